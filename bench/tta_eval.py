"""Would test-time augmentation rank better? Score a run's holdouts again under fixed views, average.

For a run made by ``bench/quality.py``, the images of its own validation split
(``val_predictions.csv``, what its threshold was chosen on), of ``OUT/eval`` (in-distribution
holdout) and of ``OUT/eval-shift`` (held-out acquisition group, when there is one) are
preprocessed by the run's pipeline, then scored under each fixed view of the package's test-time view sets
(``augment.TEST_TIME_VIEWS``, what ``train --test-time-views`` switches on): zoom 0.92 and 1.08,
rotation +4° and −4° (within the training augmentation's ±15 % zoom and ±7°; never a flip).
The original view's probability is the evaluation's own (so the run itself must have no views).
Reported per side: ROC-AUC of each view and of each set's mean (``mean_zoom``: the image and the
two zooms; ``mean_zoom_rotate``: all five), with 95 % intervals that resample patients, and each
mean's gain over the original view bootstrapped paired. The per-view probabilities are saved
(:func:`views_csv_path`: ``views.csv`` beside each holdout's predictions, ``val_views.csv`` in the
run) and reused by the next call on the same images; ``bench/threshold_transfer.py --views``
chooses each threshold rule on the averaged validation scores from them, as a run trained with
``--test-time-views`` would.

Cost: one forward pass per view and image (Keras float32), e.g. about 3 min per view for 1,091
images at 6 img/s. ``--limit N`` scores only the first N/2 images of each class on each side (a smoke test).

    python bench/tta_eval.py runs/default-group --json runs/tta.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import add_json_argument, emit, fail, interval95, paired_patient_bootstrap, require_run

# Each side's predictions, relative to the run directory.
SIDES = {
    "validation": "val_predictions.csv",
    "in_distribution": "eval/predictions.csv",
    "held_out_group": "eval-shift/predictions.csv",
}


def views_csv_path(predictions_csv: Path, limit: int | None = None) -> Path:
    """Where the per-view probabilities of ``predictions_csv``'s images are kept."""
    stem = "val_views" if predictions_csv.name == "val_predictions.csv" else "views"
    return predictions_csv.with_name(f"{stem}-limit{limit}.csv" if limit else f"{stem}.csv")


def view_name(scale: float, degrees: float) -> str:
    return f"zoom_{scale:g}" if degrees == 0 else f"rot_{degrees:+g}"


def view_names() -> list[str]:
    """The extra views of the package's largest set, "zoom_rotate" (augment.TEST_TIME_VIEWS), named."""
    from cxr_pneumonia.augment import TEST_TIME_VIEWS

    return [view_name(*view) for view in TEST_TIME_VIEWS["zoom_rotate"]]


def means() -> dict[str, list[str]]:
    """Each test-time view set a run can choose (train --test-time-views), as the columns it averages."""
    from cxr_pneumonia.augment import TEST_TIME_VIEWS

    return {
        f"mean_{name}": ["orig", *(view_name(*view) for view in extra)]
        for name, extra in TEST_TIME_VIEWS.items()
        if extra
    }


def scored_views(run: Any, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (an evaluation's predictions) with one probability column per view."""
    from cxr_pneumonia.augment import extra_views
    from cxr_pneumonia.io import load_image

    preprocessed = np.stack([run.preprocess(load_image(path), source=path) for path in table["path"]])
    table = table.rename(columns={"probability": "orig"})
    for name, batch in zip(view_names(), extra_views(preprocessed, "zoom_rotate"), strict=True):
        table[name] = run.predict_preprocessed(batch)
    return table


def views_table(run: Any, table: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """The per-view probabilities of ``table``'s images: read from ``csv`` when it holds exactly
    these images with these original probabilities (not a run retrained in the same folder since),
    else scored and saved there."""
    if csv.is_file():
        saved = pd.read_csv(csv)
        same = list(saved["path"]) == list(table["path"]) and {"orig", *view_names()} <= set(saved.columns)
        if same and np.allclose(saved["orig"], table["probability"], atol=1e-7):
            return saved
    scored = scored_views(run, table)
    scored.to_csv(csv, index=False)
    return scored


def side_figures(table: pd.DataFrame, n_bootstrap: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    y, patients = table["label"].to_numpy(), table["patient_id"].astype(str).to_numpy()
    columns = {name: table[name].to_numpy() for name in ("orig", *view_names())}
    for mean, members in means().items():
        columns[mean] = table[members].mean(axis=1).to_numpy()
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
            for mean in means()
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
    if run.test_time_views != "none":
        fail(f"{args.run}: the run already averages over test-time views ({run.test_time_views})")
    if not any((args.run / SIDES[side]).is_file() for side in ("in_distribution", "held_out_group")):
        fail(f"{args.run}: no eval/ or eval-shift/ predictions (not a bench/quality.py run)")
    figures: dict[str, Any] = {"run": str(args.run), "views": ["orig", *view_names()]}
    summary = []
    for side, relative in SIDES.items():
        csv = args.run / relative
        if not csv.is_file():
            continue
        table = pd.read_csv(csv).dropna(subset=["probability"])
        if args.limit:  # the files are sorted by class: take the first of each
            table = table.groupby("label").head(max(1, args.limit // 2))
        if table["label"].nunique() < 2:
            fail(f"{csv}: needs images of both classes")
        figures[side] = side_figures(views_table(run, table, views_csv_path(csv, args.limit)), args.bootstrap)
        aucs = figures[side]["roc_auc"]
        summary.append(f"{side}: " + ", ".join(f"{name} {cell['value']}" for name, cell in aucs.items()))
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
