"""Training: patient-grouped split, cached backbone features, recall-first operating point.

The backbone is frozen up to a split point, so its activations are computed once per image
(and per augmented view) into a float16 memory map on disk; every epoch then only runs the
trainable top (head, plus the top ``fine_tune_blocks`` blocks when fine-tuning). An epoch costs
seconds instead of a forward pass over every image, and memory stays flat.

Training is a list of :class:`Stage` s (the head on a frozen backbone, then the top blocks),
each one compile/fit block. The run directory is complete only when ``model.keras`` exists; it is
written last, by rename. Until then ``checkpoints/`` holds, after every epoch, the model's weights,
the optimiser's variables, the early-stopping state with its best weights and the random states
(dropout seeds; Python's, with which Keras orders batches), so that ``resume`` continues exactly
where an interrupted run stopped.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from cxr_pneumonia import __version__
from cxr_pneumonia.augment import TEST_TIME_VIEWS, AugmentConfig
from cxr_pneumonia.batch import cache_images, default_workers, write_failures_csv
from cxr_pneumonia.config import (
    ConfigError,
    Precision,
    StageConfig,
    atomic_write_bytes,
    config_hash,
    default_cache_dir,
    from_dict,
    override,
    read_json,
    to_dict,
    write_json,
)
from cxr_pneumonia.data import (
    CLUSTER_STATS,
    DatasetError,
    SplitConfig,
    acquisition_groups,
    describe_groups,
    discover,
    image_statistics,
    make_splits,
    training_population,
)
from cxr_pneumonia.distill import Teacher, check_unseen, load_teacher, soft_targets, teacher_probabilities
from cxr_pneumonia.evaluate import (
    GROUP_RULES,
    MARGIN_RULE,
    ThresholdChoice,
    choose_threshold,
    choose_threshold_across_groups,
    choose_threshold_with_margin,
    compute_metrics,
    rates_at,
    rates_by_group,
)
from cxr_pneumonia.features import (
    FeatureStore,
    bf16_supported,
    compute_image_features,
    feature_batches,
    map_features,
    reduced_precision_copy,
    score_images,
    write_store,
)
from cxr_pneumonia.gate import GATE_DIR, DomainModel, GateConfig, fit_gate
from cxr_pneumonia.io import load_image
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
    BEST_WEIGHTS_FILE,
    CHECKPOINT_DIR,
    CHECKPOINT_WEIGHTS_FILE,
    CONFIG_FILE,
    FAILURES_FILE,
    HISTORY_FILE,
    METRICS_VAL_FILE,
    MODEL_FILE,
    OPERATING_POINTS_FILE,
    OPTIMIZER_FILE,
    RANDOM_STATE_FILE,
    STATE_FILE,
    TRAINING_CURVES_FILE,
    TRAINING_IMAGES_FILE,
    VAL_PREDICTIONS_FILE,
    VALIDATION_POINT_PREFIX,
    read_config,
    write_metadata,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data, bad run directory)."""


# Shipped settings (src/cxr_pneumonia/presets/<name>.json, also usable as `train --config FILE`).
PRESETS: tuple[str, ...] = ("seed",)
TEST_TIME_VIEW_SETS: tuple[str, ...] = tuple(TEST_TIME_VIEWS)


