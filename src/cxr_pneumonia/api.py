"""The Python API: what the CLI does, as functions.

```python
from cxr_pneumonia import api

run = api.train("chest_xray/train", "runs/xception", backbone="xception", weights="imagenet")
metrics = api.evaluate("runs/xception", "chest_xray/test", "runs/xception/eval-test")
api.export("runs/xception")  # ONNX + the OpenVINO precision plan; predict then runs on it
predictions = api.predict("runs/xception", ["scan1.dcm", "folder/"])  # gate=False: classify all
summary = api.score_archive("runs/xception", ["/archive"], "scores/")  # on Ray, resumable, Parquet
api.fit_gate("runs/old-run")  # an input gate for a run trained before gates existed
run = api.Run.load("runs/xception", runtime="keras"); probabilities = run.predict_images([img1, img2])
```
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_pneumonia import evaluation
from cxr_pneumonia.config import override
from cxr_pneumonia.export import ExportConfig, export_run
from cxr_pneumonia.model import ModelConfig
from cxr_pneumonia.predict import Prediction, Run, expand_inputs
from cxr_pneumonia.preprocess import PreprocessConfig
from cxr_pneumonia.rundir import RunError
from cxr_pneumonia.train import TrainConfig, fit_gate_for_run
from cxr_pneumonia.train import train as _train

if TYPE_CHECKING:
    from cxr_pneumonia.archive import ArchiveSummary

__all__ = [
    "ExportConfig",
    "ModelConfig",
    "PreprocessConfig",
    "Run",
    "RunError",
    "TrainConfig",
    "evaluate",
    "explain",
    "export",
    "fit_gate",
    "predict",
    "robustness",
    "score_archive",
    "train",
]


def _split_overrides(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    names = set(cls.model_fields)
    return {k: overrides.pop(k) for k in list(overrides) if k in names and overrides[k] is not None}


def train(
    data: str | Path,
    out: str | Path,
    *,
    preprocess_cfg: PreprocessConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    resume: bool = False,
    **overrides: Any,
) -> Run:
    """Train a run and load it; keyword overrides (``backbone=``, ``epochs=``, ``target_recall=`` ...) go to
    whichever config has that field."""
    model_cfg = override(model_cfg or ModelConfig(), **_split_overrides(ModelConfig, overrides))
    train_cfg = override(train_cfg or TrainConfig(), **_split_overrides(TrainConfig, overrides))
    preprocess_cfg = override(
        preprocess_cfg or PreprocessConfig(), **_split_overrides(PreprocessConfig, overrides)
    )
    if overrides:
        raise TypeError(f"unknown settings {sorted(overrides)}")
    run_dir = _train(
        data, out, preprocess_cfg=preprocess_cfg, model_cfg=model_cfg, train_cfg=train_cfg, resume=resume
    )
    return Run.load(run_dir)


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run.load(run)


def evaluate(
    run: Run | str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    heatmaps: bool = True,
    max_misclassified: int = 48,
    batch_size: int = 32,
    gate: bool = True,
) -> dict[str, Any]:
    """Evaluate a run on a labelled dataset at the run's saved threshold (see
    :func:`cxr_pneumonia.evaluation.evaluate`): the headline metrics on the images the input
    check accepts (``gate=False``: on all images), beside the all-images metrics and the
    rejections; ``heatmaps`` adds Grad-CAM of the misclassified images to the report."""
    return evaluation.evaluate(
        _as_run(run),
        data,
        out,
        split=split,
        n_bootstrap=n_bootstrap,
        seed=seed,
        overlay_for=_grad_cam_overlay() if heatmaps else None,
        max_misclassified=max_misclassified,
        batch_size=batch_size,
        gate=gate,
    )


def explain(
    run: Run | str | Path, inputs: Iterable[str | Path], out: str | Path, *, gate: bool = True
) -> list[Any]:
    """Grad-CAM overlays ``out/<stem>_gradcam.png`` for files and folders (see
    :func:`cxr_pneumonia.explain.explain_paths`); an image the input check rejects gets none
    (``rejected=True`` in its result) unless ``gate=False``."""
    from cxr_pneumonia.explain import explain_paths

    return explain_paths(_as_run(run), expand_inputs(inputs), out, gate=gate)


def _grad_cam_overlay() -> evaluation.OverlayFn | None:
    try:
        from cxr_pneumonia.explain import heatmap_overlay_for_path
    except ImportError:  # explain not available: the report shows thumbnails only
        return None
    return heatmap_overlay_for_path


def robustness(
    run: Run | str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    split: str | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """Metrics clean and under each perturbation (see :func:`cxr_pneumonia.evaluation.robustness`)."""
    return evaluation.robustness(_as_run(run), data, out, split=split, batch_size=batch_size)


def export(run_dir: str | Path, *, calibration: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Export a run (ONNX + precision plan, see :mod:`cxr_pneumonia.export`); ``overrides`` are
    :class:`ExportConfig` fields. Returns the content of ``export.json``."""
    return export_run(run_dir, ExportConfig(**overrides), calibration=calibration)


def predict(
    run: Run | str | Path, inputs: Iterable[str | Path], *, gate: bool = True, batch_size: int = 32
) -> list[Prediction]:
    """Predict files and folders (JPEG/PNG/DICOM); unreadable files come back with status
    ``error``, images unlike the training images with status ``rejected`` (and, with
    ``gate=False``, classified anyway)."""
    return _as_run(run).predict_paths(expand_inputs(inputs), batch_size=batch_size, gate=gate)


def fit_gate(run_dir: str | Path, data: str | Path | None = None, **gate_overrides: Any) -> dict[str, Any]:
    """Fit (or refit) a run's input gate on its own patient split of ``data`` (default: the data it
    was trained on), written to ``RUN/gate/``; ``gate_overrides`` are
    :class:`~cxr_pneumonia.gate.GateConfig` fields. Returns the gate's summary (gate.json)."""
    from cxr_pneumonia.config import read_json
    from cxr_pneumonia.gate import GATE_DIR, GATE_JSON

    fit_gate_for_run(run_dir, data, **gate_overrides)
    return read_json(Path(run_dir) / GATE_DIR / GATE_JSON)


def score_archive(
    run: str | Path,
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    **settings: Any,
) -> ArchiveSummary:
    """Score files and folders on Ray Data into ``out`` (Parquet with :func:`predict`'s columns;
    a rerun scores only what is missing), see :mod:`cxr_pneumonia.archive`; ``settings`` are
    :class:`~cxr_pneumonia.archive.ArchiveConfig` fields (``workers=``, ``runtime=``, ``gate=`` ...).
    Returns an :class:`~cxr_pneumonia.archive.ArchiveSummary`."""
    from cxr_pneumonia.archive import ArchiveConfig
    from cxr_pneumonia.archive import score_archive as _score_archive

    cfg = ArchiveConfig(**{k: v for k, v in settings.items() if v is not None})
    return _score_archive(run, inputs, out, cfg, address=address)
