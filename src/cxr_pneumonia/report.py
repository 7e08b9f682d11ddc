"""Figures and the self-contained HTML evaluation report.

Every figure function returns a ``matplotlib.figure.Figure`` built without pyplot's global
figure registry, so nothing leaks when reports are made in a loop or a server.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless by design (CLI, CI, servers): pick Agg before pyplot/seaborn import it.
matplotlib.use("Agg")

import cv2
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

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
    """Seaborn heatmap of ``[[tn, fp], [fn, tp]]``, annotated with counts and row percentages."""
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2; got shape {cm.shape}")
    row_totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    annot = np.array([[f"{cm[i, j]}\n{share[i, j]:.1%}" for j in range(2)] for i in range(2)], dtype=object)
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(
        share,
        annot=annot,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1,
        cbar=False,
        ax=ax,
        xticklabels=list(class_names),
        yticklabels=list(class_names),
        annot_kws={"size": 12},
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def _operating_point(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    rates = evaluate.rates_at(y, s, threshold)
    return {"fpr": 1.0 - rates["specificity"], **rates}


def plot_roc(y_true: Any, scores: Any, threshold: float) -> Figure:
    """ROC curve with AUC, the operating point and the 0.5 point marked."""
    y, s = np.asarray(y_true), np.asarray(scores)
    fpr, tpr, _ = roc_curve(y, s)
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    op, half = _operating_point(y, s, threshold), _operating_point(y, s, 0.5)
    ax.plot(op["fpr"], op["recall"], "o", ms=9, color="crimson", label=f"operating point (t={threshold:.3g})")
    ax.plot(half["fpr"], half["recall"], "o", ms=8, mfc="none", color="black", label="t=0.5")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("ROC curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_pr(y_true: Any, scores: Any, threshold: float) -> Figure:
    """Precision-recall curve with average precision, prevalence baseline and operating point."""
    y, s = np.asarray(y_true), np.asarray(scores)
    precision, recall, _ = precision_recall_curve(y, s)
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", lw=2, label=f"PR (AP {average_precision_score(y, s):.3f})")
    ax.axhline(float(np.mean(y)), ls="--", color="grey", lw=1, label="prevalence")
    op, half = _operating_point(y, s, threshold), _operating_point(y, s, 0.5)
    ax.plot(
        op["recall"],
        op["precision"],
        "o",
        ms=9,
        color="crimson",
        label=f"operating point (t={threshold:.3g})",
    )
    ax.plot(half["recall"], half["precision"], "o", ms=8, mfc="none", color="black", label="t=0.5")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("Precision-recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_threshold_sweep(y_true: Any, scores: Any, threshold: float) -> Figure:
    """Sensitivity and specificity against the threshold, with the operating point marked."""
    sweep = evaluate.threshold_sweep(y_true, scores)
    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.step(sweep["threshold"], sweep["sensitivity"], where="post", lw=2, label="sensitivity")
    ax.step(sweep["threshold"], sweep["specificity"], where="post", lw=2, label="specificity")
    ax.axvline(threshold, color="crimson", ls="-", lw=1.5, label=f"operating point (t={threshold:.3g})")
    ax.axvline(0.5, color="black", ls=":", lw=1, label="t=0.5")
    ax.set_xlabel("threshold (positive when score >= t)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("Sensitivity and specificity vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_calibration(y_true: Any, scores: Any, *, n_bins: int = 10) -> Figure:
    """Reliability diagram (``calibration_curve``, uniform bins) over score histograms by class."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    fig = Figure(figsize=(4.6, 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    top.plot(prob_pred, prob_true, "-o", lw=2, label="model")
    top.set_ylabel("fraction positive")
    top.set_ylim(-0.01, 1.01)
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


# ----------------------------------------------------------------------------- HTML pieces


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    ci95 = metrics.get("ci95") or {}
    at_half = metrics.get("at_0_5") or {}
    rows = []
    for name, label in _METRIC_LABELS.items():
        ci = ci95.get(name)
        ci_text = f"{_fmt(ci[0])} – {_fmt(ci[1])}" if ci else "n/a"
        half = _fmt(at_half.get(name)) if name in evaluate.RATE_NAMES else "(threshold-free)"
        rows.append(
            f"<tr><th>{_esc(label)}</th><td>{_esc(_fmt(metrics.get(name)))}</td>"
            f"<td>{_esc(ci_text)}</td><td>{_esc(half)}</td></tr>"
        )
    head = (
        f"<tr><th>metric</th><th>at operating threshold {_esc(_fmt(metrics.get('threshold'), 4))}"
        "</th><th>95 % CI (bootstrap)</th><th>at threshold 0.5</th></tr>"
    )
    cm = metrics.get("confusion_matrix")
    cm_half = at_half.get("confusion_matrix")
    cm_row = (
        f"<tr><th>Confusion [[TN, FP], [FN, TP]]</th><td>{_esc(cm)}</td><td></td>"
        f"<td>{_esc(cm_half)}</td></tr>"
    )
    return f"<table class='metrics'>{head}{''.join(rows)}{cm_row}</table>"


def _value_html(value: Any) -> str:
    if isinstance(value, Mapping):
        return _key_value_table(value)
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(_fmt(v, 4) for v in value))
    return _esc(_fmt(value, 4))


def _key_value_table(values: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(key)}</th><td>{_value_html(value)}</td></tr>" for key, value in values.items()
    )
    return f"<table class='kv'>{rows}</table>"


