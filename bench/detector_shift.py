"""Detector shift without test data: score runs on their own validation images under texture,
intensity and framing perturbations, and on the full-resolution originals.

Each run is scored at its own saved threshold on the same images: ``--per-class`` NORMAL and
PNEUMONIA images drawn (seed 0) from the first run's ``val_predictions.csv`` (runs trained with
the same data and seed share that patient split). For each condition it reports ROC-AUC,
recall, specificity and the median NORMAL score: the held-out split's symptom was NORMAL scores
rising, so that median is the figure to watch. Noise σ 10 and edge enhancement ×2 lie beyond the
training augmentation's range on purpose.

    python bench/detector_shift.py runs/xception-old runs/xception-default --json shift.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import FULLRES_DIR, add_json_argument, emit, require_run

Perturbation = Callable[[np.ndarray], np.ndarray]


def conditions() -> dict[str, Perturbation]:
    from cxr_pneumonia.augment import PERTURBATIONS, add_noise, unsharp_mask

    def seeded_noise(sigma: float) -> Perturbation:
        return lambda img: add_noise(img, sigma, np.random.default_rng(list(img.shape)))

    return {
        "clean": lambda img: img,
        **PERTURBATIONS,
        "noise_3": seeded_noise(3.0),
        "noise_10": seeded_noise(10.0),
        "sharpen_2": lambda img: unsharp_mask(img, 2.0),
    }


def sample_images(run: Path, per_class: int) -> pd.DataFrame:
    table = pd.read_csv(run / "val_predictions.csv")
    picks = [table[table["label"] == c].sample(min(per_class, (table["label"] == c).sum()), random_state=0)
             for c in (0, 1)]  # fmt: skip
    return pd.concat(picks)[["path", "label"]]


def rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    from cxr_pneumonia.evaluate import compute_metrics

    m = compute_metrics(y, p, threshold, n_bootstrap=0)
    return {
        "roc_auc": m["roc_auc"],
        "recall": m["recall"],
        "specificity": m["specificity"],
        "normal_median": float(np.median(p[y == 0])),
    }


def score_run(run_dir: Path, images: pd.DataFrame, fullres: list[Path]) -> dict[str, Any]:
    from cxr_pneumonia.io import load_image
    from cxr_pneumonia.predict import Run

    run = Run.load(run_dir, runtime="keras")
    raw = [load_image(p) for p in images["path"]]
    y = images["label"].to_numpy()
    results = {
        name: rates(y, run.predict_images([perturb(img) for img in raw]), run.threshold)
        for name, perturb in conditions().items()
    }
    if fullres:
        fy = np.array([int(p.parent.name == "PNEUMONIA") for p in fullres])
        results["fullres"] = rates(fy, run.predict_images([load_image(p) for p in fullres]), run.threshold)
    return {"threshold": run.threshold, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="Run directories (same data and seed).")
    parser.add_argument("--per-class", type=int, default=120, help="Validation images per class.")
    parser.add_argument("--fullres", type=Path, default=FULLRES_DIR, help="Full-resolution originals.")
    add_json_argument(parser)
    args = parser.parse_args()
    for run in args.runs:
        require_run(run)
    images = sample_images(args.runs[0], args.per_class)
    fullres = sorted(args.fullres.glob("*/*/*")) if args.fullres.is_dir() else []
    figures = {str(run): score_run(run, images, fullres) for run in args.runs}
    names = list(next(iter(figures.values()))["results"])
    summary = ["condition        " + "  ".join(f"{run.name[:28]:>28s}" for run in args.runs)]
    for name in names:
        cells = []
        for run in args.runs:
            r = figures[str(run)]["results"][name]
            cells.append(f"{r['roc_auc']:.3f}/{r['specificity']:.3f}/{r['normal_median']:.3f}".rjust(28))
        summary.append(f"{name:16s} " + "  ".join(cells))
    summary.append("cells: ROC-AUC / specificity at the run's threshold / median NORMAL score")
    emit({"n_per_class": args.per_class, "runs": figures}, summary, args.json)


if __name__ == "__main__":
    main()
