"""Input gate: is this a frontal chest X-ray like the ones the model was trained on?

The gate reads the backbone's own activations at a few depths, pooled over space, from the
same forward pass that gives the probability (:func:`gated_model`). A :class:`DomainModel`
fitted on the run's training images measures how far an image's pooled activations lie from
the training images' (a Mahalanobis distance with Ledoit-Wolf shrinkage per depth, on a PCA
of the activations), standardises each depth's distance on held-out training images and takes
the largest: the *domain score*. Its acceptance limit is the ``accept_quantile`` of the
validation images' scores (by default also under mild acquisition changes), so that a
known share of genuine chest X-rays passes; a lower level (the validation 95th percentile)
marks an accepted image as unlike the training population. :func:`batch_shift` tells
whether a batch as a whole differs from validation.

The method follows FRODO (Çallı et al., MIDL 2019): Mahalanobis distances on intermediate
CNN features separate wrong anatomy and orientation from chest X-rays. Pooled activations of
some backbones (MobileNetV2) hardly change when an image is turned upside down, so an
*orientation check* adds one more column to the score: a logistic regression on the same
features, fitted to tell the upright training images from copies turned by 90, 180 or 270
degrees (rotation as a self-supervised task: Gidaris et al., ICLR 2018; as an out-of-distribution
signal: Hendrycks et al., NeurIPS 2019). A *symmetry check* adds another: a frontal chest X-ray
is roughly mirror-symmetric about its vertical midline (two lung fields either side of the
spine), a lateral view is not (the spine along one side), and pooled activations hardly tell
the two apart. The column is how much less the input, average-pooled to a coarse grid,
correlates with its own mirror image than the training images do.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_pneumonia.augment import PERTURBATIONS, AugmentConfig, random_augment, random_raw_augment
from cxr_pneumonia.config import atomic_write_bytes, one_line, read_json, write_json
from cxr_pneumonia.io import ImageReadError
from cxr_pneumonia.model import INPUT_NAME, ModelConfig, backbone_layers, get_backbone
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, build_pipeline

log = logging.getLogger(__name__)

GATE_DIR = "gate"
GATE_JSON = "gate.json"
GATE_NPZ = "gate.npz"
FORMAT_VERSION = 1
THUMBNAIL_NAME = "gate_thumbnail"
SYMMETRY_NAME = "gate_symmetry_grid"
POOL_PREFIX = "gate_pool_"
SHIFT_MESSAGE = "these images differ from the training data; the operating point may not hold here"

Status = Literal["ok", "rejected"]


# Below this many validation images the limit (a high quantile of their scores) is close to
# their maximum and moves with every image: fit_gate warns.
FEW_LIMIT_IMAGES = 200


class GateError(RuntimeError):
    """A gate cannot be fitted, saved, loaded or applied to this model."""


class GateConfig(BaseModel):
    """How the domain model is built, where its limit sits and when a batch counts as shifted.

    ``block_fractions`` pick backbone blocks by relative depth (0 = input, 1 = the last block):
    a fraction ``f`` of a backbone with ``n`` blocks is block ``max(1, round(f * n))`` from the
    bottom, and the gate reads that block's output. ``thumbnail`` adds the input image
    average-pooled to a ``thumbnail``×``thumbnail`` grid as one more "depth" (0: off): pooled
    activations forget where things are, the thumbnail keeps the layout.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_fractions: tuple[float, ...] = (0.15, 0.3, 0.55, 0.85)
    # "mean_std": per-channel mean and standard deviation over space; "mean": the mean only.
    pooling: Literal["mean", "mean_std"] = "mean_std"
    thumbnail: int = Field(default=0, ge=0)
    # Principal components kept per depth before the covariance (None: all); never more than
    # a quarter of the training images, so the shrinkage covariance stays well conditioned.
    pca_components: int | None = Field(default=64, ge=1)
    combine: Literal["max", "mean"] = "max"
    # At most this many training images are read to fit (a random subset): the covariance of
    # a few dozen components needs no more, and fitting stays a minute on a CPU.
    max_fit_images: int | None = Field(default=1000, ge=8)
    # Training-style augmented views (augment.random_raw_augment + random_augment) of each
    # training image added to the fit: the classifier was trained to take blur, JPEG, framing
    # and contrast changes, so the gate's notion of "like the training images" includes them.
    fit_augmented_views: int = Field(default=1, ge=0)
    # The orientation check (module docstring): one turned copy of each training image is fitted
    # against the upright ones; its standardised logit is one more column of the domain score.
    orientation_check: bool = Field(
        default=True, description="Also reject images turned by 90, 180 or 270 degrees."
    )
    # Inverse L2 strength of that logistic regression on standardised features.
    orientation_c: float = Field(default=0.1, gt=0.0)
    # The polarity check: a copy of each training image with its grey levels inverted joins the
    # turned ones in that regression. Off by default: the default preprocessing's contour mask
    # already makes an inverted image unlike any training image; without the mask it does not.
    polarity_check: bool = Field(
        default=False,
        description="Also reject images with inverted grey levels (needs the orientation check).",
    )
    # The symmetry check (module docstring): the input average-pooled to a symmetry_grid ×
    # symmetry_grid grid, correlated with its mirror image; one more column of the domain score.
    symmetry_check: bool = Field(
        default=True,
        description="Also reject images far less left-right symmetric than frontal chest X-rays "
        "(lateral views).",
    )
    symmetry_grid: int = Field(default=16, ge=4)
    # Held-out folds of the training images that standardise each depth's distance.
    folds: int = Field(default=2, ge=2)
    accept_quantile: float = Field(default=0.99, gt=0.5, lt=1.0)
    unusual_quantile: float = Field(default=0.95, gt=0.5, lt=1.0)
    # Validation images are also scored under these augment.PERTURBATIONS (one per image, in
    # turn) when setting the limit, so another scanner's contrast or framing is not refused.
    limit_perturbations: tuple[str, ...] = tuple(PERTURBATIONS)
    # Batch warning: a batch of at least shift_min_batch images is "shifted" when more than
    # shift_min_share of it lies above the unusual level and a one-sided test says so at
    # shift_alpha (Bonferroni over the two tests).
    shift_min_batch: int = Field(default=10, ge=2)
    shift_min_share: float = Field(default=0.15, gt=0.0, lt=1.0)
    shift_alpha: float = Field(default=0.01, gt=0.0, lt=0.5)
    seed: int = 0

    @field_validator("block_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("block_fractions needs at least one depth")
        if any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError(f"block_fractions must lie in (0, 1], got {list(value)}")
        return value

    @field_validator("limit_perturbations")
    @classmethod
    def _perturbations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in PERTURBATIONS]
        if unknown:
            raise ValueError(f"unknown perturbations {unknown}; valid: {sorted(PERTURBATIONS)}")
        return value

    @model_validator(mode="after")
    def _levels(self) -> GateConfig:
        if self.unusual_quantile >= self.accept_quantile:
            raise ValueError(
                f"unusual_quantile ({self.unusual_quantile}) must be below accept_quantile "
                f"({self.accept_quantile})"
            )
        if self.polarity_check and not self.orientation_check:
            raise ValueError("polarity_check is fitted with the orientation check: turn orientation_check on")
        return self