class TrainConfig(StageConfig):
    """Training settings; saved in the run's config.json."""

    cli_fields: ClassVar[tuple[str, ...]] = (
        "epochs", "fine_tune_epochs", "augment_views", "batch_size", "target_recall", "threshold_rule",
        "val_fraction", "seed", "strategy", "precision", "cache_dir", "workers", "fit_gate",
        "fixed_threshold", "threshold_groups", "threshold_margin_percentile", "test_time_views",
        "preset", "teacher", "distill_weight",
    )  # fmt: skip

    epochs: int = Field(15, ge=1, description="Head epochs on cached features (frozen backbone).")
    fine_tune_epochs: int = Field(
        2, ge=0, description="Fine-tuning epochs (the model's top fine_tune_blocks blocks trainable)."
    )
    batch_size: int = Field(32, ge=1, description="Batch size.")
    seed: int = Field(42, description="Random seed (split, shuffles, augmentation, initialisation).")
    val_fraction: float = Field(1 / 6, gt=0, le=0.5, description="Share of patients held out for validation.")
    use_official_val: bool = Field(
        False, description="Validate on the dataset's own val split instead of held-out patients."
    )
    target_recall: float = Field(0.98, gt=0, le=1, description="Validation recall the threshold must keep.")
    # group_median: the median of the acquisition groups' target-recall thresholds (evaluate.
    # choose_threshold_across_groups says why); the pooled rules ignore the groups.
    threshold_rule: Literal[
        "group_median", "group_min", "max_specificity", "midpoint", "bootstrap_margin", "fixed"
    ] = Field(
        "group_median",
        description="Operating point: median (group_median) or minimum (group_min) of the validation "
        "acquisition groups' target-recall thresholds, the pooled one (max_specificity, midpoint), "
        "the pooled one lowered to a patient-bootstrap percentile (bootstrap_margin), or "
        "fixed_threshold (fixed).",
    )
    threshold_margin_percentile: float = Field(
        5.0,
        gt=0,
        lt=50,
        description="bootstrap_margin: the percentile of the resampled target-recall thresholds.",
    )
    fixed_threshold: float = Field(0.5, gt=0, le=1, description="The threshold of threshold_rule fixed.")
    # Chosen at training time, because the threshold must be chosen on the scores the run will
    # give: with views, validation is scored as the mean over them too, and so is every prediction.
    test_time_views: Literal[TEST_TIME_VIEW_SETS] = Field(  # type: ignore[valid-type]
        "none",
        description="Average each probability over fixed views (augment.TEST_TIME_VIEWS): none, zoom "
        "(×0.92, ×1.08) or zoom_rotate (and ±4°); predictions cost 1, 3 or 5 forward passes.",
    )
    threshold_groups: int = Field(
        4, ge=1, description="Acquisition groups the validation images are clustered into (data.py)."
    )
    preset: Literal[PRESETS] | None = Field(  # type: ignore[valid-type]
        None, description="The shipped settings the run starts from (seed: the seed's pipeline)."
    )
    patience: int = Field(4, ge=1, description="Epochs without a better validation AUC before stopping.")
    class_weight: bool = Field(True, description="Weight the classes by their inverse frequency.")
    augment_views: int = Field(
        2, ge=0, description="Augmented views per training image in the feature cache."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation ranges.")
    cache_dir: str | None = Field(None, description="Cache for preprocessed images and features.")
    workers: int | None = Field(
        None, ge=1, description="Preprocessing worker processes (default: CPU cores)."
    )
    strategy: Literal["default", "mirrored", "multiworker"] = Field(
        "default",
        description="tf.distribute strategy: default, mirrored (several GPUs) or multiworker (several "
        "processes or machines from TF_CONFIG; README: multi-worker training).",
    )
    precision: Precision = Field(
        "auto", description="Frozen-feature pass: bf16 where the hardware has it (auto), fp32 or bf16."
    )
    fit_gate: bool = Field(
        True, description="Fit the input gate (is this a chest X-ray like the training images?)."
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="How the input gate is fitted.")
    teacher: str | None = Field(
        None, description="A trained run to distil from: its probabilities on the same views are targets."
    )
    distill_weight: float = Field(
        0.5, ge=0, le=1, description="With a teacher: its share of each target (the label has the rest)."
    )

    @field_validator("teacher")
    @classmethod
    def _absolute_teacher(cls, value: str | None) -> str | None:
        # Recorded absolute, so that a resumed run and config.json name the same teacher.
        return str(Path(value).expanduser().absolute()) if value else None


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
    try:
        train_df, val_df = make_splits(df, split_cfg)
    except DatasetError as e:  # the split's own message does not say which data
        raise DatasetError(f"{data}: {e}") from None
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
# Stages as data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One compile/fit block of training (keras-io's transfer-learning recipe, as data).

    ``part`` is the Keras model fitted in this stage (its layers are the full model's);
    ``features`` names the cached activations it reads: ``"backbone"`` (the backbone's output,
    the head's input) or ``"split"`` (the fine-tuning split point, the top blocks' input).
    """

    name: str
    epochs: int
    learning_rate: float
    trainable_blocks: int
    part: Any
    features: Literal["backbone", "split"]


def plan_stages(model_cfg: ModelConfig, train_cfg: TrainConfig, *, head: Any, top: Any) -> list[Stage]:
    """The head on a frozen backbone, then (when asked for) the top blocks together with the head."""
    stages = [Stage("head", train_cfg.epochs, model_cfg.learning_rate, 0, head, "backbone")]
    if train_cfg.fine_tune_epochs and model_cfg.fine_tune_blocks:
        stages.append(
            Stage(
                "fine_tune",
                train_cfg.fine_tune_epochs,
                model_cfg.fine_tune_learning_rate,
                model_cfg.fine_tune_blocks,
                top,
                "split",
            )
        )
    return stages


@dataclass
class _Fit:
    """What every stage of one training shares."""

    run_dir: Path
    model: Any
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    stores: dict[str, FeatureStore]
    history: list[dict[str, Any]]
    callbacks: Sequence[Any] = ()
    targets: np.ndarray | None = None  # (views, n) soft targets of the training views (distillation)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume: weights, optimiser variables, early-stopping state
# --------------------------------------------------------------------------------------------


def _save_weights(model: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


def _save_arrays(arrays: list[np.ndarray], path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _early_stopping(patience: int) -> Any:
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """Keras' EarlyStopping whose counters and best weights survive an interruption."""

        restored: tuple[dict[str, Any], list[np.ndarray] | None] | None = None

        def state(self) -> dict[str, Any]:
            best = None if self.best is None else float(self.best)
            return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch),
                    "stopped_epoch": int(self.stopped_epoch)}  # fmt: skip

        def restore(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
            self.restored = (state, best_weights)
            self.wait, self.best = state["wait"], state["best"]
            self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
            self.best_weights = best_weights

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)  # resets the counters
            if self.restored is not None:
                self.restore(*self.restored)

    return ResumableEarlyStopping(monitor="val_auc", mode="max", patience=patience, restore_best_weights=True)


def _checkpoint_callback(fit: _Fit, stage: Stage, stop: Any) -> Any:
    import keras

    class Checkpoint(keras.callbacks.Callback):
        """After every epoch: the model's weights, the optimiser's variables, the early-stopping
        state (and its best weights) and the history; the state file last, so it never runs ahead."""

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            row = {"stage": stage.name, "epoch": len(fit.history) + 1}
            fit.history.append({**row, **{k: float(v) for k, v in (logs or {}).items()}})
            ckpt = fit.run_dir / CHECKPOINT_DIR
            ckpt.mkdir(parents=True, exist_ok=True)
            _save_weights(fit.model, ckpt / CHECKPOINT_WEIGHTS_FILE)
            _save_arrays([np.asarray(v.numpy()) for v in _random_states(fit.model)], ckpt / RANDOM_STATE_FILE)
            _save_arrays(
                [np.asarray(v.numpy()) for v in stage.part.optimizer.variables], ckpt / OPTIMIZER_FILE
            )
            if stop.best_epoch == epoch and stop.best_weights is not None:
                _save_weights(stage.part, ckpt / BEST_WEIGHTS_FILE)
            version, internal, gauss = random.getstate()  # Keras shuffles each epoch's batches with it
            state = read_json(fit.run_dir / STATE_FILE)
            state.update(stage=stage.name, stage_epoch=epoch + 1, history=fit.history)
            state.update(early_stopping=stop.state(), python_random=[version, list(internal), gauss])
            write_json(fit.run_dir / STATE_FILE, state)

    return Checkpoint()


def _random_states(model: Any) -> list[Any]:
    """The model's variables that are not weights: its layers' seed states (Dropout's masks)."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _restore_variables(variables: list[Any], path: Path, what: str) -> bool:
    """Assign the arrays saved in ``path`` to ``variables`` (False, with a warning, when it cannot)."""
    if not path.is_file():
        log.warning("%s missing: %s start afresh", path, what)
        return False
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if [tuple(v.shape) for v in variables] != [v.shape for v in values]:
        log.warning("%s does not match the model: %s start afresh", path, what)
        return False
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    return True


def _restore_optimizer(part: Any, path: Path) -> bool:
    """Adam's step count and moments as they were after the last completed epoch."""
    part.optimizer.build(part.trainable_variables)
    return _restore_variables(part.optimizer.variables, path, "the optimiser's moments")


