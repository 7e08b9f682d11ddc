"""Training speed: the project's frozen-base training against a plain ``model.fit`` over the images.

Both sides train the same frozen-backbone model on the same images (a seeded subsample of
``--limit`` images of ``--data``), with the same patient-grouped validation split, class weights,
batch size and number of epochs, each in its own fresh process (so each has its own peak RSS):

* project: ``cxr_pneumonia.train.train(epochs=E, fine_tune_epochs=0, augment_views=0)`` into a temporary run
  with an empty cache, so preprocessing and the one backbone-feature pass are inside its time
  (early stopping off, so it runs all E epochs);
* plain: ``build_model`` (frozen backbone, float32), a ``tf.data`` pipeline decoding the same
  preprocessed PNGs (map -> cache -> shuffle -> batch -> prefetch), ``model.fit(epochs=E)``.
  Its preprocessing is timed apart and is not in its fit time, which favours the plain side.

    CXR_PNEUMONIA_WEIGHTS_DIR=../shared/weights python bench/train_speed.py --limit 1000 --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import (
    KERMANY224_TRAIN,
    Timer,
    add_json_argument,
    child_figures,
    emit,
    fail,
    ratio,
    run_side,
)


def configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(PreprocessConfig, ModelConfig) shared by both sides."""
    from cxr_pneumonia.model import ModelConfig
    from cxr_pneumonia.preprocess import PreprocessConfig

    return (
        PreprocessConfig(size=args.image_size),
        ModelConfig(backbone=args.backbone, weights=args.weights, image_size=args.image_size),
    )


