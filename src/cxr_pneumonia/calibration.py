"""Site calibration: a deployment site's labelled sample re-chooses the operating point.

A model's threshold is chosen on its own validation split; on another hospital's images the
scores move (other detectors, exposure, patients), and the recall promised on validation no
longer holds. :func:`calibrate` scores a site's labelled sample (tens to a few hundred images)
with the run, through its input check, chooses the threshold for the target recall with the
same rule as training (:func:`cxr_pneumonia.evaluate.choose_threshold`), and keeps it in the run
as a named operating point (``operating_points.json``, :mod:`cxr_pneumonia.rundir`) beside the
validation one (``default``, threshold.json, never overwritten). Evaluate, predict and serve
apply a named point with ``--operating-point NAME``.

Every interval is a patient-level bootstrap (patients resampled, stratified so both classes stay
present): the threshold's own, and recall's and specificity's at it. A small sample gives wide
intervals, so the point also says how many more local images would narrow them
(:func:`images_needed`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr_pneumonia import __version__, rundir
from cxr_pneumonia.data import CLASS_NAMES, content_hashes, discover
from cxr_pneumonia.evaluate import (
    RULES,
    bootstrap_rates,
    bootstrap_thresholds,
    choose_threshold,
    compute_metrics,
)

if TYPE_CHECKING:  # the model's modules (TensorFlow) load only when a sample is scored
    from cxr_pneumonia.predict import Run

MIN_PER_CLASS = 10  # fewer images of a class than this say nothing about its rate at a threshold
DEFAULT_WIDTH = 0.05  # full width (upper - lower) of the 95 % intervals to aim for
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


class CalibrationError(ValueError):
    """A sample that cannot calibrate a run (one class, too few images, a name already taken)."""


# ---- how many images a width needs ---------------------------------------------------------------


def wilson_width(p: float, n: float, *, z: float = Z95) -> float:
    """Full width of the Wilson score interval for a proportion ``p`` observed on ``n`` trials.

    ``2 z / (1 + z²/n) · sqrt(p (1 - p) / n + z² / (4 n²))``. Unlike the Wald interval it does
    not collapse to zero width when ``p`` is 0 or 1, which recall at a high-recall threshold
    often is on a small sample.
    """
    return 2 * z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))


def images_needed(p: float, n_now: int, width: float, *, design_effect: float = 1.0, z: float = Z95) -> int:
    """How many more images of a class would narrow the 95 % interval of its rate ``p`` (recall
    over positives, specificity over negatives) to full width ``width``.

    Independent images: the smallest ``n`` with :func:`wilson_width` ``(p, n) == width`` solves
    the quadratic ``W² n² + 2 z² (W² - 2 p q) n - z⁴ (1 - W²) = 0`` (``q = 1 - p``), so
    ``n = z² (2 p q - W² + sqrt((2 p q - W²)² + W² (1 - W²))) / W²``; at ``p`` = 1 this is
    ``z² (1 - W) / W`` (73 images for W = 0.05).

    Images of one patient are correlated, so ``n`` images carry the information of only
    ``n / design_effect`` independent ones, where the design effect is the patient-level
    variance of the rate divided by its image-level variance (both measured by the bootstrap on
    the sample; Kish's ``1 + (m - 1) ρ`` for ``m`` images per patient and intra-patient
    correlation ρ). New images from new patients at the same images-per-patient rate keep that
    design effect, so the images needed are ``ceil(design_effect · n)``; the answer is what
    that exceeds ``n_now`` by (0 when the interval is already that narrow).
    """
    if not 0 < width < 1:
        raise ValueError(f"width must be in (0, 1); got {width}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1]; got {p}")
    a, pq, w2 = z * z, p * (1 - p), width * width
    n_independent = a * (2 * pq - w2 + math.sqrt((2 * pq - w2) ** 2 + w2 * (1 - w2))) / w2
    # the tolerance keeps an exact whole-number answer from rounding up by float noise
    return max(0, math.ceil(max(design_effect, 1.0) * n_independent - 1e-9) - int(n_now))


def design_effect(patient_level: np.ndarray, image_level: np.ndarray) -> float:
    """Patient-level bootstrap variance of a rate ÷ its image-level variance, at least 1.

    Below 1 is bootstrap noise around independent images (or a rate with no variance at all,
    e.g. recall 1.0 at the threshold): it is reported as 1, never promising fewer images than
    independent sampling would need.
    """
    image_var = float(np.var(image_level))
    if image_var <= 0:
        return 1.0
    return max(1.0, float(np.var(patient_level)) / image_var)


# ---- the operating point -------------------------------------------------------------------------


def choose_operating_point(
    y_true: Any,
    scores: Any,
    patients: Any,
    *,
    target_recall: float,
    rule: str = "max_specificity",
    width: float = DEFAULT_WIDTH,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The threshold for ``target_recall`` on a labelled sample, with patient-level intervals.

    Returns the JSON-ready point (less its name and provenance): ``threshold``, ``recall``,
    ``specificity``, ``roc_auc``, ``achievable``, counts, ``ci95`` of the threshold itself (the
    threshold the rule picks in each resample of patients) and of recall, specificity and
    ROC-AUC at the chosen threshold, and ``more_images`` (:func:`images_needed` for recall and
    specificity, with each one's design effect).
    """
    choice = choose_threshold(y_true, scores, target_recall=target_recall, rule=rule)
    boot = {"groups": patients, "n_bootstrap": n_bootstrap, "seed": seed}
    metrics = compute_metrics(y_true, scores, choice.threshold, **boot)
    thresholds = bootstrap_thresholds(y_true, scores, target_recall=target_recall, rule=rule, **boot)
    by_patient = bootstrap_rates(y_true, scores, choice.threshold, **boot)
    by_image = bootstrap_rates(y_true, scores, choice.threshold, n_bootstrap=n_bootstrap, seed=seed)
    more = {}
    for rate, n_now in (("recall", metrics["n_positive"]), ("specificity", metrics["n_negative"])):
        effect = design_effect(by_patient[rate], by_image[rate])
        lo, hi = metrics["ci95"][rate]
        more[rate] = {
            "design_effect": round(effect, 3),
            "width_now": hi - lo,
            "more": images_needed(metrics[rate], n_now, width, design_effect=effect),
        }
    return {
        **choice.to_dict(),
        "n": metrics["n"],
        "n_pos": metrics["n_positive"],
        "n_neg": metrics["n_negative"],
        "n_patients": metrics["n_ci_units"],
        "roc_auc": metrics["roc_auc"],
        "ci95": {
            "threshold": [float(v) for v in np.percentile(thresholds, [2.5, 97.5])],
            **{k: metrics["ci95"][k] for k in ("recall", "specificity", "roc_auc")},
        },
        "ci_unit": metrics["ci_unit"],
        "n_bootstrap": n_bootstrap,
        "more_images": {"width": width, **more},
    }