def _saved_best_weights(part: Any, path: Path) -> list[np.ndarray] | None:
    """The stage's best weights as saved by the checkpoint (the part's own weights are kept)."""
    if not path.is_file():
        return None
    current = part.get_weights()
    part.load_weights(path)
    best = part.get_weights()
    part.set_weights(current)
    return best


def _class_weights(labels: np.ndarray) -> dict[int, float]:
    n, n_pos = len(labels), int(labels.sum())
    return {0: n / (2.0 * (n - n_pos)), 1: n / (2.0 * n_pos)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _stage_data(fit: _Fit, stage: Stage, initial_epoch: int) -> tuple[Any, Any]:
    """(training batches, validation batches) of the stage's cached features."""
    cfg = fit.train_cfg
    labels = fit.train_df["label"].to_numpy()
    weights = None
    if cfg.class_weight:
        cw = _class_weights(labels)
        weights = np.where(labels == 1, cw[1], cw[0]).astype(np.float32)
    train_data = feature_batches(
        fit.stores[f"train_{stage.features}"],
        labels,
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        sample_weights=weights,
        targets=fit.targets,
    )
    train_data.epoch = initial_epoch  # a resumed run continues the same shuffles
    train_data.on_epoch_end()
    val_labels = fit.val_df["label"].to_numpy()
    val_data = feature_batches(
        fit.stores[f"val_{stage.features}"],
        val_labels,
        batch_size=max(64, cfg.batch_size),
        shuffle=False,
        seed=cfg.seed,
        targets=None if fit.targets is None else val_labels[None, :].astype(np.float32),  # val: the labels
    )
    return train_data, val_data


def _fit_stage(fit: _Fit, stage: Stage, resumed: dict[str, Any] | None) -> None:
    """Compile and fit one stage; ``resumed`` is the saved state of this stage when interrupted."""
    stop = _early_stopping(fit.train_cfg.patience)
    ckpt, initial = fit.run_dir / CHECKPOINT_DIR, 0
    if resumed is not None:
        initial = int(resumed["stage_epoch"])
        if resumed.get("early_stopping"):
            stop.restore(resumed["early_stopping"], _saved_best_weights(stage.part, ckpt / BEST_WEIGHTS_FILE))
        if stop.stopped_epoch or initial >= stage.epochs:  # it had ended: only the best weights are due
            if stop.best_weights is not None:
                stage.part.set_weights(stop.best_weights)
            return
    compile_model(stage.part, stage.learning_rate, fit.model_cfg, soft_targets=fit.targets is not None)
    if resumed is not None:
        _restore_optimizer(stage.part, ckpt / OPTIMIZER_FILE)
        if resumed.get("python_random"):
            version, internal, gauss = resumed["python_random"]
            random.setstate((version, tuple(internal), gauss))
    train_data, val_data = _stage_data(fit, stage, initial)
    stage.part.fit(
        train_data,
        validation_data=val_data,
        epochs=stage.epochs,
        initial_epoch=initial,
        callbacks=[stop, _checkpoint_callback(fit, stage, stop), *fit.callbacks],
        verbose=2,
    )


def _run_stages(fit: _Fit, stages: list[Stage], state: dict[str, Any], strategy: Any) -> None:
    """Every stage in order; a resumed run skips the finished ones and continues the interrupted one."""
    names = [stage.name for stage in stages]
    resume_at = names.index(state["stage"]) if state.get("stage") in names else 0
    for position, stage in enumerate(stages):
        if position < resume_at:
            continue
        resumed = state if position == resume_at and state.get("stage") == stage.name else None
        with strategy.scope():  # compile and fit where the variables live
            set_trainable_blocks(fit.model, fit.model_cfg, stage.trainable_blocks)
            _fit_stage(fit, stage, resumed)
    set_trainable_blocks(fit.model, fit.model_cfg, 0)


def _feature_dtype(train_cfg: TrainConfig) -> str:
    """The dtype of the frozen-feature pass: "bfloat16" or "float32"."""
    bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and bf16_supported())
    return "bfloat16" if bf16 else "float32"


def _feature_stores(
    model: Any,
    preprocess_cfg: PreprocessConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    folder: Path,
    strategy: Any = None,
) -> dict[str, FeatureStore]:
    """Activations at the fine-tuning split ("split") and at the backbone output ("backbone").

    The expensive pass runs the frozen lower backbone once per image and view; the backbone
    output is then derived from it by the (still frozen) top blocks, which is cheap. Under
    ``multiworker`` each worker computes its share of the images and the chief gathers the
    shares (:func:`_sharded`): the cache folder is shared, and its files are the same as one
    worker's.
    """
    import keras

    shard = _shard_of(strategy)
    source = model
    if _feature_dtype(train_cfg) == "bfloat16":
        source = reduced_precision_copy(model_cfg, model)
    extractor, _ = split_model(source, model_cfg, at="fine_tune")
    pipeline = build_pipeline(preprocess_cfg)

    def image_pass(df: pd.DataFrame, side: str, views: int, raw: bool) -> FeatureStore:
        cached, paths = list(df["cached"]), list(df["path"])

        def compute(first: int, stop: int, path: Path) -> FeatureStore:
            return compute_image_features(
                extractor, cached[first:stop], path, views=views, augment=train_cfg.augment,
                seed=train_cfg.seed, description=f"backbone features ({side})", first=first,
                raw=(paths[first:stop], pipeline) if raw else None,
            )  # fmt: skip

        return _sharded(folder / f"{side}_split.npy", len(df), shard, compute)

    stores = {
        "train_split": image_pass(train_df, "train", 1 + train_cfg.augment_views, raw=True),
        "val_split": image_pass(val_df, "val", 1, raw=False),
    }
    if model_cfg.fine_tune_blocks == 0:
        stores["train_backbone"], stores["val_backbone"] = stores["train_split"], stores["val_split"]
        return stores
    feature_extractor, _ = split_model(model, model_cfg, at="fine_tune")
    top_blocks = keras.Model(
        feature_extractor.output, model.get_layer(get_backbone(model_cfg.backbone).last_conv_layer).output
    )
    for side in ("train", "val"):
        split = stores[f"{side}_split"]
        stores[f"{side}_backbone"] = _sharded(
            folder / f"{side}_backbone.npy",
            split.n,
            shard,
            lambda first, stop, path, split=split, side=side: map_features(
                top_blocks, _StoreSlice(split, first, stop), path, description=f"top-block features ({side})"
            ),
        )
    return stores


