"""Training: patient-grouped split, cached backbone features, recall-first operating point.

The backbone is frozen up to a split point, so its activations are computed once per image
(and per augmented view) into a float16 memory map on disk; every epoch then only runs the
trainable top (head, plus the top ``fine_tune_blocks`` blocks when fine-tuning). An epoch costs
seconds instead of a forward pass over every image, and memory stays flat.

The run directory is complete only when ``model.keras`` exists; it is written last, by rename.
``checkpoints/`` holds the last epoch's weights and state so ``resume`` can continue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_pneumonia.augment import AugmentConfig
from cxr_pneumonia.batch import cache_images, default_workers, write_failures_csv
from cxr_pneumonia.config import config_hash, from_dict, read_json, to_dict, write_json
from cxr_pneumonia.data import SplitConfig, discover, make_splits
from cxr_pneumonia.evaluate import choose_threshold, compute_metrics
from cxr_pneumonia.features import (
    FeatureStore,
    bf16_supported,
    compute_image_features,
    feature_batches,
    map_features,
    reduced_precision_copy,
    score_images,
)
from cxr_pneumonia.model import (
    ModelConfig,
    build_model,
    compile_model,
    get_backbone,
    set_trainable_blocks,
    split_model,
)
from cxr_pneumonia.preprocess import PreprocessConfig, build_pipeline
from cxr_pneumonia.rundir import (
    CHECKPOINT_DIR,
    CHECKPOINT_WEIGHTS_FILE,
    FAILURES_FILE,
    HISTORY_FILE,
    METRICS_VAL_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAINING_CURVES_FILE,
    TRAINING_IMAGES_FILE,
    VAL_PREDICTIONS_FILE,
    write_metadata,
)

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored")


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data, bad run directory)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; saved in the run's config.json."""

    epochs: int = 15  # head epochs (frozen backbone, cached features)
    fine_tune_epochs: int = 2  # epochs with the model's top `fine_tune_blocks` blocks trainable
    batch_size: int = 32
    seed: int = 42
    val_fraction: float = 1 / 6
    use_official_val: bool = False
    target_recall: float = 0.98
    threshold_rule: str = "max_specificity"
    patience: int = 4
    class_weight: bool = True
    augment_views: int = 2  # augmented copies of each training image in the feature cache
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache_dir: str | None = None
    workers: int | None = None
    strategy: str = "default"
    # The frozen-feature pass in bfloat16 where the hardware has it ("auto"), or "float32".
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def default_cache_dir() -> Path:
    base = os.environ.get("CXR_PNEUMONIA_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "cxr-pneumonia" if base else Path.home() / ".cache" / "cxr-pneumonia"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and Keras (the only global seeding; the CLI and train() call it)."""
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


# --------------------------------------------------------------------------------------------
# Data: split, preprocessing cache, feature cache
# --------------------------------------------------------------------------------------------


def prepare_data(
    data: Path, preprocess_cfg: PreprocessConfig, train_cfg: TrainConfig, cache_dir: Path, run_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Discover, split per patient, preprocess into the cache; failures go to failures.csv."""
    df = discover(Path(data))
    if "train" not in set(df["split"]) and "all" not in set(df["split"]):
        raise TrainingError(f"{data}: no training images (found splits {sorted(set(df['split']))})")
    split_cfg = SplitConfig(
        val_fraction=train_cfg.val_fraction, seed=train_cfg.seed, use_official_val=train_cfg.use_official_val
    )
    train_df, val_df = make_splits(df, split_cfg)
    both = pd.concat([train_df.assign(role="train"), val_df.assign(role="val")], ignore_index=True)
    cached, report = cache_images(
        [Path(p) for p in both["path"]], preprocess_cfg, cache_dir / "preprocessed", workers=train_cfg.workers
    )
    both["cached"] = [str(p) if p is not None else None for p in cached]
    write_failures_csv(run_dir / FAILURES_FILE, report.failures)
    for source, reason in report.failures:
        log.warning("skipping %s: %s", source, reason)
    both = both[both["cached"].notna()].reset_index(drop=True)
    train_df, val_df = (
        both[both.role == "train"].reset_index(drop=True),
        both[both.role == "val"].reset_index(drop=True),
    )
    for name, part in (("train", train_df), ("validation", val_df)):
        if part["label"].nunique() < 2:
            raise TrainingError(f"{data}: the {name} split needs images of both classes")
    log.info(
        "train: %d images (%d patients), validation: %d images (%d patients)",
        len(train_df),
        train_df["patient_id"].nunique(),
        len(val_df),
        val_df["patient_id"].nunique(),
    )
    return train_df, val_df


def data_fingerprint(train_df: pd.DataFrame, val_df: pd.DataFrame) -> dict[str, Any]:
    """Which images, with which labels, went into each side (content hashes, not paths)."""

    def digest(df: pd.DataFrame) -> str:
        names = sorted(f"{Path(c).stem}:{label}" for c, label in zip(df["cached"], df["label"], strict=True))
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    return {
        side: {
            "n": len(df),
            "n_pneumonia": int(df["label"].sum()),
            "n_patients": int(df["patient_id"].nunique()),
            "sha256": digest(df),
        }
        for side, df in (("train", train_df), ("val", val_df))
    }


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


def _checkpoint_callback(model: Any, run_dir: Path, stage: str, history_rows: list[dict[str, Any]]):
    import keras

    class Checkpoint(keras.callbacks.Callback):
        """After every epoch: the full model's weights and the history so far, atomically."""

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            history_rows.append(
                {
                    "stage": stage,
                    "epoch": len(history_rows) + 1,
                    **{k: float(v) for k, v in (logs or {}).items()},
                }
            )
            ckpt = run_dir / CHECKPOINT_DIR
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = ckpt / ".last.tmp.weights.h5"
            model.save_weights(tmp)
            os.replace(tmp, ckpt / CHECKPOINT_WEIGHTS_FILE)
            state = read_json(run_dir / STATE_FILE)
            state.update(stage=stage, stage_epoch=epoch + 1, history=history_rows)
            write_json(run_dir / STATE_FILE, state)

    return Checkpoint()


def _class_weights(labels: np.ndarray) -> dict[int, float]:
    n, n_pos = len(labels), int(labels.sum())
    return {0: n / (2.0 * (n - n_pos)), 1: n / (2.0 * n_pos)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _fit_stage(
    model,
    trainable_part,
    train_feats,
    val_feats,
    train_df,
    val_df,
    *,
    stage: str,
    epochs: int,
    initial_epoch: int,
    learning_rate: float,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: Path,
    history_rows: list[dict[str, Any]],
    callbacks: Sequence[Any],
) -> None:
    import keras

    compile_model(trainable_part, learning_rate, model_cfg)
    labels = train_df["label"].to_numpy()
    weights = None
    if train_cfg.class_weight:
        cw = _class_weights(labels)
        weights = np.where(labels == 1, cw[1], cw[0]).astype(np.float32)
    train_data = feature_batches(
        train_feats,
        labels,
        batch_size=train_cfg.batch_size,
        shuffle=True,
        seed=train_cfg.seed,
        sample_weights=weights,
    )
    train_data.epoch = initial_epoch  # a resumed run continues the same shuffles
    train_data.on_epoch_end()
    val_data = feature_batches(
        val_feats,
        val_df["label"].to_numpy(),
        batch_size=max(64, train_cfg.batch_size),
        shuffle=False,
        seed=train_cfg.seed,
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=train_cfg.patience, restore_best_weights=True
    )
    trainable_part.fit(
        train_data,
        validation_data=val_data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[_checkpoint_callback(model, run_dir, stage, history_rows), stop, *callbacks],
        verbose=2,
    )


def _feature_precision(train_cfg: TrainConfig) -> str:
    if train_cfg.precision == "auto":
        return "bfloat16" if bf16_supported() else "float32"
    return train_cfg.precision


def _feature_stores(
    model: Any,
    preprocess_cfg: PreprocessConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    folder: Path,
) -> dict[str, FeatureStore]:
    """Activations at the fine-tuning split ("split") and at the backbone output ("backbone").

    The expensive pass runs the frozen lower backbone once per image and view; the backbone
    output is then derived from it by the (still frozen) top blocks, which is cheap.
    """
    import keras

    source = model
    if _feature_precision(train_cfg) == "bfloat16":
        source = reduced_precision_copy(model_cfg, model)
    extractor, _ = split_model(source, model_cfg, at="fine_tune")
    views = 1 + train_cfg.augment_views
    stores = {
        "train_split": compute_image_features(
            extractor,
            list(train_df["cached"]),
            folder / "train_split.npy",
            views=views,
            augment=train_cfg.augment,
            seed=train_cfg.seed,
            description="backbone features (train)",
            raw=(list(train_df["path"]), build_pipeline(preprocess_cfg)),
        ),
        "val_split": compute_image_features(
            extractor,
            list(val_df["cached"]),
            folder / "val_split.npy",
            views=1,
            augment=train_cfg.augment,
            seed=train_cfg.seed,
            description="backbone features (validation)",
        ),
    }
    if model_cfg.fine_tune_blocks == 0:
        stores["train_backbone"], stores["val_backbone"] = stores["train_split"], stores["val_split"]
        return stores
    feature_extractor, _ = split_model(model, model_cfg, at="fine_tune")
    top_blocks = keras.Model(
        feature_extractor.output, model.get_layer(get_backbone(model_cfg.backbone).last_conv_layer).output
    )
    for side in ("train", "val"):
        stores[f"{side}_backbone"] = map_features(
            top_blocks,
            stores[f"{side}_split"],
            folder / f"{side}_backbone.npy",
            description=f"top-block features ({side})",
        )
    return stores


def _distribution(name: str) -> Any:
    """The tf.distribute strategy for ``name`` (the default strategy for "default")."""
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        log.info("MirroredStrategy over %d devices", strategy.num_replicas_in_sync)
        return strategy
    return tf.distribute.get_strategy()


def train(
    data: str | Path,
    out: str | Path,
    *,
    preprocess_cfg: PreprocessConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
) -> Path:
    """Train on ``data`` into the run directory ``out`` and return it (``predict.Run.load`` loads it).

    With ``resume=True`` the configs and data come from ``out/train_state.json`` and training
    continues from the last completed epoch.
    """
    run_dir = Path(out)
    if resume:
        state = _load_state(run_dir)
        data = state["data"]
        preprocess_cfg = from_dict(PreprocessConfig, state["preprocess"])
        model_cfg = from_dict(ModelConfig, state["model"])
        train_cfg = train_config_from_dict(state["train"])
    else:
        if (run_dir / MODEL_FILE).exists():
            raise TrainingError(f"{run_dir}: already holds a trained model; choose another --out")
        preprocess_cfg = preprocess_cfg or PreprocessConfig()
        train_cfg = train_cfg or TrainConfig()
        model_cfg = model_cfg or ModelConfig()
        if model_cfg.image_size != preprocess_cfg.size:
            preprocess_cfg = dataclasses.replace(preprocess_cfg, size=model_cfg.image_size)
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / STATE_FILE,
            {
                "data": str(Path(data).resolve()),
                "preprocess": to_dict(preprocess_cfg),
                "model": to_dict(model_cfg),
                "train": to_dict(train_cfg),
                "stage": None,
                "stage_epoch": 0,
                "history": [],
            },
        )
        state = read_json(run_dir / STATE_FILE)

    seed_everything(train_cfg.seed)
    started = time.perf_counter()
    cache_dir = Path(train_cfg.cache_dir) if train_cfg.cache_dir else default_cache_dir()
    if train_cfg.workers is None:
        train_cfg = dataclasses.replace(train_cfg, workers=default_workers())
    train_df, val_df = prepare_data(Path(data), preprocess_cfg, train_cfg, cache_dir, run_dir)

    n_pos, n_neg = int(train_df["label"].sum()), int((train_df["label"] == 0).sum())
    if model_cfg.initial_bias is None:
        model_cfg = dataclasses.replace(
            model_cfg, initial_bias=0.0 if train_cfg.class_weight else math.log(n_pos / n_neg)
        )
    strategy = _distribution(train_cfg.strategy)
    with strategy.scope():
        model = build_model(model_cfg)
        if resume and (run_dir / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS_FILE).exists():
            model.load_weights(run_dir / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS_FILE)
            log.info(
                "resumed from %s (stage %s, epoch %s)",
                run_dir / CHECKPOINT_DIR,
                state["stage"],
                state["stage_epoch"],
            )
        _, top = split_model(model, model_cfg, at="fine_tune")

    feature_key = config_hash(
        {
            "preprocess": to_dict(preprocess_cfg),
            "backbone": model_cfg.backbone,
            "weights": _weights_identity(model_cfg),
            "size": model_cfg.image_size,
            "blocks": model_cfg.fine_tune_blocks,
            "views": train_cfg.augment_views,
            "augment": to_dict(train_cfg.augment),
            "seed": train_cfg.seed,
            "precision": _feature_precision(train_cfg),
            "data": data_fingerprint(train_df, val_df),
        }
    )
    stores = _feature_stores(
        model, preprocess_cfg, model_cfg, train_cfg, train_df, val_df, cache_dir / "features" / feature_key
    )
    with strategy.scope():
        _, head = split_model(model, model_cfg, at="backbone_output")

    history_rows: list[dict[str, Any]] = list(state.get("history", []))
    stages = [("head", train_cfg.epochs, model_cfg.learning_rate, 0, head, "backbone")]
    if train_cfg.fine_tune_epochs and model_cfg.fine_tune_blocks:
        stages.append(
            (
                "fine_tune",
                train_cfg.fine_tune_epochs,
                model_cfg.fine_tune_learning_rate,
                model_cfg.fine_tune_blocks,
                top,
                "split",
            )
        )
    names = [stage[0] for stage in stages]
    resume_at = names.index(state["stage"]) if state.get("stage") in names else 0
    for position, (stage, epochs, lr, blocks, part, level) in enumerate(stages):
        initial = int(state["stage_epoch"]) if position == resume_at and state.get("stage") == stage else 0
        if position < resume_at or initial >= epochs:
            continue
        with strategy.scope():  # compile and fit where the variables live
            set_trainable_blocks(model, model_cfg, blocks)
            _fit_stage(
                model,
                part,
                stores[f"train_{level}"],
                stores[f"val_{level}"],
                train_df,
                val_df,
                stage=stage,
                epochs=epochs,
                initial_epoch=initial,
                learning_rate=lr,
                model_cfg=model_cfg,
                train_cfg=train_cfg,
                run_dir=run_dir,
                history_rows=history_rows,
                callbacks=callbacks,
            )
    set_trainable_blocks(model, model_cfg, 0)

    # The operating point is chosen on exactly what the saved model will output: a full float32
    # forward pass over the validation images (cached features may be bfloat16/float16).
    val_scores = score_images(model, list(val_df["cached"]), batch_size=train_cfg.batch_size)
    y_val = val_df["label"].to_numpy()
    choice = choose_threshold(
        y_val, val_scores, target_recall=train_cfg.target_recall, rule=train_cfg.threshold_rule
    )
    metrics_val = compute_metrics(y_val, val_scores, choice.threshold, seed=train_cfg.seed)
    _finish_run(
        run_dir,
        model,
        preprocess_cfg,
        model_cfg,
        train_cfg,
        choice,
        metrics_val,
        history_rows,
        train_df,
        val_df,
        val_scores,
        fingerprint=data_fingerprint(train_df, val_df),
        data=data,
        seconds=time.perf_counter() - started,
    )
    return run_dir


def _weights_identity(model_cfg: ModelConfig) -> str:
    from cxr_pneumonia.model import resolve_weights

    resolved = resolve_weights(model_cfg.backbone, model_cfg.weights)
    if resolved in (None, "imagenet"):
        return str(resolved)
    stat = Path(resolved).stat()
    return f"{Path(resolved).name}:{stat.st_size}:{int(stat.st_mtime)}"


def _finish_run(
    run_dir: Path,
    model: Any,
    preprocess_cfg: PreprocessConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    choice: Any,
    metrics_val: dict[str, Any],
    history_rows: list[dict[str, Any]],
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    val_scores: np.ndarray,
    *,
    fingerprint: dict[str, Any],
    data: Any,
    seconds: float,
) -> None:
    """Write every artefact, model.keras last (by rename), then drop the checkpoints."""
    from cxr_pneumonia.report import plot_training_curves

    history = pd.DataFrame(history_rows)
    history.to_csv(run_dir / HISTORY_FILE, index=False)
    if not history.empty:
        plot_training_curves(history, run_dir / TRAINING_CURVES_FILE)
    seen = pd.concat([train_df.assign(role="train"), val_df.assign(role="val")], ignore_index=True)
    seen = seen.assign(sha256=[Path(c).stem for c in seen["cached"]])
    seen[["sha256", "patient_id", "label", "role"]].to_csv(run_dir / TRAINING_IMAGES_FILE, index=False)
    pd.DataFrame(
        {
            "path": val_df["path"],
            "label": val_df["label"],
            "patient_id": val_df["patient_id"],
            "probability": val_scores.astype(np.float64),  # exact float32 values survive the CSV
        }
    ).to_csv(run_dir / VAL_PREDICTIONS_FILE, index=False)
    write_json(run_dir / METRICS_VAL_FILE, metrics_val)
    threshold = {**choice.to_dict(), "chosen_on": "validation (patient-grouped split of the training data)"}
    write_metadata(
        run_dir,
        preprocess_cfg=preprocess_cfg,
        model_cfg=model_cfg,
        threshold=threshold,
        train_cfg=train_cfg,
        extra={"data": {"source": str(data), **fingerprint}, "train_seconds": round(seconds, 1)},
    )
    tmp = run_dir / ".model.tmp.keras"
    model.save(tmp)
    os.replace(tmp, run_dir / MODEL_FILE)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    log.info(
        "run complete: %s (threshold %.4f, validation recall %.3f, specificity %.3f)",
        run_dir,
        choice.threshold,
        metrics_val["recall"],
        metrics_val["specificity"],
    )


def _load_state(run_dir: Path) -> dict[str, Any]:
    if (run_dir / MODEL_FILE).exists():
        raise TrainingError(f"{run_dir}: training already complete; nothing to resume")
    if not (run_dir / STATE_FILE).is_file():
        raise TrainingError(f"{run_dir}: no {STATE_FILE}; not a run that can be resumed")
    return read_json(run_dir / STATE_FILE)


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its saved dict (the nested AugmentConfig included)."""
    values = dict(values)
    values["augment"] = from_dict(AugmentConfig, values.get("augment", {}))
    return from_dict(TrainConfig, values)
