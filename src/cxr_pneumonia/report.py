"""Figures and the self-contained HTML evaluation report.

Every figure function returns a ``matplotlib.figure.Figure`` built without pyplot's global
figure registry, so nothing leaks when reports are made in a loop or a server.
"""

from __future__ import annotations

import base64
import functools
import io as _bytes_io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless by design (CLI, CI, servers): pick Agg before pyplot is imported.
matplotlib.use("Agg")

import cv2
import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from cxr_pneumonia import config, evaluate
from cxr_pneumonia.data import CLASS_NAMES
from cxr_pneumonia.rundir import DISCLAIMER

logger = logging.getLogger(__name__)

TRAINING_METRICS = ("loss", "accuracy", "recall", "precision", "auc")
NOTICE = DISCLAIMER  # the one research-use notice (rundir)
THUMBNAIL_SIZE = 128
_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}


# ----------------------------------------------------------------------------- figures


def training_curves_figure(history: pd.DataFrame) -> Figure:
    """One subplot per metric in :data:`TRAINING_METRICS` present (train and ``val_`` columns).

    Missing metrics are skipped. When a ``stage`` column exists, a dotted vertical line marks
    the first ``fine_tune`` epoch. Epochs are plotted by row position (1-based), so a history
    whose epoch counter restarts at fine-tuning still reads left to right.
    """
    if len(history) == 0:
        raise ValueError("training history is empty")
    present = [m for m in TRAINING_METRICS if m in history or f"val_{m}" in history]
    if not present:
        raise ValueError(
            f"training history has none of the columns {list(TRAINING_METRICS)} (or val_*); "
            f"columns: {list(history.columns)}"
        )
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    epochs = np.arange(1, len(history) + 1)
    fine_tune_at = None
    if "stage" in history:
        starts = np.flatnonzero(history["stage"].astype(str).to_numpy() == "fine_tune")
        if len(starts):
            fine_tune_at = epochs[starts[0]] - 0.5
    for i, name in enumerate(present):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for column, label, style in ((name, "train", "-o"), (f"val_{name}", "validation", "-s")):
            if column in history:
                ax.plot(epochs, history[column].to_numpy(dtype=float), style, ms=3, label=label)
        if fine_tune_at is not None:
            ax.axvline(fine_tune_at, ls=":", color="grey", label="fine-tuning starts")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Save :func:`training_curves_figure` as a PNG at ``path`` (atomically)."""
    config.atomic_write_bytes(Path(path), _figure_png(training_curves_figure(history)))


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]],
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    title: str = "Confusion matrix",
) -> Figure:
    """``ConfusionMatrixDisplay`` of ``[[tn, fp], [fn, tp]]``: counts with row percentages."""
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2; got shape {cm.shape}")
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(cm, display_labels=list(class_names))
    display.plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    row_totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(f"{cm[i, j]}\n{share[i, j]:.1%}")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def _mark_operating_points(ax: Any, y: np.ndarray, s: np.ndarray, threshold: float, *, roc: bool) -> None:
    """Mark the operating threshold (filled) and t=0.5 (hollow) on a ROC or PR axis."""
    for t, style, label in (
        (threshold, {"ms": 9, "color": "crimson"}, f"operating point (t={threshold:.3g})"),
        (0.5, {"ms": 8, "mfc": "none", "color": "black"}, "t=0.5"),
    ):
        rates = evaluate.rates_at(y, s, t)
        x, y_value = (
            (1.0 - rates["specificity"], rates["recall"]) if roc else (rates["recall"], rates["precision"])
        )
        ax.plot(x, y_value, "o", label=label, **style)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)


def plot_roc(y_true: Any, scores: Any, threshold: float) -> Figure:
    """``RocCurveDisplay`` with AUC and chance line; the operating point and t=0.5 marked."""
    y, s = np.asarray(y_true), np.asarray(scores)
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    RocCurveDisplay.from_predictions(y, s, name="ROC", ax=ax, plot_chance_level=True)
    _mark_operating_points(ax, y, s, threshold, roc=True)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_pr(y_true: Any, scores: Any, threshold: float) -> Figure:
    """``PrecisionRecallDisplay`` with AP and prevalence line; the operating point and t=0.5 marked."""
    y, s = np.asarray(y_true), np.asarray(scores)
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    PrecisionRecallDisplay.from_predictions(y, s, name="PR", ax=ax, plot_chance_level=True)
    _mark_operating_points(ax, y, s, threshold, roc=False)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision-recall curve")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_threshold_sweep(y_true: Any, scores: Any, threshold: float) -> Figure:
    """Sensitivity and specificity against the threshold (no sklearn Display for this one)."""
    sweep = evaluate.threshold_sweep(y_true, scores)
    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for rate in ("sensitivity", "specificity"):
        ax.step(sweep["threshold"], sweep[rate], where="post", lw=2, label=rate)
    ax.axvline(threshold, color="crimson", lw=1.5, label=f"operating point (t={threshold:.3g})")
    ax.axvline(0.5, color="black", ls=":", lw=1, label="t=0.5")
    ax.set(xlabel="threshold (positive when score >= t)", ylabel="rate", ylim=(-0.01, 1.01))
    ax.set_title("Sensitivity and specificity vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_calibration(y_true: Any, scores: Any, *, n_bins: int = 10) -> Figure:
    """``CalibrationDisplay`` (uniform bins) over score histograms by class.

    Raises ``ValueError`` (from scikit-learn) when scores lie outside [0, 1].
    """
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(4.6, 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    CalibrationDisplay.from_predictions(y, s, n_bins=n_bins, strategy="uniform", name="model", ax=top)
    top.set_ylim(-0.01, 1.01)
    top.set(xlabel="", ylabel="fraction positive")
    top.set_title("Calibration")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bins = np.linspace(0, 1, n_bins + 1)
    for label, name in enumerate(CLASS_NAMES):
        bottom.hist(s[y == label], bins=bins, alpha=0.6, label=name)
    bottom.set_xlabel("predicted probability of pneumonia")
    bottom.set_ylabel("count")
    bottom.legend(fontsize="small")
    return fig


# ----------------------------------------------------------------------------- encoding


def _figure_png(fig: Figure) -> bytes:
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _downsize(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Shrink so the longer side is at most ``size`` pixels (never enlarges)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        return image
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)


def _image_png(image: np.ndarray, *, rgb: bool) -> bytes:
    """PNG bytes of a uint8 grayscale (H×W) or RGB (H×W×3) image."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image; got dtype {image.dtype}")
    if rgb:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB H×W×3 image; got shape {image.shape}")
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim != 2:
        raise ValueError(f"expected an H×W or H×W×3 image; got shape {image.shape}")
    ok, encoded = cv2.imencode(".png", _downsize(image))
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as PNG")
    return encoded.tobytes()