def _distill_targets(
    teacher: Teacher,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    cache_dir: Path,
    key: str,
) -> np.ndarray:
    """(views, n) soft targets of the training views: the teacher's probabilities mixed with the
    labels (distill.py), the teacher's probabilities cached beside the student's features."""
    from cxr_pneumonia.rundir import model_sha256

    probabilities = teacher_probabilities(
        teacher,
        list(train_df["cached"]),
        cache_dir / "features" / key / f"teacher_{model_sha256(teacher.path)[:16]}.npy",
        views=1 + train_cfg.augment_views,
        augment=train_cfg.augment,
        seed=train_cfg.seed,
        raw=(list(train_df["path"]), build_pipeline(preprocess_cfg)),
        teacher_split=_teacher_split_cache(teacher, preprocess_cfg, train_cfg, train_df, val_df, cache_dir),
        bf16=_feature_dtype(train_cfg) == "bfloat16",
        batch_size=train_cfg.batch_size,
    )
    return soft_targets(train_df["label"].to_numpy(), probabilities, train_cfg.distill_weight)


def _teacher_split_cache(
    teacher: Teacher,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    cache_dir: Path,
) -> Path | None:
    """The teacher's own cached split activations of exactly the student's views, if any: its
    feature key computed with the student's views, augmentation, seed and data."""
    from cxr_pneumonia.model import WeightsUnavailableError

    try:
        key = _feature_key(preprocess_cfg, teacher.model_cfg, train_cfg, train_df, val_df)
    except (WeightsUnavailableError, OSError):  # its backbone weights are gone: no cache to match
        return None
    folders = [Path(teacher.cache_dir) if teacher.cache_dir else default_cache_dir(), cache_dir]
    found = [f / "features" / key / "train_split.npy" for f in folders]
    return next((path for path in found if path.is_file()), None)


# --------------------------------------------------------------------------------------------
# Several workers: MultiWorkerMirroredStrategy from TF_CONFIG, the feature pass sharded
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    """This process's share of the feature pass: worker ``index`` of ``count`` (the chief is 0);
    ``barrier()`` returns when every worker has called it."""

    index: int = 0
    count: int = 1
    barrier: Any = None


class _StoreSlice:
    """Items ``[first, stop)`` of a feature store, read as :func:`features.map_features` reads a store."""

    def __init__(self, store: FeatureStore, first: int, stop: int) -> None:
        self.store, self.first, self.stop = store, first, stop
        self.views, self.n = store.views, stop - first

    def batches(self, batch_size: int, view: int = 0) -> Any:
        for start in range(self.first, self.stop, batch_size):
            yield self.store.read(range(start, min(start + batch_size, self.stop)), view)


def _sharded(path: Path, n: int, shard: _Shard, compute: Any) -> FeatureStore:
    """The store at ``path`` over ``n`` items, ``compute(first, stop, file)`` writing items
    ``[first, stop)`` into ``file``: at once on one worker, else this worker's share, then the
    chief gathers the shares into ``path`` while the others wait. A share already on disk (an
    interrupted pass) is reused."""
    if path.exists():
        return FeatureStore(path)
    if shard.count == 1:
        return compute(0, n, path)
    edges = np.linspace(0, n, shard.count + 1).astype(int)
    first, stop = int(edges[shard.index]), int(edges[shard.index + 1])
    parts = [path.with_name(f".{path.stem}.shard-{i}-of-{shard.count}.npy") for i in range(shard.count)]
    log.info(
        "%s: items [%d, %d) of %d on worker %d of %d", path.name, first, stop, n, shard.index, shard.count
    )
    compute(first, stop, parts[shard.index])
    shard.barrier()  # every share is on disk
    if shard.index == 0:
        _gather([FeatureStore(part) for part in parts], path)
    shard.barrier()  # the whole store is on disk
    if shard.index == 0:
        for part in parts:
            part.unlink(missing_ok=True)
    return FeatureStore(path)


def _gather(parts: list[FeatureStore], path: Path) -> FeatureStore:
    """One store of the shares' items in order (view by view, as the file is laid out)."""
    n = sum(part.n for part in parts)

    def chunks() -> Any:
        for view in range(parts[0].views):
            for part in parts:
                yield from part.batches(256, view)

    shape = (parts[0].views, n, *parts[0].item_shape)
    return write_store(path, shape, chunks(), total=parts[0].views * n, description="gathering features")


def _tf_config_task() -> tuple[int, int] | None:
    """(this worker's index, the chief first; number of workers) from TF_CONFIG; None without it."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        chiefs = len(cluster.get("chief", []))
        count = chiefs + len(cluster.get("worker", []))
        index = 0 if task["type"] == "chief" else chiefs + int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainingError(f"TF_CONFIG is not a cluster and task description: {e!r}") from None
    if not 0 <= index < count:
        raise TrainingError(f"TF_CONFIG: task {task} is not in its cluster of {count} workers")
    return index, count


def _multiworker_task() -> tuple[int, int]:
    task = _tf_config_task()
    if task is None:
        raise TrainingError("--strategy multiworker needs TF_CONFIG (README: multi-worker training)")
    return task


def _worker_dir(out: Path, train_cfg: TrainConfig, *, resume: bool) -> Path:
    """Where this process writes the run: ``out``, except a worker other than the chief, which
    writes its checkpoints into a scratch folder (only the chief writes the run directory),
    seeded with the interrupted run's state when resuming."""
    if train_cfg.strategy != "multiworker":
        return out
    index, _ = _multiworker_task()
    if index == 0:
        return out
    if not resume and (out / MODEL_FILE).exists():
        raise TrainingError(f"{out}: already holds a trained model; choose another --out")
    scratch = Path(tempfile.mkdtemp(prefix=f"cxr-pneumonia-worker{index}-"))
    if resume:
        shutil.copy2(out / STATE_FILE, scratch / STATE_FILE)
        if (out / CHECKPOINT_DIR).is_dir():
            shutil.copytree(out / CHECKPOINT_DIR, scratch / CHECKPOINT_DIR)
    return scratch


def _shard_of(strategy: Any) -> _Shard:
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return _Shard()
    index, count = _multiworker_task()
    return _Shard(index, count, lambda: _barrier(strategy))


def _barrier(strategy: Any) -> None:
    """Return when every worker has called it: an all-reduce of a constant (collectives block)."""
    _everyone(strategy)()


