"""Running a trained run over labelled data: evaluation, the leakage check, robustness.

Nothing here chooses anything: every decision uses the threshold saved with the run.
:mod:`cxr_pneumonia.evaluate` holds the metrics; this module feeds them a run's predictions.
Every image also passes the run's input check (its gate, :mod:`cxr_pneumonia.gate`): the
headline metrics are those of the images it accepts, beside the metrics of all images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxr_pneumonia import rundir
from cxr_pneumonia.batch import write_failures_csv
from cxr_pneumonia.config import atomic_write_text, file_sha256_or_none, write_json
from cxr_pneumonia.data import discover, is_kermany_patient_id
from cxr_pneumonia.evaluate import apply_threshold, compute_metrics
from cxr_pneumonia.header import has_age_note
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.predict import Prediction, Run
from cxr_pneumonia.preprocess import PreprocessError

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
ROBUSTNESS_FILE = "robustness.json"
MAX_REJECTED_EXAMPLES = 20
NO_GATE_MESSAGE = (
    "this run has no domain model, so images were not checked; fit one with `cxr-pneumonia gate RUN`"
)

log = logging.getLogger(__name__)

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
    gate: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run`` on a labelled dataset at the run's saved threshold.

    Every readable image is classified and checked by the run's gate. The headline metrics are
    those of the images the gate accepts (``gate=False``: of all images); ``all_images`` and
    ``accepted_images`` hold both sets, and ``domain`` the rejections, unusual images and
    whether the batch as a whole differs from the training data (``domain.shift``; a one-line
    warning is logged when it does). Writes ``metrics.json``, ``predictions.csv`` (with each
    image's ``status``, ``domain_score`` and ``reason``), ``failures.csv`` and ``report.html``
    into ``out``; the report shows ``overlay_for``'s heatmaps of the misclassified images when given.
    """
    from cxr_pneumonia.report import write_report

    out = Path(out)
    images = labelled_images(data, split)
    images = images.assign(sha256=[file_sha256_or_none(Path(p)) for p in images["path"]])
    leakage = leakage_check(run, images)
    table, failures, predictions = _predict_table(run, images, data, batch_size, gate)
    headline = _headline(table, run, data, gate)
    y_true, scores = headline["label"].to_numpy(), headline["probability"].to_numpy()
    # Intervals resample patients (data.discover's patient_id; a file without one is its own).
    patients = headline["patient_id"].to_numpy()
    metrics = compute_metrics(
        y_true, scores, run.threshold, n_bootstrap=n_bootstrap, seed=seed, groups=patients
    )
    subsets = _subset_metrics(run, table, headline, metrics, n_bootstrap=n_bootstrap, seed=seed)
    domain = domain_summary(run, table, predictions, gate=gate)
    metrics.update(
        run=str(run.path),
        data=str(data),
        n_failed=len(failures),
        # gate or not: images whose DICOM header declares an age the training patients did not have
        n_age_outside=int(sum(has_age_note(p.reason) for p in predictions if p.error is None)),
        operating_point=run.operating_point,
        threshold_rule=run.threshold_info.get("rule"),
        evaluated_on="accepted images" if gate and run.gate is not None else "all images",
        **subsets,
        domain=domain,
        leakage=leakage,
        runtime=run.runtime,
        test_time_views=run.test_time_views,
    )
    out.mkdir(parents=True, exist_ok=True)
    # An earlier evaluation's summary must not sit beside this one's predictions should the
    # report fail: metrics.json, written last, says the folder is complete.
    for stale in (METRICS_FILE, REPORT_FILE):
        (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / PREDICTIONS_FILE, table.to_csv(index=False))
    write_failures_csv(out / rundir.FAILURES_FILE, failures)
    overlays = misclassified_overlays(run, headline, max_misclassified, overlay_for) if overlay_for else {}
    write_report(
        out,
        metrics=metrics,
        y_true=y_true,
        scores=scores,
        paths=list(headline["path"]),
        threshold=run.threshold,
        title=f"Evaluation of {run.name} on {Path(data).name}",
        run_info=run_info(run),
        heatmaps=overlays,
        max_misclassified=max_misclassified,
    )
    write_json(out / METRICS_FILE, metrics)
    return metrics