def _misclassified(
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
    path: str,
    score: float,
    truth: int,
    threshold: float,
    thumbnail: np.ndarray | None,
    heatmap: np.ndarray | None,
) -> str:
    images = []
    if thumbnail is not None:
        images.append(f"<img src='{_data_uri(_image_png(thumbnail, rgb=False))}' alt='image'>")
    else:
        images.append("<div class='missing'>image unreadable</div>")
    if heatmap is not None:
        images.append(f"<img src='{_data_uri(_image_png(heatmap, rgb=True))}' alt='heatmap'>")
    predicted = CLASS_NAMES[int(evaluate.apply_threshold(score, threshold))]
    caption = (
        f"<b>{_esc(Path(path).name)}</b><br>score {_esc(f'{score:.3f}')} · "
        f"true {_esc(CLASS_NAMES[truth])} · predicted {_esc(predicted)}"
    )
    return (
        f"<figure title='{_esc(path)}'><div class='pair'>{''.join(images)}</div>"
        f"<figcaption>{caption}<br><span class='path'>{_esc(path)}</span></figcaption></figure>"
    )


def _gallery(
    heading: str,
    indices: list[int],
    total: int,
    *,
    y: np.ndarray,
    s: np.ndarray,
    paths: Sequence[str],
    threshold: float,
    thumbnails: Mapping[str, np.ndarray],
    heatmaps: Mapping[str, np.ndarray],
) -> str:
    items = []
    for i in indices:
        path = str(paths[i])
        thumbnail = thumbnails[path] if path in thumbnails else _load_thumbnail(path)
        items.append(_gallery_item(path, float(s[i]), int(y[i]), threshold, thumbnail, heatmaps.get(path)))
    shown = f"showing {len(indices)} of {total}"
    body = "".join(items) if items else "<p>none</p>"
    return f"<h3>{_esc(heading)} — {_esc(shown)}</h3><div class='gallery'>{body}</div>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;
max-width:1200px}
.notice{background:#fff3cd;border:1px solid #e0b000;padding:.8rem 1rem;font-weight:600;
border-radius:4px}
table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
table.metrics td{font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1rem}
.figs img{max-width:560px;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}
.gallery figure{margin:0;width:290px;font-size:.8rem}
.pair{display:flex;gap:4px}
.pair img{width:140px;height:auto;image-rendering:auto}
.missing{width:140px;height:140px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#900}
.path{color:#666;word-break:break-all}
"""


def _save_figure(fig: Figure, path: Path) -> str:
    """Write ``fig`` as a PNG file and return its data URI for embedding."""
    png = _figure_png(fig)
    config.atomic_write_bytes(path, png)
    return _data_uri(png)


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
    given. Does not write ``metrics.json`` (the caller does).
    """
    y, s = evaluate.check_inputs(y_true, scores)
    if len(paths) != len(y):
        raise ValueError(f"paths has {len(paths)} items but scores has {len(y)}")
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    thumbnails = dict(thumbnails or {})
    heatmaps = dict(heatmaps or {})

    both_classes = len(np.unique(y)) == 2
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
    figures = []
    for name, caption, build in builders:
        if name in ("roc", "pr") and not both_classes:
            figures.append(f"<p>{_esc(caption)}: not defined with only one class.</p>")
            continue
        try:
            fig = build()
        except ValueError as exc:  # e.g. calibration of scores outside [0, 1]
            logger.warning("report: skipping %s: %s", name, exc)
            figures.append(f"<p>{_esc(caption)}: not available ({_esc(exc)}).</p>")
            continue
        uri = _save_figure(fig, plots_dir / f"{name}.png")
        figures.append(f"<img src='{uri}' alt='{_esc(caption)}' title='{_esc(caption)}'>")

    fn_idx, fp_idx, n_fn, n_fp = _misclassified(y, s, threshold, max_misclassified)
    gallery_kwargs = {
        "y": y,
        "s": s,
        "paths": paths,
        "threshold": threshold,
        "thumbnails": thumbnails,
        "heatmaps": heatmaps,
    }
    galleries = _gallery("False negatives (missed pneumonia)", fn_idx, n_fn, **gallery_kwargs) + _gallery(
        "False positives (false alarms)", fp_idx, n_fp, **gallery_kwargs
    )
    summary = (
        f"{metrics.get('n', len(y))} images: {metrics.get('n_positive', int(y.sum()))} "
        f"{CLASS_NAMES[1]}, {metrics.get('n_negative', int(len(y) - y.sum()))} {CLASS_NAMES[0]}. "
        f"Decision rule: {CLASS_NAMES[1]} when score ≥ {threshold:.4g}."
    )
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p class="notice">{_esc(NOTICE)}</p>
<p>{_esc(summary)}</p>
<h2>Metrics</h2>
{_metrics_table(metrics)}
<h2>Figures</h2>
<div class="figs">{"".join(figures)}</div>
<h2>Run</h2>
{_key_value_table(run_info)}
<h2>Misclassified images</h2>
{galleries}
<details><summary>metrics (JSON)</summary>
<pre>{_esc(json.dumps(metrics, indent=2, default=str))}</pre></details>
<p class="notice">{_esc(NOTICE)}</p>
</body></html>
"""
    report_path = out_dir / "report.html"
    config.atomic_write_text(report_path, document)
    logger.info("report written to %s", report_path)
    return report_path
