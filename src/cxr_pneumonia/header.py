"""What a DICOM header declares about its image, and the declarations that rule it out.

The model reads frontal chest radiographs. A DICOM header often says outright that an image is
something else: a lateral or oblique view (View Position ``LL``, ``RL``, ``LLO``, ``RLO``, or
free text such as ``LATERAL``), another modality (CT, MR, ultrasound...) or another body part
(a knee, a hand). A PACS study of the chest usually holds a frontal and a lateral image side by
side, so a folder exported from one brings laterals with it. Such a declaration is certain where
the input gate's score is a judgement, so :meth:`cxr_pneumonia.predict.Run.classify_preprocessed`
rejects the image on it and its reason quotes the attribute.

Only what the header states rules an image out: an absent, empty or unfamiliar value rules out
nothing, and the gate still judges the pixels. Decubitus views (``RLD``, ``LLD``) are frontal
projections of a patient lying on one side and pass.

The header's Patient's Age (0010,1010) rules nothing out, but an age outside the training
patients' (:func:`age_note`; Kermany's children were 1-5 years old) marks the prediction unusual:
a chest X-ray of an adult is the image the model was built for, of a population it never saw.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "AGE_NOTE_MARK",
    "REASON_PREFIX",
    "DicomHeader",
    "age_note",
    "declared_age_years",
    "has_age_note",
    "is_header_reason",
    "rejection_reason",
]

REASON_PREFIX = "the DICOM header declares"  # how every reason of rejection_reason begins
AGE_NOTE_MARK = "in the DICOM header is outside the ages of the patients"  # in every age_note

# View Position (0018,5101) values that are not frontal projections: the defined terms, and LAT.
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO", "LAT"})
# Free text written there instead (measured in real headers, bench/header_eval.py: LATERAL, LARGE
# LATERAL, Spanish OBLICUA): a value with one of these words is not frontal, unless it is a
# decubitus view (a frontal projection of a patient lying on one side).
NOT_FRONTAL_WORDS = ("LATERAL", "OBLI")
# Modality (0008,0060) codes that are not projection radiographs. CR, DX and the non-standard DR
# pass, and so do OT (other: secondary captures of films) and any code not listed.
NOT_RADIOGRAPH_MODALITIES = {
    "BMD": "bone densitometry",
    "CT": "CT",
    "ECG": "ECG",
    "ES": "endoscopy",
    "GM": "general microscopy",
    "IO": "intra-oral radiography",
    "IVOCT": "intravascular OCT",
    "IVUS": "intravascular ultrasound",
    "MG": "mammography",
    "MR": "MR",
    "NM": "nuclear medicine",
    "OCT": "optical coherence tomography",
    "OP": "ophthalmic photography",
    "OPT": "ophthalmic tomography",
    "PT": "PET",
    "PX": "panoramic dental radiography",
    "RF": "fluoroscopy",
    "RTDOSE": "radiotherapy dose",
    "RTIMAGE": "radiotherapy portal image",
    "SEG": "segmentation",
    "SM": "slide microscopy",
    "US": "ultrasound",
    "XA": "X-ray angiography",
    "XC": "external-camera photography",
}
# Body Part Examined (0018,0015) defined terms (DICOM PS3.16 Annex L) of regions a projection
# radiograph shows instead of the chest. The list rules out; it does not define the chest, because
# headers in the wild also say THORAX, LUNG, PORT CHEST or nothing.
NOT_CHEST_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ACJOINT", "ANKLE", "ARM", "BRAIN", "BREAST", "CALCANEUS", "CERVIX",
    "CLAVICLE", "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FACE", "FEMUR", "FINGER", "FOOT", "FOREARM",
    "HAND", "HEAD", "HEEL", "HIP", "HUMERUS", "JAW", "KNEE", "KUB", "LEG", "LOWERLIMB", "LSPINE",
    "MANDIBLE", "NECK", "ORBIT", "PATELLA", "PELVIS", "SACRUM", "SCAPULA", "SHOULDER", "SINUS",
    "SKULL", "SSPINE", "THUMB", "TIBIA", "TMJ", "TOE", "TSPINE", "UPPERLIMB", "WRIST",
})  # fmt: skip


@dataclass(frozen=True)
class DicomHeader:
    """The header attributes that say what an image shows; ``""`` where the header is silent.

    ``view_position``: View Position (0018,5101); ``view``: the code meaning of the View Code
    Sequence (0054,0220), which digital radiographs (DX) may carry instead; ``patient_age``:
    Patient's Age (0010,1010) as written (``045Y``, ``018M``...).
    """

    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    view: str = ""
    patient_age: str = ""

    @classmethod
    def from_dataset(cls, ds: Any) -> DicomHeader:
        """The attributes of a pydicom dataset; a malformed one counts as absent (the header is
        evidence only where it is legible)."""
        return cls(
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            view_position=_text(ds, "ViewPosition"),
            view=_view_code_meaning(ds),
            patient_age=_text(ds, "PatientAge"),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DicomHeader | None:
        """The header :meth:`to_json` wrote; None for ``""`` (not a DICOM)."""
        return cls(**json.loads(text)) if text else None


def rejection_reason(header: DicomHeader | None) -> str | None:
    """Why the header rules its image out for a frontal chest X-ray model; None when it does not
    (or there is no header: PNG and JPEG files)."""
    if header is None:
        return None
    modality = _code(header.modality)
    if modality in NOT_RADIOGRAPH_MODALITIES:
        name = NOT_RADIOGRAPH_MODALITIES[modality]
        spelled = f" ({name})" if name != modality else ""
        return f"{REASON_PREFIX} Modality {modality}{spelled}, not a chest radiograph"
    body_part = _code(header.body_part)
    if body_part in NOT_CHEST_BODY_PARTS:
        return f"{REASON_PREFIX} Body Part Examined {header.body_part.strip()}, not the chest"
    view_position = _code(header.view_position)
    if view_position in NOT_FRONTAL_VIEWS or _names_a_side_view(view_position):
        return (
            f"{REASON_PREFIX} View Position {header.view_position.strip().upper()}, not a frontal "
            "(PA or AP) view; the model reads frontal chest X-rays"
        )
    if _names_a_side_view(_code(header.view)):
        return (
            f"{REASON_PREFIX} the view {header.view.strip()!r}, not a frontal (PA or AP) "
            "view; the model reads frontal chest X-rays"
        )
    return None


# Age String (DICOM PS3.5 VR AS): three digits and a unit. Writers in the wild drop the padding
# and the unit too (every one of the RSNA challenge's 26,684 headers says "43", not "043Y":
# bench/header_eval.py); a bare number is read as years, as viewers read it.
_AGE_STRING = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def declared_age_years(header: DicomHeader | None) -> float | None:
    """The Patient's Age in years; None when there is no header, no age or an illegible one."""
    if header is None:
        return None
    match = _AGE_STRING.match(header.patient_age.strip().upper())
    if not match or int(match.group(1)) == 0:  # "000Y" stands for an unknown age in many exports
        return None
    return int(match.group(1)) * _YEARS_PER_UNIT[match.group(2) or "Y"]


