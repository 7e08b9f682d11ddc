"""Model quality: train on one labelled folder, evaluate on another, print the metrics and wall time.

Training runs in this process through ``cxr_pneumonia.api.train``; the peak resident memory
after training is reported. Without ``--eval``, ``--holdout-fraction F`` splits ``--train`` by
patient (seed 2024, independent of training's own validation split) into ``holdout_train.csv``
and ``holdout_eval.csv`` inside the run directory: train on the first, evaluate on the second.
``--robustness`` then scores the evaluation images again under each fixed perturbation of
``cxr_pneumonia.augment.PERTURBATIONS`` (applied to the raw image before the run's
preprocessing) at the run's threshold.

Shift-aware validation: ``--holdout-group G`` (or ``auto``: the acquisition group farthest from
the rest among those worth holding out) first takes one whole acquisition group
(``cxr_pneumonia.data.acquisition_groups``: clusters of exposure, contrast, sharpness, noise,
borders, texture direction and JPEG size, one group per patient) out of ``--train`` into
``shift_eval.csv``; the in-distribution split above is made from the other groups (fraction 0.2
unless ``--holdout-fraction`` says otherwise). One model, trained on neither, is then evaluated
on both, side by side, and ``--robustness`` perturbs both.

    CXR_PNEUMONIA_WEIGHTS_DIR=../shared/weights python bench/quality.py \\
        --train ../shared/data/kermany224/train --holdout-group auto \\
        --backbone xception --weights imagenet --out runs/quality-xception --robustness
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, Timer, add_json_argument, emit, fail, peak_rss_mb

HOLDOUT_SEED = 2024  # not training's seed (42): the held-out patients are a different draw
DEFAULT_SHIFT_FRACTION = 0.2  # the in-distribution holdout beside a held-out group
COLUMNS = ["path", "label", "patient_id"]
# Flags passed to the training API as-is when given (argparse dest -> config field).
TRAIN_OVERRIDES: dict[str, type] = {
    "epochs": int,
    "fine_tune_blocks": int,
    "fine_tune_epochs": int,
    "augment_views": int,
    "label_smoothing": float,
    "target_recall": float,
    "threshold_rule": str,
    "fixed_threshold": float,
    "threshold_groups": int,
    "threshold_margin_percentile": float,
    "test_time_views": str,
    "image_size": int,
    "head": str,
    "batch_size": int,
    "seed": int,
    "workers": int,
    "cache_dir": str,
    "mask_shape": str,
    "resize_mode": str,
}


def _side_info(csv: Path, df: Any) -> dict[str, Any]:
    return {
        "csv": str(csv),
        "n": len(df),
        "n_pneumonia": int(df["label"].sum()),
        "n_patients": int(df["patient_id"].nunique()),
    }


def _labelled(train_dir: Path) -> Any:
    from cxr_pneumonia.data import discover

    images = discover(train_dir)
    return images[images["split"] != "test"].reset_index(drop=True)


def holdout_split(
    train_dir: Path, fraction: float, out: Path, images: Any = None
) -> tuple[Path, Path, dict[str, Any]]:
    """Split ``train_dir`` (or ``images``) by patient into two ``path,label,patient_id`` CSVs in ``out``."""
    from cxr_pneumonia.data import patient_split

    images = _labelled(train_dir) if images is None else images
    # Byte-identical files are kept on one side (patient_split merges them), so no leakage.
    kept, held = patient_split(images, val_fraction=fraction, seed=HOLDOUT_SEED)
    out.mkdir(parents=True, exist_ok=True)
    train_csv, eval_csv = out / "holdout_train.csv", out / "holdout_eval.csv"
    kept[COLUMNS].to_csv(train_csv, index=False)
    held[COLUMNS].to_csv(eval_csv, index=False)
    info = {
        side: _side_info(csv, df)
        for side, csv, df in (("train", train_csv, kept), ("heldout", eval_csv, held))
    }
    return train_csv, eval_csv, {"seed": HOLDOUT_SEED, "fraction": fraction, **info}


def group_holdout(args: argparse.Namespace, out: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(train CSV, in-distribution CSV, shift CSV, info): acquisition group ``--holdout-group``
    out of ``--train``, then the patient split of the other groups."""
    from cxr_pneumonia.data import (
        acquisition_groups,
        describe_groups,
        farthest_group,
        filename_families,
        image_statistics,
    )

    images = _labelled(args.train)
    from cxr_pneumonia.train import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()  # training's, which reuses it
    stats = image_statistics(images["path"], workers=args.workers, cache_dir=cache / "image_stats")
    groups = acquisition_groups(images, k=args.groups, seed=HOLDOUT_SEED, stats=stats)
    if args.holdout_group == "auto":
        group = farthest_group(stats, groups, images["label"], min_per_class=args.group_min_per_class)
    else:
        group = int(args.holdout_group)
        if group not in set(groups):
            fail(f"--holdout-group {group}: the groups are {sorted(set(groups))}")
    shifted = images[groups == group].reset_index(drop=True)
    rest = images[groups != group].reset_index(drop=True)
    if shifted["label"].nunique() < 2:
        fail(f"acquisition group {group} holds one class only; choose another --holdout-group")
    fraction = args.holdout_fraction or DEFAULT_SHIFT_FRACTION
    train_csv, eval_csv, info = holdout_split(args.train, fraction, out, images=rest)
    shift_csv = out / "shift_eval.csv"
    shifted[COLUMNS].to_csv(shift_csv, index=False)
    described = describe_groups(stats, groups, images["label"]).round(4)
    described["n_patients"] = images.groupby(groups)["patient_id"].nunique()
    families = filename_families(images).groupby(groups).value_counts().unstack(fill_value=0)
    info["shift"] = {
        "group": int(group),
        "k": args.groups,
        **_side_info(shift_csv, shifted),
        "groups": described.join(families).to_dict(orient="index"),
    }
    return train_csv, eval_csv, shift_csv, info