@functools.cache
def _everyone(strategy: Any) -> Any:
    """The barrier's all-reduce, traced once per strategy (there is one per process)."""
    import tensorflow as tf

    @tf.function
    def everyone() -> Any:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)

    return everyone


def _weights_digest(model: Any) -> str:
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()[:16]


def _workers_finish(strategy: Any, model: Any) -> None:
    """Multi-worker: log the weights' digest (the same on every worker: the replicas stay in sync)
    and wait until every worker is done, so that none leaves while the chief still writes."""
    shard = _shard_of(strategy)
    if shard.count > 1:
        log.info("worker %d of %d: final weights %s", shard.index, shard.count, _weights_digest(model))
        shard.barrier()


def _leave_run(scratch: Path, out: Path, strategy: Any, model: Any) -> Path:
    """The end of training on a worker other than the chief: wait for the chief to write the run
    directory, drop the scratch folder; returns the chief's run directory."""
    try:
        _workers_finish(strategy, model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _patch_keras_for_multiworker() -> None:
    """Two fixes to Keras 3's TensorFlow trainer, which fails under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): it asks the strategy for the mean of a whole data batch to learn the
    input shapes (one replica's batch has them), and reduces each replica's scalar metrics along
    an axis they lack (their mean across replicas is meant). Applied only for ``multiworker``."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_cxr_multiworker_patched", False):
        return

    def local(value: Any, strategy: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                strategy = self.distribute_strategy
                data_batch = tf.nest.map_structure(lambda v, s=strategy: local(v, s), next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.reduce("MEAN", value, axis=None)
            return value

        return tf.nest.map_structure(mean, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer._cxr_multiworker_patched = True


def _distribution(name: str) -> Any:
    """The tf.distribute strategy for ``name`` (the default strategy for "default")."""
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        log.info("MirroredStrategy over %d devices", strategy.num_replicas_in_sync)
        return strategy
    if name == "multiworker":
        index, count = _multiworker_task()
        _patch_keras_for_multiworker()
        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # its INFO lines on every collective
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info("MultiWorkerMirroredStrategy: worker %d of %d, %d replicas", index, count,
                 strategy.num_replicas_in_sync)  # fmt: skip
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
    """Train on ``data`` into the run directory ``out``; return it (``predict.Run.load`` applies it).

    With ``resume=True`` the configs and data come from ``out/train_state.json`` and training
    continues after the last completed epoch, with the optimiser and early-stopping state it had.
    """
    run_dir = Path(out)
    if resume:
        state = _load_state(run_dir)
        data, preprocess_cfg, model_cfg, train_cfg = _configs_from_state(run_dir, state, data)
        run_dir = _worker_dir(run_dir, train_cfg, resume=True)
    else:
        preprocess_cfg, model_cfg, train_cfg = _fresh_configs(preprocess_cfg, model_cfg, train_cfg)
        run_dir = _worker_dir(run_dir, train_cfg, resume=False)
        state = _start_run(run_dir, data, preprocess_cfg, model_cfg, train_cfg)

    seed_everything(train_cfg.seed)
    started = time.perf_counter()
    cache_dir = Path(train_cfg.cache_dir) if train_cfg.cache_dir else default_cache_dir()
    if train_cfg.workers is None:
        train_cfg = override(train_cfg, workers=default_workers())
    teacher = load_teacher(train_cfg.teacher, preprocess_cfg) if train_cfg.teacher else None
    train_df, val_df = prepare_data(Path(data), preprocess_cfg, train_cfg, cache_dir, run_dir)
    _check_same_split(run_dir, data_fingerprint(train_df, val_df), resume=resume)
    if teacher is not None:
        check_unseen(teacher, val_df)
    model_cfg = _with_initial_bias(model_cfg, train_cfg, train_df)
    strategy = _distribution(train_cfg.strategy)
    with strategy.scope():
        model = _build_or_restore(model_cfg, run_dir, state if resume else None)
        _, top = split_model(model, model_cfg, at="fine_tune")
    key = _feature_key(preprocess_cfg, model_cfg, train_cfg, train_df, val_df)
    stores = _feature_stores(
        model, preprocess_cfg, model_cfg, train_cfg, train_df, val_df, cache_dir / "features" / key, strategy
    )
    with strategy.scope():
        _, head = split_model(model, model_cfg, at="backbone_output")
    fit = _Fit(run_dir, model, model_cfg, train_cfg, train_df, val_df, stores, list(state.get("history", [])))
    fit.callbacks = callbacks
    if teacher is not None:
        fit.targets = _distill_targets(teacher, preprocess_cfg, train_cfg, train_df, val_df, cache_dir, key)
    _run_stages(fit, plan_stages(model_cfg, train_cfg, head=head, top=top), state, strategy)
    if run_dir != Path(out):  # a worker other than the chief: the chief writes the run
        return _leave_run(run_dir, Path(out), strategy, model)

    choice, metrics_val, val_scores = _operating_point(model, val_df, train_cfg, cache_dir)
    alternatives = validation_points(
        val_df["label"].to_numpy(), val_scores, val_df, train_cfg, cache_dir=cache_dir
    )
    if train_cfg.fit_gate:
        save_gate(run_fit_gate(model, preprocess_cfg, model_cfg, train_cfg, train_df, val_df), run_dir)
    _finish_run(
        run_dir,
        model,
        preprocess_cfg,
        model_cfg,
        train_cfg,
        choice,
        metrics_val,
        fit.history,
        train_df,
        val_df,
        val_scores,
        fingerprint=data_fingerprint(train_df, val_df),
        data=data,
        seconds=time.perf_counter() - started,
        teacher=teacher.record() if teacher is not None else None,
        alternatives=alternatives,
    )
    _workers_finish(strategy, model)
    return run_dir


def _fresh_configs(
    preprocess_cfg: PreprocessConfig | None, model_cfg: ModelConfig | None, train_cfg: TrainConfig | None
) -> tuple[PreprocessConfig, ModelConfig, TrainConfig]:
    """The defaults where a config is not given; the preprocessing size follows the model's."""
    preprocess_cfg = preprocess_cfg or PreprocessConfig()
    model_cfg = model_cfg or ModelConfig()
    if model_cfg.image_size != preprocess_cfg.size:
        preprocess_cfg = override(preprocess_cfg, size=model_cfg.image_size)
    return preprocess_cfg, model_cfg, train_cfg or TrainConfig()


def _start_run(
    run_dir: Path, data: Any, preprocess_cfg: PreprocessConfig, model_cfg: ModelConfig, train_cfg: TrainConfig
) -> dict[str, Any]:
    """Create the run directory with its resume state (configs, data, no epoch yet)."""
    if (run_dir / MODEL_FILE).exists():
        raise TrainingError(f"{run_dir}: already holds a trained model; choose another --out")
    check_weights_available(model_cfg, train_cfg)  # before the run directory exists
    # An interrupted earlier attempt may have left its checkpoints and its input gate (saved just
    # before the run is finished): a fresh run must not finish carrying another model's gate.
    for leftover in (CHECKPOINT_DIR, GATE_DIR):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "data": str(Path(data).resolve()),
        "preprocess": to_dict(preprocess_cfg),
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "stage": None,
        "stage_epoch": 0,
        "history": [],
    }
    write_json(run_dir / STATE_FILE, state)
    return read_json(run_dir / STATE_FILE)