def _headline(table: pd.DataFrame, run: Run, data: str | Path, gate: bool) -> pd.DataFrame:
    """The rows the headline metrics are computed on: the accepted images (gate on), else all."""
    if not gate or run.gate is None:
        return table
    accepted = table[table["status"] == "ok"].reset_index(drop=True)
    if accepted.empty:
        raise ValueError(
            f"{data}: the input check rejected all {len(table)} readable images (not like the frontal "
            "chest X-rays this model was trained on); --no-gate (gate=False) evaluates them anyway"
        )
    return accepted


def scored_images(
    run: Run, data: str | Path, *, split: str | None = None, gate: bool = True, batch_size: int = 32
) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[str, str]]]:
    """Every readable labelled image of ``data`` scored by ``run``: (the table of all of them,
    with ``status``; the rows metrics are computed on: those the gate accepts, or all with
    ``gate=False``; the (path, reason) of unreadable files). What ``calibrate`` chooses on."""
    images = labelled_images(data, split)
    table, failures, _ = _predict_table(run, images, data, batch_size, gate)
    return table, _headline(table, run, data, gate), failures


def _subset_metrics(
    run: Run, table: pd.DataFrame, headline: pd.DataFrame, metrics: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """``all_images`` (every readable image, classified even when rejected) and
    ``accepted_images`` (None when the run has no gate or the gate accepted nothing)."""

    def of(rows: pd.DataFrame) -> dict[str, Any] | None:
        if rows.empty:
            return None
        if len(rows) == len(headline) and rows["path"].equals(headline["path"]):
            return dict(metrics)
        y, s = rows["label"].to_numpy(), rows["probability"].to_numpy()
        return compute_metrics(y, s, run.threshold, groups=rows["patient_id"].to_numpy(), **kwargs)

    accepted = table[table["status"] == "ok"].reset_index(drop=True)
    return {"all_images": of(table), "accepted_images": of(accepted) if run.gate is not None else None}


def domain_summary(
    run: Run, table: pd.DataFrame, predictions: list[Prediction], *, gate: bool = True
) -> dict[str, Any]:
    """What the input check said about an evaluation's images: rejections, unusual images and
    the batch-shift test (``run.batch_shift``); logs the shift warning."""
    if run.gate is None:
        return {"checked": False, "gate": gate, "message": NO_GATE_MESSAGE}
    rejected = table[table["status"] == "rejected"].sort_values("domain_score", ascending=False)
    accepted = table[table["status"] == "ok"]
    shift = run.batch_shift([p for p in predictions if p.error is None])
    line = shift_warning(shift)
    if line:
        log.warning("%s", line)
    return {
        "checked": True,
        "gate": gate,
        "n_images": len(table),
        "n_rejected": len(rejected),
        "n_unusual": int(accepted["unusual"].sum()),
        "limit": run.gate.limit,
        "unusual_level": run.gate.unusual_level,
        "rejected": [
            {"path": str(path), "domain_score": float(score), "reason": reason}
            for path, score, reason in rejected[["path", "domain_score", "reason"]]
            .head(MAX_REJECTED_EXAMPLES)
            .itertuples(index=False)
        ],
        "shift": shift,
        "message": line or "",
    }


def shift_warning(shift: dict[str, Any] | None) -> str | None:
    """The one line that says a batch is unlike the training data (None when it is not)."""
    if not shift or not shift.get("shifted"):
        return None
    return (
        f"{shift['message']} ({shift['share_above_unusual']:.0%} of {shift['n']} images lie beyond "
        f"the usual range of the training population; {shift['expected_share']:.0%} expected)"
    )


def _predict_table(
    run: Run, images: pd.DataFrame, data: str | Path, batch_size: int, gate: bool = True
) -> tuple[pd.DataFrame, list[tuple[str, str]], list[Prediction]]:
    """(path, label, patient_id, probability, predicted, status, domain_score, unusual, reason) of
    the readable images, every one classified (rejected ones too); (path, reason) of the others;
    the predictions themselves."""
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
    rows = [by_path[p] for p in evaluated["path"]]
    scores = np.array([p.probability for p in rows], dtype=np.float64)
    table = evaluated[["path", "label", "patient_id"]].assign(
        probability=scores,
        predicted=apply_threshold(scores, run.threshold),
        status=[p.status for p in rows],
        domain_score=[p.domain_score for p in rows],
        unusual=[p.unusual for p in rows],
        reason=[_reason_text(p, gate) for p in rows],
    )
    return table, failures, predictions


def _reason_text(prediction: Prediction, gate: bool) -> str | None:
    """The gate's reason; with the gate on, without the "classified anyway" note (evaluation
    classifies every image for the all-images metrics; the headline leaves rejected ones out)."""
    reason = prediction.reason
    if gate and reason and prediction.status == "rejected":
        reason = reason.split(" (classified anyway", 1)[0]
    return reason


def run_info(run: Run) -> dict[str, Any]:
    """The run as the report's "model" table shows it."""
    model = run.config["model"]
    return {
        "run": str(run.path),
        "backbone": model.get("backbone"),
        "weights": model.get("weights"),
        "head": model.get("head"),
        "image size": model.get("image_size"),
        "operating point": run.operating_point,
        "threshold": run.threshold,
        "threshold rule": run.threshold_info.get("rule"),
        "target recall": run.threshold_info.get("target_recall"),
        "threshold chosen on": run.threshold_info.get("chosen_on"),
        "validation metrics": _short_metrics(run.metrics_val),
        "package version": run.config.get("package_version"),
        "runtime": f"{run.runtime['backend']}, {run.runtime['precision']}",
        "test-time views": run.test_time_views,
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
    """Heatmap overlays of the misclassified images the report shows (``report.
    misclassified_indices``: false negatives first, false positives at least half the places)."""
    from cxr_pneumonia.report import misclassified_indices

    y, s = table["label"].to_numpy(), table["probability"].to_numpy()
    fn, fp, _, _ = misclassified_indices(y, s, run.threshold, limit)
    overlays = {}
    for path in table["path"].to_numpy()[fn + fp]:
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
    Each variant's row counts the images it scored (``n``) and those it could not (``n_failed``:
    unreadable, or preprocessing failed). Writes ``robustness.json`` into ``out`` when given.
    """
    from cxr_pneumonia.augment import PERTURBATIONS

    if data is None:
        if split is not None:
            raise ValueError(f"split {split!r} needs DATA: the run's own validation images have no splits")
        images = pd.read_csv(run.path / rundir.VAL_PREDICTIONS_FILE)[["path", "label"]]
    else:
        images = labelled_images(data, split)
    variants = {"clean": lambda img: img, **PERTURBATIONS}
    labels, scores = _perturbed_scores(run, images, variants, batch_size)
    results: dict[str, dict[str, Any]] = {}
    for name, values in scores.items():
        s = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(s)
        metrics = compute_metrics(labels[ok], s[ok], run.threshold, n_bootstrap=0)
        # n_failed: unreadable files plus images whose preprocessing failed under this variant;
        # the CLI exits 2 when the clean row has any, as every other batch command does
        results[name] = {
            "n": int(ok.sum()),
            "n_failed": len(images) - int(ok.sum()),
            **{k: metrics[k] for k in ("roc_auc", "recall", "specificity")},
        }
    if out is not None:
        payload = {"run": str(run.path), "data": str(data or "validation"), "threshold": run.threshold}
        payload["operating_point"] = run.operating_point
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
            except ImageReadError as e:
                log.warning("%s (left out of the robustness figures)", e)
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
