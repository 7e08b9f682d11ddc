"""Model quality: train on one labelled folder, evaluate on another, print the metrics and wall time.

Training runs in this process through ``cxr_pneumonia.api.train``; the peak resident memory
after training is reported. Without ``--eval``, ``--holdout-fraction F`` splits ``--train`` by
patient (seed 2024, independent of training's own validation split) into ``holdout_train.csv``
and ``holdout_eval.csv`` inside the run directory: train on the first, evaluate on the second.
``--robustness`` then scores the evaluation images again under each fixed perturbation of
``cxr_pneumonia.augment.PERTURBATIONS`` (applied to the raw image, before the run's
preprocessing) at the run's threshold.

    CXR_PNEUMONIA_WEIGHTS_DIR=../shared/weights python bench/quality.py \\
        --train ../shared/data/kermany224/train --holdout-fraction 0.2 \\
        --backbone xception --weights imagenet --out runs/quality-xception --robustness
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, Timer, add_json_argument, emit, fail, peak_rss_mb

HOLDOUT_SEED = 2024  # not training's seed (42): the held-out patients are a different draw
# Flags passed to the training API as-is when given (argparse dest -> config field).
TRAIN_OVERRIDES: dict[str, type] = {
    "epochs": int,
    "fine_tune_blocks": int,
    "fine_tune_epochs": int,
    "augment_views": int,
    "label_smoothing": float,
    "target_recall": float,
    "threshold_rule": str,
    "image_size": int,
    "head": str,
    "batch_size": int,
    "seed": int,
    "workers": int,
    "cache_dir": str,
}


def holdout_split(train_dir: Path, fraction: float, out: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Split ``train_dir`` by patient into two ``path,label,patient_id`` CSVs inside ``out``."""
    from cxr_pneumonia.data import discover, patient_split

    images = discover(train_dir)
    images = images[images["split"] != "test"].reset_index(drop=True)
    # Byte-identical files are kept on one side (patient_split merges them), so no leakage.
    kept, held = patient_split(images, val_fraction=fraction, seed=HOLDOUT_SEED)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["path", "label", "patient_id"]
    train_csv, eval_csv = out / "holdout_train.csv", out / "holdout_eval.csv"
    kept[columns].to_csv(train_csv, index=False)
    held[columns].to_csv(eval_csv, index=False)
    info = {
        side: {
            "csv": str(csv),
            "n": len(df),
            "n_pneumonia": int(df["label"].sum()),
            "n_patients": int(df["patient_id"].nunique()),
        }
        for side, csv, df in (("train", train_csv, kept), ("heldout", eval_csv, held))
    }
    return train_csv, eval_csv, {"seed": HOLDOUT_SEED, "fraction": fraction, **info}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=Path, required=True, help="Training data (folder or CSV).")
    parser.add_argument("--eval", type=Path, default=None, help="Labelled evaluation data (folder or CSV).")
    parser.add_argument("--eval-split", default=None, help="Only this split of a Kaggle-layout --eval.")
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=None,
        help="Without --eval: hold out this share of --train's patients for evaluation.",
    )
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a .weights.h5 path.")
    parser.add_argument("--out", type=Path, default=None, help="Run directory to create.")
    for name, kind in TRAIN_OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the CIs.")
    parser.add_argument(
        "--heatmaps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Grad-CAM of misclassified images in the report.",
    )
    parser.add_argument("--robustness", action="store_true", help="Also score perturbed evaluation images.")
    add_json_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.train.exists():
        fail(f"{args.train}: training data not found")
    if args.eval is None and args.holdout_fraction is None:
        fail("give --eval DATA or --holdout-fraction F")
    if args.eval is not None and not args.eval.exists():
        fail(f"{args.eval}: evaluation data not found")
    out = args.out or REPO_ROOT / "runs" / f"quality-{args.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "model.keras").exists():
        fail(f"{out}: already holds a trained model; choose another --out")

    from cxr_pneumonia import api
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.model import WeightsUnavailableError
    from cxr_pneumonia.train import TrainingError

    started = time.perf_counter()
    split_info = None
    train_source, eval_source = args.train, args.eval
    try:
        if eval_source is None:
            train_source, eval_source, split_info = holdout_split(args.train, args.holdout_fraction, out)
        overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
        with Timer() as train_timer:
            run = api.train(train_source, out, backbone=args.backbone, weights=args.weights, **overrides)
        train_rss = peak_rss_mb("self")
        with Timer() as eval_timer:
            metrics = api.evaluate(
                run,
                eval_source,
                out / "eval",
                split=args.eval_split,
                n_bootstrap=args.bootstrap,
                heatmaps=args.heatmaps,
            )
        perturbed = api.robustness(run, eval_source, out, split=args.eval_split) if args.robustness else None
    except (DatasetError, TrainingError, WeightsUnavailableError, ValueError, OSError) as e:
        fail(str(e))

    figures = {
        "backbone": args.backbone,
        "weights": args.weights,
        "overrides": overrides,
        "train_data": str(train_source),
        "eval_data": str(eval_source),
        "holdout": split_info,
        "run": str(out),
        "threshold": run.threshold,
        "threshold_rule": run.threshold_info.get("rule"),
        "metrics_val": run.metrics_val,
        "metrics": metrics,
        "robustness": perturbed,
        "train_s": round(train_timer.seconds, 1),
        "eval_s": round(eval_timer.seconds, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "train_peak_rss_mb": round(train_rss, 1),
        "peak_rss_mb": round(peak_rss_mb("self"), 1),
    }
    summary = [
        f"run {out}: {args.backbone} ({args.weights}), trained on {train_source} in "
        f"{figures['train_s']} s (peak RSS {figures['train_peak_rss_mb']} MiB)",
        f"evaluated on {eval_source} (n={metrics['n']}) at threshold {run.threshold:.4f}: "
        + ", ".join(
            f"{k} {metrics[k]:.3f}"
            for k in ("roc_auc", "recall", "specificity", "accuracy")
            if metrics.get(k) is not None
        ),
    ]
    for name, row in (perturbed or {}).items():
        auc = "n/a" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
        summary.append(
            f"  {name:14s} roc_auc {auc}  recall {row['recall']:.3f}  specificity {row['specificity']:.3f}"
        )
    summary.append(f"wall time {figures['wall_s']} s; report: {out / 'eval' / 'report.html'}")
    emit(figures, summary, args.json)
    (out / "bench_quality.json").write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
