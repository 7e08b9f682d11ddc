"""Would an ensemble rank better? Average the probabilities that two or more runs gave the same images.

Reads the ``predictions.csv`` of ``cxr-pneumonia evaluate`` outputs (or of ``bench/quality.py``'s
``eval`` and ``eval-shift`` folders) made by different runs on the same images, joins them on
``path``, and reports the ROC-AUC of each run and of the mean probability, with 95 % intervals
that resample patients. The gain of the mean over the best single run is bootstrapped paired
(the same patients on both sides of every resample), so its interval says whether the gain is
more than the draw of patients; the members' rank correlation says how much they disagree.
Nothing is trained or scored: it costs seconds, and it tells whether an ensemble is worth
building before one is built.

    python bench/ensemble_eval.py runs/default-group/eval-shift runs/seed-group/eval-shift
"""

from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from _common import add_json_argument, emit, fail, interval95, paired_patient_bootstrap

N_BOOTSTRAP = 1000


def joined_predictions(eval_dirs: list[Path]) -> Any:
    """One row per image scored by every run: label, patient_id and ``p0``, ``p1``, ... ."""
    import pandas as pd

    table = None
    for index, folder in enumerate(eval_dirs):
        csv = folder / "predictions.csv"
        if not csv.is_file():
            fail(f"{folder}: no predictions.csv (not an evaluate output)")
        scores = pd.read_csv(csv, usecols=["path", "label", "patient_id", "probability"])
        scores = scores.dropna(subset=["probability"]).rename(columns={"probability": f"p{index}"})
        table = (
            scores if table is None else table.merge(scores.drop(columns=["label", "patient_id"]), on="path")
        )
    if table is None or table.empty or table["label"].nunique() < 2:
        fail("the evaluations share no images with both labels")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="evaluate outputs of different runs")
    add_json_argument(parser)
    args = parser.parse_args()
    if len(args.eval_dirs) < 2:
        fail("give at least two evaluations to average")
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    table = joined_predictions(args.eval_dirs)
    y, patients = table["label"].to_numpy(), table["patient_id"].astype(str).to_numpy()
    columns = {str(folder): table[f"p{i}"].to_numpy() for i, folder in enumerate(args.eval_dirs)}
    best = max(columns, key=lambda name: roc_auc_score(y, columns[name]))
    columns["mean"] = np.mean([table[f"p{i}"] for i in range(len(args.eval_dirs))], axis=0)
    samples = paired_patient_bootstrap(y, patients, columns, N_BOOTSTRAP)
    figures = {
        "n_images": len(table),
        "n_patients": int(np.unique(patients).size),
        "n_negative": int((y == 0).sum()),
        "roc_auc": {
            name: {"value": round(float(roc_auc_score(y, s)), 4), "ci95_patient": interval95(samples[name])}
            for name, s in columns.items()
        },
        "best_single": best,
        "mean_minus_best": {
            "value": round(float(roc_auc_score(y, columns["mean"]) - roc_auc_score(y, columns[best])), 4),
            "ci95_patient": interval95(samples["mean"] - samples[best]),
        },
        # members that order images alike have little to average out
        "rank_correlation": {
            f"{a} ~ {b}": round(float(spearmanr(columns[a], columns[b])[0]), 3)
            for a, b in combinations(list(columns)[:-1], 2)
        },
        "n_bootstrap": N_BOOTSTRAP,
    }
    summary = [
        f"{name}: ROC-AUC {cell['value']} {cell['ci95_patient']}" for name, cell in figures["roc_auc"].items()
    ]
    gain = figures["mean_minus_best"]
    summary.append(f"mean − best single: {gain['value']:+.4f} {gain['ci95_patient']} ({len(table)} images)")
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
