"""The run-directory contract: metadata written and read back, completeness, export staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_pneumonia import rundir
from cxr_pneumonia.data import CLASS_NAMES
from cxr_pneumonia.model import ModelConfig
from cxr_pneumonia.preprocess import PreprocessConfig
from cxr_pneumonia.rundir import RunError


def test_metadata_round_trip(tmp_path: Path) -> None:
    threshold = {"threshold": 0.25, "rule": "max_specificity"}
    rundir.write_metadata(
        tmp_path,
        preprocess_cfg=PreprocessConfig(),
        model_cfg=ModelConfig(),
        threshold=threshold,
        extra={"x": 1},
    )
    config = rundir.read_config(tmp_path)
    assert config["class_names"] == list(CLASS_NAMES) and config["x"] == 1 and config["train"] is None
    assert config["preprocess"]["size"] == PreprocessConfig().size
    assert rundir.read_threshold(tmp_path) == threshold
    assert rundir.read_metrics_val(tmp_path) is None


def test_incomplete_run_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / rundir.CONFIG_FILE).write_text("{}")
    with pytest.raises(RunError, match=r"missing model\.keras, threshold\.json"):
        rundir.check_complete(tmp_path)
    assert not rundir.is_complete(tmp_path)
    for name in rundir.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    rundir.check_complete(tmp_path)
    assert rundir.is_complete(tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "reason"),
    [
        (rundir.THRESHOLD_FILE, "{", "not valid JSON (Expecting property name"),
        (rundir.THRESHOLD_FILE, "[0.5]", "not a JSON object"),
        (rundir.THRESHOLD_FILE, '{"threshold": "0.5"}', "no threshold between 0 and 1 (found '0.5')"),
        (rundir.THRESHOLD_FILE, '{"threshold": 1.5}', "no threshold between 0 and 1 (found 1.5)"),
        (rundir.CONFIG_FILE, "\xff", "not valid JSON ('utf-8' codec can't decode"),
    ],
)
def test_a_damaged_run_file_is_a_run_error_naming_it(
    tmp_path: Path, file: str, content: str, reason: str
) -> None:
    rundir.write_metadata(
        tmp_path, preprocess_cfg=PreprocessConfig(), model_cfg=ModelConfig(), threshold={"threshold": 0.3}
    )
    (tmp_path / file).write_bytes(content.encode("latin-1"))
    with pytest.raises(RunError) as info:
        rundir.read_threshold(tmp_path) if file == rundir.THRESHOLD_FILE else rundir.read_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / file}: {reason}")


def test_an_operating_point_without_a_threshold_is_a_run_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / rundir.OPERATING_POINTS_FILE).write_text(json.dumps({"points": {"site-a": {"rule": "x"}}}))
    with pytest.raises(RunError, match=r"operating_points\.json: operating point 'site-a': no threshold"):
        rundir.read_operating_points(tmp_path)


def test_predict_on_a_damaged_run_is_a_one_line_error(
    tiny_run: Path, sample_dir: Path, tmp_path: Path, capsys
) -> None:
    """It was a JSONDecodeError traceback (predict, evaluate, explain, calibrate load runs alike)."""
    from conftest import copy_run
    from cxr_pneumonia.cli import EXIT_USAGE, main

    run = copy_run(tiny_run, tmp_path / "run")
    (run / rundir.THRESHOLD_FILE).write_text("{")
    image = sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]
    assert main(["predict", str(run), str(image)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / rundir.THRESHOLD_FILE}: not valid JSON") and "\n" not in err


def test_export_is_stale_when_model_keras_changes(tmp_path: Path) -> None:
    assert rundir.read_export_info(tmp_path) is None
    (tmp_path / rundir.MODEL_FILE).write_bytes(b"model v1")
    folder = rundir.export_dir(tmp_path)
    folder.mkdir()
    info = {"model_sha256": rundir.model_sha256(tmp_path)}
    (folder / rundir.EXPORT_INFO_FILE).write_text(json.dumps(info))
    assert rundir.read_export_info(tmp_path) is None, "export.json without model.onnx is no export"
    (folder / rundir.ONNX_FILE).write_bytes(b"onnx")
    assert rundir.read_export_info(tmp_path) == info
    assert not rundir.export_is_stale(tmp_path, info)
    (tmp_path / rundir.MODEL_FILE).write_bytes(b"model v2")  # retrained into the same folder
    assert rundir.export_is_stale(tmp_path, info)


def test_one_disclaimer_with_an_ascii_form_for_image_captions() -> None:
    from cxr_pneumonia import explain

    assert "not a medical device" in rundir.DISCLAIMER
    assert rundir.ascii_text(rundir.DISCLAIMER) == explain.CAPTION_NOTICE
    assert explain.CAPTION_NOTICE.isascii()
