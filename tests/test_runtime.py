"""Keras and OpenVINO behind one call (the OpenVINO side is exercised in test_export.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_pneumonia import runtime
from cxr_pneumonia.rundir import RunError


def test_unknown_runtime_is_refused_listing_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"unknown runtime 'tpu'; valid: \['auto', 'keras', 'openvino'\]"):
        runtime.load_runtime(tmp_path, "tpu")  # type: ignore[arg-type]


def test_auto_without_export_is_keras_and_matches_the_model(tiny_run: Path) -> None:
    loaded = runtime.load_runtime(tiny_run, "auto")
    assert loaded.info == {"backend": "keras", "precision": "fp32", "reason": "no export"}
    assert loaded.keras_loaded, "a broken model.keras must fail at load time"
    size = loaded.keras_model.input.shape[1]
    x = np.random.default_rng(0).uniform(0, 255, (3, size, size, 1)).astype(np.float32)
    p = loaded(x)
    assert p.dtype == np.float32 and p.shape == (3,)
    np.testing.assert_allclose(p, np.asarray(loaded.keras_model(x)).reshape(-1), atol=1e-6)


def test_gpu_probe_reads_proc_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime, "Path", lambda _: tmp_path / "gpus")
    assert not runtime.nvidia_gpu_present()
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert runtime.nvidia_gpu_present()
