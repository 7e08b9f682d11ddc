"""Stage configs: validated when built, frozen, unknown keys refused, JSON round trips, precision words."""

from __future__ import annotations

import json
import re
import typing

import pytest
from pydantic import BaseModel, ValidationError

from cxr_pneumonia.augment import AugmentConfig
from cxr_pneumonia.config import ConfigError, StageConfig, config_hash, from_dict, override, to_dict
from cxr_pneumonia.data import SplitConfig
from cxr_pneumonia.export import ExportConfig
from cxr_pneumonia.gate import GateConfig
from cxr_pneumonia.model import ModelConfig
from cxr_pneumonia.preprocess import PreprocessConfig
from cxr_pneumonia.train import TrainConfig

CONFIGS = (PreprocessConfig, AugmentConfig, SplitConfig, ModelConfig, TrainConfig, ExportConfig)


def _choices(annotation: typing.Any) -> tuple[typing.Any, ...] | None:
    """The Literal values of a field's annotation (inside tuple[...] or X | None too)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return None


CHOICE_FIELDS = [
    (cls, name, _choices(field.annotation))
    for cls in CONFIGS
    for name, field in cls.model_fields.items()
    if _choices(field.annotation)
]


def test_every_choice_field_is_found():
    found = {(cls.__name__, name) for cls, name, _ in CHOICE_FIELDS}
    assert found >= {
        ("PreprocessConfig", "steps"),
        ("PreprocessConfig", "threshold_method"),
        ("PreprocessConfig", "mask_shape"),
        ("PreprocessConfig", "resize_mode"),
        ("ModelConfig", "backbone"),
        ("ModelConfig", "head"),
        ("TrainConfig", "threshold_rule"),
        ("TrainConfig", "strategy"),
        ("TrainConfig", "precision"),
        ("ExportConfig", "format"),
        ("ExportConfig", "precision"),
    }


@pytest.mark.parametrize(
    ("cls", "name", "choices"), CHOICE_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in CHOICE_FIELDS]
)
def test_a_bad_choice_names_the_field_and_the_allowed_values(cls, name, choices):
    default = cls.model_fields[name].default
    bad = ("clahe", "typo") if isinstance(default, tuple) else "typo"
    with pytest.raises(ConfigError) as info:
        cls(**{name: bad})
    message = str(info.value)
    assert "\n" not in message
    assert message == f"{name}: must be one of {', '.join(map(repr, choices))} (got 'typo')"
    # the same from a saved dict and from an override
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(cls, {**to_dict(cls()), name: bad})
    with pytest.raises(ConfigError, match=re.escape(message)):
        override(cls(), **{name: bad})


def test_the_message_of_the_issue():
    with pytest.raises(ConfigError) as info:
        override(TrainConfig(), threshold_rule="max_spec")
    assert str(info.value) == (
        "threshold_rule: must be one of 'group_median', 'group_min', 'max_specificity', 'midpoint', "
        "'bootstrap_margin', 'fixed' (got 'max_spec')"
    )


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (TrainConfig, {"epochs": 0}, r"epochs: input should be greater than or equal to 1 \(got 0\)"),
        (TrainConfig, {"target_recall": 1.5}, "target_recall: input should be less than or equal to 1"),
        (TrainConfig, {"workers": 0}, "workers: input should be greater than or equal to 1"),
        (TrainConfig, {"augment": {"contrast": 2}}, "augment.contrast: input should be less than 1"),
        (SplitConfig, {"val_fraction": 0.0}, "val_fraction: input should be greater than 0"),
        (PreprocessConfig, {"size": 4}, "size: input should be greater than or equal to 8"),
        (ModelConfig, {"weights": "none", "backbone": "xception", "image_size": 64}, "minimum 71"),
        (ModelConfig, {"backbone": "resnet50v2", "weights": "none", "fine_tune_blocks": 17}, r"\[0, 16\]"),
        (ExportConfig, {"tolerance": 0}, "tolerance: input should be greater than 0"),
    ],
)
def test_numeric_ranges_are_checked_when_built(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, values)


@pytest.mark.parametrize("cls", CONFIGS)
def test_unknown_keys_are_refused(cls):
    with pytest.raises(ConfigError, match=r"^threshhold: unknown key; valid keys of .*"):
        cls(threshhold=1)
    with pytest.raises(ConfigError, match="threshhold: unknown key"):
        from_dict(cls, {"threshhold": 1})
    with pytest.raises(ConfigError, match="threshhold: unknown key"):
        override(cls(), threshhold=1)


@pytest.mark.parametrize("cls", CONFIGS)
def test_configs_are_frozen(cls):
    cfg = cls()
    name = next(iter(cls.model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(cfg, name, getattr(cfg, name))
    assert issubclass(cls, StageConfig) and cls.model_config["extra"] == "forbid"


@pytest.mark.parametrize("cls", CONFIGS)
def test_json_round_trip_is_equal(cls):
    cfg = cls()
    text = json.dumps(to_dict(cfg))
    again = from_dict(cls, json.loads(text))
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)


def test_round_trip_restores_tuples_and_nested_configs():
    cfg = TrainConfig(augment=AugmentConfig(contrast=0.2), epochs=3)
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
    assert isinstance(again.augment, AugmentConfig) and again == cfg
    steps = from_dict(PreprocessConfig, {"steps": ["clahe", "resize"]}).steps
    assert steps == ("clahe", "resize") and isinstance(steps, tuple)


def test_override_validates_and_ignores_none():
    cfg = TrainConfig()
    assert override(cfg, epochs=None, seed=None) is cfg
    changed = override(cfg, epochs=3, seed=None)
    assert (changed.epochs, changed.seed) == (3, cfg.seed) and cfg.epochs == 15


def test_hashes_are_those_of_the_values():
    # the same values as the dataclasses had: caches keyed by config_hash stay valid
    assert config_hash(PreprocessConfig()) == config_hash(json.loads(json.dumps(to_dict(PreprocessConfig()))))
    assert config_hash(PreprocessConfig(size=64)) != config_hash(PreprocessConfig())


@pytest.mark.parametrize(("old", "new"), [("float32", "fp32"), ("bfloat16", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("cls", [TrainConfig, ExportConfig])
def test_old_precision_words_are_read(cls, old, new):
    assert from_dict(cls, {"precision": old}).precision == new
    assert cls(precision=old).precision == new


def test_defaults_are_unchanged():
    # saved runs and the demo's metrics depend on these
    assert to_dict(TrainConfig()) | {"augment": None, "gate": None} == {
        "epochs": 15, "fine_tune_epochs": 2, "batch_size": 32, "seed": 42, "val_fraction": 1 / 6,
        "use_official_val": False, "target_recall": 0.98, "threshold_rule": "group_median",
        "fixed_threshold": 0.5, "threshold_groups": 4, "threshold_margin_percentile": 5.0,
        "test_time_views": "none", "preset": None,
        "patience": 4, "class_weight": True, "augment_views": 2, "augment": None, "cache_dir": None,
        "workers": None, "strategy": "default", "precision": "auto", "fit_gate": True, "gate": None,
        "teacher": None, "distill_weight": 0.5,
    }  # fmt: skip
    assert TrainConfig().gate == GateConfig()  # the input gate's own defaults (tests/test_gate.py)
    # "downscale" first: a no-op on the 224 px training images, so the demo's metrics stay as they were
    assert PreprocessConfig().steps == (
        "downscale", "denoise", "clahe", "crop", "mask", "morph", "apply_mask", "resize",
    )  # fmt: skip
    assert (PreprocessConfig().working_size, PreprocessConfig().working_jpeg_quality) == (224, 75)
    assert (ModelConfig().backbone, ModelConfig().weights, ModelConfig().image_size) == (
        "mobilenetv2",
        "imagenet",
        224,
    )


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_a_description(cls):
    # the command line's help comes from it
    assert all(field.description for field in cls.model_fields.values())
    assert set(cls.cli_fields) <= set(cls.model_fields)


def test_a_plain_model_error_is_still_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert not issubclass(ConfigError, BaseModel)
