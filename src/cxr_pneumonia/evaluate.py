"""Metrics and the recall-first operating point.

Decision rule, used everywhere (train, evaluate, predict, serve): an image is called
pneumonia when ``score >= threshold`` (:func:`apply_threshold`). The threshold is chosen on the
validation split only (:func:`choose_threshold`) and saved with the model; test data is never
used to choose anything.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr_pneumonia import config

logger = logging.getLogger(__name__)

RULES = ("max_specificity", "midpoint")
RATE_NAMES = ("accuracy", "precision", "recall", "specificity", "f1")
CURVE_NAMES = ("roc_auc", "pr_auc")
# A resample block of this many (resample x item) cells bounds bootstrap memory (~16 MB/array).
_BOOTSTRAP_CELLS = 2_000_000
# Recall is a ratio of counts; the tolerance keeps e.g. 49/50 >= 0.98 true despite rounding.
_RECALL_TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """The operating point chosen on validation, saved as ``threshold.json`` beside the model.

    ``recall`` and ``specificity`` are the validation values at ``threshold`` under the rule
    ``score >= threshold``. ``achievable`` is False when the target recall could only be met by
    calling every validation image positive (specificity 0), i.e. no useful operating point.
    """

    threshold: float
    target_recall: float
    recall: float
    specificity: float
    rule: str
    achievable: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ThresholdChoice:
        """Rebuild from :meth:`to_dict` output (unknown keys rejected)."""
        return config.from_dict(cls, values)


def apply_threshold(scores: Any, threshold: float) -> np.ndarray:
    """Predicted labels (0/1 int array): positive when ``score >= threshold``."""
    return (np.asarray(scores) >= threshold).astype(np.int64)


def check_inputs(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D aligned 0/1 labels and finite scores; return ``(int64 labels, float scores)``.

    Raises ``ValueError`` naming the problem (shape, length, label values, non-finite scores).
    """
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and scores must be 1-D; got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} items but scores has {len(s)}")
    if len(y) == 0:
        raise ValueError("y_true and scores are empty")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"y_true must be 0/1; found {sorted(set(y[bad].tolist()))[:5]}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite values")
    return y.astype(np.int64), s


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """``(tn, fp, fn, tp)`` as Python ints."""
    tp = int(np.sum((y == 1) & (pred == 1)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    return tn, fp, fn, tp


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0`` (sklearn's ``zero_division=0``)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _rates_from_counts(tn: Any, fp: Any, fn: Any, tp: Any) -> dict[str, np.ndarray]:
    """The five threshold rates from confusion counts (scalars or arrays of resamples)."""
    tn, fp, fn, tp = (np.asarray(v, dtype=np.float64) for v in (tn, fp, fn, tp))
    return {
        "accuracy": _safe_div(tp + tn, tp + tn + fp + fn),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def rates_at(y_true: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity, F1 and ``confusion_matrix`` at ``threshold``."""
    y, s = check_inputs(y_true, scores)
    tn, fp, fn, tp = _confusion(y, apply_threshold(s, threshold))
    out: dict[str, Any] = {"threshold": float(threshold)}
    out.update({k: float(v) for k, v in _rates_from_counts(tn, fp, fn, tp).items()})
    out["confusion_matrix"] = [[tn, fp], [fn, tp]]
    return out


def choose_threshold(
    y_true: Any,
    scores: Any,
    *,
    target_recall: float = 0.98,
    rule: str = "max_specificity",
) -> ThresholdChoice:
    """Pick the recall-first operating point on validation scores.

    Candidates are the unique scores (positive when ``score >= threshold``). Among candidates
    whose recall is >= ``target_recall``, the one with the highest specificity wins. Ties in
    specificity go to the *lowest* such threshold: equal specificity means the same false alarms,
    so the lower one is never worse and catches at least as many positives.

    ``rule="midpoint"`` then moves the threshold halfway down to the next lower candidate score
    (a negative's score, by the tie rule). Validation predictions are unchanged, but a positive
    whose score drifts down slightly under distribution shift is still caught. When the chosen
    score is already the lowest, the threshold stays there.

    Raises ``ValueError`` when only one class is present, the inputs are malformed, the target
    is outside [0, 1] or the rule is unknown.
    """
    y, s = _choice_inputs(y_true, scores, target_recall, rule)
    threshold = _choose(y, s, target_recall, rule)
    tn, fp, fn, tp = _confusion(y, apply_threshold(s, threshold))
    rates = _rates_from_counts(tn, fp, fn, tp)
    choice = ThresholdChoice(
        threshold=threshold,
        target_recall=float(target_recall),
        recall=float(rates["recall"]),
        specificity=float(rates["specificity"]),
        rule=rule,
        achievable=bool(tn > 0),
    )
    if not choice.achievable:
        warnings.warn(
            f"target recall {target_recall} is only reached by calling every validation image "
            f"positive (specificity 0); threshold {threshold:.4g} is not a useful operating point",
            UserWarning,
            stacklevel=2,
        )
    logger.info(
        "threshold %.6g (%s): validation recall %.4f, specificity %.4f (target recall %.3f)",
        choice.threshold,
        rule,
        choice.recall,
        choice.specificity,
        target_recall,
    )
    return choice


def _choice_inputs(
    y_true: Any, scores: Any, target_recall: float, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_inputs`, and the checks of a threshold choice (rule, target, both classes)."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; valid rules: {list(RULES)}")
    if not 0.0 <= target_recall <= 1.0:
        raise ValueError(f"target_recall must be in [0, 1]; got {target_recall}")
    y, s = check_inputs(y_true, scores)
    if len(np.unique(y)) < 2:
        raise ValueError(f"choosing a threshold needs both classes; validation labels are all {int(y[0])}")
    return y, s


def _choose(y: np.ndarray, s: np.ndarray, target_recall: float, rule: str) -> float:
    """:func:`choose_threshold`'s threshold on checked inputs holding both classes (no logging:
    the threshold bootstrap calls it once per resample)."""
    # The ROC points at every distinct score, highest first (sklearn's ``roc_curve`` without
    # ``drop_intermediate`` and its +inf start; its input checks cost more than this, per resample).
    order = np.argsort(-s, kind="stable")
    ranked, positive = s[order], y[order]
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    tps, fps = np.cumsum(positive)[last_of_tie], np.cumsum(1 - positive)[last_of_tie]
    tpr, fpr, thresholds = tps / tps[-1], fps / fps[-1], ranked[last_of_tie]
    eligible = np.flatnonzero(tpr >= target_recall - _RECALL_TOL)
    # The lowest candidate (everything positive) has recall 1, so ``eligible`` is never empty.
    best_fpr = fpr[eligible].min()
    # thresholds decrease along the curve: the last index with the best fpr is the lowest one.
    idx = int(eligible[fpr[eligible] == best_fpr][-1])
    threshold = float(thresholds[idx])
    if rule == "midpoint" and idx + 1 < len(thresholds):
        lower = float(thresholds[idx + 1])
        midpoint = lower + (threshold - lower) / 2.0
        # In float32 the midpoint can round onto ``lower``; keep the score itself then.
        same = np.array_equal(apply_threshold(s, midpoint), apply_threshold(s, threshold))
        if lower < midpoint <= threshold and same:
            threshold = midpoint
    return threshold


def threshold_sweep(y_true: Any, scores: Any) -> pd.DataFrame:
    """Sensitivity and specificity at every unique score, thresholds ascending.

    Columns ``threshold, sensitivity, specificity``; a rate is NaN when its class is absent.
    """
    y, s = check_inputs(y_true, scores)
    thresholds = np.unique(s)
    pos = np.sort(s[y == 1])
    neg = np.sort(s[y == 0])
    # Items strictly below a threshold are called negative under ``score >= threshold``.
    pos_below = np.searchsorted(pos, thresholds, side="left")
    neg_below = np.searchsorted(neg, thresholds, side="left")
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (
            (len(pos) - pos_below) / len(pos)
            if len(pos)
            else np.full_like(thresholds, np.nan, dtype=np.float64)
        )
        specificity = neg_below / len(neg) if len(neg) else np.full_like(thresholds, np.nan, dtype=np.float64)
    return pd.DataFrame(
        {
            "threshold": thresholds.astype(np.float64),
            "sensitivity": np.asarray(sensitivity, dtype=np.float64),
            "specificity": np.asarray(specificity, dtype=np.float64),
        }
    )


def _score_groups(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order items by score descending; return ``(order, is_positive in order, group starts)``.

    Tied scores form one group, because a threshold cannot separate them.
    """
    order = np.argsort(-s, kind="stable")
    sorted_scores = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    return order, y[order].astype(bool), starts


def _weighted_curve_metrics(
    is_pos: np.ndarray, starts: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision for each row of ``weights`` (counts per sorted item).

    Equal to sklearn's ``roc_auc_score`` / ``average_precision_score`` with those counts as
    ``sample_weight``: both are sums over the tied-score groups of the cumulative counts.
    """
    weights = np.atleast_2d(weights).astype(np.float64)
    tp = np.cumsum(np.add.reduceat(weights * is_pos, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(weights * ~is_pos, starts, axis=1), axis=1)
    zeros = np.zeros((weights.shape[0], 1))
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
    tpr0 = np.hstack([zeros, tpr])
    fpr0 = np.hstack([zeros, fpr])
    # Trapezoids give tied positive/negative pairs half credit, as the Mann-Whitney AUC does.
    roc_auc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2.0, axis=1)
    precision = _safe_div(tp, tp + fp)
    average_precision = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
    return roc_auc, average_precision


def _stratified_counts(rng: np.random.Generator, n_items: int, n_resamples: int) -> np.ndarray:
    """How often each of ``n_items`` is drawn in each resample (rows sum to ``n_items``)."""
    if n_items == 0:
        return np.zeros((n_resamples, 0), dtype=np.int64)
    idx = rng.integers(0, n_items, size=(n_resamples, n_items))
    idx += np.arange(n_resamples)[:, None] * n_items
    return np.bincount(idx.ravel(), minlength=n_resamples * n_items).reshape(n_resamples, n_items)


@dataclasses.dataclass(frozen=True)
class _Clusters:
    """What a bootstrap resamples: ``index`` maps each item to its cluster (patient); ``strata``
    lists the clusters of each stratum; ``unit`` is ``"patient"`` or ``"image"``."""

    index: np.ndarray
    strata: tuple[np.ndarray, ...]
    unit: str

    @property
    def n(self) -> int:
        return len(self.index) and int(self.index.max()) + 1


def _clusters(y: np.ndarray, groups: Any | None) -> _Clusters:
    """The resampling units of labels ``y``: patients (``groups``, one id per item) or, without
    ``groups``, the items themselves.

    Patients are stratified by what they hold: only positive images, only negative images, or
    both. Each stratum is resampled to its own size, so every resample holds both classes
    whenever the data does (a stratum with positives is never empty of draws) and the class
    balance moves only as much as patients' image counts make it. Without ``groups`` this is
    the plain per-class stratified image bootstrap.
    """
    if groups is None:
        index, unit = np.arange(len(y)), "image"
    else:
        ids = np.asarray(groups, dtype=object)
        if ids.shape != y.shape:
            raise ValueError(f"groups has {ids.size} items but y_true has {len(y)}")
        if pd.isna(ids).any():
            raise ValueError(f"groups (patient ids) has {int(pd.isna(ids).sum())} missing values")
        # sort=True: a patient's cluster number does not depend on the order of the images.
        index, unit = pd.factorize(ids.astype(str), sort=True)[0], "patient"
    n = len(index) and int(index.max()) + 1
    has_pos = np.bincount(index, weights=y, minlength=n) > 0
    has_neg = np.bincount(index, weights=1 - y, minlength=n) > 0
    kind = has_pos.astype(np.int64) + 2 * has_neg
    strata = tuple(np.flatnonzero(kind == k) for k in (1, 2, 3))
    return _Clusters(index=index, strata=tuple(s for s in strata if len(s)), unit=unit)


def _weight_blocks(
    rng: np.random.Generator, clusters: _Clusters, item_cluster: np.ndarray, n_bootstrap: int
) -> Iterator[np.ndarray]:
    """Blocks of resample weights, float64 ``(resamples, items)``: how often each item's
    cluster was drawn (an item counts once per draw of its patient). ``item_cluster`` is
    ``clusters.index`` in the order the caller wants the columns."""
    block = max(1, _BOOTSTRAP_CELLS // max(len(item_cluster), clusters.n, 1))
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        counts = np.zeros((b, clusters.n), dtype=np.float64)
        for members in clusters.strata:
            counts[:, members] = _stratified_counts(rng, len(members), b)
        yield counts[:, item_cluster]


def _bootstrap(
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    *,
    clusters: _Clusters,
    n_bootstrap: int,
    seed: int,
    with_curves: bool,
) -> dict[str, np.ndarray]:
    """Per-resample metric values from a stratified cluster bootstrap (:func:`_clusters`).

    Every metric is a function of weighted counts, so a resample is a row of weights over the
    items and nothing is copied: thousands of images and resamples take a second or so.
    """
    rng = np.random.default_rng(seed)
    order, is_pos, starts = _score_groups(y, s)
    pred = apply_threshold(s[order], threshold).astype(bool)
    # One product gives each resample's weighted (tp, fp, positives, negatives).
    cells = np.stack([pred & is_pos, pred & ~is_pos, is_pos, ~is_pos], axis=1).astype(np.float64)
    values: dict[str, list[np.ndarray]] = {k: [] for k in RATE_NAMES + CURVE_NAMES}
    for weights in _weight_blocks(rng, clusters, clusters.index[order], n_bootstrap):
        tp, fp, n_pos, n_neg = (weights @ cells).T
        for name, arr in _rates_from_counts(n_neg - fp, fp, n_pos - tp, tp).items():
            values[name].append(arr)
        if with_curves:
            roc_auc, pr_auc = _weighted_curve_metrics(is_pos, starts, weights)
            values["roc_auc"].append(roc_auc)
            values["pr_auc"].append(pr_auc)
    return {k: np.concatenate(v) for k, v in values.items() if v}


def bootstrap_rates(
    y_true: Any,
    scores: Any,
    threshold: float,
    *,
    groups: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The five rates at ``threshold`` in each of ``n_bootstrap`` resamples (arrays), from the
    bootstrap :func:`compute_metrics` uses: of patients when ``groups`` (a patient id per item)
    is given, else of images."""
    y, s = check_inputs(y_true, scores)
    clusters = _clusters(y, groups)
    return _bootstrap(
        y, s, threshold, clusters=clusters, n_bootstrap=n_bootstrap, seed=seed, with_curves=False
    )


def bootstrap_auc(
    y_true: Any, scores: Any, *, groups: Any | None = None, n_bootstrap: int = 1000, seed: int = 0
) -> np.ndarray:
    """ROC-AUC in each of ``n_bootstrap`` resamples, from the bootstrap :func:`compute_metrics`
    uses (patients when ``groups`` is given, else images): its ``ci95["roc_auc"]`` is these
    values' 2.5th and 97.5th percentiles.

    The resamples depend on ``y_true``, ``groups`` and ``seed`` only, never on the scores, so two
    models' (or two views') scores of the same images give paired values: the percentiles of
    their difference are the interval of one's gain over the other.
    """
    y, s = check_inputs(y_true, scores)
    if y.min() == y.max():
        raise ValueError("ROC-AUC needs both classes")
    samples = _bootstrap(
        y, s, 0.5, clusters=_clusters(y, groups), n_bootstrap=n_bootstrap, seed=seed, with_curves=True
    )
    return samples["roc_auc"]


def bootstrap_thresholds(
    y_true: Any,
    scores: Any,
    *,
    target_recall: float,
    rule: str = "max_specificity",
    groups: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """The threshold :func:`choose_threshold` picks in each resample of the same bootstrap as
    :func:`bootstrap_rates` (patients when ``groups`` is given): how far the chosen threshold
    itself would move had another sample of patients been drawn."""
    y, s = _choice_inputs(y_true, scores, target_recall, rule)
    clusters = _clusters(y, groups)
    rng = np.random.default_rng(seed)
    items = np.arange(len(y))
    thresholds = []
    for weights in _weight_blocks(rng, clusters, clusters.index, n_bootstrap):
        for row in weights.astype(np.int64):
            idx = np.repeat(items, row)  # a calibration sample is small: materialising is cheap
            thresholds.append(_choose(y[idx], s[idx], target_recall, rule))
    return np.asarray(thresholds, dtype=np.float64)


MARGIN_RULE = "bootstrap_margin"


def choose_threshold_with_margin(
    y_true: Any,
    scores: Any,
    groups: Any | None,
    *,
    target_recall: float = 0.98,
    percentile: float = 5.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[ThresholdChoice, dict[str, Any]]:
    """The target-recall threshold with a margin for the draw of validation patients.

    A threshold that stops exactly at the target recall on validation is fitted to that sample's
    own lowest-scoring positives, so new patients fall short of the target (by 1-2 points on two
    runs' held-out patients and acquisition group: README, Results). Here the threshold is the
    ``percentile``-th percentile of the thresholds ``max_specificity`` picks in ``n_bootstrap``
    resamples of ``groups`` (patients; images when None) (:func:`bootstrap_thresholds`), and never
    above the pooled one: a threshold that would still reach the target had all but
    ``percentile`` % of the other draws of patients been the validation set. The price is the
    specificity between the two thresholds.

    Returns the choice (rule ``bootstrap_margin``; validation recall and specificity at its
    threshold) and what the margin rests on (the pooled threshold, the percentile, the
    resampled thresholds' 2.5/50/97.5 percentiles), for ``threshold.json``.
    """
    if not 0.0 < percentile < 50.0:
        raise ValueError(f"percentile must be in (0, 50); got {percentile}")
    y, s = _choice_inputs(y_true, scores, target_recall, "max_specificity")
    pooled = _choose(y, s, target_recall, "max_specificity")
    resampled = bootstrap_thresholds(
        y, s, target_recall=target_recall, groups=groups, n_bootstrap=n_bootstrap, seed=seed
    )
    threshold = min(pooled, float(np.percentile(resampled, percentile)))
    tn, fp, fn, tp = _confusion(y, apply_threshold(s, threshold))
    rates = _rates_from_counts(tn, fp, fn, tp)
    choice = ThresholdChoice(
        threshold=threshold, target_recall=float(target_recall), recall=float(rates["recall"]),
        specificity=float(rates["specificity"]), rule=MARGIN_RULE, achievable=bool(tn > 0),
    )  # fmt: skip
    margin = {
        "pooled_threshold": pooled,
        "percentile": float(percentile),
        "resampled_thresholds": dict(
            zip(("p2.5", "p50", "p97.5"), np.percentile(resampled, [2.5, 50, 97.5]).tolist(), strict=True)
        ),
        "resampled": "patients" if groups is not None else "images",
        "n_bootstrap": n_bootstrap,
    }
    logger.info(
        "threshold %.6g (%s, p%g of %d resampled thresholds; pooled %.6g): validation recall %.4f, "
        "specificity %.4f", threshold, MARGIN_RULE, percentile, n_bootstrap, pooled, choice.recall,
        choice.specificity,
    )  # fmt: skip
    return choice, margin


def _percentile_ci(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def compute_metrics(
    y_true: Any,
    scores: Any,
    threshold: float,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Any | None = None,
) -> dict[str, Any]:
    """Metrics at ``threshold`` (rule ``score >= threshold``), JSON-ready.

    Keys: ``n, n_positive, n_negative, threshold, accuracy, precision, recall, specificity, f1,
    roc_auc, pr_auc`` (average precision), ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``),
    ``ci95`` (``{metric: [lo, hi]}``, percentile 95 % interval of a seeded stratified bootstrap
    with ``n_bootstrap`` resamples; ``None`` entries when ``n_bootstrap`` is 0), ``ci_unit`` and
    ``n_ci_units`` (what the bootstrap resampled, and how many: ``"patient"`` when ``groups``,
    a patient id per image, is given, else ``"image"``) and ``at_0_5`` (the rates and confusion
    matrix at threshold 0.5). Zero divisions give 0.0, like sklearn's ``zero_division=0``. With
    one class only, the AUCs are ``None`` and a warning is issued.

    Images of one patient are not independent (the same lungs, often the same day), so
    resampling images makes intervals too narrow; pass ``groups`` whenever patients are known.
    """
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0; got {n_bootstrap}")
    y, s = check_inputs(y_true, scores)
    clusters = _clusters(y, groups)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    both_classes = n_pos > 0 and n_neg > 0
    if not both_classes:
        warnings.warn(
            f"only one class present ({n_pos} positive, {n_neg} negative): ROC AUC and PR AUC "
            "are undefined, and the rates of the missing class are reported as 0",
            UserWarning,
            stacklevel=2,
        )
    point = rates_at(y, s, threshold)
    metrics: dict[str, Any] = {
        "n": len(y),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": float(threshold),
        **{name: point[name] for name in RATE_NAMES},
        "roc_auc": float(roc_auc_score(y, s)) if both_classes else None,
        "pr_auc": float(average_precision_score(y, s)) if both_classes else None,
        "confusion_matrix": point["confusion_matrix"],
        "ci_unit": clusters.unit,
        "n_ci_units": clusters.n,
    }
    if n_bootstrap:
        samples = _bootstrap(
            y, s, threshold, clusters=clusters, n_bootstrap=n_bootstrap, seed=seed, with_curves=both_classes
        )
        ci95 = {
            name: _percentile_ci(samples[name]) if name in samples else None
            for name in RATE_NAMES + CURVE_NAMES
        }
    else:
        ci95 = {name: None for name in RATE_NAMES + CURVE_NAMES}
    metrics["ci95"] = ci95
    metrics["at_0_5"] = rates_at(y, s, 0.5)
    return metrics


# --------------------------------------------------------------------------------------------
# A threshold that transfers: the target-recall threshold of each acquisition group
# --------------------------------------------------------------------------------------------

GROUP_RULES = ("group_median", "group_min")
POOLED_GROUP = "pooled"  # the name of the group made of the groups with too few positives


@dataclasses.dataclass(frozen=True)
class GroupThresholdChoice:
    """The operating point chosen across acquisition groups of the validation set.

    The first six fields mean what they mean in :class:`ThresholdChoice` (``recall`` and
    ``specificity`` on the whole validation set). ``min_positives``, ``groups`` and ``spread``
    are :func:`rates_by_group`'s. ``fallback``: why the pooled rule decided instead, or None.
    """

    threshold: float
    target_recall: float
    recall: float
    specificity: float
    rule: str
    achievable: bool
    min_positives: int
    groups: tuple[dict[str, Any], ...]
    spread: dict[str, Any]
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what threshold.json holds)."""
        return config.to_dict(self)


def _recall_threshold(positive_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold keeping ``target_recall`` of these positives (``score >= t``)."""
    ordered = np.sort(positive_scores)[::-1]
    needed = max(1, int(np.ceil(target_recall * len(ordered) - _RECALL_TOL * len(ordered))))
    return float(ordered[needed - 1])


def _min_positives(target_recall: float) -> int:
    """Positives a group needs before its target-recall threshold means anything: enough that one
    of them may be missed (1 / (1 - target), 50 at 0.98). With fewer, the threshold is just the
    group's lowest positive score."""
    if target_recall >= 1.0:
        return 1
    return max(1, int(np.ceil(round(1.0 / (1.0 - target_recall), 9))))


def _group_masks(y: np.ndarray, g: np.ndarray, min_positives: int) -> tuple[dict[Any, np.ndarray], dict]:
    """(group -> mask, for the groups a threshold is taken in; small group -> where it went).

    Groups with fewer than ``min_positives`` positives are pooled into one :data:`POOLED_GROUP`,
    used when the pool has enough positives ("pooled") and skipped otherwise (None)."""
    usable: dict[Any, np.ndarray] = {}
    small = []
    for group in pd.unique(g):
        mask = g == group
        if y[mask].sum() >= min_positives:
            usable[group] = mask
        else:
            small.append(group)
    pool = np.isin(g, small)
    enough = bool(small) and y[pool].sum() >= min_positives
    if enough:
        usable[POOLED_GROUP] = pool
    return usable, {group: POOLED_GROUP if enough else None for group in small}


def _group_row(group: Any, y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    tn, fp, fn, tp = _confusion(y, apply_threshold(s, threshold))
    return {
        "group": group.item() if isinstance(group, np.generic) else group,
        "n": len(y), "n_positive": tp + fn, "n_negative": tn + fp,
        "recall": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
    }  # fmt: skip


def _span(rows: list[dict[str, Any]], key: str) -> list[float] | None:
    values = [r[key] for r in rows if r[key] is not None]
    return [float(min(values)), float(max(values))] if values else None


def rates_by_group(
    y_true: Any,
    scores: Any,
    groups: Any,
    threshold: float,
    *,
    target_recall: float = 0.98,
    min_positives: int | None = None,
) -> dict[str, Any]:
    """How ``threshold`` does in each group, and where each group would have put it.

    ``groups``: one entry per group (``group``, ``n``, ``n_positive``, ``n_negative``, ``recall``
    and ``specificity`` at ``threshold``, None without items of that class; ``threshold``: the
    group's own target-recall threshold, None when it has fewer than ``min_positives``
    positives; ``pooled_into``: :data:`POOLED_GROUP` or None for such a small group), plus a
    :data:`POOLED_GROUP` entry when the small groups together have enough positives. ``spread``:
    ``n_groups_used`` and [min, max] of the own thresholds and of recall and specificity at
    ``threshold`` over the groups that have an own threshold.
    """
    y, s, g = _check_groups(y_true, scores, groups)
    needed = _min_positives(target_recall) if min_positives is None else int(min_positives)
    masks, pooled_into = _group_masks(y, g, needed)
    named = [(group, g == group) for group in pd.unique(g)]
    if POOLED_GROUP in masks:
        named.append((POOLED_GROUP, masks[POOLED_GROUP]))
    rows = []
    for group, mask in named:
        row = _group_row(group, y[mask], s[mask], threshold)
        own = group in masks
        row["threshold"] = _recall_threshold(s[mask & (y == 1)], target_recall) if own else None
        row["pooled_into"] = pooled_into.get(group)
        rows.append(row)
    used = [r for r in rows if r["threshold"] is not None]
    spread = {
        "n_groups_used": len(used),
        **{k: _span(used, k) for k in ("threshold", "recall", "specificity")},
    }
    return {"min_positives": needed, "groups": rows, "spread": spread}


def _check_groups(y_true: Any, scores: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s = check_inputs(y_true, scores)
    g = np.asarray(groups, dtype=object)
    if g.shape != y.shape:
        raise ValueError(f"groups has shape {g.shape} but y_true has {y.shape}")
    if any(isinstance(v, str) and v == POOLED_GROUP for v in g):
        raise ValueError(f"{POOLED_GROUP!r} is reserved for the pool of small groups; rename that group")
    return y, s, g


def choose_threshold_across_groups(
    y_true: Any,
    scores: Any,
    groups: Any,
    *,
    target_recall: float = 0.98,
    rule: str = "group_median",
    min_positives: int | None = None,
) -> GroupThresholdChoice:
    """An operating point meant to hold at a new site: the target-recall threshold is taken in
    every acquisition group of the validation set (``groups``, e.g. ``data.acquisition_groups``)
    and the final threshold is their median (``rule="group_median"``) or minimum (``"group_min"``).

    Why the median. The pooled threshold (:func:`choose_threshold`) is set by wherever the
    lowest-scoring positives sit. On a real run's validation set (870 images, four groups; README,
    Results) they sat in the group of positives imaged like the NORMAL images, whose own threshold
    was 0.085, while the group imaged like most PNEUMONIA images needed 0.456 and held the
    highest-scoring negatives (median 0.24, as the held-out test's NORMAL images had). The minimum
    keeps the target recall in every group but gives specificity away wherever negatives score
    higher (0.60 pooled, 0.14 in that group). The median is robust in both directions: neither the
    most optimistic nor the most pessimistic group sets it. There it moved the threshold from 0.283
    to 0.333: specificity in that group 0.57 -> 0.71 at the same recall (0.99), pooled recall
    0.981 -> 0.977. The price, stated: the validation recall can fall below the target, since half
    the groups may. Only positives set a group's threshold, so a group without negatives counts.

    Groups with fewer than ``min_positives`` positives (default ``ceil(1 / (1 - target))``: 50 at
    0.98, so that a group may miss one positive) are pooled into one group, used when the pool
    reaches ``min_positives`` and skipped otherwise (their images still count in ``recall`` and
    ``specificity``). With fewer than two groups left, the pooled ``max_specificity`` rule
    decides and ``fallback`` says why.
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"unknown group threshold rule {rule!r}; valid rules: {list(GROUP_RULES)}")
    if not 0.0 <= target_recall <= 1.0:
        raise ValueError(f"target_recall must be in [0, 1]; got {target_recall}")
    y, s, g = _check_groups(y_true, scores, groups)
    if len(np.unique(y)) < 2:
        raise ValueError(f"choosing a threshold needs both classes; validation labels are all {int(y[0])}")
    needed = _min_positives(target_recall) if min_positives is None else int(min_positives)
    masks, _ = _group_masks(y, g, needed)
    own = np.array([_recall_threshold(s[mask & (y == 1)], target_recall) for mask in masks.values()])
    fallback = None
    if len(own) >= 2:
        threshold = float(np.median(own) if rule == "group_median" else own.min())
    else:
        fallback = f"{len(own)} group(s) with >= {needed} positives: the pooled max_specificity rule decided"
        threshold = choose_threshold(y, s, target_recall=target_recall).threshold
    by_group = rates_by_group(y, s, g, threshold, target_recall=target_recall, min_positives=needed)
    tn, fp, fn, tp = _confusion(y, apply_threshold(s, threshold))
    rates = _rates_from_counts(tn, fp, fn, tp)
    choice = GroupThresholdChoice(
        threshold=threshold, target_recall=float(target_recall), recall=float(rates["recall"]),
        specificity=float(rates["specificity"]), rule=rule, achievable=bool(tn > 0),
        min_positives=needed, groups=tuple(by_group["groups"]), spread=by_group["spread"], fallback=fallback,
    )  # fmt: skip
    logger.info(
        "threshold %.6g (%s over %d groups, own thresholds %s): validation recall %.4f, specificity %.4f",
        threshold, rule, len(own), choice.spread["threshold"], choice.recall, choice.specificity,
    )  # fmt: skip
    return choice