def patient_level(eval_dir: Path, threshold: float, n_bootstrap: int) -> dict[str, Any] | None:
    """95 % intervals resampling patients (``compute_metrics(groups=...)``) on the headline images
    of an evaluation; None when this version of compute_metrics cannot."""
    import pandas as pd

    from cxr_pneumonia.evaluate import compute_metrics

    if "groups" not in inspect.signature(compute_metrics).parameters:
        return None
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    table = pd.read_csv(eval_dir / "predictions.csv")
    if metrics.get("evaluated_on") == "accepted images":
        table = table[table["status"] == "ok"]
    result = compute_metrics(
        table["label"].to_numpy(),
        table["probability"].to_numpy(),
        threshold,
        n_bootstrap=n_bootstrap,
        groups=table["patient_id"].astype(str).to_numpy(),
    )
    return result["ci95"]


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
    parser.add_argument(
        "--holdout-group",
        default=None,
        help="Without --eval: also hold out this acquisition group (a number, or auto: the farthest).",
    )
    parser.add_argument("--groups", type=int, default=4, help="Acquisition groups to cluster --train into.")
    parser.add_argument(
        "--group-min-per-class",
        type=int,
        default=30,
        help="--holdout-group auto: images of each class a group needs to be held out.",
    )
    parser.add_argument("--preset", default=None, help="Start from a shipped preset (seed).")
    parser.add_argument(
        "--backbone", default=None, help="Default: the package's (mobilenetv2), or the preset's."
    )
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a .weights.h5 path.")
    parser.add_argument("--out", type=Path, default=None, help="Run directory to create.")
    for name, kind in TRAIN_OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument(
        "--no-step",
        action="append",
        default=[],
        metavar="NAME",
        help="Switch a preprocessing step off (repeatable), as `cxr-pneumonia train --no-step`.",
    )
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


def _check_args(args: argparse.Namespace) -> Path:
    if not args.train.exists():
        fail(f"{args.train}: training data not found")
    if args.eval is None and args.holdout_fraction is None and args.holdout_group is None:
        fail("give --eval DATA, --holdout-fraction F or --holdout-group G")
    if args.eval is not None and args.holdout_group is not None:
        fail("--holdout-group holds out part of --train: it does not go with --eval")
    if args.eval is not None and not args.eval.exists():
        fail(f"{args.eval}: evaluation data not found")
    name = f"quality-{args.backbone or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out or REPO_ROOT / "runs" / name
    if (out / "model.keras").exists():
        fail(f"{out}: already holds a trained model; choose another --out")
    return out


