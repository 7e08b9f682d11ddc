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