def project_side(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    from cxr_pneumonia.features import bf16_supported
    from cxr_pneumonia.predict import Run
    from cxr_pneumonia.train import TrainConfig, train

    preprocess_cfg, model_cfg = configs(args)
    train_cfg = TrainConfig(
        epochs=args.epochs,
        fine_tune_epochs=0,
        augment_views=0,  # the plain side sees each image once per epoch, unaugmented
        patience=args.epochs + 1,  # no early stop: both sides run every epoch
        batch_size=args.batch_size,
        seed=args.seed,
        cache_dir=str(args.workdir / "cache-project"),
        workers=args.workers,
    )
    with Timer() as timer:
        run_dir = train(
            args.csv,
            args.workdir / "run",
            preprocess_cfg=preprocess_cfg,
            model_cfg=model_cfg,
            train_cfg=train_cfg,
        )
    run = Run.load(run_dir)
    history = pd.read_csv(run.path / "history.csv")
    data = run.config["data"]
    figures.update(
        train_s=round(timer.seconds, 1),
        epochs_run=len(history),
        n_train=data["train"]["n"],
        n_val=data["val"]["n"],
        feature_precision="bfloat16" if bf16_supported() else "float32",
    )


def tf_dataset(paths: list[str], labels: np.ndarray, *, batch_size: int, shuffle: bool, seed: int) -> Any:
    """The keras-io input pipeline over preprocessed PNGs: (N, H, W, 1) float32 in [0, 255]."""
    import tensorflow as tf

    def load(path: Any, label: Any) -> tuple[Any, Any]:
        image = tf.io.decode_png(tf.io.read_file(path), channels=1)
        return tf.cast(image, tf.float32), label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.float32)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def plain_side(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    import keras

    from cxr_pneumonia.batch import cache_images
    from cxr_pneumonia.config import override
    from cxr_pneumonia.data import SplitConfig, discover, make_splits
    from cxr_pneumonia.model import build_model

    preprocess_cfg, model_cfg = configs(args)
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(args.seed)
    train_df, val_df = make_splits(discover(args.csv), SplitConfig(seed=args.seed))
    with Timer() as prep:
        parts = []
        for df in (train_df, val_df):
            cached, _ = cache_images(
                [Path(p) for p in df["path"]],
                preprocess_cfg,
                args.workdir / "cache-plain",
                workers=args.workers,
            )
            keep = [c is not None for c in cached]
            parts.append(([str(c) for c in cached if c is not None], df["label"].to_numpy()[keep]))
    (train_paths, y_train), (val_paths, y_val) = parts
    n, n_pos = len(y_train), int(y_train.sum())
    class_weight = {0: n / (2.0 * (n - n_pos)), 1: n / (2.0 * n_pos)}  # as the project's training
    model = build_model(override(model_cfg, initial_bias=0.0))  # as with class weights
    train_ds = tf_dataset(train_paths, y_train, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    val_ds = tf_dataset(val_paths, y_val, batch_size=max(64, args.batch_size), shuffle=False, seed=args.seed)
    with Timer() as fit:
        history = model.fit(
            train_ds, validation_data=val_ds, epochs=args.epochs, class_weight=class_weight, verbose=2
        )
    figures.update(
        preprocess_s=round(prep.seconds, 1),
        fit_s=round(fit.seconds, 1),
        total_s=round(prep.seconds + fit.seconds, 1),
        epochs_run=len(history.history["loss"]),
        n_train=len(train_paths),
        n_val=len(val_paths),
        trainable_weights=len(model.trainable_weights),
    )


def subsample(data: Path, limit: int, seed: int, out_csv: Path) -> int:
    """A seeded random subset of ``data`` as a ``path,label,patient_id`` CSV; returns its size."""
    from cxr_pneumonia.data import discover

    images = discover(data)
    images = images[images["split"] != "test"]
    if 0 < limit < len(images):
        images = images.sample(n=limit, random_state=seed)
    images[["path", "label", "patient_id"]].to_csv(out_csv, index=False)
    return len(images)


def side_args(args: argparse.Namespace, side: str, csv: Path, workdir: Path) -> list[str]:
    shared = [
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    if args.workers:
        shared += ["--workers", str(args.workers)]
    return ["--side", side, "--csv", str(csv), "--workdir", str(workdir / side), *shared]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=KERMANY224_TRAIN, help="Labelled training images.")
    parser.add_argument("--backbone", default="xception")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a .weights.h5 path.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=1000, help="Images to use (0: all).")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=None, help="Preprocessing worker processes.")
    # Internal: one side in a fresh process.
    parser.add_argument("--side", choices=("project", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args()

    if args.side is not None:
        with child_figures(args.json) as figures:
            (project_side if args.side == "project" else plain_side)(args, figures)
        return

    if not args.data.exists():
        fail(f"{args.data}: training data not found")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        n = subsample(args.data, args.limit, args.seed, work / "images.csv")
        sides = {}
        for side in ("project", "plain"):
            arguments = side_args(args, side, work / "images.csv", work)
            sides[side] = run_side(Path(__file__), arguments, work / f"{side}.json", label=f"{side} side")
    project, plain = sides["project"], sides["plain"]
    figures = {
        "data": str(args.data),
        "n_images": n,
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "project": project,
        "plain": plain,
        "speedup_vs_plain_fit": ratio(plain["fit_s"], project["train_s"]),
        "speedup_vs_plain_total": ratio(plain["total_s"], project["train_s"]),
    }
    summary = [
        f"{n} images of {args.data}, {args.backbone} ({args.weights}) at {args.image_size} px, "
        f"{args.epochs} epochs, {project['n_train']} train / {project['n_val']} validation",
        f"project (preprocessing + features + {project['epochs_run']} head epochs + threshold): "
        f"{project['train_s']} s, peak RSS {project['peak_rss_mb']} MiB",
        f"plain model.fit ({plain['epochs_run']} epochs, float32): {plain['fit_s']} s "
        f"(+ {plain['preprocess_s']} s preprocessing), peak RSS {plain['peak_rss_mb']} MiB",
        f"speed-up (plain fit time / project time): {figures['speedup_vs_plain_fit']}× "
        f"({figures['speedup_vs_plain_total']}× counting the plain side's preprocessing)",
    ]
    emit(figures, summary, args.json)


if __name__ == "__main__":
    main()
