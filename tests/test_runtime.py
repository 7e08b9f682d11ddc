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


# ---- the input gate ----------------------------------------------------------------------------


def test_features_come_with_the_same_probabilities_in_one_pass(tiny_run: Path) -> None:
    loaded = runtime.load_runtime(tiny_run, "keras")
    assert loaded.gate is not None and loaded.gate.layers
    size = loaded.keras_model.input.shape[1]
    x = np.random.default_rng(1).uniform(0, 255, (4, size, size, 1)).astype(np.float32)
    p, features = loaded.features(x)
    np.testing.assert_array_equal(p, loaded(x))  # gate on or off: identical probabilities
    assert len(features) == len(loaded.gate.layers) + 1  # the depths, then the symmetry grid
    assert features[-1].shape == (4, loaded.gate.cfg.symmetry_grid**2)
    assert all(f.dtype == np.float64 and f.shape[0] == 4 for f in features)
    assert np.isfinite(loaded.gate.score(features)).all()


def test_a_run_without_gate_loads_with_one_warning(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old, ignore=shutil.ignore_patterns("gate"))
    with caplog.at_level("WARNING"):
        loaded = runtime.load_runtime(old, "keras")
    assert loaded.gate is None
    warnings = [r.getMessage() for r in caplog.records if "domain model" in r.getMessage()]
    assert warnings == [f"{old}: {runtime.NO_GATE_WARNING}"]
    assert "cxr-pneumonia gate RUN" in runtime.NO_GATE_WARNING


def test_an_unreadable_gate_is_a_run_error(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "gate" / "gate.npz").write_bytes(b"not an npz")
    with pytest.raises(RunError, match="no readable gate"):
        runtime.load_runtime(broken, "keras")


@pytest.mark.parametrize(
    ("file", "why"),
    [("gate.npz", "File is not a zip file"), ("gate.json", "lacks n_val")],
    ids=["npz-cut", "json-without-n_val"],
)
def test_a_damaged_gate_is_one_error_line_naming_the_file(
    tiny_run: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, why: str
) -> None:
    import json
    import shutil

    from cxr_pneumonia.cli import EXIT_USAGE, main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    damaged = broken / "gate" / file
    if file == "gate.npz":  # a copy that stopped half-way
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    else:  # a hand-edited one
        meta = json.loads(damaged.read_text())
        del meta["n_val"]
        damaged.write_text(json.dumps(meta))
    with pytest.raises(RunError, match=f"^{damaged}: no readable gate \\({why}\\)"):
        runtime.load_runtime(broken, "keras")
    image = sorted((sample_dir / "test" / "NORMAL").iterdir())[0]
    out = tmp_path / "p.csv"
    assert main(["predict", str(broken), str(image), "--runtime", "keras", "-o", str(out)]) == EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {damaged}: no readable gate")
    assert not out.exists()
