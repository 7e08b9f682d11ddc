"""The Python API: what the CLI does, as functions.

```python
from cxr_pneumonia import api

run = api.train("chest_xray/train", "runs/default")  # MobileNetV2; backbone="xception" etc.
seed = api.train("chest_xray/train", "runs/seed", preset="seed", backbone="xception")  # the seed's pipeline
metrics = api.evaluate("runs/default", "chest_xray/test", "runs/default/eval-test")
api.export("runs/default")  # ONNX + the OpenVINO precision plan; predict then runs on it
predictions = api.predict("runs/default", ["scan1.dcm", "folder/"])  # gate=False: classify all
summary = api.score_archive("runs/default", ["/archive"], "scores/")  # on Ray, resumable, Parquet
api.fit_gate("runs/old-run")  # an input gate for a run trained before gates existed
api.calibrate("runs/default", "site_a_sample", name="site-a")  # a site's own operating point
api.evaluate("runs/default", "site_a_rest", "eval-site-a", operating_point="site-a")
run = api.Run.load("runs/default", runtime="keras"); probabilities = run.predict_images([img1, img2])
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
from cxr_pneumonia.train import TrainConfig, fit_gate_for_run, preset_configs
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
    "calibrate",
    "evaluate",
    "explain",
    "export",
    "fit_gate",
    "operating_points",
    "predict",
    "robustness",
    "score_archive",
    "train",
]


def _split_overrides(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    names = set(cls.model_fields)
    return {k: overrides.pop(k) for k in list(overrides) if k in names and overrides[k] is not None}


def train(
    data: str | Path | None,
    out: str | Path,
    *,
    preprocess_cfg: PreprocessConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    resume: bool = False,
    preset: str | None = None,
    **overrides: Any,
) -> Run:
    """Train a run and load it; keyword overrides (``backbone=``, ``epochs=``, ``target_recall=`` ...) go to
    whichever config has that field. ``preset="seed"`` starts from a shipped pipeline (the seed's)
    instead of the defaults: a config given here replaces that section, keyword overrides win.
    ``resume=True`` continues the interrupted run ``out`` with its own data (``data``: None, or
    the same data) and settings, so it takes no settings."""
    if resume:
        named = {"preset": preset, "preprocess_cfg": preprocess_cfg}
        named |= {"model_cfg": model_cfg, "train_cfg": train_cfg, **overrides}
        if given := sorted(name for name, value in named.items() if value is not None):
            raise TypeError(f"resume=True takes no {', '.join(given)}: {out} holds the run's settings")
        return Run.load(_train(data, out, resume=True))
    if data is None:
        raise TypeError("give the training data (data=None only with resume=True)")
    base = (
        preset_configs(preset) if preset is not None else (PreprocessConfig(), ModelConfig(), TrainConfig())
    )
    model_cfg = override(model_cfg or base[1], **_split_overrides(ModelConfig, overrides))
    train_cfg = override(train_cfg or base[2], preset=preset, **_split_overrides(TrainConfig, overrides))
    preprocess_cfg = override(preprocess_cfg or base[0], **_split_overrides(PreprocessConfig, overrides))
    if overrides:
        raise TypeError(f"unknown settings {sorted(overrides)}")
    run_dir = _train(data, out, preprocess_cfg=preprocess_cfg, model_cfg=model_cfg, train_cfg=train_cfg)
    return Run.load(run_dir)


def _as_run(run: Run | str | Path, operating_point: str | None = None) -> Run:
    """A loaded run at ``operating_point`` (None: the run's as loaded, or ``default`` from a path)."""
    if isinstance(run, Run):
        return run.with_operating_point(operating_point) if operating_point else run
    return Run.load(run, operating_point=operating_point)


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
    operating_point: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run on a labelled dataset at the run's saved threshold (see
    :func:`cxr_pneumonia.evaluation.evaluate`): the headline metrics on the images the input
    check accepts (``gate=False``: on all images), beside the all-images metrics and the
    rejections; ``heatmaps`` adds Grad-CAM of the misclassified images to the report.
    ``operating_point``: a point saved by :func:`calibrate` instead of the validation threshold."""
    return evaluation.evaluate(
        _as_run(run, operating_point),
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
    run: Run | str | Path,
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    gate: bool = True,
    operating_point: str | None = None,
) -> list[Any]:
    """Grad-CAM overlays ``out/<stem>_gradcam.png`` for files and folders (see
    :func:`cxr_pneumonia.explain.explain_paths`); an image the input check rejects gets none
    (``rejected=True`` in its result) unless ``gate=False``."""
    from cxr_pneumonia.explain import explain_paths

    return explain_paths(_as_run(run, operating_point), expand_inputs(inputs), out, gate=gate)


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
    operating_point: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics clean and under each perturbation (see :func:`cxr_pneumonia.evaluation.robustness`)."""
    loaded = _as_run(run, operating_point)
    return evaluation.robustness(loaded, data, out, split=split, batch_size=batch_size)


def export(run_dir: str | Path, *, calibration: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Export a run (ONNX + precision plan, see :mod:`cxr_pneumonia.export`); ``overrides`` are
    :class:`ExportConfig` fields. Returns the content of ``export.json``."""
    return export_run(run_dir, ExportConfig(**overrides), calibration=calibration)


def predict(
    run: Run | str | Path,
    inputs: Iterable[str | Path],
    *,
    gate: bool = True,
    batch_size: int = 32,
    operating_point: str | None = None,
) -> list[Prediction]:
    """Predict files and folders (JPEG/PNG/DICOM); unreadable files come back with status
    ``error``, images unlike the training images with status ``rejected`` (and, with
    ``gate=False``, classified anyway). Labels use ``operating_point``'s threshold when given."""
    loaded = _as_run(run, operating_point)
    return loaded.predict_paths(expand_inputs(inputs), batch_size=batch_size, gate=gate)


def fit_gate(run_dir: str | Path, data: str | Path | None = None, **gate_overrides: Any) -> dict[str, Any]:
    """Fit (or refit) a run's input gate on its own patient split of ``data`` (default: the data it
    was trained on), written to ``RUN/gate/``; ``gate_overrides`` are
    :class:`~cxr_pneumonia.gate.GateConfig` fields. Returns the gate's summary (gate.json)."""
    from cxr_pneumonia.config import read_json
    from cxr_pneumonia.gate import GATE_DIR, GATE_JSON

    fit_gate_for_run(run_dir, data, **gate_overrides)
    return read_json(Path(run_dir) / GATE_DIR / GATE_JSON)


def calibrate(
    run: Run | str | Path,
    data: str | Path,
    *,
    name: str,
    target_recall: float | None = None,
    rule: str | None = None,
    width: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
    replace: bool = False,
    split: str | None = None,
    gate: bool = True,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Choose the operating point ``name`` for ``target_recall`` (default: the run's) on a site's
    labelled sample and keep it in the run (see :func:`cxr_pneumonia.calibration.calibrate`);
    apply it with ``operating_point=name``. ``rule``: ``max_specificity`` or ``midpoint``
    (default: the run's own when it is one of them, else ``max_specificity``). Returns the point,
    with patient-level intervals and the images that would narrow them to ``width``."""
    from cxr_pneumonia.calibration import calibrate as _calibrate

    return _calibrate(
        _as_run(run),
        data,
        name=name,
        target_recall=target_recall,
        rule=rule,
        width=width,
        n_bootstrap=n_bootstrap,
        seed=seed,
        replace=replace,
        split=split,
        gate=gate,
        batch_size=batch_size,
    )


def operating_points(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """A run's operating points by name: ``default`` (the validation threshold) and those saved by
    :func:`calibrate`."""
    from cxr_pneumonia.calibration import operating_points as _points

    return _points(run_dir)


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
