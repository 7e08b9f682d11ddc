"""What a DICOM header declares, read by io and acted on by every entry point that classifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from conftest import DECLARED_VIEWS, chest_dicom_bytes
from cxr_pneumonia.header import DicomHeader, age_note, declared_age_years, is_header_reason, rejection_reason
from cxr_pneumonia.io import load_image, load_image_and_header, load_image_bytes_and_header


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (DicomHeader(), None),
        (DicomHeader("CR", "CHEST", "PA"), None),
        (DicomHeader("DX", "CHEST", "AP"), None),
        # Decubitus views are frontal projections of a patient lying on one side.
        (DicomHeader("DX", "CHEST", "RLD"), None),
        (DicomHeader("CR", "", "", "postero-anterior"), None),
        (DicomHeader("DX", "", "", "left lateral decubitus"), None),
        # Headers in the wild: other words for the chest, secondary captures, unknown codes.
        (DicomHeader("OT", "THORAX", ""), None),
        (DicomHeader("CR", "PORT CHEST", "PA"), None),
        (DicomHeader("XR", "LUNG", "AP"), None),
        (DicomHeader("CR", "CHEST", "LL"), "View Position LL, not a frontal (PA or AP) view"),
        (DicomHeader("CR", "CHEST", " rl "), "View Position RL, not a frontal"),
        (DicomHeader("DX", "CHEST", "RLO"), "View Position RLO, not a frontal"),
        (DicomHeader("DX", "CHEST", "Lateral"), "View Position LATERAL, not a frontal"),
        # Free text found in real headers (PadChest, Indiana: bench/header_eval.py).
        (DicomHeader("CR", "CHEST", "LARGE LATERAL"), "View Position LARGE LATERAL, not a frontal"),
        (DicomHeader("CR", "", "OBLICUA"), "View Position OBLICUA, not a frontal"),
        (DicomHeader("CR", "", "POSTEROANTERIOR"), None),
        (DicomHeader("CR", "", "ANTEROPOSTERIOR"), None),
        (DicomHeader("CR", "", "GENERICA"), None),
        (DicomHeader("DX", "CHEST", "LATERAL DECUBITUS"), None),
        (DicomHeader("DX", "CHEST", "", "left lateral"), "the view 'left lateral', not a frontal"),
        (DicomHeader("DX", "", "", "Right Anterior Oblique"), "the view 'Right Anterior Oblique'"),
        (DicomHeader("CR", "KNEE", "AP"), "Body Part Examined KNEE, not the chest"),
        (DicomHeader("CR", "EXTREMITY", "AP"), "Body Part Examined EXTREMITY, not the chest"),
        (DicomHeader("DX", "C-SPINE", "AP"), "Body Part Examined C-SPINE, not the chest"),
        (DicomHeader("CT", "CHEST", ""), "Modality CT, not a chest radiograph"),
        (DicomHeader("us", "", ""), "Modality US (ultrasound), not a chest radiograph"),
        (DicomHeader("RTIMAGE", "CHEST", "AP"), "Modality RTIMAGE (radiotherapy portal image)"),
        # The modality decides first: a mammogram is not a chest X-ray, whatever its view says.
        (DicomHeader("MG", "BREAST", "LL"), "Modality MG (mammography)"),
    ],
)
def test_rejection_reason_known_answers(header: DicomHeader | None, expected: str | None) -> None:
    reason = rejection_reason(header)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason and reason.startswith("the DICOM header declares")


def test_header_is_read_from_a_dataset_and_survives_json() -> None:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "LL"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10232", "SRT", "left lateral"
    ds.ViewCodeSequence = [code]
    ds.PatientAge = "045Y"
    header = DicomHeader.from_dataset(ds)
    assert header == DicomHeader("DX", "CHEST", "LL", "left lateral", "045Y")
    assert DicomHeader.from_json(header.to_json()) == header
    # a header saved before the age was read (the Ray engine's JSON column) still loads
    old = '{"body_part": "CHEST", "modality": "DX", "view": "", "view_position": "PA"}'
    assert DicomHeader.from_json(old) == DicomHeader("DX", "CHEST", "PA")
    assert DicomHeader.from_json("") is None
    assert DicomHeader.from_dataset(Dataset()) == DicomHeader()
    multi = Dataset()
    multi.BodyPartExamined = ["CHEST", "ABDOMEN"]  # two values: neither alone is the body part
    assert DicomHeader.from_dataset(multi).body_part == "CHEST\\ABDOMEN"
    assert rejection_reason(DicomHeader.from_dataset(multi)) is None


def test_io_returns_the_header_of_a_dicom_and_none_for_other_formats(
    tmp_path: Path, sample_dir: Path
) -> None:
    jpeg = sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]
    image, header = load_image_and_header(jpeg)
    assert header is None
    path = tmp_path / "lateral.dcm"
    path.write_bytes(chest_dicom_bytes(image, **DECLARED_VIEWS["lateral_ll.dcm"]))
    pixels, header = load_image_and_header(path)
    assert header == DicomHeader("CR", "CHEST", "LL")
    # The header travels beside the pixels; it does not change them.
    np.testing.assert_array_equal(pixels, image)
    np.testing.assert_array_equal(load_image(path), image)
    assert load_image_bytes_and_header(path.read_bytes(), name="x.dcm")[1] == header


def _pydicom_data_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is in pydicom-data (the dev extra), which is not installed")
    return Path(path)


@pytest.mark.filterwarnings("ignore:.*MONOCHROME1")
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RG1_UNCR.dcm", None),  # an adult chest radiograph, CR, CHEST, PA
        ("RG3_UNCR.dcm", "Body Part Examined EXTREMITY"),  # a lower leg
        ("CT_small.dcm", "Modality CT"),
        ("MR_small.dcm", "Modality MR"),
        ("US1_UNCR.dcm", "Modality US"),
    ],
)
def test_real_headers_of_pydicom_test_files(name: str, expected: str | None) -> None:
    _, header = load_image_and_header(_pydicom_data_file(name))
    reason = rejection_reason(header)
    assert reason is None if expected is None else expected in reason


def test_a_malformed_attribute_counts_as_absent() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = Dataset()
    ds.Modality = "CT"
    # View Position stored as 16-bit integers in 3 bytes: pydicom parses an element when it is
    # first read, so this raises only then, as in a damaged file.
    tag = Tag(0x00185101)
    ds._dict[tag] = RawDataElement(tag, "US", 3, b"LL ", 0, False, True)
    with pytest.raises(Exception, match="even multiple"):
        ds.get("ViewPosition")
    header = DicomHeader.from_dataset(ds)
    assert header.view_position == "" and header.modality == "CT"


# --- every entry point that classifies acts on the header --------------------------------------

REJECTED_BY_HEADER = {
    "lateral_ll.dcm": "View Position LL",
    "knee.dcm": "Body Part Examined KNEE",
    "ct.dcm": "Modality CT",
}


def _by_name(predictions: list) -> dict[str, object]:
    return {Path(p.path).name: p for p in predictions}


def test_predict_rejects_what_the_header_declares_and_nothing_else(
    tiny_run: Path, declared_views_dir: Path, sample_dir: Path
) -> None:
    from cxr_pneumonia.api import predict

    jpeg = sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]
    [reference] = predict(tiny_run, [jpeg])
    assert reference.status == "ok"  # the gate accepts these pixels
    found = _by_name(predict(tiny_run, [declared_views_dir]))
    assert sorted(found) == sorted(DECLARED_VIEWS)
    frontal = found.pop("frontal_pa.dcm")
    assert (frontal.status, frontal.reason) == (reference.status, reference.reason)
    assert frontal.probability == pytest.approx(reference.probability, abs=1e-6)
    for name, prediction in found.items():
        assert prediction.status == "rejected" and prediction.gated, name
        assert prediction.probability is None and prediction.label is None, name
        assert REJECTED_BY_HEADER[name] in prediction.reason, name
        # Same pixels, same gate score: the header, not the image, ruled it out.
        assert prediction.domain_score == pytest.approx(frontal.domain_score, abs=1e-6), name

    classified = _by_name(predict(tiny_run, [declared_views_dir], gate=False))
    for name in REJECTED_BY_HEADER:
        prediction = classified[name]
        assert prediction.status == "rejected" and not prediction.gated
        assert prediction.probability == pytest.approx(frontal.probability, abs=1e-6)
        assert prediction.reason.endswith("(classified anyway: gate off)")
        assert REJECTED_BY_HEADER[name] in prediction.reason


def test_a_run_without_a_gate_still_acts_on_the_header(ungated_run: Path, declared_views_dir: Path) -> None:
    from cxr_pneumonia.api import predict

    found = _by_name(predict(ungated_run, [declared_views_dir]))
    assert found["frontal_pa.dcm"].status == "ok" and not found["frontal_pa.dcm"].gated
    lateral = found["lateral_ll.dcm"]
    assert (lateral.status, lateral.probability, lateral.domain_score) == ("rejected", None, None)
    assert lateral.gated and "View Position LL" in lateral.reason


def test_explain_draws_no_heatmap_for_a_declared_lateral(
    tiny_run: Path, declared_views_dir: Path, tmp_path: Path
) -> None:
    from cxr_pneumonia import explain
    from cxr_pneumonia.predict import Run

    run = Run.load(tiny_run)
    paths = [declared_views_dir / "frontal_pa.dcm", declared_views_dir / "lateral_ll.dcm"]
    frontal, lateral = explain.explain_paths(run, paths, tmp_path)
    assert frontal.output is not None and frontal.output.is_file() and not frontal.rejected
    assert lateral.output is None and lateral.rejected and "View Position LL" in lateral.error


def test_serve_answers_a_declared_lateral_with_a_rejection(tiny_run: Path, declared_views_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from cxr_pneumonia import serve
    from cxr_pneumonia.predict import Run

    def post(client: TestClient, name: str, query: str = "") -> dict:
        files = {"file": (name, (declared_views_dir / name).read_bytes(), "application/dicom")}
        response = client.post(f"/v1/predict{query}", files=files)
        assert response.status_code == 200, response.text
        return response.json()

    with TestClient(serve.create_app(Run.load(tiny_run))) as client:
        frontal, lateral = post(client, "frontal_pa.dcm"), post(client, "lateral_ll.dcm")
        assert frontal["status"] == "ok" and frontal["probability"] is not None
        assert lateral["status"] == "rejected" and lateral["probability"] is None
        assert "View Position LL" in lateral["reason"]
        anyway = post(client, "lateral_ll.dcm", "?gate=false")
        assert anyway["probability"] == pytest.approx(frontal["probability"], abs=1e-6)
        assert anyway["reason"].endswith("(classified anyway: gate off)")


def test_evaluate_and_calibrate_leave_out_what_the_header_rules_out(
    tiny_run: Path, declared_views_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from cxr_pneumonia.evaluation import scored_images
    from cxr_pneumonia.predict import Run

    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(declared_views_dir, data / label)
    table, accepted, failures = scored_images(Run.load(tiny_run), data)
    assert failures == [] and len(table) == 8
    assert sorted(Path(p).name for p in accepted["path"]) == ["frontal_pa.dcm"] * 2
    lateral = table[table["path"].str.endswith("lateral_ll.dcm")]
    assert (lateral["status"] == "rejected").all()
    assert lateral["reason"].str.contains("View Position LL").all()


def test_training_and_preprocess_leave_out_what_the_header_rules_out(
    declared_views_dir: Path, tmp_path: Path
) -> None:
    from cxr_pneumonia.batch import cache_images, preprocess_tree
    from cxr_pneumonia.preprocess import PreprocessConfig

    cfg = PreprocessConfig(size=64)
    paths = [declared_views_dir / name for name in sorted(DECLARED_VIEWS)]
    cached, report = cache_images(paths, cfg, tmp_path / "cache", workers=1, progress=False)
    assert [p is not None for p in cached] == [name == "frontal_pa.dcm" for name in sorted(DECLARED_VIEWS)]
    reasons = dict(report.failures)
    assert sorted(Path(p).name for p in reasons) == sorted(REJECTED_BY_HEADER)
    for path, reason in reasons.items():
        assert reason.startswith("left out: the DICOM header declares")
        assert REJECTED_BY_HEADER[Path(path).name] in reason

    report = preprocess_tree(declared_views_dir, tmp_path / "out", cfg, workers=1, progress=False)
    assert len(report.failures) == 3 and len(report.processed) == 1
    assert "View Position LL" in (tmp_path / "out" / "failures.csv").read_text()


def test_inspect_lists_what_the_header_rules_out(declared_views_dir: Path, tmp_path: Path) -> None:
    import shutil

    from cxr_pneumonia.data import format_report, inspect_dataset

    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(declared_views_dir, tmp_path / "data" / label)
    report = inspect_dataset(tmp_path / "data", workers=1)
    assert report.unreadable == [] and report.n_images == 8
    found = sorted((Path(p).parent.name, Path(p).name) for p, _ in report.declared_not_frontal)
    assert found == [
        (label, name) for label in ("NORMAL", "PNEUMONIA") for name in sorted(REJECTED_BY_HEADER)
    ]
    assert all(REJECTED_BY_HEADER[Path(p).name] in reason for p, reason in report.declared_not_frontal)
    text = format_report(report)
    assert "Not frontal chest X-rays by their DICOM header (train leaves them out): 6" in text
    assert "NORMAL/lateral_ll.dcm: the DICOM header declares View Position LL" in text
    assert report.to_dict()["declared_not_frontal"][0][0] == report.declared_not_frontal[0][0]


def test_a_dicom_export_is_read_as_a_folder_and_its_headers_are_believed(
    tiny_run: Path, tmp_path: Path
) -> None:
    """pydicom's own DICOMDIR test tree, laid out as exported media: two DICOMDIR indexes, CT and
    MR series and three cervical-spine radiographs (one lateral), many stripped of their pixels."""
    import shutil
    import warnings

    from pydicom.data import get_testdata_file

    from cxr_pneumonia.api import predict
    from cxr_pneumonia.io import holds_no_image, list_image_files

    export = tmp_path / "export"
    shutil.copytree(Path(get_testdata_file("DICOMDIR", download=False)).parent, export)
    listed = list_image_files(export)
    assert len(list(export.rglob("DICOMDIR"))) == 2
    assert not [p for p in listed if p.name == "DICOMDIR"]  # an index, not an image
    # the same indexes under other names are skipped by what they are (they were errors)
    renamed = [p for p in export.rglob("DICOMDIR?*") if holds_no_image(p)]
    assert len(renamed) >= 2 and {holds_no_image(p) for p in renamed} == {"Media Storage Directory Storage"}
    assert not set(renamed) & set(listed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on these old test files
        predictions = predict(tiny_run, [export])
    assert len(predictions) == len(listed)
    errors = [p for p in predictions if p.status == "error"]
    # The test images stripped of their pixels are broken images: errors that say what they are.
    assert {p.error for p in errors} == {"no pixel data in this CT Image Storage object"}
    images = [p for p in predictions if p.status != "error"]
    assert len(images) == 31 and all(p.status == "rejected" for p in images)
    spine = [p for p in images if "Body Part Examined CSPINE" in p.reason]
    assert sorted(Path(p.path).parent.name for p in spine) == ["CR1", "CR2", "CR3"]
    assert all("Modality MR" in p.reason or "Modality CT" in p.reason for p in images if p not in spine)


def test_predict_from_the_cli_says_how_many_the_headers_rejected(
    tiny_run: Path, declared_views_dir: Path, tmp_path: Path, capsys
) -> None:
    from cxr_pneumonia.cli import EXIT_OK, main

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tiny_run), str(declared_views_dir), "--out", str(out)]) == EXIT_OK
    err = capsys.readouterr().err
    assert (
        "3 of 4 images rejected: not like the frontal chest X-rays this model was trained on, 3 of them"
        in err
    )
    assert "by their DICOM header" in err and "Traceback" not in err
    assert main(["predict", str(tiny_run), str(declared_views_dir), "--no-gate"]) == EXIT_OK
    assert "3 of 4 images are not like the frontal chest X-rays this model was trained on, 3 of them" in (
        capsys.readouterr().err
    )


# ---- the declared age --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "years", "outside_1_to_5"),
    [
        ("", None, False),
        ("unknown", None, False),
        ("45", 45.0, True),  # no unit (the RSNA challenge's headers): years
        ("4", 4.0, False),
        ("45 years", None, False),  # free text: illegible, so it says nothing
        ("-3Y", None, False),
        ("000Y", None, False),  # a placeholder for an unknown age in many exports
        ("0", None, False),
        ("003Y", 3.0, False),
        ("005Y", 5.0, False),
        ("071M", 71 / 12, False),  # 5 years 11 months: still five
        ("072M", 6.0, True),
        ("006Y", 6.0, True),
        ("011M", 11 / 12, True),
        ("010D", 10 / 365.25, True),
        ("052W", 52 * 7 / 365.25, True),  # 364 days: not yet one
        ("045Y", 45.0, True),
        (" 45y ", 45.0, True),
    ],
)
def test_declared_age_known_answers(age: str, years: float | None, outside_1_to_5: bool) -> None:
    header = DicomHeader("CR", "CHEST", "PA", patient_age=age)
    assert declared_age_years(header) == (pytest.approx(years) if years is not None else None)
    note = age_note(header, [1.0, 5.0])
    assert (note is not None) == outside_1_to_5
    if note is not None:
        assert note.startswith(f"Patient's Age {age.strip()} in the DICOM header is outside")
        assert "(1-5 years)" in note and not is_header_reason(note)  # it marks; it does not reject
    assert age_note(header, None) is None  # a run that does not know its patients' ages marks nothing


def test_the_training_population_is_known_only_for_kermany_files() -> None:
    from cxr_pneumonia.data import training_population

    names = ["person1_virus_6.jpeg", "IM-0115-0001.jpeg", "NORMAL2-IM-0115-0001.jpeg"]
    assert training_population(names, ["person1", "IM-0115", "NORMAL2-IM-0115"]) == {
        "age_years": [1.0, 5.0],
        "basis": "every training file is named as in Kermany et al. 2018, whose patients were 1-5 years old",
    }
    assert training_population(["person1_virus_6.jpeg", "0001.png"], ["person1", "site_b/0001.png"]) is None
    # a DICOM viewer's export names its files like Kermany's: IM-0001-0001.dcm
    assert training_population(["IM-0001-0001.dcm"], ["IM-0001"]) is None
    assert training_population([], []) is None


def test_a_declared_adult_is_classified_and_marked_unusual(
    tiny_run: Path, ungated_run: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """Kermany's patients were children of 1-5 years; an adult's chest X-ray is the kind of image
    the model reads, of a population it never saw. The age marks it; it rules nothing out."""
    from cxr_pneumonia.api import predict

    config = json.loads((tiny_run / "config.json").read_text())
    assert config["data"]["population"]["age_years"] == [1.0, 5.0]  # the sample's Kermany names
    image = load_image(sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0])
    for name, age in (("child.dcm", "003Y"), ("adult.dcm", "045Y"), ("silent.dcm", "")):
        attributes = {"PatientAge": age} if age else {}
        (tmp_path / name).write_bytes(
            chest_dicom_bytes(image, Modality="CR", ViewPosition="PA", **attributes)
        )
    for run in (tiny_run, ungated_run):
        found = _by_name(predict(run, [tmp_path]))
        child, adult, silent = found["child.dcm"], found["adult.dcm"], found["silent.dcm"]
        assert (child.status, child.unusual, child.reason) == (silent.status, silent.unusual, silent.reason)
        assert adult.status == "ok" and adult.unusual and adult.probability == child.probability
        assert adult.reason.startswith(
            "Patient's Age 045Y in the DICOM header is outside the ages of the patients this model "
            "was trained on (1-5 years); its figures may not hold"
        )
        # the input check's own verdict stays in the reason where there is one
        assert adult.reason.endswith(f"; input check: {child.reason}" if child.reason else "may not hold")
    # a declared lateral of an adult, classified with the gate off: the rejection stays first and
    # is still counted as the header's
    (tmp_path / "adult_lateral.dcm").write_bytes(
        chest_dicom_bytes(image, Modality="CR", ViewPosition="LL", PatientAge="045Y")
    )
    [lateral] = predict(tiny_run, [tmp_path / "adult_lateral.dcm"], gate=False)
    assert lateral.status == "rejected" and lateral.unusual and is_header_reason(lateral.reason)
    assert lateral.reason.startswith("the DICOM header declares View Position LL")
    assert "(classified anyway: gate off); Patient's Age 045Y in the DICOM header" in lateral.reason
    [gated] = predict(tiny_run, [tmp_path / "adult_lateral.dcm"])
    assert gated.probability is None and "Patient's Age" not in gated.reason  # nothing shown, nothing marked


def test_a_run_with_a_malformed_population_is_refused_at_load(
    tiny_run: Path, make_run_copy, tmp_path: Path
) -> None:
    from cxr_pneumonia.predict import Run, RunError

    for bad in ([5], {"youngest": 1}, [5, 1], ["1", "5"], [True, 5]):
        run = make_run_copy(tiny_run, tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        config = json.loads((run / "config.json").read_text())
        config["data"]["population"] = {"age_years": bad}
        (run / "config.json").write_text(json.dumps(config))
        with pytest.raises(RunError, match=r"config\.json: data\.population\.age_years must be"):
            Run.load(run)
    config["data"]["population"] = None  # a run on other data records none: nothing is marked
    (run / "config.json").write_text(json.dumps(config))
    assert Run.load(run).population_age is None


def test_evaluate_counts_the_declared_adults_with_or_without_a_gate(
    tiny_run: Path, ungated_run: Path, sample_dir: Path, tmp_path: Path, capsys
) -> None:
    import warnings

    from cxr_pneumonia.api import evaluate

    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i, path in enumerate(sorted((sample_dir / "test" / label).glob("*.jpeg"))[:3]):
            age = "045Y" if i == 0 else "004Y"
            (tmp_path / "data" / label / f"{i}.dcm").write_bytes(
                chest_dicom_bytes(load_image(path), Modality="CR", ViewPosition="PA", PatientAge=age)
            )
    for run in (tiny_run, ungated_run):
        out = tmp_path / f"eval-{run.parent.name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a tiny sample: one class may be missing
            metrics = evaluate(run, tmp_path / "data", out, n_bootstrap=0, heatmaps=False, gate=False)
        assert metrics["n_age_outside"] == 2
        assert (
            "2 image(s) of patients whose DICOM header declares an age outside"
            in (out / "report.html").read_text()
        )
    from cxr_pneumonia.cli import main

    argv = [
        "evaluate",
        str(ungated_run),
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "cli"),
        "--bootstrap",
        "0",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
    assert "2 images whose DICOM header declares an age outside" in capsys.readouterr().out
