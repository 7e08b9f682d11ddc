"""Model builder: shapes, frozen layers, in-model preprocessing, saving, splitting, weights."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from cxr_pneumonia import backbones, config
from cxr_pneumonia import model as cm

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_XCEPTION = SHARED / "weights" / "xception_imagenet_notop.weights.h5"

# Smallest sizes each backbone accepts, to keep the tests fast.
SIZES = {"resnet50v2": 32, "xception": 71, "densenet121": 32, "efficientnetv2b0": 32}
SIZES |= {"mobilenetv2": 32, "efficientnet_lite0": 32}
PREPROCESS_INPUT = {
    "resnet50v2": keras.applications.resnet_v2.preprocess_input,
    "xception": keras.applications.xception.preprocess_input,
    "densenet121": keras.applications.densenet.preprocess_input,
    "efficientnetv2b0": keras.applications.efficientnet_v2.preprocess_input,
    "mobilenetv2": keras.applications.densenet.preprocess_input,  # ImageNet mean/std ("torch")
    "efficientnet_lite0": lambda x: (x - 127.0) / 128.0,
}
REFERENCE_CONSTRUCTORS = {
    "resnet50v2": keras.applications.ResNet50V2,
    "xception": keras.applications.Xception,
    "densenet121": keras.applications.DenseNet121,
    "efficientnetv2b0": keras.applications.EfficientNetV2B0,
    "mobilenetv2": backbones.mobilenetv2,
    "efficientnet_lite0": backbones.efficientnet_lite0,
}
BACKBONE_NAMES = sorted(SIZES)

pytestmark = [
    # keras' own get_weights() on numpy 2; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    # Saving an untrained model stores an unbuilt optimizer; expected in these tests.
    pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer"),
]


def make_cfg(backbone: str, head: str = "gap", **changes) -> cm.ModelConfig:
    return cm.ModelConfig(backbone=backbone, weights="none", head=head, image_size=SIZES[backbone], **changes)


@functools.cache
def cached_model(backbone: str, head: str) -> keras.Model:
    """Built once per session; tests that change trainable flags restore them."""
    return cm.build_model(make_cfg(backbone, head))


def images(cfg: cm.ModelConfig, n: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, cfg.image_size, cfg.image_size, 1)).astype("float32")


def run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


def test_registry_has_required_backbones():
    assert {"resnet50v2", "xception", "densenet121", "efficientnetv2b0"} <= set(cm.BACKBONES)
    assert set(SIZES) == set(cm.BACKBONES)


def test_default_config_is_the_seed_head_on_the_small_backbone():
    cfg = cm.ModelConfig()
    assert (cfg.backbone, cfg.weights, cfg.head, cfg.image_size) == (
        "mobilenetv2",
        "imagenet",
        "flatten",
        224,
    )
    assert (cfg.dense_units, cfg.dropout) == (128, 0.5)
    # fine-tuning is a later training stage: the built model's backbone is frozen, as the seed's
    model = cm.build_model(config.override(cfg, weights="none", image_size=32))
    assert not any(layer.trainable for layer in cm.backbone_layers(model, cfg))
    assert config.from_dict(cm.ModelConfig, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone": "vgg16"}, r"^backbone: must be one of 'resnet50v2', 'xception', .* \(got 'vgg16'\)$"),
        ({"head": "attention"}, re.escape("head: must be one of 'flatten', 'gap' (got 'attention')")),
        ({"backbone": "xception", "image_size": 64}, "minimum 71"),
        ({"backbone": "resnet50v2", "fine_tune_blocks": 17}, r"\[0, 16\]"),
        ({"fine_tune_blocks": 19}, r"\[0, 18\] for mobilenetv2"),
        ({"fine_tune_blocks": -1}, "fine_tune_blocks: input should be greater than or equal to 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"dense_units": 0}, "dense_units"),
        ({"learning_rate": 0.0}, "learning_rate: input should be greater than 0"),
    ],
)
def test_config_rejects_invalid_values(changes, message):
    with pytest.raises(config.ConfigError, match=message):
        cm.ModelConfig(**{"weights": "none", **changes})


@pytest.mark.parametrize("head", ["flatten", "gap"])
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_output_is_one_probability_per_image(backbone, head):
    cfg = make_cfg(backbone, head)
    model = cached_model(backbone, head)
    assert tuple(model.input.shape) == (None, cfg.image_size, cfg.image_size, 1)
    out = run(model, images(cfg, n=3))
    assert out.shape == (3, 1)
    assert np.all((out >= 0) & (out <= 1))
    head_layers = [layer.name for layer in model.layers[-(4 if head == "flatten" else 3) :]]
    expected = {
        "flatten": ["head_flatten", "head_dense", "head_dropout", "probability"],
        "gap": ["head_pool", "head_dropout", "probability"],
    }[head]
    assert head_layers == expected


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_scaling_layer_matches_keras_preprocess_input(backbone):
    cfg = make_cfg(backbone)
    model = cached_model(backbone, "gap")
    x = images(cfg, n=2, seed=1)
    scaled = keras.Model(model.input, model.get_layer(cm.SCALING_NAME).output)
    expected = PREPROCESS_INPUT[backbone](np.repeat(x, 3, axis=-1).copy())
    np.testing.assert_allclose(run(scaled, x), expected, atol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_features_match_reference_backbone_on_preprocessed_rgb(backbone):
    """Gray pixels through our model == keras' own backbone on preprocess_input(RGB)."""
    cfg = make_cfg(backbone)
    model = cached_model(backbone, "gap")
    ours = cm.backbone_layers(model, cfg)
    size = cfg.image_size
    reference = REFERENCE_CONSTRUCTORS[backbone](include_top=False, weights=None, input_shape=(size, size, 3))
    theirs = reference.layers[1:]  # skip its InputLayer
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        assert type(mine) is type(ref)
        ref.set_weights(mine.get_weights())
    x = images(cfg, n=2, seed=2)
    features = keras.Model(model.input, model.get_layer(cm.BACKBONES[backbone].last_conv_layer).output)
    expected = run(reference, PREPROCESS_INPUT[backbone](np.repeat(x, 3, axis=-1).copy()))
    np.testing.assert_allclose(run(features, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_grad_cam_layer_is_the_4d_backbone_output(backbone):
    cfg = make_cfg(backbone, "flatten")
    model = cached_model(backbone, "flatten")
    layer = model.get_layer(cm.BACKBONES[backbone].last_conv_layer)
    assert len(layer.output.shape) == 4
    assert cm.backbone_layers(model, cfg)[-1] is layer
    assert model.get_layer("head_flatten").input is layer.output


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_block_prefixes_exist_and_run_top_down(backbone):
    cfg = make_cfg(backbone)
    names = [layer.name for layer in cm.backbone_layers(cached_model(backbone, "gap"), cfg)]
    first = [
        next((i for i, n in enumerate(names) if n.startswith(p)), None)
        for p in cm.BACKBONES[backbone].block_prefixes
    ]
    assert None not in first, "every registered block prefix names real layers"
    assert first == sorted(first, reverse=True)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_frozen_backbone_trains_only_the_head(backbone):
    cfg = make_cfg(backbone, "flatten")
    model = cached_model(backbone, "flatten")
    assert not any(layer.trainable for layer in cm.backbone_layers(model, cfg))
    features = int(np.prod(model.get_layer("head_flatten").input.shape[1:]))
    head_params = features * 128 + 128 + 128 + 1
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == head_params
    assert len(model.trainable_weights) == 4


@pytest.mark.parametrize("n_blocks", [1, 3])
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_fine_tune_unfreezes_exactly_the_top_blocks(backbone, n_blocks):
    cfg = make_cfg(backbone)
    model = cached_model(backbone, "gap")
    spec = cm.BACKBONES[backbone]
    try:
        trainable = cm.set_trainable_blocks(model, cfg, n_blocks)
        layers = cm.backbone_layers(model, cfg)
        top = cm.top_block_layers(model, cfg, n_blocks)
        top_names = {layer.name for layer in top}
        selected = spec.block_prefixes[:n_blocks]
        lower = spec.block_prefixes[n_blocks:]
        assert {n for n in (layer.name for layer in layers) if n.startswith(selected)} <= top_names
        assert not any(name.startswith(lower) for name in top_names)
        assert trainable and set(trainable) <= top_names
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                assert not layer.trainable, f"{layer.name}: BatchNorm must stay frozen"
            else:
                assert layer.trainable == (layer.name in top_names), layer.name
        assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    finally:
        cm.set_trainable_blocks(model, cfg, 0)
    assert not any(layer.trainable for layer in cm.backbone_layers(model, cfg))


def test_xception_fine_tune_counts_known_parameters():
    """Blocks 13-14 of Xception: four separable convs plus block 13's 1x1 residual conv."""
    cfg = make_cfg("xception", fine_tune_blocks=2)
    model = cm.build_model(cfg)
    cm.set_trainable_blocks(model, cfg, cfg.fine_tune_blocks)  # what training's fine-tuning stage does
    sep = [(728, 728), (728, 1024), (1024, 1536), (1536, 2048)]  # (in, out) channels
    backbone_params = sum(9 * c_in + c_in * c_out for c_in, c_out in sep) + 728 * 1024
    head_params = 2048 + 1
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == (backbone_params + head_params)
    assert len(model.trainable_weights) == 4 * 2 + 1 + 2


def test_initial_bias_and_label_smoothing_reach_the_compiled_model():
    pos, neg = 3875, 1341
    bias = math.log(pos / neg)
    cfg = make_cfg("resnet50v2", initial_bias=bias, label_smoothing=0.1, learning_rate=3e-4)
    model = cm.build_model(cfg)
    kernel, b = model.get_layer("probability").get_weights()
    assert b[0] == pytest.approx(bias, rel=1e-6)
    model.get_layer("probability").set_weights([np.zeros_like(kernel), b])
    x = images(cfg, n=4)
    np.testing.assert_allclose(run(model, x), pos / (pos + neg), rtol=1e-5)
    y = np.array([1, 1, 0, 1], dtype="float32")
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy", "recall", "precision", "auc"}
    p = pos / (pos + neg)
    target = y * 0.9 + 0.05  # label smoothing 0.1 pulls targets towards 0.5
    expected = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["accuracy"] == pytest.approx(0.75)
    assert float(model.optimizer.learning_rate) == pytest.approx(3e-4)
    cm.compile_model(model, cfg.fine_tune_learning_rate, cfg)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("backbone", "head"),
    [
        ("resnet50v2", "flatten"),
        ("xception", "gap"),
        ("densenet121", "gap"),
        ("efficientnetv2b0", "flatten"),
        ("mobilenetv2", "gap"),
        ("efficientnet_lite0", "flatten"),
    ],
)
def test_saved_model_reloads_without_custom_objects(tmp_path, backbone, head):
    cfg = make_cfg(backbone, head)
    model = cached_model(backbone, head)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode stays on: no Lambda layers
    x = images(cfg, n=2, seed=3)
    np.testing.assert_allclose(run(loaded, x), run(model, x), atol=1e-6)
    names = [layer.name for layer in cm.backbone_layers(loaded, cfg)]
    assert names == [layer.name for layer in cm.backbone_layers(model, cfg)]
    assert cm.set_trainable_blocks(loaded, cfg, 1)


def _train_one_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)


