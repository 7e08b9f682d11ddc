"""The Python API: what the CLI does, as functions.

```python
from cxr_pneumonia import api

run = api.train("chest_xray/train", "runs/xception", backbone="xception", weights="imagenet")
metrics = api.evaluate("runs/xception", "chest_xray/test", "runs/xception/eval-test")
api.export("runs/xception")  # ONNX + the OpenVINO precision plan; predict then runs on it
predictions = api.predict("runs/xception", ["scan1.dcm", "folder/"])
run = api.Run.load("runs/xception", runtime="keras"); probabilities = run.predict_images([img1, img2])
```
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxr_pneumonia.config import file_sha256, override, write_json
from cxr_pneumonia.data import discover
from cxr_pneumonia.export import ExportConfig, export_run
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.model import ModelConfig
from cxr_pneumonia.predict import Prediction, Run, RunError, expand_inputs
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, write_failures_csv
from cxr_pneumonia.train import TRAINING_IMAGES_FILE, TrainConfig
from cxr_pneumonia.train import train as _train

__all__ = [
    "ExportConfig",
    "ModelConfig",
    "PreprocessConfig",
    "Run",
    "RunError",
    "TrainConfig",
    "evaluate",
    "export",
    "predict",
    "robustness",
    "train",
]

log = logging.getLogger(__name__)


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
    """Train a run; keyword overrides (``backbone=``, ``epochs=``, ``target_recall=`` ...) go to
    whichever config has that field."""
    model_cfg = override(model_cfg or ModelConfig(), **_split_overrides(ModelConfig, overrides))
    train_cfg = override(train_cfg or TrainConfig(), **_split_overrides(TrainConfig, overrides))
    preprocess_cfg = override(
        preprocess_cfg or PreprocessConfig(), **_split_overrides(PreprocessConfig, overrides)
    )
    if overrides:
        raise TypeError(f"unknown settings {sorted(overrides)}")
    return _train(
        data, out, preprocess_cfg=preprocess_cfg, model_cfg=model_cfg, train_cfg=train_cfg, resume=resume
    )


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run.load(run)


def leakage_check(run: Run, images: pd.DataFrame) -> dict[str, Any]:
    """Evaluation images that the run trained or validated on (same bytes, or same patient)."""
    manifest = run.path / TRAINING_IMAGES_FILE
    if not manifest.is_file():
        return {"checked": False}
    seen = pd.read_csv(manifest)
    hashes = set(seen["sha256"])
    same_bytes = [p for p, h in zip(images["path"], images["sha256"], strict=True) if h in hashes]
    kermany_patients = images["patient_id"][~images["patient_id"].str.contains("/")]
    same_patient = sorted(set(kermany_patients) & set(seen["patient_id"]))
    result = {
        "checked": True,
        "n_same_image": len(same_bytes),
        "n_same_patient_ids": len(same_patient),
        "examples": [Path(p).name for p in same_bytes[:10]],
    }
    if same_bytes or same_patient:
        warnings.warn(
            f"data leakage: {len(same_bytes)} evaluation images are byte-identical to images this run "
            f"was trained or validated on, and {len(same_patient)} patient ids overlap; the metrics "
            "are optimistic",
            stacklevel=2,
        )
    return result


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
) -> dict[str, Any]:
    """Evaluate a run on a labelled dataset at the run's saved threshold.

    Writes ``metrics.json``, ``predictions.csv``, ``failures.csv`` and ``report.html`` into
    ``out``. Nothing here chooses anything: the threshold is the one saved with the run.
    """
    from cxr_pneumonia.evaluate import compute_metrics
    from cxr_pneumonia.report import write_report

    run = _as_run(run)
    out = Path(out)
    images = discover(Path(data))
    if split is not None:
        images = images[images["split"] == split].reset_index(drop=True)
        if images.empty:
            raise ValueError(f"{data}: no images in split {split!r}")
    images = images.assign(sha256=[file_sha256(Path(p)) for p in images["path"]])
    leakage = leakage_check(run, images)

    predictions = list(
        tqdm(
            run.iter_predictions(images["path"], batch_size=batch_size),
            total=len(images),
            desc="predicting",
            unit="img",
        )
    )
    ok = [p for p in predictions if p.error is None]
    failures = [(p.path, p.error) for p in predictions if p.error is not None]
    if not ok:
        raise ValueError(f"{data}: no readable images to evaluate")
    by_path = {p.path: p for p in ok}
    evaluated = images[images["path"].isin(by_path)].reset_index(drop=True)
    y_true = evaluated["label"].to_numpy()
    scores = np.array([by_path[p].probability for p in evaluated["path"]], dtype=np.float64)

    metrics = compute_metrics(y_true, scores, run.threshold, n_bootstrap=n_bootstrap, seed=seed)
    metrics.update(
        run=str(run.path),
        data=str(data),
        n_failed=len(failures),
        threshold_rule=run.threshold_info.get("rule"),
        leakage=leakage,
        runtime=run.runtime,
    )
    out.mkdir(parents=True, exist_ok=True)
    table = evaluated[["path", "label", "patient_id"]].assign(
        probability=scores, predicted=(scores >= run.threshold).astype(int)
    )
    table.to_csv(out / "predictions.csv", index=False)
    write_failures_csv(out / "failures.csv", failures)
    overlays = _misclassified_heatmaps(run, table, max_misclassified) if heatmaps else {}
    write_report(
        out,
        metrics=metrics,
        y_true=y_true,
        scores=scores,
        paths=list(evaluated["path"]),
        threshold=run.threshold,
        title=f"Evaluation of {run.name} on {Path(data).name}",
        run_info=_run_info(run),
        heatmaps=overlays,
        max_misclassified=max_misclassified,
    )
    write_json(out / "metrics.json", metrics)
    return metrics


def _run_info(run: Run) -> dict[str, Any]:
    model = run.config["model"]
    return {
        "run": str(run.path),
        "backbone": model.get("backbone"),
        "weights": model.get("weights"),
        "head": model.get("head"),
        "image size": model.get("image_size"),
        "threshold": run.threshold,
        "threshold rule": run.threshold_info.get("rule"),
        "target recall (validation)": run.threshold_info.get("target_recall"),
        "threshold chosen on": run.threshold_info.get("chosen_on"),
        "validation metrics": _short_metrics(run.metrics_val),
        "package version": run.config.get("package_version"),
        "runtime": f"{run.runtime['backend']}, {run.runtime['precision']}",
    }


def _short_metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "n/a"
    keys = ("n", "roc_auc", "recall", "specificity", "precision", "f1")
    return ", ".join(
        f"{k} {metrics[k]:.3f}" if isinstance(metrics.get(k), float) else f"{k} {metrics.get(k)}"
        for k in keys
    )


def _misclassified_heatmaps(run: Run, table: pd.DataFrame, limit: int) -> dict[str, np.ndarray]:
    """Grad-CAM overlays for the misclassified images the report will show."""
    try:
        from cxr_pneumonia.explain import heatmap_overlay_for_path
    except ImportError:  # explain not available: the report shows thumbnails only
        return {}
    wrong = table[table["label"] != table["predicted"]]
    wrong = wrong.assign(error=(wrong["probability"] - wrong["label"]).abs()).sort_values(
        "error", ascending=False
    )
    overlays = {}
    for path in wrong["path"].head(limit):
        overlay = heatmap_overlay_for_path(run, path)
        if overlay is not None:
            overlays[path] = overlay
    return overlays


def robustness(
    run: Run | str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    split: str | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """ROC-AUC, recall and specificity at the run's threshold, clean and under each perturbation.

    Perturbations (``augment.PERTURBATIONS``: contrast, gamma, blur, JPEG, crop, zoom, rotation)
    hit the raw image before the run's preprocessing, as a different scanner or export would.
    Without ``data`` it uses the run's own validation images, so it needs no test data.
    Writes ``robustness.json`` into ``out`` when given.
    """
    from cxr_pneumonia.augment import PERTURBATIONS
    from cxr_pneumonia.evaluate import compute_metrics

    run = _as_run(run)
    if data is None:
        images = pd.read_csv(run.path / "val_predictions.csv")[["path", "label"]]
    else:
        images = discover(Path(data))
        if split is not None:
            images = images[images["split"] == split]
    variants = {"clean": lambda img: img, **PERTURBATIONS}
    scores: dict[str, list[float]] = {name: [] for name in variants}
    labels: list[int] = []
    rows = list(zip(images["path"], images["label"], strict=True))
    for start in tqdm(
        range(0, len(rows), batch_size), desc=f"robustness ({len(variants)} variants)", unit="batch"
    ):
        # each raw image is decoded once and perturbed in memory; memory stays flat
        batch = []
        for path, label in rows[start : start + batch_size]:
            try:
                batch.append(load_image(path))
            except ImageReadError:
                continue
            labels.append(int(label))
        for name, perturb in variants.items():
            scores[name].extend(_scores_or_nan(run, [perturb(img) for img in batch]))
    y = np.asarray(labels)
    results: dict[str, dict[str, Any]] = {}
    for name, values in scores.items():
        s = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(s)
        metrics = compute_metrics(y[ok], s[ok], run.threshold, n_bootstrap=0)
        results[name] = {"n": int(ok.sum()), **{k: metrics[k] for k in ("roc_auc", "recall", "specificity")}}
    if out is not None:
        payload = {"run": str(run.path), "data": str(data or "validation"), "threshold": run.threshold}
        write_json(Path(out) / "robustness.json", {**payload, "results": results})
    return results


def _scores_or_nan(run: Run, images: list[np.ndarray]) -> list[float]:
    """Probabilities; NaN for an image whose preprocessing fails (one must not stop the batch)."""
    try:
        return [float(p) for p in run.predict_images(images)]
    except PreprocessError:
        out = []
        for image in images:
            try:
                out.append(float(run.predict_images([image])[0]))
            except PreprocessError:
                out.append(float("nan"))
        return out


def export(run_dir: str | Path, *, calibration: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Export a run (ONNX + precision plan, see :mod:`cxr_pneumonia.export`); ``overrides`` are
    :class:`ExportConfig` fields. Returns the content of ``export.json``."""
    return export_run(run_dir, ExportConfig(**overrides), calibration=calibration)


def predict(run: Run | str | Path, inputs: Iterable[str | Path], *, batch_size: int = 32) -> list[Prediction]:
    """Predict files and folders (JPEG/PNG/DICOM); unreadable files come back with ``error`` set."""
    return _as_run(run).predict_paths(expand_inputs(inputs), batch_size=batch_size)