def _load_thumbnail(path: str) -> np.ndarray | None:
    """The image at ``path`` via ``io.load_image``, or None (logged) when it cannot be read."""
    from cxr_pneumonia import io as cxr_io  # imported lazily: only galleries need it

    try:
        return cxr_io.load_image(Path(path))
    except (cxr_io.ImageReadError, OSError) as exc:
        logger.warning("report: no thumbnail for %s: %s", path, exc)
        return None


# ----------------------------------------------------------------------------- HTML context


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per metric: value at the operating threshold, its 95 % CI, value at 0.5."""
    ci95 = metrics.get("ci95") or {}
    at_half = metrics.get("at_0_5") or {}
    rows = []
    for name, label in _METRIC_LABELS.items():
        ci = ci95.get(name)
        rows.append(
            {
                "label": label,
                "value": _fmt(metrics.get(name)),
                "ci": f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci else "n/a",
                "at_half": _fmt(at_half.get(name)) if name in evaluate.RATE_NAMES else "(threshold-free)",
            }
        )
    return rows


def ci_header(metrics: Mapping[str, Any]) -> str:
    """What the intervals are: "95 % CI, patient-level bootstrap (N patients)" (or image-level)."""
    unit, n = metrics.get("ci_unit"), metrics.get("n_ci_units")
    if unit is None:  # metrics from before the unit was recorded
        return "95 % CI (bootstrap)"
    return f"95 % CI, {unit}-level bootstrap ({n} {unit}s)"


def _domain_context(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The "Domain check" section: what the input check (gate) said about the images.

    Read from ``metrics["domain"]``, ``all_images`` and ``accepted_images`` as
    :func:`cxr_pneumonia.evaluation.evaluate` records them; a note when there are none.
    """
    domain = metrics.get("domain") or {}
    n_aged = int(metrics.get("n_age_outside") or 0)
    context: dict[str, Any] = {
        "checked": bool(domain.get("checked")),
        "ages": (
            f"{n_aged} image(s) of patients whose DICOM header declares an age outside the training "
            "patients' (predictions.csv: unusual, with the reason): the metrics may not describe them."
            if n_aged
            else ""
        ),
        "verdict": "",
        "shift": "",
        "consistent": "",
        "comparison": [],
        "rejected": [],
        "rejected_shown": "",
    }
    if not context["checked"]:
        context["verdict"] = domain.get("message") or "No input check was recorded for these images."
        return context
    n, n_rejected, n_unusual = domain["n_images"], domain["n_rejected"], domain["n_unusual"]
    if domain.get("gate", True):
        headline = f"the metrics above are on the {n - n_rejected} of {n} images it accepted"
    else:
        headline = f"the input check was off (--no-gate): the metrics above are on all {n} images"
    context["verdict"] = (
        f"Input check (limit {_fmt(domain.get('limit'), 2)}): {headline}. {n_rejected} rejected as not like "
        f"the frontal chest X-rays this model was trained on; {n_unusual} accepted but unlike most of the "
        "training population."
    )
    shift = domain.get("shift") or {}
    if shift.get("shifted"):
        context["shift"] = domain.get("message") or shift.get("message", "")
    elif shift:
        share, expected = shift.get("share_above_unusual", 0.0), shift.get("expected_share", 0.0)
        context["consistent"] = (
            f"The batch's domain scores are consistent with validation ({share:.0%} beyond the usual "
            f"range, {expected:.0%} expected)."
        )
    accepted, every = metrics.get("accepted_images") or {}, metrics.get("all_images") or {}
    for name in ("n", *_METRIC_LABELS):
        label = "Images" if name == "n" else _METRIC_LABELS[name]
        context["comparison"].append(
            {"label": label, "accepted": _fmt(accepted.get(name)), "all": _fmt(every.get(name))}
        )
    rejected = domain.get("rejected") or []
    context["rejected"] = [
        {"name": Path(r["path"]).name, "path": r["path"], "score": _fmt(r.get("domain_score"), 2),
         "reason": r.get("reason") or ""}
        for r in rejected
    ]  # fmt: skip
    context["rejected_shown"] = f"showing {len(rejected)} of {n_rejected}"
    return context