# --- the gated forward pass ------------------------------------------------------------------


def block_output_layer(model: Any, model_cfg: ModelConfig, block: int) -> str:
    """The name of the layer whose output leaves backbone block ``block`` (1 = the lowest).

    That is the tensor entering the next block (for Xception the residual ``add`` after the
    block, for ResNet50V2 ``convN_blockM_out``); the top block's output is the backbone's.
    """
    spec = get_backbone(model_cfg.backbone)
    bottom_up = spec.block_prefixes[::-1]
    if not 1 <= block <= len(bottom_up):
        raise ValueError(f"block must be in [1, {len(bottom_up)}] for {model_cfg.backbone}, got {block}")
    if block == len(bottom_up):
        return spec.last_conv_layer
    layers = backbone_layers(model, model_cfg)
    following = next((layer for layer in layers if layer.name.startswith(bottom_up[block])), None)
    if following is None:
        raise GateError(f"no {model_cfg.backbone} layer starts with {bottom_up[block]!r}")
    inputs = following.input if isinstance(following.input, list | tuple) else [following.input]
    if len(inputs) == 1:
        # _keras_history is how Keras 3 itself finds the layer that made a tensor.
        return inputs[0]._keras_history.operation.name
    own = [layer.name for layer in layers if layer.name.startswith(bottom_up[block - 1])]
    return own[-1]


def gate_blocks(model_cfg: ModelConfig, cfg: GateConfig) -> list[int]:
    """The backbone blocks (1 = the lowest) that ``cfg.block_fractions`` select, deduplicated."""
    n = len(get_backbone(model_cfg.backbone).block_prefixes)
    return sorted({max(1, min(n, round(f * n))) for f in cfg.block_fractions})


def gate_layers(model: Any, model_cfg: ModelConfig, cfg: GateConfig | None = None) -> list[str]:
    """Names of the layers whose pooled outputs are the gate's features, lowest first."""
    cfg = cfg or GateConfig()
    return [block_output_layer(model, model_cfg, b) for b in gate_blocks(model_cfg, cfg)]


def gated_model(model: Any, layers: Sequence[str], cfg: GateConfig | None = None) -> Any:
    """``model`` with more outputs: ``[probability, features_1, ..., features_k]``.

    ``features_i`` are the per-channel spatial mean of layer ``layers[i]`` (and, with
    ``pooling="mean_std"``, the mean of its square), concatenated; with ``cfg.thumbnail`` one
    last output is the input average-pooled to a grid, flattened. Built from serialisable
    built-in layers on the model's own tensors, so it shares every weight and runs one pass.
    """
    import keras

    cfg = cfg or GateConfig()
    outputs = [model.output]
    for name in layers:
        tensor = model.get_layer(name).output
        pooled = keras.layers.GlobalAveragePooling2D(name=f"{POOL_PREFIX}{name}_mean")(tensor)
        if cfg.pooling == "mean_std":
            square = keras.layers.Multiply(name=f"{POOL_PREFIX}{name}_square")([tensor, tensor])
            second = keras.layers.GlobalAveragePooling2D(name=f"{POOL_PREFIX}{name}_m2")(square)
            pooled = keras.layers.Concatenate(name=f"{POOL_PREFIX}{name}")([pooled, second])
        outputs.append(pooled)
    image = model.get_layer(INPUT_NAME).output if _has_layer(model, INPUT_NAME) else model.input
    size = int(model.input.shape[1])
    for name, grid in _input_grids(cfg):
        side = _grid_side(size, grid, name)
        # The rows and columns past grid * side are left out, so that the grid has grid cells.
        extra = size - grid * side
        cells = keras.layers.Cropping2D(((0, extra), (0, extra)), name=f"{name}_crop")(image)
        pooled = keras.layers.AveragePooling2D(side, strides=side, name=f"{name}_pool")(cells)
        outputs.append(keras.layers.Flatten(name=name)(pooled))
    return keras.Model(model.input, outputs, name=f"{model.name}_gated")