def age_note(header: DicomHeader | None, age_years: Sequence[float] | None) -> str | None:
    """Why the declared age makes the prediction unusual: it lies outside ``age_years`` (the
    training patients' ages, ``[youngest, oldest]``); None when it lies inside, or either is
    unknown. The last year counts whole: a child of 5 years and 11 months is 5."""
    age = declared_age_years(header)
    if age is None or not age_years:
        return None
    youngest, oldest = float(age_years[0]), float(age_years[1])
    if youngest <= age < oldest + 1:
        return None
    # Not REASON_PREFIX: that begins the reasons that reject (is_header_reason); this one marks.
    return (
        f"Patient's Age {header.patient_age.strip()} {AGE_NOTE_MARK} this model was trained on "
        f"({youngest:g}-{oldest:g} years); its figures may not hold"
    )


def has_age_note(reason: str | None) -> bool:
    """Whether a prediction's ``reason`` carries :func:`age_note`'s mark."""
    return bool(reason) and AGE_NOTE_MARK in reason


def is_header_reason(reason: str | None) -> bool:
    """Whether a prediction's ``reason`` is one of :func:`rejection_reason`'s."""
    return bool(reason) and reason.startswith(REASON_PREFIX)


def _names_a_side_view(code: str) -> bool:
    return any(word in code for word in NOT_FRONTAL_WORDS) and "DECUB" not in code


def _code(value: str) -> str:
    """A code string compared as DICOM writes defined terms: upper case, no spaces or separators."""
    return "".join(ch for ch in value.upper() if ch.isalnum())


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom parses lazily: a malformed element raises only when read
        return ""
    if value is None or isinstance(value, str | bytes):
        return value.decode("latin-1") if isinstance(value, bytes) else (value or "")
    # A multi-valued element (backslash-separated in the file) reads as its values joined.
    return "\\".join(map(str, value)) if isinstance(value, Iterable) else str(value)


def _view_code_meaning(ds: Any) -> str:
    try:
        sequence = ds.get("ViewCodeSequence")
        return str(sequence[0].get("CodeMeaning") or "") if sequence else ""
    except Exception:  # as in _text
        return ""