def _info_value(value: Any) -> Any:
    """Run-info values as the template shows them: nested mappings stay mappings, the rest text."""
    if isinstance(value, Mapping):
        return {str(k): _info_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, 4) for v in value)
    return _fmt(value, 4)


def misclassified_indices(
    y: np.ndarray, s: np.ndarray, threshold: float, max_items: int
) -> tuple[list[int], list[int], int, int]:
    """Indices of false negatives and false positives to show, most wrong first.

    False negatives come first (recall-first); false positives get at least half the slots
    when there are enough of them, so neither kind disappears from the gallery.
    """
    pred = evaluate.apply_threshold(s, threshold)
    fn = np.flatnonzero((y == 1) & (pred == 0))
    fp = np.flatnonzero((y == 0) & (pred == 1))
    fn = fn[np.argsort(s[fn], kind="stable")]  # lowest score = most confidently missed
    fp = fp[np.argsort(-s[fp], kind="stable")]  # highest score = most confident false alarm
    fp_quota = min(len(fp), max_items // 2)
    fn_quota = min(len(fn), max_items - fp_quota)
    fp_quota = min(len(fp), max_items - fn_quota)
    return fn[:fn_quota].tolist(), fp[:fp_quota].tolist(), len(fn), len(fp)


def _gallery_item(
    path: str, score: float, truth: int, threshold: float, thumbnail: np.ndarray | None, heatmap: Any
) -> dict[str, Any]:
    return {
        "path": path,
        "name": Path(path).name,
        "score": f"{score:.3f}",
        "truth": CLASS_NAMES[truth],
        "predicted": CLASS_NAMES[int(evaluate.apply_threshold(np.asarray([score]), threshold)[0])],
        "image": None if thumbnail is None else _data_uri(_image_png(thumbnail, rgb=False)),
        "heatmap": None if heatmap is None else _data_uri(_image_png(heatmap, rgb=True)),
    }


def _galleries(
    y: np.ndarray,
    s: np.ndarray,
    paths: Sequence[str],
    threshold: float,
    max_items: int,
    thumbnails: Mapping[str, np.ndarray],
    heatmaps: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """The false-negative and false-positive galleries (headings, counts, items)."""
    fn_idx, fp_idx, n_fn, n_fp = misclassified_indices(y, s, threshold, max_items)
    galleries = []
    for heading, indices, total in (
        ("False negatives (missed pneumonia)", fn_idx, n_fn),
        ("False positives (false alarms)", fp_idx, n_fp),
    ):
        items = []
        for i in indices:
            path = str(paths[i])
            thumbnail = thumbnails[path] if path in thumbnails else _load_thumbnail(path)
            items.append(
                _gallery_item(path, float(s[i]), int(y[i]), threshold, thumbnail, heatmaps.get(path))
            )
        galleries.append({"heading": heading, "shown": f"showing {len(indices)} of {total}", "items": items})
    return galleries


def _save_figure(fig: Figure, path: Path) -> str:
    """Write ``fig`` as a PNG file and return its data URI for embedding."""
    png = _figure_png(fig)
    config.atomic_write_bytes(path, png)
    return _data_uri(png)


def _figures(
    y: np.ndarray, s: np.ndarray, threshold: float, metrics: Mapping[str, Any], plots_dir: Path
) -> list[dict[str, str]]:
    """Build, save (``plots_dir/<name>.png``) and embed each figure; a note where one is undefined."""
    builders: list[tuple[str, str, Callable[[], Figure]]] = [
        (
            "confusion_matrix",
            "Confusion matrix at the operating threshold",
            lambda: plot_confusion_matrix(
                metrics["confusion_matrix"], title=f"Confusion matrix (t={threshold:.3g})"
            ),
        ),
        ("roc", "ROC curve", lambda: plot_roc(y, s, threshold)),
        ("pr", "Precision-recall curve", lambda: plot_pr(y, s, threshold)),
        (
            "threshold_sweep",
            "Sensitivity and specificity vs threshold",
            lambda: plot_threshold_sweep(y, s, threshold),
        ),
        ("calibration", "Calibration", lambda: plot_calibration(y, s)),
    ]
    both_classes = len(np.unique(y)) == 2
    figures = []
    for name, caption, build in builders:
        if name in ("roc", "pr") and not both_classes:
            figures.append({"caption": caption, "note": "not defined with only one class"})
            continue
        try:
            fig = build()
        except ValueError as exc:  # e.g. calibration of scores outside [0, 1]
            logger.warning("report: skipping %s: %s", name, exc)
            figures.append({"caption": caption, "note": f"not available ({exc})"})
            continue
        figures.append({"caption": caption, "uri": _save_figure(fig, plots_dir / f"{name}.png")})
    return figures


@functools.cache
def _template() -> jinja2.Template:
    """The report template (package file ``templates/report.html.j2``), HTML-escaping every value."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cxr_pneumonia", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")


def write_report(
    out_dir: Path,
    *,
    metrics: Mapping[str, Any],
    y_true: Any,
    scores: Any,
    paths: Sequence[str],
    threshold: float,
    title: str,
    run_info: Mapping[str, Any],
    thumbnails: Mapping[str, np.ndarray] | None = None,
    heatmaps: Mapping[str, np.ndarray] | None = None,
    max_misclassified: int = 48,
) -> Path:
    """Write a self-contained ``out_dir/report.html`` and return its path.

    ``metrics`` is :func:`evaluate.compute_metrics` output for ``(y_true, scores, threshold)``;
    ``paths`` are aligned with ``scores``. Figures are embedded as base64 PNG and also saved in
    ``out_dir/plots/``. Misclassified images are shown as thumbnails (from ``thumbnails``, else
    loaded with ``io.load_image``), with the RGB uint8 ``heatmaps`` overlay beside them when
    given. A "Domain check" section shows the input check's record in ``metrics`` (``domain``,
    ``all_images``, ``accepted_images``) when there is one. Does not write ``metrics.json``
    (the caller does).
    """
    y, s = evaluate.check_inputs(y_true, scores)
    if len(paths) != len(y):
        raise ValueError(f"paths has {len(paths)} items but scores has {len(y)}")
    out_dir = Path(out_dir)
    summary = (
        f"{metrics.get('n', len(y))} images: {metrics.get('n_positive', int(y.sum()))} "
        f"{CLASS_NAMES[1]}, {metrics.get('n_negative', int(len(y) - y.sum()))} {CLASS_NAMES[0]}. "
        f"Decision rule: {CLASS_NAMES[1]} when score ≥ {threshold:.4g}."
    )
    if metrics.get("operating_point"):
        summary += f" Operating point: {metrics['operating_point']}."
    document = _template().render(
        title=title,
        notice=NOTICE,
        summary=summary,
        threshold=_fmt(metrics.get("threshold"), 4),
        metric_rows=_metric_rows(metrics),
        ci_header=ci_header(metrics),
        domain=_domain_context(metrics),
        confusion=metrics.get("confusion_matrix"),
        confusion_at_half=(metrics.get("at_0_5") or {}).get("confusion_matrix"),
        figures=_figures(y, s, threshold, metrics, out_dir / "plots"),
        run_info=_info_value(run_info),
        galleries=_galleries(
            y, s, paths, threshold, max_misclassified, dict(thumbnails or {}), dict(heatmaps or {})
        ),
        metrics_json=json.dumps(metrics, indent=2, default=str),
    )
    report_path = out_dir / "report.html"
    config.atomic_write_text(report_path, document)
    logger.info("report written to %s", report_path)
    return report_path