def _input_grids(cfg: GateConfig) -> list[tuple[str, int]]:
    """(output name, grid) of each average-pooled copy of the input the gate reads, in output
    order after the depths: the thumbnail, then the symmetry check's grid."""
    grids = [(THUMBNAIL_NAME, cfg.thumbnail)] if cfg.thumbnail else []
    return grids + ([(SYMMETRY_NAME, cfg.symmetry_grid)] if cfg.symmetry_check else [])


def _grid_side(size: int, grid: int, name: str) -> int:
    """Pixels per cell of a ``grid``×``grid`` pooling of a ``size``-pixel input."""
    if size // grid < 1:
        raise GateError(f"{name} grid {grid} is finer than the input ({size})")
    return size // grid


def _has_layer(model: Any, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def pooled_features(raw: Sequence[np.ndarray], cfg: GateConfig, n_layers: int) -> list[np.ndarray]:
    """The gated model's raw feature outputs -> one float64 (n, d) matrix per depth.

    The second moment becomes a log standard deviation; the input grids (in [0, 255]) are scaled
    to [0, 1].
    """
    features = []
    for i, values in enumerate(raw):
        x = np.asarray(values, dtype=np.float64)
        if i < n_layers and cfg.pooling == "mean_std":
            mean, second = np.split(x, 2, axis=1)
            std = np.sqrt(np.maximum(second - mean**2, 0.0))
            x = np.concatenate([mean, np.log(std + 1e-3)], axis=1)
        elif i >= n_layers:
            x = x / 255.0
        features.append(x)
    return features


def pool_activations(
    activations: Sequence[np.ndarray], batch: np.ndarray, cfg: GateConfig
) -> list[np.ndarray]:
    """What :func:`gated_model`'s feature outputs hold, computed in NumPy from the NHWC
    activations at the gate's layers and the input batch (for runtimes other than Keras).

    Feed the result to :func:`pooled_features`.
    """
    raw = []
    for act in activations:
        x = np.asarray(act, dtype=np.float64)
        pooled = x.mean(axis=(1, 2))
        if cfg.pooling == "mean_std":
            pooled = np.concatenate([pooled, (x * x).mean(axis=(1, 2))], axis=1)
        raw.append(pooled)
    x = np.asarray(batch, dtype=np.float64)
    n, size = x.shape[0], x.shape[1]
    for name, grid in _input_grids(cfg):
        side = _grid_side(size, grid, name)
        cells = x[:, : grid * side, : grid * side, :]
        raw.append(cells.reshape(n, grid, side, grid, side, -1).mean(axis=(2, 4)).reshape(n, -1))
    return raw


def run_gated(
    gated: Any, batch: np.ndarray, cfg: GateConfig, n_layers: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities (n,) and per-depth features of one float32 (n, size, size, 1) batch."""
    from cxr_pneumonia.model import inference_function

    outputs = inference_function(gated)(np.asarray(batch, dtype=np.float32))
    outputs = [np.asarray(o) for o in outputs]
    return outputs[0].reshape(-1).astype(np.float32), pooled_features(outputs[1:], cfg, n_layers)


def extract(
    gated: Any, images: Sequence[np.ndarray], cfg: GateConfig, n_layers: int, *, batch_size: int = 32
) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`run_gated` over preprocessed uint8 (size, size) images, in batches."""
    if len(images) == 0:
        raise GateError("no images to extract features from")
    probs, parts = [], []
    for start in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(img) for img in images[start : start + batch_size]])
        batch = batch[..., None].astype(np.float32)
        p, f = run_gated(gated, batch, cfg, n_layers)
        probs.append(p)
        parts.append(f)
    features = [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
    return np.concatenate(probs), features


# --- the domain model ------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one image."""

    status: Status
    domain_score: float
    limit: float
    reason: str
    unusual: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "domain_score": round(self.domain_score, 3),
            "limit": round(self.limit, 3),
            "reason": self.reason,
            "unusual": self.unusual,
        }


class _Depth:
    """PCA + Ledoit-Wolf Mahalanobis distance for one depth's features."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, location: np.ndarray, precision: np.ndarray):
        self.mean, self.components, self.location, self.precision = mean, components, location, precision

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int | None) -> _Depth:
        from sklearn.covariance import LedoitWolf

        mean = x.mean(axis=0)
        centred = x - mean
        k = min(x.shape[1], max(1, x.shape[0] // 4))
        if n_components is not None:
            k = min(k, n_components)
        # The leading right singular vectors: the directions the training images vary most in.
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:k]
        z = centred @ components.T
        lw = LedoitWolf().fit(z)
        return cls(mean, components, lw.location_, lw.precision_)

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distances of the rows of ``x`` (not squared)."""
        d = (x - self.mean) @ self.components.T - self.location
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}components": self.components,
            f"{prefix}location": self.location,
            f"{prefix}precision": self.precision,
        }

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> _Depth:
        return cls(
            *(np.asarray(arrays[f"{prefix}{k}"]) for k in ("mean", "components", "location", "precision"))
        )


