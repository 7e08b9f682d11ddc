"""Running a trained run over labelled data: evaluation, the leakage check, robustness.

Nothing here chooses anything: every decision uses the threshold saved with the run.
:mod:`cxr_pneumonia.evaluate` holds the metrics; this module feeds them a run's predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxr_pneumonia import rundir
from cxr_pneumonia.batch import write_failures_csv
from cxr_pneumonia.config import file_sha256, write_json
from cxr_pneumonia.data import discover, is_kermany_patient_id
from cxr_pneumonia.evaluate import apply_threshold, compute_metrics
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.predict import Prediction, Run
from cxr_pneumonia.preprocess import PreprocessError

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
ROBUSTNESS_FILE = "robustness.json"

# (run, image path) -> Grad-CAM overlay (RGB uint8) or None; explain provides it (api composes).
OverlayFn = Callable[[Run, str], "np.ndarray | None"]


def labelled_images(data: str | Path, split: str | None = None) -> pd.DataFrame:
    """``data.discover`` of ``data``, restricted to ``split`` when given (an empty split is an error)."""
    images = discover(Path(data))
    if split is not None:
        images = images[images["split"] == split].reset_index(drop=True)
        if images.empty:
            raise ValueError(f"{data}: no images in split {split!r}")
    return images


def leakage_check(run: Run, images: pd.DataFrame) -> dict[str, Any]:
    """Evaluation images that the run trained or validated on (same bytes, or same patient).

    ``images`` needs ``path``, ``sha256`` and ``patient_id`` columns. Patient ids are compared
    only where they name a Kermany patient: an id made from a path means nothing across datasets.
    """
    manifest = run.path / rundir.TRAINING_IMAGES_FILE
    if not manifest.is_file():
        return {"checked": False}
    seen = pd.read_csv(manifest)
    hashes = set(seen["sha256"])
    same_bytes = [p for p, h in zip(images["path"], images["sha256"], strict=True) if h in hashes]
    patients = {pid for pid in images["patient_id"] if is_kermany_patient_id(pid)}
    same_patient = sorted(patients & set(seen["patient_id"]))
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
    run: Run,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    overlay_for: OverlayFn | None = None,
    max_misclassified: int = 48,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate ``run`` on a labelled dataset at the run's saved threshold.

    Writes ``metrics.json``, ``predictions.csv``, ``failures.csv`` and ``report.html`` into
    ``out``; the report shows ``overlay_for``'s heatmaps of the misclassified images when given.
    """
    from cxr_pneumonia.report import write_report

    out = Path(out)
    images = labelled_images(data, split)
    images = images.assign(sha256=[file_sha256(Path(p)) for p in images["path"]])
    leakage = leakage_check(run, images)
    table, failures = _predict_table(run, images, data, batch_size)
    y_true, scores = table["label"].to_numpy(), table["probability"].to_numpy()
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
    table.to_csv(out / PREDICTIONS_FILE, index=False)
    write_failures_csv(out / rundir.FAILURES_FILE, failures)
    overlays = misclassified_overlays(run, table, max_misclassified, overlay_for) if overlay_for else {}
    write_report(
        out,
        metrics=metrics,
        y_true=y_true,
        scores=scores,
        paths=list(table["path"]),
        threshold=run.threshold,
        title=f"Evaluation of {run.name} on {Path(data).name}",
        run_info=run_info(run),
        heatmaps=overlays,
        max_misclassified=max_misclassified,
    )
    write_json(out / METRICS_FILE, metrics)
    return metrics


def _predict_table(
    run: Run, images: pd.DataFrame, data: str | Path, batch_size: int
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(path, label, patient_id, probability, predicted) of the readable images; (path, reason) of
    the others."""
    predictions: list[Prediction] = list(
        tqdm(
            run.iter_predictions(images["path"], batch_size=batch_size, gate=False),
            total=len(images),
            desc="predicting",
            unit="img",
        )
    )
    by_path = {p.path: p for p in predictions if p.error is None}
    failures = [(p.path, p.error) for p in predictions if p.error is not None]
    if not by_path:
        raise ValueError(f"{data}: no readable images to evaluate")
    evaluated = images[images["path"].isin(by_path)].reset_index(drop=True)
    scores = np.array([by_path[p].probability for p in evaluated["path"]], dtype=np.float64)
    table = evaluated[["path", "label", "patient_id"]].assign(
        probability=scores, predicted=apply_threshold(scores, run.threshold)
    )
    return table, failures


def run_info(run: Run) -> dict[str, Any]:
    """The run as the report's "model" table shows it."""
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


def misclassified_overlays(
    run: Run, table: pd.DataFrame, limit: int, overlay_for: OverlayFn
) -> dict[str, np.ndarray]:
    """Heatmap overlays of the ``limit`` most confidently misclassified images (the report's)."""
    wrong = table[table["label"] != table["predicted"]]
    wrong = wrong.assign(error=(wrong["probability"] - wrong["label"]).abs()).sort_values(
        "error", ascending=False
    )
    overlays = {}
    for path in wrong["path"].head(limit):
        overlay = overlay_for(run, path)
        if overlay is not None:
            overlays[path] = overlay
    return overlays


def robustness(
    run: Run,
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

    if data is None:
        images = pd.read_csv(run.path / rundir.VAL_PREDICTIONS_FILE)[["path", "label"]]
    else:
        images = discover(Path(data))
        if split is not None:
            images = images[images["split"] == split]
    variants = {"clean": lambda img: img, **PERTURBATIONS}
    labels, scores = _perturbed_scores(run, images, variants, batch_size)
    results: dict[str, dict[str, Any]] = {}
    for name, values in scores.items():
        s = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(s)
        metrics = compute_metrics(labels[ok], s[ok], run.threshold, n_bootstrap=0)
        results[name] = {"n": int(ok.sum()), **{k: metrics[k] for k in ("roc_auc", "recall", "specificity")}}
    if out is not None:
        payload = {"run": str(run.path), "data": str(data or "validation"), "threshold": run.threshold}
        write_json(Path(out) / ROBUSTNESS_FILE, {**payload, "results": results})
    return results


def _perturbed_scores(
    run: Run, images: pd.DataFrame, variants: dict[str, Callable[[np.ndarray], np.ndarray]], batch_size: int
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """(labels of the readable images, each variant's scores on them; NaN where preprocessing failed)."""
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
    return np.asarray(labels), scores


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