def _check_same_split(run_dir: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
    """Record the split a run starts with; refuse to resume on another one.

    The split is drawn again from DATA on resume: had images been added or removed meanwhile,
    the checkpoint's weights would go on against validation patients they had trained on, and
    early stopping, the threshold and the validation metrics would all be read on them.
    """
    state = read_json(run_dir / STATE_FILE)
    recorded = state.get("data_fingerprint")
    if resume and recorded is not None and recorded != fingerprint:
        raise TrainingError(
            f"{state.get('data')}: the images or labels changed since {run_dir} started "
            f"(training/validation split {_split_summary(recorded)} then, {_split_summary(fingerprint)} "
            "now); resuming would validate on images it trained on: train afresh into another --out"
        )
    if recorded is None and resume and state.get("history"):
        log.warning("%s: started before its split was recorded; cannot check that DATA is unchanged", run_dir)
    if recorded is None:  # a fresh run, or one started before the split was recorded
        write_json(run_dir / STATE_FILE, {**state, "data_fingerprint": fingerprint})


def _split_summary(fingerprint: dict[str, Any]) -> str:
    return "/".join(str(fingerprint.get(side, {}).get("n", "?")) for side in ("train", "val"))


def _load_state(run_dir: Path) -> dict[str, Any]:
    if (run_dir / MODEL_FILE).exists():
        raise TrainingError(f"{run_dir}: training already complete; nothing to resume")
    if not (run_dir / STATE_FILE).is_file():
        raise TrainingError(f"{run_dir}: no {STATE_FILE}; not a run that can be resumed")
    return read_json(run_dir / STATE_FILE)


def _configs_from_state(
    run_dir: Path, state: dict[str, Any], data: str | Path | None = None
) -> tuple[str, PreprocessConfig, ModelConfig, TrainConfig]:
    """(data, configs) of an interrupted run, validated before any image is read. ``data``, when
    given, must be the data the run started on."""
    if data is not None and "data" in state and Path(data).resolve() != Path(state["data"]):
        raise TrainingError(f"{data}: {run_dir} was started on {state['data']}; it resumes on that data only")
    try:
        return (
            state["data"],
            from_dict(PreprocessConfig, state["preprocess"]),
            from_dict(ModelConfig, state["model"]),
            from_dict(TrainConfig, state["train"]),
        )
    except ConfigError as e:
        raise ConfigError(f"{run_dir / STATE_FILE}: {e}") from None
    except KeyError as e:
        raise TrainingError(f"{run_dir / STATE_FILE}: no {e} entry; not a run that can be resumed") from None


def preset_configs(name: str) -> tuple[PreprocessConfig, ModelConfig, TrainConfig]:
    """The three configs of a shipped preset (``presets/<name>.json``; ``preset`` recorded in the
    TrainConfig). Raises :class:`ConfigError` in one line for an unknown name."""
    from importlib import resources

    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    values = json.loads((resources.files("cxr_pneumonia") / "presets" / f"{name}.json").read_text("utf-8"))
    return (
        from_dict(PreprocessConfig, values.get("preprocess") or {}),
        from_dict(ModelConfig, values.get("model") or {}),
        from_dict(TrainConfig, {**(values.get("train") or {}), "preset": name}),
    )


def check_weights_available(model_cfg: ModelConfig, train_cfg: TrainConfig | None = None) -> None:
    """Fail before any image is read when the backbone's ImageNet weights are neither in
    ``$CXR_PNEUMONIA_WEIGHTS_DIR`` nor downloadable (a download that works is cached by Keras)."""
    import keras

    from cxr_pneumonia.model import WEIGHTS_DIR_ENV, WeightsUnavailableError, resolve_weights

    if resolve_weights(model_cfg.backbone, model_cfg.weights) != "imagenet":
        return  # a local file (checked when loaded), or random weights
    spec = get_backbone(model_cfg.backbone)
    size = max(model_cfg.image_size, spec.min_size)
    try:
        spec.constructor(
            include_top=False,
            weights="imagenet",
            input_shape=(size, size, 3),
            **dict(spec.constructor_kwargs),
        )
    except (ValueError, TypeError):
        return  # not a download problem: building the model says what is wrong
    except Exception as e:  # keras' get_file raises a bare Exception when the download fails
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        preset = (
            f" (the {train_cfg.preset} preset runs on any backbone)" if train_cfg and train_cfg.preset else ""
        )
        raise WeightsUnavailableError(
            f"ImageNet weights for {model_cfg.backbone} are not available: none in ${WEIGHTS_DIR_ENV} and "
            f"the download failed ({reason}); train a backbone whose weights you have{preset}, e.g. "
            "the default mobilenetv2 or --backbone xception with its weights in that folder, or pass "
            "--weights PATH or --weights none"
        ) from None
    finally:
        keras.backend.clear_session()  # the probe's layers must not rename the real model's


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its saved dict (the nested AugmentConfig included)."""
    return from_dict(TrainConfig, values)


def _with_initial_bias(model_cfg: ModelConfig, train_cfg: TrainConfig, train_df: pd.DataFrame) -> ModelConfig:
    """Start the output at the class prior (0 with class weights, which balance the classes)."""
    if model_cfg.initial_bias is not None:
        return model_cfg
    n_pos, n_neg = int(train_df["label"].sum()), int((train_df["label"] == 0).sum())
    return override(model_cfg, initial_bias=0.0 if train_cfg.class_weight else math.log(n_pos / n_neg))


def _build_or_restore(model_cfg: ModelConfig, run_dir: Path, state: dict[str, Any] | None) -> Any:
    """The model, with the last checkpoint's weights when resuming (call in the strategy's scope)."""
    model = build_model(model_cfg)
    last = run_dir / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS_FILE
    if state is not None and last.exists():
        model.load_weights(last)
        _restore_variables(_random_states(model), last.parent / RANDOM_STATE_FILE, "dropout's seeds")
        log.info("resumed from %s (stage %s, epoch %s)", last.parent, state["stage"], state["stage_epoch"])
    return model


def _feature_key(
    preprocess_cfg: PreprocessConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
) -> str:
    """The feature cache's key: everything the cached activations depend on."""
    return config_hash(
        {
            "preprocess": to_dict(preprocess_cfg),
            "backbone": model_cfg.backbone,
            "weights": _weights_identity(model_cfg),
            "size": model_cfg.image_size,
            "blocks": model_cfg.fine_tune_blocks,
            "views": train_cfg.augment_views,
            "augment": to_dict(train_cfg.augment),
            "seed": train_cfg.seed,
            "precision": _feature_dtype(train_cfg),
            "data": data_fingerprint(train_df, val_df),
            # The stores are positional (row i is image i): the same images in another order
            # (a CSV, or Kaggle's val folder moved into train) must not read each other's rows.
            "order": {side: _row_order(df) for side, df in (("train", train_df), ("val", val_df))},
        }
    )


