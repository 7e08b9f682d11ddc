"""How often does a site calibration hold on the rest of the site? The acceptance protocol, repeated.

Issue 11's site check calibrates on a patient-grouped third of a labelled set and evaluates at
that point on the other two thirds. One such split is one draw; this script repeats it
``--repeats`` times on a run's holdout predictions (``bench/quality.py``'s ``eval/`` and
``eval-shift/``; nothing is scored again) and reports, for each way of choosing the threshold
on the third, how often recall and specificity on the rest reach the floors, and their
median and 5th percentile:

- ``max_specificity`` and ``midpoint``: what ``calibrate`` can do (``--rule``; it defaults to
  the run's rule, and ``max_specificity`` for the group rules a site sample cannot use);
- ``bootstrap_margin`` at the 10th and 5th percentiles (``evaluate.choose_threshold_with_margin``,
  a training rule, not offered by ``calibrate``): the price of protecting recall against the
  draw of the sample;
- ``hindsight``: the target-recall threshold of the whole holdout, rest included. No rule can
  beat it on average; what it misses is the noise of evaluating on the rest alone.

Only images the run's gate accepted count, as in ``calibrate`` and ``evaluate``'s headline.

    python bench/calibration_transfer.py runs/quality-group-mnv2 [--repeats 200]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import add_json_argument, emit, fail, require_run
from tta_eval import SIDES

HOLDOUTS = ("in_distribution", "held_out_group")
MARGIN_PERCENTILES = (10, 5)


def accepted_predictions(run: Path, side: str) -> pd.DataFrame | None:
    """One holdout's scored images that the gate accepted, or None when the run lacks that side."""
    csv = run / SIDES[side]
    if not csv.is_file():
        return None
    table = pd.read_csv(csv).dropna(subset=["probability"])
    if "status" in table:
        table = table[table["status"] == "ok"]
    return table.assign(patient_id=table["patient_id"].astype(str)).reset_index(drop=True)


def thresholds_on(sample: pd.DataFrame, target: float, seed: int) -> dict[str, float]:
    """Each rule's threshold, chosen on ``sample`` alone."""
    from cxr_pneumonia.evaluate import choose_threshold, choose_threshold_with_margin

    y, s = sample["label"].to_numpy(), sample["probability"].to_numpy()
    chosen = {
        rule: choose_threshold(y, s, target_recall=target, rule=rule).threshold
        for rule in ("max_specificity", "midpoint")
    }
    for q in MARGIN_PERCENTILES:
        choice, _ = choose_threshold_with_margin(
            y,
            s,
            sample["patient_id"].to_numpy(),
            target_recall=target,
            percentile=q,
            n_bootstrap=300,
            seed=seed,
        )
        chosen[f"bootstrap_margin p{q}"] = choice.threshold
    return chosen


def repeat_protocol(
    table: pd.DataFrame, *, target: float, fraction: float, repeats: int, seed: int
) -> dict[str, np.ndarray]:
    """Per rule, the (recall, specificity) on the rest of each of ``repeats`` patient-grouped draws."""
    from cxr_pneumonia.evaluate import choose_threshold, rates_at

    hindsight = choose_threshold(table["label"], table["probability"], target_recall=target).threshold
    patients = table["patient_id"].unique()
    rng = np.random.default_rng(seed)
    results: dict[str, list[tuple[float, float]]] = {}
    for draw in range(repeats):
        third = rng.choice(patients, size=max(1, round(len(patients) * fraction)), replace=False)
        in_sample = table["patient_id"].isin(third).to_numpy()
        sample, rest = table[in_sample], table[~in_sample]
        if sample["label"].nunique() < 2 or rest["label"].nunique() < 2:
            continue
        for rule, threshold in {**thresholds_on(sample, target, draw), "hindsight": hindsight}.items():
            rates = rates_at(rest["label"].to_numpy(), rest["probability"].to_numpy(), threshold)
            results.setdefault(rule, []).append((float(rates["recall"]), float(rates["specificity"])))
    return {rule: np.asarray(pairs) for rule, pairs in results.items()}


def summarise(pairs: np.ndarray, recall_floor: float, specificity_floor: float) -> dict[str, Any]:
    recall, specificity = pairs[:, 0], pairs[:, 1]
    meets = {"recall": recall >= recall_floor, "specificity": specificity >= specificity_floor}
    return {
        "draws": len(pairs),
        "share_recall_at_floor": round(float(meets["recall"].mean()), 3),
        "share_specificity_at_floor": round(float(meets["specificity"].mean()), 3),
        "share_both": round(float((meets["recall"] & meets["specificity"]).mean()), 3),
        "recall_median_p5": [round(float(np.median(recall)), 4), round(float(np.percentile(recall, 5)), 4)],
        "specificity_median_p5": [
            round(float(np.median(specificity)), 4),
            round(float(np.percentile(specificity, 5)), 4),
        ],
    }


def summary_line(s: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"recall ≥ {args.recall_floor} in {s['share_recall_at_floor']:.0%}, specificity ≥ "
        f"{args.specificity_floor} in {s['share_specificity_at_floor']:.0%}, both in {s['share_both']:.0%} "
        f"of {s['draws']} draws; median recall {s['recall_median_p5'][0]:.3f}, "
        f"specificity {s['specificity_median_p5'][0]:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories made by bench/quality.py")
    parser.add_argument("--repeats", type=int, default=200, help="Patient-grouped draws per holdout.")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="Share of patients in the sample.")
    parser.add_argument("--target-recall", type=float, default=0.98, help="The recall each rule aims at.")
    parser.add_argument("--recall-floor", type=float, default=0.97, help="Recall the rest must keep.")
    parser.add_argument(
        "--specificity-floor", type=float, default=0.80, help="Specificity the rest must keep."
    )
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    args = parser.parse_args()
    if not 0 < args.fraction < 1 or args.repeats < 1:
        fail(f"--fraction must be in (0, 1) and --repeats at least 1; got {args.fraction}, {args.repeats}")
    logging.getLogger("cxr_pneumonia").setLevel(logging.WARNING)  # one line per chosen threshold otherwise
    warnings.filterwarnings("ignore", message="target recall .* is only reached")
    keys = ("repeats", "fraction", "target_recall", "recall_floor", "specificity_floor", "seed")
    figures: dict[str, Any] = {key: getattr(args, key) for key in keys}
    summary = []
    for run in args.runs:
        require_run(run)
        for side in HOLDOUTS:
            table = accepted_predictions(run, side)
            if table is None:
                continue
            draws = repeat_protocol(
                table, target=args.target_recall, fraction=args.fraction, repeats=args.repeats, seed=args.seed
            )
            rules = {
                rule: summarise(pairs, args.recall_floor, args.specificity_floor)
                for rule, pairs in draws.items()
            }
            figures.setdefault("runs", {}).setdefault(str(run), {})[side] = {
                "n": len(table),
                "n_negative": int((table["label"] == 0).sum()),
                "n_patients": int(table["patient_id"].nunique()),
                "rules": rules,
            }
            summary += [f"{run} {side} {rule}: {summary_line(s, args)}" for rule, s in rules.items()]
    if "runs" not in figures:
        fail("no eval/ or eval-shift/ predictions in the runs given (not bench/quality.py runs)")
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
