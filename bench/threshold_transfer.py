"""Does the threshold chosen on validation hold on new patients? Rules compared on a run's holdouts.

For a run made by ``bench/quality.py`` (its ``val_predictions.csv`` and the ``predictions.csv``
of ``eval/`` and, with ``--holdout-group``, ``eval-shift/``), each candidate threshold is chosen
on the validation scores alone and then applied to the holdouts:

- the run's saved threshold (``threshold.json``, whatever its rule);
- ``group_median``, the default rule, chosen again here (the acquisition groups recomputed as
  training did: ``data.acquisition_groups`` with the run's ``threshold_groups`` and ``seed``);
- ``max_specificity`` on the pooled validation scores (the target-recall threshold);
- ``bootstrap_margin`` (``evaluate.choose_threshold_with_margin``) at the 10th and 5th
  percentiles of the thresholds that ``max_specificity`` picks in 1,000 resamples of validation
  patients: a threshold that still reaches the target recall had 90 % / 95 % of the other draws
  of patients been the validation set;
- the fixed 0.5.

Recall and specificity on each holdout show which rule keeps the target recall on patients it
was not chosen on, and what that costs. Nothing is scored again: seconds.

``--views zoom|zoom_rotate`` replaces every probability (validation and holdouts) by its mean
over that test-time view set, from the per-view probabilities ``bench/tta_eval.py`` saved for the
same run: the rules are then chosen and applied as a run trained with ``--test-time-views`` would
(same model; the saved threshold, chosen on single views, is left out). Paired with the plain
call on the same run, this separates what the views do to the operating point from the draw of
a training run.

    python bench/threshold_transfer.py runs/default-group runs/seed-group
    python bench/tta_eval.py runs/default-group
    python bench/threshold_transfer.py runs/default-group --views zoom_rotate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import add_json_argument, emit, fail, require_run
from tta_eval import SIDES, means, views_csv_path

MARGIN_PERCENTILES = (10, 5)
HOLDOUTS = ("in_distribution", "held_out_group")


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from cxr_pneumonia.evaluate import rates_at

    rates = rates_at(labels, scores, threshold)
    return {"recall": round(float(rates["recall"]), 4), "specificity": round(float(rates["specificity"]), 4)}


def scores_of(run: Path, side: str, views: str) -> pd.DataFrame:
    """One side's predictions; with ``views``, each probability is the mean over that view set."""
    csv = run / SIDES[side]
    table = pd.read_csv(csv).dropna(subset=["probability"])
    if views == "none":
        return table
    views_csv = views_csv_path(csv)
    if not views_csv.is_file():
        fail(f"{views_csv}: no per-view probabilities; run bench/tta_eval.py {run} first")
    saved = pd.read_csv(views_csv)
    if list(saved["path"]) != list(table["path"]) or not np.allclose(saved["orig"], table["probability"]):
        fail(f"{views_csv}: made for other images or another model; run bench/tta_eval.py {run} again")
    return table.assign(probability=saved[means()[f"mean_{views}"]].mean(axis=1).to_numpy())


def group_median_threshold(run: Path, val: pd.DataFrame, target_recall: float) -> float:
    """The default rule on ``val``'s scores, over the acquisition groups training formed."""
    from cxr_pneumonia.data import acquisition_groups
    from cxr_pneumonia.evaluate import choose_threshold_across_groups

    train_cfg = json.loads((run / "config.json").read_text())["train"]
    groups = acquisition_groups(val, k=train_cfg["threshold_groups"], seed=train_cfg["seed"])
    return choose_threshold_across_groups(
        val["label"].to_numpy(), val["probability"].to_numpy(), groups.to_numpy(), target_recall=target_recall
    ).threshold


def candidate_thresholds(run: Path, target_recall: float, views: str = "none") -> dict[str, float]:
    """Each rule's threshold, chosen on the run's validation predictions only."""
    from cxr_pneumonia.evaluate import choose_threshold, choose_threshold_with_margin

    val = scores_of(run, "validation", views)
    labels, scores = val["label"].to_numpy(), val["probability"].to_numpy()
    patients = val["patient_id"].astype(str).to_numpy()
    saved = json.loads((run / "threshold.json").read_text())
    margins = {
        f"bootstrap_margin p{q}": choose_threshold_with_margin(
            labels, scores, patients, target_recall=target_recall, percentile=q
        )[0].threshold
        for q in MARGIN_PERCENTILES
    }
    # The saved threshold was chosen on single-view scores: no candidate under views.
    saved_name = f"saved ({saved.get('rule', 'unknown')})"
    saved_rule = {} if views != "none" else {saved_name: float(saved["threshold"])}
    return {
        **saved_rule,
        "group_median": group_median_threshold(run, val, target_recall),
        "max_specificity": choose_threshold(labels, scores, target_recall=target_recall).threshold,
        **margins,
        "fixed 0.5": 0.5,
    }


def transfer(run: Path, views: str = "none") -> dict[str, Any]:
    require_run(run)
    for needed in ("val_predictions.csv", "threshold.json", "eval/predictions.csv", "config.json"):
        if not (run / needed).is_file():
            fail(f"{run}: no {needed} (not a bench/quality.py run)")
    run_views = json.loads((run / "config.json").read_text())["train"].get("test_time_views", "none")
    if run_views != "none" and views != "none":
        fail(f"{run}: the run already averages over test-time views; --views is for single-view runs")
    target = float(json.loads((run / "threshold.json").read_text()).get("target_recall", 0.98))
    thresholds = candidate_thresholds(run, target, views)
    sides: dict[str, Any] = {}
    for side in HOLDOUTS:
        if not (run / SIDES[side]).is_file():
            continue
        table = scores_of(run, side, views)
        labels, scores = table["label"].to_numpy(), table["probability"].to_numpy()
        sides[side] = {rule: _rates(labels, scores, t) for rule, t in thresholds.items()}
    return {
        "views": views,
        "target_recall": target,
        "thresholds": {k: round(v, 4) for k, v in thresholds.items()},
        "holdouts": sides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories made by bench/quality.py")
    parser.add_argument(
        "--views",
        choices=("none", "zoom", "zoom_rotate"),
        default="none",
        help="Average every probability over this test-time view set (needs bench/tta_eval.py RUN first).",
    )
    add_json_argument(parser)
    args = parser.parse_args()
    figures = {str(run): transfer(run, args.views) for run in args.runs}
    summary = []
    for run, result in figures.items():
        for rule, threshold in result["thresholds"].items():
            cells = [
                f"{side} recall {rates[rule]['recall']:.3f} specificity {rates[rule]['specificity']:.3f}"
                for side, rates in result["holdouts"].items()
            ]
            summary.append(f"{run} {rule} {threshold:.3f}: " + "; ".join(cells))
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