def test_split_at_backbone_output_shares_the_head():
    cfg = make_cfg("resnet50v2", "flatten")
    model = cm.build_model(cfg)
    extractor, head = cm.split_model(model, cfg)
    assert extractor.output.shape[1:] == (1, 1, 2048)
    assert head.get_layer("probability") is model.get_layer("probability")
    x = images(cfg, n=4, seed=4)
    features = run(extractor, x)
    before = run(model, x)
    np.testing.assert_allclose(run(head, features), before, atol=1e-6)
    _train_one_step(head, features, np.array([1, 0, 1, 0], dtype="float32"))
    after = run(model, x)
    assert not np.allclose(after, before, atol=1e-4)
    np.testing.assert_allclose(after, run(head, features), atol=1e-6)


def test_split_at_fine_tune_starts_at_block13_input_of_xception():
    cfg = make_cfg("xception", fine_tune_blocks=2)
    model = cm.build_model(cfg)
    cm.set_trainable_blocks(model, cfg, cfg.fine_tune_blocks)  # what training's fine-tuning stage does
    extractor, head = cm.split_model(model, cfg, at="fine_tune")
    block13_input = model.get_layer("block13_sepconv1_act").input
    assert isinstance(block13_input._keras_history.operation, keras.layers.Add)
    assert extractor.output is block13_input
    assert extractor.output.shape[1:] == (5, 5, 728)
    assert head.get_layer("block13_sepconv1") is model.get_layer("block13_sepconv1")
    x = images(cfg, n=2, seed=5)
    features = run(extractor, x)
    kernel_before = model.get_layer("block13_sepconv1").get_weights()[1].copy()
    _train_one_step(head, features, np.array([1, 0], dtype="float32"))
    assert not np.array_equal(model.get_layer("block13_sepconv1").get_weights()[1], kernel_before)
    np.testing.assert_allclose(run(model, x), run(head, features), atol=1e-5)


