"""Distillation: a trained run (the teacher) gives soft targets for the views a student trains on.

Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network"
(arXiv:1503.02531): a small model learns more from a large model's probabilities than from the
labels alone, because the probabilities say how sure the large model is about each image. For a
sigmoid output the soft target is simply a probability, and binary cross-entropy takes it as is:
``target = w * p_teacher + (1 - w) * label`` (``TrainConfig.distill_weight`` is ``w``).

The teacher scores exactly the views the student's feature cache holds (the same preprocessed
images, the same seeded augmentation draws), once per view, and its probabilities are cached
beside the student's features under the teacher's model hash. When the teacher's own feature
cache for those views exists (a teacher trained with the same data, seed and augmentation, and
the same cache), only its trainable top runs over its cached activations: seconds, not a pass of
the large backbone. The teacher must share the student's preprocessing and must not have trained
on any of the student's validation patients, or the student's validation (its threshold, its
early stopping) would see the teacher's memory of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_pneumonia import rundir
from cxr_pneumonia.augment import AugmentConfig
from cxr_pneumonia.config import ConfigError, config_hash, from_dict, to_dict
from cxr_pneumonia.features import (
    FeatureStore,
    compute_image_features,
    map_features,
    reduced_precision_copy,
)
from cxr_pneumonia.model import ModelConfig, split_model
from cxr_pneumonia.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher run cannot teach this student (one line: the run and the reason)."""


@dataclass
class Teacher:
    """A complete run directory as a teacher: its configs, and its Keras model when first used."""

    path: Path
    config: dict[str, Any]
    model_cfg: ModelConfig
    _model: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        if self._model is None:
            import keras

            self._model = keras.saving.load_model(self.path / rundir.MODEL_FILE, compile=False)
        return self._model

    @property
    def cache_dir(self) -> str | None:
        """The feature cache the teacher was trained with (None: the default one)."""
        return (self.config.get("train") or {}).get("cache_dir")

    def record(self) -> dict[str, Any]:
        """What the student's config.json says about its teacher."""
        sections = {k: self.config.get(k) for k in ("preprocess", "model", "train")}
        return {
            "path": str(self.path),
            "config_hash": config_hash(sections),
            "model_sha256": rundir.model_sha256(self.path),
            "backbone": self.model_cfg.backbone,
        }


def soft_targets(labels: np.ndarray, teacher_p: np.ndarray, weight: float) -> np.ndarray:
    """(views, n) float32 targets ``weight * p_teacher + (1 - weight) * label`` (Hinton et al. 2015)."""
    labels = np.asarray(labels, dtype=np.float32)
    teacher_p = np.asarray(teacher_p, dtype=np.float32)
    if teacher_p.ndim != 2 or teacher_p.shape[1] != len(labels):
        raise ValueError(f"teacher probabilities of shape {teacher_p.shape} for {len(labels)} labels")
    return weight * teacher_p + (1.0 - weight) * labels[None, :]


def load_teacher(path: str | Path, preprocess_cfg: PreprocessConfig) -> Teacher:
    """The teacher run at ``path``, refused unless complete and preprocessed like the student."""
    path = Path(path)
    try:
        rundir.check_complete(path)
        config = rundir.read_config(path)
        model_cfg = from_dict(ModelConfig, config["model"])
        theirs = from_dict(PreprocessConfig, config["preprocess"])
    except (rundir.RunError, ConfigError, KeyError, OSError, ValueError) as e:
        raise TeacherError(f"teacher {path}: not a usable run ({e})") from None
    if theirs != preprocess_cfg:
        mine, other = to_dict(preprocess_cfg), to_dict(theirs)
        diff = ", ".join(f"{k} {other[k]!r} vs {mine[k]!r}" for k in mine if mine[k] != other.get(k))
        raise TeacherError(f"teacher {path}: preprocessing differs from the student's ({diff})")
    return Teacher(path=path, config=config, model_cfg=model_cfg)


def check_unseen(teacher: Teacher, val_df: pd.DataFrame) -> None:
    """Refuse a teacher that trained on any image or patient of the student's validation split.

    The split is seeded by patient: the same data, seed and validation share give the same split,
    so a teacher trained that way passes.
    """
    file = teacher.path / rundir.TRAINING_IMAGES_FILE
    if not file.is_file():
        raise TeacherError(f"teacher {teacher.path}: no {file.name}; cannot check what it trained on")
    seen = pd.read_csv(file, dtype={"sha256": str, "patient_id": str, "role": str})
    trained = seen[seen["role"] == "train"]
    images = set(trained["sha256"]) & {Path(c).stem for c in val_df["cached"]}
    patients = set(trained["patient_id"]) & set(val_df["patient_id"].astype(str))
    if images or patients:
        example = sorted(patients)[:3] or sorted(images)[:3]
        raise TeacherError(
            f"teacher {teacher.path}: trained on {len(patients)} of the student's validation patients "
            f"({len(images)} images, e.g. {', '.join(example)}); train the student on the teacher's "
            f"data with its seed and val_fraction"
        )


def teacher_probabilities(
    teacher: Teacher,
    paths: Sequence[str],
    out_path: Path,
    *,
    views: int,
    augment: AugmentConfig,
    seed: int,
    raw: tuple[Sequence[str], Any] | None,
    teacher_split: Path | None = None,
    bf16: bool = False,
    batch_size: int = 32,
) -> np.ndarray:
    """(views, n) teacher probabilities of the student's cached views (``features.image_batches``'
    views of ``paths``); read from ``out_path`` when it exists, else computed and written there.

    ``teacher_split`` is the teacher's own cache of activations at its fine-tuning split for the
    same views: its top (frozen below the split, so equal to the trained model) then runs on them.
    """
    store = _from_teacher_cache(teacher, teacher_split, out_path, views=views, n=len(paths))
    if store is None:
        model = reduced_precision_copy(teacher.model_cfg, teacher.model) if bf16 else teacher.model
        log.info("teacher %s: scoring %d views of %d images", teacher.path, views, len(paths))
        store = compute_image_features(
            model,
            paths,
            out_path,
            views=views,
            augment=augment,
            seed=seed,
            batch_size=batch_size,
            description="teacher probabilities",
            raw=raw,
        )
    return np.stack([store.read(range(store.n), v).reshape(-1) for v in range(store.views)])


def _from_teacher_cache(
    teacher: Teacher, split: Path | None, out_path: Path, *, views: int, n: int
) -> FeatureStore | None:
    """The teacher's probabilities from its cached split activations (None: no usable cache)."""
    if out_path.exists():
        return FeatureStore(out_path)
    if split is None or not split.is_file():
        return None
    _, top = split_model(teacher.model, teacher.model_cfg, at="fine_tune")
    cached = FeatureStore(split)
    expected = (views, n, *(int(d) for d in top.input.shape[1:]))
    if cached.shape != expected:
        log.warning("%s: shape %s, expected %s; scoring the images instead", split, cached.shape, expected)
        return None
    log.info("teacher %s: probabilities from its cached activations %s", teacher.path, split)
    return map_features(top, cached, out_path, description="teacher probabilities")
