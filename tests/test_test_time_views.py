"""Test-time views: fixed zooms and rotations whose probabilities a run averages (opt-in)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_pneumonia.augment import TEST_TIME_VIEWS, affine, extra_views
from cxr_pneumonia.io import load_image
from cxr_pneumonia.predict import Run


def _disk(size: int = 64, radius: int = 12) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    cv2.circle(img, (size // 2, size // 2), radius, 255, -1)
    return img


def test_views_zoom_and_rotate_each_image_about_its_centre():
    batch = np.stack([_disk(), _disk(radius=8)])[..., None].astype(np.float32)
    assert extra_views(batch, "none") == []
    views = extra_views(batch, "zoom_rotate")
    assert len(views) == len(TEST_TIME_VIEWS["zoom_rotate"]) == 4
    assert all(v.shape == batch.shape and v.dtype == batch.dtype for v in views)
    # a zoom by s scales a centred disk's brightness sum (its area) by s², a rotation keeps it
    mass = batch.sum(axis=(1, 2, 3))
    for view, expected in zip(views, (0.92**2, 1.08**2, 1.0, 1.0), strict=True):
        np.testing.assert_allclose(view.sum(axis=(1, 2, 3)) / mass, expected, rtol=0.01)
    np.testing.assert_array_equal(views[2][1, ..., 0], affine(batch[1, ..., 0], degrees=4.0))
    with pytest.raises(KeyError):
        extra_views(batch, "flip")


def _with_views(run_dir: Path, target: Path, views: str, make_run_copy) -> Path:
    copy = make_run_copy(run_dir, target)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["test_time_views"] = views
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_run_averages_its_probability_over_the_views_and_gates_the_image_itself(
    tiny_run, sample_dir, tmp_path, make_run_copy
):
    plain = Run.load(tiny_run)
    assert plain.test_time_views == "none" and plain.info()["test_time_views"] == "none"
    viewed = Run.load(_with_views(tiny_run, tmp_path / "run", "zoom_rotate", make_run_copy))
    paths = sorted((sample_dir / "test").rglob("*.jpeg"))[:6]
    x = np.stack([plain.preprocess(load_image(p)) for p in paths])

    # the mean of the plain run's probabilities on the image and on each view of it
    x4 = x[..., None].astype(np.float32)
    per_view = [plain.predict_preprocessed(v) for v in (x4, *extra_views(x4, "zoom_rotate"))]
    expected = np.mean(per_view, axis=0)
    assert np.abs(per_view[1] - per_view[0]).max() > 1e-4  # the views change what the model sees
    np.testing.assert_allclose(viewed.predict_preprocessed(x, batch_size=4), expected, atol=1e-6)

    gated, gated_plain = viewed.classify_preprocessed(x), plain.classify_preprocessed(x)
    np.testing.assert_allclose([p.probability for p in gated], expected, atol=1e-6)
    # the gate judges the image as it is: the same domain scores and decisions as without views
    assert [(p.domain_score, p.status) for p in gated] == [(p.domain_score, p.status) for p in gated_plain]
    assert [p.label for p in gated] == ["PNEUMONIA" if p >= viewed.threshold else "NORMAL" for p in expected]


def test_training_with_views_chooses_the_threshold_on_the_averaged_scores(tiny_run, sample_dir, tmp_path):
    from cxr_pneumonia.evaluate import choose_threshold
    from cxr_pneumonia.model import ModelConfig
    from cxr_pneumonia.preprocess import PreprocessConfig
    from cxr_pneumonia.train import TrainConfig, train

    out = tmp_path / "run"
    train(
        sample_dir / "train",
        out,
        preprocess_cfg=PreprocessConfig(size=64),
        model_cfg=ModelConfig(backbone="resnet50v2", weights="none", image_size=64),
        # the tiny run's cache: the same images and features, only the scoring differs
        train_cfg=TrainConfig(
            epochs=3, cache_dir=str(tiny_run.parent / "cache"), workers=1, test_time_views="zoom"
        ),
    )
    assert json.loads((out / "config.json").read_text())["train"]["test_time_views"] == "zoom"
    run = Run.load(out)
    val = pd.read_csv(out / "val_predictions.csv")
    probabilities = run.predict_images([load_image(p) for p in val["path"]])
    np.testing.assert_allclose(probabilities, val["probability"], atol=1e-5)
    # ... and those are not the single-view scores
    config = {**run.config, "train": {**run.config["train"], "test_time_views": "none"}}
    single = Run(out, None, config, run.threshold_info).predict_images([load_image(p) for p in val["path"]])
    assert np.abs(single - val["probability"]).max() > 1e-4
    saved = json.loads((out / "threshold.json").read_text())
    rechosen = choose_threshold(val["label"], val["probability"], target_recall=saved["target_recall"])
    assert saved["threshold"] == pytest.approx(rechosen.threshold)


def test_a_run_with_unknown_views_is_refused_at_load_naming_its_config(tiny_run, tmp_path, make_run_copy):
    from cxr_pneumonia.rundir import RunError

    broken = _with_views(tiny_run, tmp_path / "run", "flip", make_run_copy)
    with pytest.raises(RunError, match=r"config\.json: unknown test_time_views 'flip'; valid: none, zoom"):
        Run.load(broken)