def test_split_rejects_unknown_point():
    cfg = make_cfg("resnet50v2")
    with pytest.raises(ValueError, match="valid: \\['backbone_output', 'fine_tune'\\]"):
        cm.split_model(cached_model("resnet50v2", "gap"), cfg, at="middle")


# --- weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["none", "None", "NONE"])
def test_resolve_none_means_random_init(weights):
    assert cm.resolve_weights("xception", weights) is None


def test_resolve_imagenet_prefers_the_local_weights_dir(tmp_path, monkeypatch):
    local = tmp_path / "densenet121_imagenet_notop.weights.h5"
    local.write_bytes(b"")
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(tmp_path))
    assert cm.resolve_weights("densenet121", "imagenet") == str(local)
    assert cm.resolve_weights("xception", "imagenet") == "imagenet"  # not there: download


def test_resolve_imagenet_without_weights_dir_downloads(monkeypatch):
    monkeypatch.delenv(cm.WEIGHTS_DIR_ENV, raising=False)
    assert cm.resolve_weights("resnet50v2", "imagenet") == "imagenet"


def test_resolve_explicit_path(tmp_path):
    path = tmp_path / "mine.weights.h5"
    path.write_bytes(b"")
    assert cm.resolve_weights("resnet50v2", str(path)) == str(path)