def _evaluate(
    api: Any, run: Any, data: Path, out: Path, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """Metrics (with patient-level intervals when available) and robustness of one evaluation set."""
    eval_dir = out / name
    metrics = api.evaluate(
        run, data, eval_dir, split=args.eval_split, n_bootstrap=args.bootstrap, heatmaps=args.heatmaps
    )
    # The in-distribution robustness keeps its old place (OUT/robustness.json).
    robust_dir = out if name == "eval" else eval_dir
    perturbed = api.robustness(run, data, robust_dir, split=args.eval_split) if args.robustness else None
    return {
        "data": str(data),
        "metrics": metrics,
        "ci95_patient": patient_level(eval_dir, run.threshold, args.bootstrap) if args.bootstrap else None,
        "robustness": perturbed,
    }


def _row(name: str, result: dict[str, Any]) -> str:
    m, ci = result["metrics"], result.get("ci95_patient") or result["metrics"].get("ci95") or {}

    def cell(key: str) -> str:
        value = m.get(key)
        if value is None:
            return "n/a"
        bounds = ci.get(key)
        return f"{value:.3f}" + (f" ({bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "")

    return f"  {name:24s} n={m['n']:<5d} " + "  ".join(
        f"{k} {cell(k)}" for k in ("roc_auc", "recall", "specificity")
    )


def _summary(figures: dict[str, Any], results: dict[str, dict[str, Any]], run: Any, out: Path) -> list[str]:
    lines = [
        f"run {out}: {figures['backbone']} ({figures['weights']}), trained on {figures['train_data']} in "
        f"{figures['train_s']} s (peak RSS {figures['train_peak_rss_mb']} MiB)",
        f"at the saved threshold {run.threshold:.4f} ({figures['threshold_rule']}); "
        f"95 % CI {'by patient' if any(r.get('ci95_patient') for r in results.values()) else 'by image'}:",
    ]
    lines += [_row(name, result) for name, result in results.items()]
    spread = figures.get("threshold_spread") or {}
    if spread.get("threshold"):
        lines.append(
            f"  validation acquisition groups ({spread['n_groups_used']} used): own thresholds "
            f"{spread['threshold'][0]:.3f}-{spread['threshold'][1]:.3f}, recall at the saved one "
            f"{spread['recall'][0]:.3f}-{spread['recall'][1]:.3f}"
        )
    for name, result in results.items():
        for perturbation, row in (result.get("robustness") or {}).items():
            auc = "n/a" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
            lines.append(
                f"  {name:10s} {perturbation:14s} roc_auc {auc}  recall {row['recall']:.3f}  "
                f"specificity {row['specificity']:.3f}"
            )
    lines.append(f"wall time {figures['wall_s']} s; report: {out / 'eval' / 'report.html'}")
    return lines


def _steps_without(preset: str | None, steps_off: list[str]) -> tuple[str, ...]:
    """The preset's (or the default) preprocessing steps without ``steps_off`` (validated)."""
    from cxr_pneumonia.preprocess import PreprocessConfig, disable_steps
    from cxr_pneumonia.train import preset_configs

    base = preset_configs(preset)[0] if preset is not None else PreprocessConfig()
    return disable_steps(base, *steps_off).steps


def main() -> None:
    args = parse_args()
    out = _check_args(args)

    from cxr_pneumonia import api
    from cxr_pneumonia.config import ConfigError
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.model import WeightsUnavailableError
    from cxr_pneumonia.train import TrainingError

    started = time.perf_counter()
    split_info, shift_source = None, None
    train_source, eval_source = args.train, args.eval
    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
    try:
        if args.no_step:
            overrides["steps"] = _steps_without(args.preset, args.no_step)
        if args.holdout_group is not None:
            train_source, eval_source, shift_source, split_info = group_holdout(args, out)
        elif eval_source is None:
            train_source, eval_source, split_info = holdout_split(args.train, args.holdout_fraction, out)
        with Timer() as train_timer:
            run = api.train(
                train_source,
                out,
                preset=args.preset,
                weights=args.weights,
                **overrides,
                **({"backbone": args.backbone} if args.backbone else {}),
            )
        train_rss = peak_rss_mb("self")
        with Timer() as eval_timer:
            results = {
                "in-distribution" if shift_source else "evaluation": _evaluate(
                    api, run, eval_source, out, args, "eval"
                )
            }
            if shift_source is not None:
                group = split_info["shift"]["group"]
                results[f"shift (group {group})"] = _evaluate(api, run, shift_source, out, args, "eval-shift")
    except (DatasetError, TrainingError, WeightsUnavailableError, ConfigError, ValueError, OSError) as e:
        fail(str(e))

    main_result, *shift_result = results.values()
    figures = {
        "backbone": run.config["model"]["backbone"],  # what was trained, default or preset included
        "weights": args.weights,
        "preset": args.preset,
        "overrides": overrides,
        "train_data": str(train_source),
        "eval_data": str(eval_source),
        "holdout": split_info,
        "run": str(out),
        "threshold": run.threshold,
        "threshold_rule": run.threshold_info.get("rule"),
        "threshold_spread": run.threshold_info.get("spread"),
        "threshold_groups": run.threshold_info.get("groups"),
        "metrics_val": run.metrics_val,
        "metrics": main_result["metrics"],
        "ci95_patient": main_result["ci95_patient"],
        "robustness": main_result["robustness"],
        "shift": shift_result[0] if shift_result else None,
        "train_s": round(train_timer.seconds, 1),
        "eval_s": round(eval_timer.seconds, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "train_peak_rss_mb": round(train_rss, 1),
        "peak_rss_mb": round(peak_rss_mb("self"), 1),
    }
    emit(figures, _summary(figures, results, run, out), args.json)
    (out / "bench_quality.json").write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
