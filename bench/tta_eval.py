"""Would test-time augmentation rank better? Score a run's holdouts again under fixed views, average.

For a run made by ``bench/quality.py``, the images of ``OUT/eval`` (in-distribution holdout) and
``OUT/eval-shift`` (held-out acquisition group, when there is one) are preprocessed by the run's
pipeline, then scored under each fixed view of the preprocessed image: zoom 0.92 and 1.08,
rotation +4° and −4° (within the training augmentation's ±15 % zoom and ±7°; never a flip).
The original view's probability is the evaluation's own. Reported per side: ROC-AUC of each view,
of the mean of the original and the two zooms, and of the mean of all five, with 95 % intervals
that resample patients, and each mean's gain over the original view bootstrapped paired.

Cost: one forward pass per view and image (Keras float32), e.g. about 3 min per view for 1,091
images at 6 img/s. ``--limit N`` scores only the first N/2 images of each class on each side (a smoke test).

    python bench/tta_eval.py runs/default-group --json runs/tta.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import add_json_argument, emit, fail, interval95, paired_patient_bootstrap, require_run

SIDES = {"in_distribution": "eval", "held_out_group": "eval-shift"}
MEANS = {"mean_orig_zooms": ("orig", "zoom_0.92", "zoom_1.08"), "mean_all": None}


def views() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    from cxr_pneumonia.augment import affine

    return {
        "zoom_0.92": lambda img: affine(img, scale=0.92),
        "zoom_1.08": lambda img: affine(img, scale=1.08),
        "rot_+4": lambda img: affine(img, degrees=4.0),
        "rot_-4": lambda img: affine(img, degrees=-4.0),
    }


def scored_views(run: Any, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (an evaluation's predictions) with one probability column per view."""
    from cxr_pneumonia.io import load_image

    preprocessed = np.stack([run.preprocess(load_image(path), source=path) for path in table["path"]])
    table = table.rename(columns={"probability": "orig"})
    for name, view in views().items():
        table[name] = run.predict_preprocessed(np.stack([view(img) for img in preprocessed]))
    return table


def side_figures(table: pd.DataFrame, n_bootstrap: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    y, patients = table["label"].to_numpy(), table["patient_id"].astype(str).to_numpy()
    columns = {name: table[name].to_numpy() for name in ("orig", *views())}
    for mean, members in MEANS.items():
        columns[mean] = table[list(members or ("orig", *views()))].mean(axis=1).to_numpy()
    samples = paired_patient_bootstrap(y, patients, columns, n_bootstrap)
    return {
        "n_images": len(table),
        "roc_auc": {
            name: {"value": round(float(roc_auc_score(y, s)), 4), "ci95_patient": interval95(samples[name])}
            for name, s in columns.items()
        },
        "gain_over_orig": {
            mean: {
                "value": round(float(roc_auc_score(y, columns[mean]) - roc_auc_score(y, columns["orig"])), 4),
                "ci95_patient": interval95(samples[mean] - samples["orig"]),
            }
            for mean in MEANS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run directory made by bench/quality.py")
    parser.add_argument(
        "--limit", type=int, default=None, help="Only the first N/2 images of each class per side."
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="Patient resamples for the intervals.")
    add_json_argument(parser)
    args = parser.parse_args()
    require_run(args.run)
    from cxr_pneumonia.predict import Run

    run = Run.load(args.run, runtime="keras")  # the evaluation's own probabilities are Keras float32
    figures: dict[str, Any] = {"run": str(args.run), "views": ["orig", *views()]}
    summary = []
    for side, folder in SIDES.items():
        csv = args.run / folder / "predictions.csv"
        if not csv.is_file():
            continue
        table = pd.read_csv(csv).dropna(subset=["probability"])
        if args.limit:  # the files are sorted by class: take the first of each
            table = table.groupby("label").head(max(1, args.limit // 2))
        if table["label"].nunique() < 2:
            fail(f"{csv}: needs images of both classes")
        figures[side] = side_figures(scored_views(run, table), args.bootstrap)
        aucs = figures[side]["roc_auc"]
        summary.append(f"{side}: " + ", ".join(f"{name} {cell['value']}" for name, cell in aucs.items()))
    if len(figures) == 2:
        fail(f"{args.run}: no eval/ or eval-shift/ predictions (not a bench/quality.py run)")
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