def _row_order(df: pd.DataFrame) -> str:
    """A digest of the images (content hashes) and labels in row order."""
    rows = (f"{Path(c).stem}:{label}" for c, label in zip(df["cached"], df["label"], strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _operating_point(
    model: Any, val_df: pd.DataFrame, train_cfg: TrainConfig, cache_dir: Path | None = None
) -> tuple[Any, dict, np.ndarray]:
    """The threshold and validation metrics, on exactly what the saved run will output: full
    float32 forward passes over the validation images (cached features may be bfloat16/float16),
    averaged over the run's test-time views."""
    val_scores = score_images(
        model, list(val_df["cached"]), batch_size=train_cfg.batch_size, views=train_cfg.test_time_views
    )
    y_val = val_df["label"].to_numpy()
    choice = choose_operating_point(y_val, val_scores, val_df, train_cfg, cache_dir=cache_dir)
    metrics = compute_metrics(
        y_val, val_scores, choice.threshold, seed=train_cfg.seed, groups=val_df["patient_id"]
    )
    return choice, metrics, val_scores


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and what threshold.json records about it (:func:`choose_operating_point`)."""

    threshold: float
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.record)


def choose_operating_point(
    y: np.ndarray, scores: np.ndarray, val_df: pd.DataFrame, train_cfg: TrainConfig, *, cache_dir: Path | None
) -> OperatingPoint:
    """Apply ``train_cfg.threshold_rule`` to the validation scores. Whatever the rule, the record
    shows how the threshold does in each acquisition group of the validation images
    (``data.acquisition_groups``), each group's own target-recall threshold, their spread and
    what each group is (``group_definition``: the mean statistics of its images)."""
    rule, target = train_cfg.threshold_rule, train_cfg.target_recall
    stats = image_statistics(
        val_df["path"],
        workers=train_cfg.workers,
        cache_dir=None if cache_dir is None else cache_dir / "image_stats",
    )
    groups = acquisition_groups(val_df, k=train_cfg.threshold_groups, seed=train_cfg.seed, stats=stats)
    if rule in GROUP_RULES:
        record = choose_threshold_across_groups(y, scores, groups, target_recall=target, rule=rule).to_dict()
    else:
        if rule == "fixed":
            record = _fixed_choice(y, scores, train_cfg).to_dict()
            record["chosen_on"] = "nothing: fixed_threshold (validation figures for information)"
        elif rule == MARGIN_RULE:
            choice, margin = choose_threshold_with_margin(
                y,
                scores,
                val_df["patient_id"].astype(str).to_numpy(),
                target_recall=target,
                percentile=train_cfg.threshold_margin_percentile,
                seed=train_cfg.seed,
            )
            record = {**choice.to_dict(), "margin": margin}
        else:
            record = choose_threshold(y, scores, target_recall=target, rule=rule).to_dict()
        record.update(rates_by_group(y, scores, groups, record["threshold"], target_recall=target))
    described = describe_groups(stats, groups, y).round(4)
    record["group_definition"] = {
        "method": f"KMeans (k={train_cfg.threshold_groups}, seed {train_cfg.seed}) on the standardised "
        f"{', '.join(CLUSTER_STATS)} of the raw validation images; one group per patient",
        "groups": described.astype(object).where(described.notna(), None).to_dict(orient="index"),
    }
    return OperatingPoint(float(record["threshold"]), record)


# Rules whose validation threshold every run also keeps as a named operating point. Which rule
# holds under a shift differs by shift (README: "Which threshold rule holds the target recall on
# new patients"), so a deployment can switch without retraining or labelled site data:
# --operating-point validation-max_specificity. calibrate on a site's sample beats all three.
ALTERNATIVE_RULES = ("group_median", "max_specificity", "bootstrap_margin")


def validation_points(
    y: np.ndarray, scores: np.ndarray, val_df: pd.DataFrame, train_cfg: TrainConfig, *, cache_dir: Path | None
) -> dict[str, dict[str, Any]]:
    """``validation-<rule>`` for each of :data:`ALTERNATIVE_RULES` but the run's own (that one is
    threshold.json, the ``default`` point): its threshold on the same validation scores, the
    validation recall and specificity at it, for ``operating_points.json``."""
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    points = {}
    for rule in ALTERNATIVE_RULES:
        if rule == train_cfg.threshold_rule:
            continue
        with warnings.catch_warnings():  # the run's own rule has warned; "achievable" records it here
            warnings.simplefilter("ignore", UserWarning)
            choice = choose_operating_point(
                y, scores, val_df, train_cfg.model_copy(update={"threshold_rule": rule}), cache_dir=cache_dir
            )
        rates = rates_at(y, scores, choice.threshold)
        name = f"{VALIDATION_POINT_PREFIX}{rule}"
        if choice.record.get("fallback") or choice.record.get("achievable") is False:
            log.info(
                "operating point %s: %s", name, choice.record.get("fallback") or "target recall not reachable"
            )
        points[name] = {
            "name": name,
            "threshold": choice.threshold,
            "target_recall": float(train_cfg.target_recall),
            "rule": rule,
            "recall": rates["recall"],
            "specificity": rates["specificity"],
            "n": len(y),
            "n_pos": int(np.sum(y == 1)),
            "n_neg": int(np.sum(y == 0)),
            "n_patients": int(val_df["patient_id"].nunique()),
            # a group rule without enough positives per group falls back to the pooled threshold
            **{k: choice.record[k] for k in ("achievable", "fallback") if choice.record.get(k) is not None},
            "chosen_on": "validation (patient-grouped split of the training data)",
            "created_at": created,
            "package_version": __version__,
        }
    return points


def _fixed_choice(y: np.ndarray, scores: np.ndarray, train_cfg: TrainConfig) -> ThresholdChoice:
    """``fixed_threshold``, chosen on nothing (the seed's decision at 0.5), with its validation rates."""
    rates = rates_at(y, scores, train_cfg.fixed_threshold)
    return ThresholdChoice(
        threshold=float(train_cfg.fixed_threshold),
        target_recall=float(train_cfg.target_recall),
        recall=rates["recall"],
        specificity=rates["specificity"],
        rule="fixed",
        achievable=rates["confusion_matrix"][0][0] > 0,
    )


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
    teacher: dict[str, Any] | None = None,
    alternatives: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write every artefact, model.keras last (by rename), then drop the checkpoints.
    ``alternatives``: the other rules' validation points (:func:`validation_points`)."""
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
    threshold = {"chosen_on": "validation (patient-grouped split of the training data)", **choice.to_dict()}
    write_metadata(
        run_dir,
        preprocess_cfg=preprocess_cfg,
        model_cfg=model_cfg,
        threshold=threshold,
        train_cfg=train_cfg,
        extra={
            "data": {
                "source": str(data),
                **fingerprint,
                "population": training_population(
                    [*train_df["path"], *val_df["path"]], [*train_df["patient_id"], *val_df["patient_id"]]
                ),
            },
            "train_seconds": round(seconds, 1),
            **({"teacher": teacher} if teacher else {}),
        },
    )
    if alternatives:  # a run is not calibrated before it is complete: nothing here to keep
        write_json(run_dir / OPERATING_POINTS_FILE, {"points": alternatives, "replaced": []})
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


# --------------------------------------------------------------------------------------------
# The input gate (gate.py): fitted at the end of training, or later for an existing run
# --------------------------------------------------------------------------------------------


class ImageFiles(Sequence):
    """Image files as a sequence of uint8 arrays, each read when indexed (memory stays flat)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return ImageFiles(self.paths[index])
        return load_image(self.paths[index])


def run_fit_gate(
    model: Any,
    preprocess_cfg: PreprocessConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    gate_cfg: GateConfig | None = None,
) -> DomainModel:
    """The gate of a trained model: fitted on the raw training images under the training
    augmentation, its limit set on the validation images."""
    log.info("fitting the input gate")
    return fit_gate(
        model,
        model_cfg,
        ImageFiles(train_df["path"]),
        ImageFiles(val_df["path"]),
        cfg=gate_cfg or train_cfg.gate,
        preprocess_cfg=preprocess_cfg,
        augment_cfg=train_cfg.augment,
        batch_size=train_cfg.batch_size,
    )


def save_gate(gate: DomainModel, run_dir: Path) -> Path:
    """Write ``run_dir/gate/`` as a whole: assembled under a temporary name, then renamed."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".gate-", dir=run_dir))
    target = Path(run_dir) / GATE_DIR
    old = Path(run_dir) / f".{GATE_DIR}.old-{os.getpid()}"
    try:
        gate.save(tmp)
        (tmp / GATE_DIR).chmod(0o755)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp / GATE_DIR, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def fit_gate_for_run(
    run_dir: str | Path, data: str | Path | None = None, **gate_overrides: Any
) -> DomainModel:
    """Fit (or refit) the gate of a complete run on its own patient split of ``data`` (default:
    the data it was trained on); ``gate_overrides`` are :class:`GateConfig` fields. Returns it, saved."""
    import keras

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise TrainingError(f"{run_dir}: not a complete run directory (needs {MODEL_FILE} and {CONFIG_FILE})")
    config = read_config(run_dir)
    data = data or (config.get("data") or {}).get("source")
    if not data:
        raise TrainingError(f"{run_dir}: {CONFIG_FILE} does not say which data it was trained on; give DATA")
    train_cfg = from_dict(TrainConfig, config.get("train") or {})
    preprocess_cfg = from_dict(PreprocessConfig, config["preprocess"])
    model_cfg = from_dict(ModelConfig, config["model"])
    gate_cfg = override(train_cfg.gate, **gate_overrides)
    train_df, val_df = _split_again(run_dir, Path(data), train_cfg, config)
    model = keras.models.load_model(run_dir / MODEL_FILE, compile=False)
    gate = run_fit_gate(model, preprocess_cfg, model_cfg, train_cfg, train_df, val_df, gate_cfg)
    save_gate(gate, run_dir)
    return gate


def _split_again(
    run_dir: Path, data: Path, train_cfg: TrainConfig, config: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training's patient split of ``data``, less the images training could not read."""
    split_cfg = SplitConfig(
        val_fraction=train_cfg.val_fraction, seed=train_cfg.seed, use_official_val=train_cfg.use_official_val
    )
    train_df, val_df = make_splits(discover(data), split_cfg)
    failures = run_dir / FAILURES_FILE
    if failures.is_file():
        failed = set(pd.read_csv(failures)["file"].astype(str))
        train_df = train_df[~train_df["path"].astype(str).isin(failed)].reset_index(drop=True)
        val_df = val_df[~val_df["path"].astype(str).isin(failed)].reset_index(drop=True)
    seen = config.get("data") or {}
    for side, df in (("train", train_df), ("val", val_df)):
        expected = (seen.get(side) or {}).get("n")
        if expected is not None and expected != len(df):
            log.warning(
                "%s: %d %s images, training had %d; is this the data the run was trained on?",
                data, len(df), side, expected,
            )  # fmt: skip
    return train_df, val_df