def calibrate(
    run: Run,
    data: str | Path,
    *,
    name: str,
    target_recall: float | None = None,
    rule: str | None = None,
    width: float = DEFAULT_WIDTH,
    n_bootstrap: int = 1000,
    seed: int = 0,
    replace: bool = False,
    split: str | None = None,
    gate: bool = True,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Choose and save the operating point ``name`` on a site's labelled sample ``data``.

    ``target_recall`` and ``rule`` default to the run's own (threshold.json). Images the input
    check rejects are left out and counted (``gate=False`` keeps them). Fails with
    :class:`CalibrationError` (nothing written) when the name is taken and not ``replace``, or
    when the sample holds fewer than :data:`MIN_PER_CLASS` images of a class. Returns the point
    as saved in ``RUN/operating_points.json``.
    """
    images = preflight(run.path, data, name=name, replace=replace, split=split, rule=rule)
    own = rundir.read_threshold(run.path)
    target = float(own.get("target_recall", 0.98) if target_recall is None else target_recall)
    if not 0 <= target <= 1 or not 0 < width < 1:  # before the images are scored
        raise CalibrationError(f"target recall must be in [0, 1] and width in (0, 1); got {target}, {width}")
    from cxr_pneumonia.evaluation import scored_images

    table, headline, failures = scored_images(run, data, split=split, gate=gate, batch_size=batch_size)
    n_rejected = int((table["status"] == "rejected").sum()) if gate else 0
    note = f" after the input check rejected {n_rejected}" if n_rejected else ""
    _check_classes(headline["label"].to_numpy(), data, note + _unreadable(failures))
    point = choose_operating_point(
        headline["label"].to_numpy(),
        headline["probability"].to_numpy(),
        headline["patient_id"].to_numpy(),
        target_recall=target,
        rule=rule or _own_rule(own),
        width=width,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    point = {
        "name": name,
        **point,
        "chosen_on": f"site sample {Path(data).name}" + (f" ({split})" if split else ""),
        "n_rejected": n_rejected,
        "n_failed": len(failures),
        "data": {
            "source": str(Path(data).resolve()),
            "split": split,
            "n_files": len(images),
            "fingerprint": fingerprint(images["path"]),
        },
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    rundir.save_operating_point(run.path, point, replace=replace)
    return point


def preflight(
    run_dir: str | Path,
    data: str | Path,
    *,
    name: str,
    replace: bool = False,
    split: str | None = None,
    rule: str | None = None,
) -> pd.DataFrame:
    """The checks :func:`calibrate` makes before any image is scored (so a wrong name, rule or
    sample fails before the model is loaded): the name is free (or ``replace``), the rule is one
    a sample can use (:data:`~cxr_pneumonia.evaluate.RULES`), and the sample's labels hold
    :data:`MIN_PER_CLASS` images of each class. Returns the sample's images."""
    _check_name_free(Path(run_dir), name, replace)
    if rule is not None and rule not in RULES:
        raise CalibrationError(f"unknown calibration rule {rule!r}; valid rules: {', '.join(RULES)}")
    images = discover(Path(data))
    if split is not None:
        images = images[images["split"] == split].reset_index(drop=True)
    _check_classes(images["label"].to_numpy(), data, f" in split {split!r}" if split else "")
    return images


def _own_rule(threshold_info: dict[str, Any]) -> str:
    """The run's threshold rule when :func:`choose_threshold` knows it (a run may record a rule
    of its own, e.g. one taken across groups), else ``max_specificity``."""
    rule = threshold_info.get("rule")
    return rule if rule in RULES else "max_specificity"


def fingerprint(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the sorted content hashes of ``paths``: the same files give the same
    fingerprint wherever they lie and whatever they are called. A file that cannot be read (no
    read permission) is left out of it; the point counts it in ``n_failed``."""
    hashes = [h for h in content_hashes(paths) if h is not None]
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def _check_name_free(path: Path, name: str, replace: bool) -> None:
    try:
        rundir.check_point_name(name)
    except ValueError as e:
        raise CalibrationError(str(e)) from e
    if name == rundir.DEFAULT_OPERATING_POINT:
        raise CalibrationError(f"{name!r} is the run's own threshold (threshold.json); choose another name")
    if name.startswith(rundir.VALIDATION_POINT_PREFIX):
        raise CalibrationError(
            f"{name!r}: names starting {rundir.VALIDATION_POINT_PREFIX!r} are the points training chose on "
            "validation; choose another name"
        )
    existing = rundir.read_operating_points(path).get(name)
    if existing is not None and not replace:
        raise CalibrationError(
            f"{path}: operating point {name!r} exists (threshold {existing['threshold']:.4g}, "
            f"{existing.get('created_at', 'date unknown')}); choose another name or replace it (--replace)"
        )


def _check_classes(labels: np.ndarray, data: str | Path, note: str) -> None:
    """A one-line :class:`CalibrationError` unless both classes have :data:`MIN_PER_CLASS` images."""
    counts = [int((labels == k).sum()) for k in (0, 1)]
    if min(counts) < MIN_PER_CLASS:
        found = " and ".join(f"{n} {CLASS_NAMES[k]}" for k, n in enumerate(counts))
        raise CalibrationError(
            f"{data}: calibration needs at least {MIN_PER_CLASS} images of each class; found {found}{note}"
        )


def _unreadable(failures: list[tuple[str, str]]) -> str:
    return f" ({len(failures)} files unreadable)" if failures else ""


def operating_points(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every operating point of a run by name: ``default`` (threshold.json) first, then the
    calibrated ones."""
    rundir.check_complete(Path(path))
    return {
        rundir.DEFAULT_OPERATING_POINT: rundir.read_threshold(Path(path)),
        **rundir.read_operating_points(path),
    }


def more_images_line(point: dict[str, Any]) -> str:
    """The one line that says how many more local images would narrow the intervals."""
    more = point["more_images"]
    parts = [
        f"{more[rate]['more']} more {CLASS_NAMES[k]} images ({rate} interval now "
        f"{more[rate]['width_now']:.3f} wide, design effect {more[rate]['design_effect']:.2f})"
        for k, rate in ((1, "recall"), (0, "specificity"))
    ]
    return f"to narrow the 95 % intervals to width {more['width']:g}: about {' and '.join(parts)}"