class _Orientation:
    """Logit that an image is turned (90, 180 or 270 degrees) rather than upright, from the
    gate's features of every depth: a logistic regression on standardised features, kept as
    plain arrays so that a saved gate needs no pickles."""

    PREFIX = "orientation_"

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, bias: np.ndarray):
        self.mean, self.scale, self.weights, self.bias = mean, scale, weights, bias

    @classmethod
    def fit(cls, upright: np.ndarray, turned: np.ndarray, c: float) -> _Orientation:
        """Fit on (n, d) upright and (m, d) turned rows; the two classes weigh alike."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = np.concatenate([upright, turned])
        y = np.r_[np.zeros(len(upright)), np.ones(len(turned))]
        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        return cls(scaler.mean_, scale, lr.coef_.reshape(-1), np.asarray(lr.intercept_, dtype=np.float64))

    @classmethod
    def cross_fit(
        cls,
        upright: np.ndarray,
        turned: np.ndarray,
        fold: np.ndarray,
        turned_fold: np.ndarray,
        cfg: GateConfig,
    ) -> tuple[_Orientation, float, float]:
        """The check fitted on all rows, and the median and scale of the upright rows' logits
        from fits that left their fold out (as each depth's distance is standardised)."""
        held_out = np.empty(len(upright))
        for k in range(cfg.folds):
            part = cls.fit(upright[fold != k], turned[turned_fold != k], cfg.orientation_c)
            held_out[fold == k] = part.logit(upright[fold == k])
        return cls.fit(upright, turned, cfg.orientation_c), *_robust_standardisation(held_out)

    def logit(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weights + float(self.bias[0])

    def arrays(self) -> dict[str, np.ndarray]:
        values = {"mean": self.mean, "scale": self.scale, "weights": self.weights, "bias": self.bias}
        return {f"{self.PREFIX}{k}": v for k, v in values.items()}

    @classmethod
    def from_arrays(cls, arrays: Any) -> _Orientation | None:
        if f"{cls.PREFIX}weights" not in arrays:
            return None
        return cls(*(np.asarray(arrays[f"{cls.PREFIX}{k}"]) for k in ("mean", "scale", "weights", "bias")))


def _stacked(features: Sequence[np.ndarray]) -> np.ndarray:
    """Every depth's features side by side: the orientation check's input."""
    return np.concatenate([np.asarray(f, dtype=np.float64) for f in features], axis=1)


def _robust_standardisation(held_out: np.ndarray) -> tuple[float, float]:
    """(median, MAD scaled to a normal's standard deviation) of held-out scores."""
    centre = float(np.median(held_out))
    return centre, float(np.median(np.abs(held_out - centre))) * 1.4826 or 1.0


def asymmetry(grids: np.ndarray) -> np.ndarray:
    """1 − the Pearson correlation of each flattened square grid (a row of ``grids``) with its
    left-right mirror image: 0 for a mirror-symmetric image, 2 for one that is its own
    negative mirrored (a ramp), 1 for a constant one."""
    x = np.asarray(grids, dtype=np.float64)
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise GateError(f"a symmetry grid needs a square number of cells, got {x.shape[1]}")
    x = x - x.mean(axis=1, keepdims=True)
    x = x / (np.sqrt((x * x).mean(axis=1, keepdims=True)) + 1e-6)
    mirrored = x.reshape(-1, side, side)[:, :, ::-1].reshape(len(x), -1)
    return 1.0 - (x * mirrored).mean(axis=1)


# What a damaged gate file raises on reading: a cut or garbled gate.npz fails in zipfile (BadZipFile),
# its decompression (zlib.error, EOFError) or NumPy (ValueError); a hand-edited gate.json in json
# (ValueError), a missing key (KeyError) or a value of the wrong type (TypeError).
_DAMAGED = (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)
_LIMIT_KEYS = ("n_val", "n_perturbed", "perturbations", "clean_val_limit", "val_quantiles")
_GATE_KEYS = ("config", "layers", "n_fit", "limit", "unusual_level", *_LIMIT_KEYS)


def _unreadable(path: Path, e: BaseException) -> GateError:
    """The one-line error for a gate file that cannot be read (pydantic's messages span lines)."""
    if isinstance(e, FileNotFoundError):
        why = "not found"
    elif isinstance(e, KeyError):
        why = f"no {e.args[0]!r}"
    else:
        why = one_line(e)
    return GateError(f"{path}: no readable gate ({why}); fit one for this run")


def _read_gate_json(folder: Path) -> tuple[dict[str, Any], GateConfig]:
    """``gate.json`` checked: its format, every key :meth:`DomainModel.load` reads, its config.

    Checked here, before the arrays are read, so that a file missing a key fails with one line
    naming it rather than with a KeyError half-way through building the gate.
    """
    path = folder / GATE_JSON
    try:
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise GateError(f"{folder}: gate format {meta.get('format_version')} is not {FORMAT_VERSION}")
        missing = [key for key in _GATE_KEYS if key not in meta]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        if not isinstance(meta["layers"], list) or not isinstance(meta["config"], dict):
            raise ValueError("layers or config of the wrong type")
        # Gates saved before the orientation and symmetry checks existed have neither.
        cfg = GateConfig.model_validate(
            {"orientation_check": False, "symmetry_check": False, **meta["config"]}
        )
    except _DAMAGED as e:
        raise _unreadable(path, e) from e
    return meta, cfg


class DomainModel:
    """Scores how unlike the training images an image's gate features are; decides accept/reject.

    Higher scores are further from the training data. ``limit``: images scoring above it are
    rejected. ``unusual_level``: accepted images above it are unlike the training population.
    """

    def __init__(
        self,
        cfg: GateConfig,
        layers: Sequence[str],
        depths: Sequence[_Depth],
        centres: np.ndarray,
        scales: np.ndarray,
        *,
        n_fit: int = 0,
        backbone: str = "",
        image_size: int = 0,
        orientation: _Orientation | None = None,
    ) -> None:
        self.cfg = cfg
        self.layers = list(layers)
        self.depths = list(depths)
        # ``centres`` and ``scales`` have one entry per depth, then one for the orientation check
        # and one for the symmetry check where the config has them.
        self.orientation = orientation
        self.centres = np.asarray(centres, dtype=np.float64)
        self.scales = np.asarray(scales, dtype=np.float64)
        self.n_fit = n_fit
        self.backbone = backbone
        self.image_size = image_size
        self.limit = math.inf
        self.unusual_level = math.inf
        self.val_scores = np.empty(0)
        self.limit_info: dict[str, Any] = {}

    # fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        features: Sequence[np.ndarray],
        cfg: GateConfig,
        layers: Sequence[str],
        *,
        backbone: str = "",
        image_size: int = 0,
        groups: np.ndarray | None = None,
        turned: Sequence[np.ndarray] | None = None,
        turned_groups: np.ndarray | None = None,
    ) -> DomainModel:
        """Fit on the training images' per-depth features (a list of (n, d_k) arrays; with
        ``cfg.symmetry_check``, the last one is the symmetry grid).

        Each depth's distance is standardised (median, MAD) on images held out of its fit
        (``cfg.folds`` folds), so depths of different dimension weigh alike. ``groups`` keeps
        rows of one group (an image and its augmented views) in the same fold. ``turned``: the
        per-depth features of turned copies of training images (``turned_groups``: the group
        each comes from), for the orientation check when ``cfg.orientation_check``. The
        symmetry check fits nothing: its column is standardised on the first row of each group,
        the image as acquired (framing augmentation moves the midline, and the limit's perturbed
        validation views already allow for that).
        """
        n = len(features[0])
        if cfg.symmetry_check and len(features) < 2:
            raise GateError("the symmetry check needs the symmetry grid after the depths' features")
        n_distances = len(features) - cfg.symmetry_check
        if any(len(f) != n for f in features):
            raise GateError("every depth needs one row per training image")
        groups = np.arange(n) if groups is None else np.asarray(groups)
        if len(groups) != n:
            raise GateError(f"groups has {len(groups)} entries for {n} rows")
        unique, inverse = np.unique(groups, return_inverse=True)
        if len(unique) < 2 * cfg.folds + 2:
            raise GateError(
                f"need at least {2 * cfg.folds + 2} training images to fit a gate, got {len(unique)}"
            )
        permuted = np.random.default_rng(cfg.seed).permutation(len(unique)) % cfg.folds
        fold = permuted[inverse]
        centres, scales, depths = [], [], []
        for x in features[:n_distances]:
            held_out = np.empty(n)
            for k in range(cfg.folds):
                part = _Depth.fit(x[fold != k], cfg.pca_components)
                held_out[fold == k] = part.distance(x[fold == k])
            centre, scale = _robust_standardisation(held_out)
            centres.append(centre)
            scales.append(scale)
            depths.append(_Depth.fit(x, cfg.pca_components))
        orientation = None
        if cfg.orientation_check:
            if turned is None or turned_groups is None or len(turned[0]) != len(turned_groups):
                raise GateError("the orientation check needs turned copies of the training images")
            # A turned copy sits in the fold of the image it was turned from.
            turned_fold = permuted[np.searchsorted(unique, np.asarray(turned_groups))]
            orientation, centre, scale = _Orientation.cross_fit(
                _stacked(features[:n_distances]), _stacked(turned[:n_distances]), fold, turned_fold, cfg
            )
            centres.append(centre)
            scales.append(scale)
        if cfg.symmetry_check:
            as_acquired = np.unique(groups, return_index=True)[1]
            centre, scale = _robust_standardisation(asymmetry(np.asarray(features[-1])[as_acquired]))
            centres.append(centre)
            scales.append(scale)
        return cls(
            cfg, layers, depths, np.array(centres), np.array(scales), n_fit=len(unique), backbone=backbone,
            image_size=image_size, orientation=orientation,
        )  # fmt: skip

    def depth_scores(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """(n, k) standardised distances, one column per depth, then with the orientation check
        the standardised logit that the image is turned, then with the symmetry check its
        standardised asymmetry."""
        n_depths = len(self.depths)
        if len(features) != n_depths + self.cfg.symmetry_check:
            raise GateError(
                f"expected features of {n_depths} depths"
                f"{' and a symmetry grid' if self.cfg.symmetry_check else ''}, got {len(features)} arrays"
            )
        distance_features = features[:n_depths]
        columns = [
            d.distance(np.asarray(f, dtype=np.float64))
            for d, f in zip(self.depths, distance_features, strict=True)
        ]
        if self.orientation is not None:
            columns.append(self.orientation.logit(_stacked(distance_features)))
        if self.cfg.symmetry_check:
            columns.append(asymmetry(features[-1]))
        return (np.stack(columns, axis=1) - self.centres) / self.scales

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The domain score of each image: its depths' standardised distances, combined."""
        return self._combined(self.depth_scores(features))

    def _combined(self, columns: np.ndarray) -> np.ndarray:
        return columns.max(axis=1) if self.cfg.combine == "max" else columns.mean(axis=1)

    def column_names(self) -> list[str]:
        """What each column of :meth:`depth_scores` measures, in words."""
        names = [f"features at {layer}" for layer in self.layers]
        if self.cfg.thumbnail:
            names.append("thumbnail")
        if self.orientation is not None:
            names.append("orientation and polarity check" if self.cfg.polarity_check else "orientation check")
        if self.cfg.symmetry_check:
            names.append("symmetry check")
        return names

    def assess(self, features: Sequence[np.ndarray]) -> list[GateDecision]:
        """:meth:`decide` on the features' scores; a rejected or unusual image's reason also names
        the column that lay furthest from the training images (e.g. "the symmetry check")."""
        columns = self.depth_scores(features)
        names = self.column_names()
        largest = [names[i] for i in columns.argmax(axis=1)]
        return self.decide(self._combined(columns), largest=largest)

    def set_limit(
        self, val_scores: np.ndarray, perturbed_scores: dict[str, np.ndarray] | None = None
    ) -> DomainModel:
        """Accept ``accept_quantile`` of the validation images, clean and perturbed together.

        The unusual level is the clean validation images' ``unusual_quantile``.
        """
        val_scores = np.asarray(val_scores, dtype=np.float64)
        if val_scores.size == 0:
            raise GateError("no validation scores to set the limit on")
        pool = np.concatenate([val_scores, *(perturbed_scores or {}).values()])
        clean_limit = float(np.quantile(val_scores, self.cfg.accept_quantile))
        self.limit = float(np.quantile(pool, self.cfg.accept_quantile))
        self.unusual_level = float(np.quantile(val_scores, self.cfg.unusual_quantile))
        self.val_scores = np.sort(val_scores)
        self.limit_info = {
            "n_val": int(val_scores.size),
            "n_perturbed": int(pool.size - val_scores.size),
            "perturbations": sorted(perturbed_scores or {}),
            "clean_val_limit": round(clean_limit, 4),
            "val_quantiles": {
                str(q): round(float(np.quantile(val_scores, q)), 4) for q in (0.5, 0.9, 0.95, 0.99, 1.0)
            },
        }
        return self

    # applying ----------------------------------------------------------------------------

    def decide(
        self, scores: np.ndarray | Sequence[float], *, largest: Sequence[str] | None = None
    ) -> list[GateDecision]:
        """Accept (``"ok"``) or reject each score, with a reason a person understands;
        ``largest`` names each image's largest column for the reason (:meth:`assess`)."""
        if not math.isfinite(self.limit):
            raise GateError("the gate has no limit yet; call set_limit on validation scores")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if largest is not None and len(largest) != len(scores):
            raise GateError(f"{len(largest)} column names for {len(scores)} scores")
        decisions = []
        for i, s in enumerate(scores):
            score = float(s)
            where = f", largest on the {largest[i]}" if largest is not None else ""
            if not math.isfinite(score) or score > self.limit:
                decisions.append(
                    GateDecision(
                        "rejected",
                        score,
                        self.limit,
                        "not like the frontal chest X-rays this model was trained on: "
                        f"score {score:.1f}, limit {self.limit:.1f}{where}",
                        True,
                    )
                )
            elif score > self.unusual_level:
                decisions.append(
                    GateDecision(
                        "ok",
                        score,
                        self.limit,
                        "accepted, but unlike most of the training population: "
                        f"score {score:.1f}, usual up to {self.unusual_level:.1f}{where}",
                        True,
                    )
                )
            else:
                decisions.append(
                    GateDecision(
                        "ok", score, self.limit, f"like the training images: score {score:.1f}", False
                    )
                )
        return decisions

    def batch_shift(self, scores: np.ndarray | Sequence[float]) -> dict[str, Any]:
        """:func:`batch_shift` against this gate's validation scores and settings."""
        return batch_shift(scores, self.val_scores, cfg=self.cfg)

    # saving ------------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> Path:
        """Write ``gate/gate.json`` and ``gate/gate.npz`` under ``run_dir``; returns the folder."""
        import io

        folder = Path(run_dir) / GATE_DIR
        arrays: dict[str, np.ndarray] = {
            "centres": self.centres,
            "scales": self.scales,
            "val_scores": self.val_scores,
        }
        for i, depth in enumerate(self.depths):
            arrays.update(depth.arrays(f"depth{i}_"))
        if self.orientation is not None:
            arrays.update(self.orientation.arrays())
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(folder / GATE_NPZ, buffer.getvalue())
        write_json(
            folder / GATE_JSON,
            {
                "format_version": FORMAT_VERSION,
                "config": self.cfg.model_dump(mode="json"),
                "layers": self.layers,
                "backbone": self.backbone,
                "image_size": self.image_size,
                "n_fit": self.n_fit,
                "limit": self.limit,
                "unusual_level": self.unusual_level,
                **self.limit_info,
            },
        )
        return folder

    @classmethod
    def load(cls, run_dir: str | Path) -> DomainModel:
        """The gate saved under ``run_dir`` (or a ``gate/`` folder itself).

        Raises:
            GateError: no gate there, or one of another format, or a damaged ``gate.json`` or
                ``gate.npz`` (one line naming the file).
        """
        folder = Path(run_dir)
        if not (folder / GATE_JSON).is_file():
            folder = folder / GATE_DIR
        meta, cfg = _read_gate_json(folder)
        try:
            with np.load(folder / GATE_NPZ) as arrays:
                orientation = _Orientation.from_arrays(arrays)
                n_depths = len(meta["layers"]) + bool(cfg.thumbnail)
                n_columns = n_depths + cfg.orientation_check + cfg.symmetry_check
                if cfg.orientation_check != (orientation is not None) or len(arrays["centres"]) != n_columns:
                    raise GateError(f"{folder}: the gate's config and arrays disagree on its columns")
                depths = [_Depth.from_arrays(arrays, f"depth{i}_") for i in range(n_depths)]
                centres, scales, val_scores = arrays["centres"], arrays["scales"], arrays["val_scores"]
        except _DAMAGED as e:
            raise _unreadable(folder / GATE_NPZ, e) from e
        try:  # the numbers of gate.json, of the wrong type in a hand-edited one
            gate = cls(
                cfg, meta["layers"], depths, centres, scales, n_fit=int(meta["n_fit"]),
                backbone=str(meta.get("backbone", "")), image_size=int(meta.get("image_size", 0)),
                orientation=orientation,
            )  # fmt: skip
            gate.limit, gate.unusual_level = float(meta["limit"]), float(meta["unusual_level"])
        except (TypeError, ValueError) as e:
            raise _unreadable(folder / GATE_JSON, e) from e
        gate.val_scores = np.asarray(val_scores, dtype=np.float64)
        gate.limit_info = {k: meta[k] for k in _LIMIT_KEYS}
        return gate

    def gated_model(self, model: Any) -> Any:
        """:func:`gated_model` of ``model`` at this gate's layers (checked to exist)."""
        missing = [name for name in self.layers if not _has_layer(model, name)]
        if missing:
            raise GateError(f"the model has no layers {missing}; this gate was fitted for another model")
        return gated_model(model, self.layers, self.cfg)


# --- batch shift -----------------------------------------------------------------------------


def batch_shift(
    scores: np.ndarray | Sequence[float],
    reference_val_scores: np.ndarray | Sequence[float],
    *,
    cfg: GateConfig | None = None,
) -> dict[str, Any]:
    """Does a batch's score distribution differ from validation's (upwards)?

    Two one-sided tests: the share of the batch above the validation ``unusual_quantile``
    (binomial, against that quantile's tail share) and Mann-Whitney U (batch scores larger).
    ``shifted`` needs at least ``shift_min_batch`` images, a share above ``shift_min_share``
    and either test below ``shift_alpha / 2``.
    """
    from scipy.stats import binomtest, mannwhitneyu

    cfg = cfg or GateConfig()
    batch = np.asarray(scores, dtype=np.float64).reshape(-1)
    batch = np.where(np.isfinite(batch), batch, np.finfo(np.float64).max)
    reference = np.asarray(reference_val_scores, dtype=np.float64).reshape(-1)
    if reference.size == 0:
        raise GateError("no validation scores to compare the batch with")
    level = float(np.quantile(reference, cfg.unusual_quantile))
    expected = 1.0 - cfg.unusual_quantile
    n = int(batch.size)
    above = int((batch > level).sum())
    share = above / n if n else 0.0
    p_share = float(binomtest(above, n, expected, alternative="greater").pvalue) if n else 1.0
    p_rank = float(mannwhitneyu(batch, reference, alternative="greater").pvalue) if n else 1.0
    shifted = (
        n >= cfg.shift_min_batch
        and share > cfg.shift_min_share
        and min(p_share, p_rank) < cfg.shift_alpha / 2
    )
    return {
        "n": n,
        "share_above_unusual": round(share, 4),
        "expected_share": round(expected, 4),
        "unusual_level": round(level, 4),
        "p_share": p_share,
        "p_mannwhitney": p_rank,
        "shifted": bool(shifted),
        "message": SHIFT_MESSAGE if shifted else "",
    }


# --- fitting from images ---------------------------------------------------------------------


def _preprocessed(
    images: Sequence[np.ndarray],
    pipeline: Callable[..., np.ndarray] | None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The images (read one at a time: ``images`` may be a lazy sequence of files), through
    ``transform`` and the pipeline; unreadable ones are skipped with a warning."""
    if pipeline is None:
        return [np.asarray(img) for img in images]
    out = []
    for i in range(len(images)):
        try:
            img = images[i]
            out.append(pipeline(transform(img) if transform else img, source=f"<image {i}>"))
        except (PreprocessError, ImageReadError) as e:
            log.warning("gate fit skips an image: %s", e)
    return out


def augmented_view(
    img: np.ndarray,
    rng: np.random.Generator,
    augment_cfg: AugmentConfig,
    pipeline: Callable[..., np.ndarray] | None,
) -> np.ndarray:
    """A training-style view: framing and intensity on the raw image, the pipeline, then small
    geometry, blur and JPEG (as ``features.image_batches`` makes them); with no pipeline,
    ``img`` is preprocessed already and only the second part applies."""
    if pipeline is not None:
        img = pipeline(random_raw_augment(img, rng, augment_cfg))
    return random_augment(img, rng, augment_cfg)


def _fit_views(
    train_images: Sequence[np.ndarray],
    cfg: GateConfig,
    augment_cfg: AugmentConfig,
    pipeline: Callable[..., np.ndarray] | None,
) -> tuple[list[np.ndarray], list[int]]:
    """(preprocessed images to fit on, the training image each comes from): up to
    ``max_fit_images`` images, each with ``fit_augmented_views`` augmented views."""
    chosen = range(len(train_images))
    if cfg.max_fit_images is not None and len(train_images) > cfg.max_fit_images:
        keep = np.random.default_rng(cfg.seed).choice(len(train_images), cfg.max_fit_images, replace=False)
        chosen = np.sort(keep)
    fit_images, groups = [], []
    # Image by image (each read once: ``train_images`` may be a lazy sequence of files), its views in turn.
    for i, index in enumerate(chosen):
        try:
            img = train_images[int(index)]
            views = [img if pipeline is None else pipeline(img, source=f"<image {i}>")]
            for view in range(1, cfg.fit_augmented_views + 1):
                rng = np.random.default_rng([cfg.seed, view, i])
                views.append(augmented_view(img, rng, augment_cfg, pipeline))
        except (PreprocessError, ImageReadError) as e:
            log.warning("gate fit skips an image: %s", e)
            continue
        fit_images.extend(views)
        groups.extend([i] * len(views))
    return fit_images, groups


def _turned_copies(
    fit_images: Sequence[np.ndarray], groups: Sequence[int], cfg: GateConfig
) -> tuple[list[np.ndarray], list[int]]:
    """One copy of each training image's unaugmented view turned by 90, 180 or 270 degrees (at
    random), and the group it comes from: the orientation check's other class. With the
    polarity check, also one with its grey levels inverted (of the preprocessed view: CLAHE and
    resizing treat dark and bright alike, so it stands for a raw image exported inverted)."""
    firsts = [j for j in range(len(groups)) if j == 0 or groups[j] != groups[j - 1]]
    turns = np.random.default_rng([cfg.seed, 90]).integers(1, 4, size=len(firsts))
    turned = [np.ascontiguousarray(np.rot90(fit_images[j], k)) for j, k in zip(firsts, turns, strict=True)]
    if cfg.polarity_check:
        turned += [np.ascontiguousarray(255 - fit_images[j]) for j in firsts]
        firsts = firsts * 2
    return turned, [groups[j] for j in firsts]


def fit_gate(
    model: Any,
    model_cfg: ModelConfig,
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    *,
    cfg: GateConfig | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
    augment_cfg: AugmentConfig | None = None,
    preprocessed: bool = False,
    batch_size: int = 32,
) -> DomainModel:
    """Fit a gate for ``model`` on training images and set its limit on validation images.

    Images are raw uint8 grayscale arrays run through the project's preprocessing
    (``preprocess_cfg``, default ``PreprocessConfig(size=model_cfg.image_size)``), or already
    preprocessed ``size``×``size`` arrays with ``preprocessed=True``. The fit adds
    ``cfg.fit_augmented_views`` views of each training image under ``augment_cfg`` (default:
    training's); the limit's perturbations act on raw images, so preprocessed validation
    images are used clean only.
    """
    cfg = cfg or GateConfig()
    augment_cfg = augment_cfg or AugmentConfig()
    pipeline = (
        None
        if preprocessed
        else build_pipeline(preprocess_cfg or PreprocessConfig(size=model_cfg.image_size))
    )
    layers = gate_layers(model, model_cfg, cfg)
    gated = gated_model(model, layers, cfg)

    def features(images: Sequence[np.ndarray], *, ready: bool = False, transform: Any = None) -> list:
        images = images if ready else _preprocessed(images, pipeline, transform)
        return extract(gated, images, cfg, len(layers), batch_size=batch_size)[1]

    fit_images, groups = _fit_views(train_images, cfg, augment_cfg, pipeline)
    turned, turned_groups = _turned_copies(fit_images, groups, cfg) if cfg.orientation_check else ([], [])
    gate = DomainModel.fit(
        features(fit_images, ready=True),
        cfg,
        layers,
        backbone=model_cfg.backbone,
        image_size=model_cfg.image_size,
        groups=np.array(groups),
        turned=features(turned, ready=True) if turned else None,
        turned_groups=np.array(turned_groups),
    )
    val_scores = gate.score(features(val_images))
    perturbed = {}
    if pipeline is not None and cfg.limit_perturbations:
        # One perturbed view per validation image, the perturbations taken in turn: the limit
        # sees every kind of change for the price of one more pass over validation.
        names = cfg.limit_perturbations
        for k, name in enumerate(names):
            part = val_images[k :: len(names)]
            if len(part):
                perturbed[name] = gate.score(features(part, transform=PERTURBATIONS[name]))
    elif cfg.limit_perturbations:
        log.info("preprocessed validation images: the limit is set without perturbations")
    gate.set_limit(val_scores, perturbed)
    _warn_if_few_limit_images(len(val_scores), cfg)
    log.info(
        "gate fitted on %d images (+%d augmented views, %d turned) at %s; limit %.2f (%d validation images)",
        gate.n_fit,
        len(fit_images) - gate.n_fit,
        len(turned),
        layers,
        gate.limit,
        len(val_scores),
    )
    return gate


def _warn_if_few_limit_images(n_val: int, cfg: GateConfig) -> None:
    """Say when the limit rests on too few validation images to be trusted. Measured: the demo's
    gate (100 fit images, limit on 20) rejected 5 of 40 held-out sample chest X-rays and 15 of 200
    others; runs limited on 550-574 images rejected 0-1 of 300 held out."""
    if n_val < FEW_LIMIT_IMAGES:
        log.warning(
            "the gate's limit rests on %d validation images: with fewer than %d it is a rough "
            "estimate, and the gate may reject many more than %.0f %% of ordinary chest X-rays "
            "(more training images tighten it)",
            n_val,
            FEW_LIMIT_IMAGES,
            100 * (1 - cfg.accept_quantile),
        )
