"""Does the threshold chosen on validation hold on new patients? Rules compared on a run's holdouts.

For a run made by ``bench/quality.py`` (its ``val_predictions.csv`` and the ``predictions.csv``
of ``eval/`` and, with ``--holdout-group``, ``eval-shift/``), each candidate threshold is chosen
on the validation scores alone and then applied to the holdouts:

- the run's saved threshold (``threshold.json``, whatever its rule);
- ``max_specificity`` on the pooled validation scores (the target-recall threshold);
- ``bootstrap_margin`` (``evaluate.choose_threshold_with_margin``) at the 10th and 5th
  percentiles of the thresholds that ``max_specificity`` picks in 1,000 resamples of validation
  patients: a threshold that still reaches the target recall had 90 % / 95 % of the other draws
  of patients been the validation set;
- the fixed 0.5.

Recall and specificity on each holdout show which rule keeps the target recall on patients it
was not chosen on, and what that costs. Nothing is scored again: seconds.

    python bench/threshold_transfer.py runs/default-group runs/seed-group
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import add_json_argument, emit, fail, require_run

MARGIN_PERCENTILES = (10, 5)
HOLDOUTS = {"in_distribution": "eval", "held_out_group": "eval-shift"}


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from cxr_pneumonia.evaluate import rates_at

    rates = rates_at(labels, scores, threshold)
    return {"recall": round(float(rates["recall"]), 4), "specificity": round(float(rates["specificity"]), 4)}


def candidate_thresholds(run: Path, target_recall: float) -> dict[str, float]:
    """Each rule's threshold, chosen on the run's validation predictions only."""
    from cxr_pneumonia.evaluate import choose_threshold, choose_threshold_with_margin

    val = pd.read_csv(run / "val_predictions.csv")
    labels, scores = val["label"].to_numpy(), val["probability"].to_numpy()
    patients = val["patient_id"].astype(str).to_numpy()
    saved = json.loads((run / "threshold.json").read_text())
    margins = {
        f"bootstrap_margin p{q}": choose_threshold_with_margin(
            labels, scores, patients, target_recall=target_recall, percentile=q
        )[0].threshold
        for q in MARGIN_PERCENTILES
    }
    return {
        f"saved ({saved.get('rule', 'unknown')})": float(saved["threshold"]),
        "max_specificity": choose_threshold(labels, scores, target_recall=target_recall).threshold,
        **margins,
        "fixed 0.5": 0.5,
    }


def transfer(run: Path) -> dict[str, Any]:
    require_run(run)
    for needed in ("val_predictions.csv", "threshold.json", "eval/predictions.csv"):
        if not (run / needed).is_file():
            fail(f"{run}: no {needed} (not a bench/quality.py run)")
    target = float(json.loads((run / "threshold.json").read_text()).get("target_recall", 0.98))
    thresholds = candidate_thresholds(run, target)
    sides: dict[str, Any] = {}
    for side, folder in HOLDOUTS.items():
        csv = run / folder / "predictions.csv"
        if not csv.is_file():
            continue
        table = pd.read_csv(csv).dropna(subset=["probability"])
        labels, scores = table["label"].to_numpy(), table["probability"].to_numpy()
        sides[side] = {rule: _rates(labels, scores, t) for rule, t in thresholds.items()}
    return {
        "target_recall": target,
        "thresholds": {k: round(v, 4) for k, v in thresholds.items()},
        "holdouts": sides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories made by bench/quality.py")
    add_json_argument(parser)
    args = parser.parse_args()
    figures = {str(run): transfer(run) for run in args.runs}
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