@pytest.mark.parametrize(
    ("name", "create", "message"),
    [
        ("missing.weights.h5", False, "weights file does not exist"),
        ("old_format.h5", True, "must be a '.weights.h5' file"),
    ],
)
def test_resolve_bad_path_names_the_file(tmp_path, name, create, message):
    path = tmp_path / name
    if create:
        path.write_bytes(b"")
    with pytest.raises(cm.WeightsUnavailableError, match=message) as info:
        cm.resolve_weights("resnet50v2", str(path))
    assert str(path) in str(info.value)


def test_resolve_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid backbones: .*'xception'"):
        cm.resolve_weights("inceptionv3", "imagenet")


class _Recorder:
    """Stands in for a keras.applications constructor; records the call, then raises."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.kwargs: dict = {}

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        Exception("URL fetch failure on https://storage.googleapis.com/...: None -- no network"),
        OSError("Name or service not known"),
    ],
)
def test_failed_download_explains_both_offline_options(tmp_path, monkeypatch, error):
    fake = _Recorder(error)
    spec = cm.BACKBONES["densenet121"]
    monkeypatch.setitem(cm.BACKBONES, "densenet121", dataclasses.replace(spec, constructor=fake))
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(tmp_path))  # empty folder
    cfg = config.override(make_cfg("densenet121"), weights="imagenet")
    with pytest.raises(cm.WeightsUnavailableError) as info:
        cm.build_model(cfg)
    assert fake.kwargs["weights"] == "imagenet"
    message = str(info.value)
    assert cm.WEIGHTS_DIR_ENV in message
    assert "densenet121_imagenet_notop.weights.h5" in message
    assert "--weights PATH" in message
    assert info.value.__cause__ is error


def test_argument_errors_are_not_reported_as_download_failures(tmp_path, monkeypatch):
    fake = _Recorder(ValueError("bad input_shape"))
    spec = cm.BACKBONES["resnet50v2"]
    monkeypatch.setitem(cm.BACKBONES, "resnet50v2", dataclasses.replace(spec, constructor=fake))
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="bad input_shape"):
        cm.build_model(config.override(make_cfg("resnet50v2"), weights="imagenet"))


def test_local_weights_file_is_passed_to_the_constructor(tmp_path, monkeypatch):
    local = tmp_path / "resnet50v2_imagenet_notop.weights.h5"
    local.write_bytes(b"")
    fake = _Recorder(RuntimeError("stop after recording"))
    spec = cm.BACKBONES["resnet50v2"]
    monkeypatch.setitem(cm.BACKBONES, "resnet50v2", dataclasses.replace(spec, constructor=fake))
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="stop after recording"):
        cm.build_model(config.override(make_cfg("resnet50v2"), weights="imagenet"))
    assert fake.kwargs["weights"] == str(local)
    assert fake.kwargs["include_top"] is False


def test_unreadable_weights_file_names_the_file(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an HDF5 file")
    with pytest.raises(cm.WeightsUnavailableError, match="cannot be loaded as resnet50v2") as info:
        cm.build_model(config.override(make_cfg("resnet50v2"), weights=str(path)))
    assert str(path) in str(info.value)


def test_shared_imagenet_xception_loads_into_the_flat_model(monkeypatch):
    if not SHARED_XCEPTION.is_file():
        pytest.skip(f"{SHARED_XCEPTION} not available")
    h5py = pytest.importorskip("h5py")
    monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(SHARED_XCEPTION.parent))
    cfg = cm.ModelConfig(backbone="xception", head="gap")  # weights="imagenet" -> local file
    model = cm.build_model(cfg)
    with h5py.File(SHARED_XCEPTION, "r") as f:
        stems = []
        f.visititems(
            lambda _, obj: (
                stems.append(obj[()])
                if isinstance(obj, h5py.Dataset) and obj.shape == (3, 3, 3, 32)
                else None
            )
        )
    assert len(stems) == 1, "block1_conv1 is Xception's only 3x3x3x32 kernel"
    np.testing.assert_array_equal(model.get_layer("block1_conv1").get_weights()[0], stems[0])
    reference = keras.applications.Xception(
        include_top=False, weights=str(SHARED_XCEPTION), input_shape=(224, 224, 3)
    )
    x = images(cfg, n=1, seed=6)
    extractor, _ = cm.split_model(model, cfg)
    expected = run(reference, keras.applications.xception.preprocess_input(np.repeat(x, 3, -1)))
    np.testing.assert_allclose(run(extractor, x), expected, atol=1e-4)


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="needs ../shared/weights")
def test_a_weights_folder_file_other_than_the_published_one_is_converted_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    # a damaged copy converts without an error and gives wrong features: say so
    published = SHARED / "weights" / "mobilenetv2_imagenet_features_torch.pt"
    converted: list[Path] = []

    def convert(source: Path, target: Path, backbone: str) -> None:
        converted.append(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"converted")

    monkeypatch.setattr(backbones, "import_torch_weights", convert)
    monkeypatch.setenv("CXR_PNEUMONIA_CACHE_DIR", str(tmp_path / "cache"))
    for name, flip in (("good", False), ("damaged", True)):
        folder = tmp_path / name
        folder.mkdir()
        data = bytearray(published.read_bytes())
        if flip:
            data[len(data) // 2] ^= 0xFF
        (folder / published.name).write_bytes(bytes(data))
        monkeypatch.setenv(cm.WEIGHTS_DIR_ENV, str(folder))
        caplog.clear()
        with caplog.at_level("WARNING", logger=cm.logger.name):
            assert Path(cm.resolve_weights("mobilenetv2", "imagenet")).read_bytes() == b"converted"
        warned = [r.getMessage() for r in caplog.records if "not the published mobilenetv2" in r.getMessage()]
        assert len(warned) == int(flip), (name, warned)
    assert converted == [tmp_path / "good" / published.name, tmp_path / "damaged" / published.name]
