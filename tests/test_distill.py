"""Distillation: soft targets, the loss and metrics on (label, soft target) pairs, the teacher's
checks (same preprocessing, never saw the student's validation patients), the CLI refusal.

The full path (a student trained from the tiny run, its teacher's probabilities) is in
``tests/test_small_backbone.py``, which trains the one student both test files need.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cxr_pneumonia import distill
from cxr_pneumonia.cli import EXIT_OK, main
from cxr_pneumonia.features import feature_batches, write_store
from cxr_pneumonia.model import ModelConfig, compile_model
from cxr_pneumonia.preprocess import PreprocessConfig
from cxr_pneumonia.train import TrainConfig, train


def test_soft_targets_mix_the_teacher_and_the_label_by_the_weight():
    labels = np.array([0, 1, 1])
    teacher = np.array([[0.2, 0.6, 1.0], [0.4, 0.8, 0.0]])
    np.testing.assert_allclose(distill.soft_targets(labels, teacher, 0.0), [[0, 1, 1], [0, 1, 1]])
    np.testing.assert_allclose(distill.soft_targets(labels, teacher, 1.0), teacher)
    np.testing.assert_allclose(
        distill.soft_targets(labels, teacher, 0.25), [[0.05, 0.9, 1.0], [0.1, 0.95, 0.75]], atol=1e-7
    )
    with pytest.raises(ValueError, match="for 3 labels"):
        distill.soft_targets(labels, teacher[:, :2], 0.5)


def test_soft_target_loss_uses_the_target_and_metrics_use_the_label():
    """On (label, soft target) pairs the loss is the cross-entropy against the soft target, while
    recall counts the labels: a soft target of 0.3 on a negative must not count as a positive."""
    x = keras.Input((1,))
    model = keras.Model(x, keras.layers.Identity()(x))  # the "probability" is the input
    cfg = ModelConfig(label_smoothing=0.0)
    compile_model(model, 1e-3, cfg, soft_targets=True)
    p = np.array([[0.9], [0.2], [0.6], [0.4]], np.float32)
    labels = np.array([1, 0, 0, 1], np.float32)
    soft = np.array([0.8, 0.3, 0.1, 0.7], np.float32)
    result = model.evaluate(p, np.stack([labels, soft], -1), verbose=0, return_dict=True)
    expected_loss = -np.mean(soft * np.log(p[:, 0]) + (1 - soft) * np.log(1 - p[:, 0]))
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["recall"] == pytest.approx(0.5)  # positives 0 and 3; only 0 is above 0.5
    assert result["precision"] == pytest.approx(0.5)  # predicted 0 and 2; 2 is a negative
    assert result["accuracy"] == pytest.approx(0.5)


def test_feature_batches_pair_each_label_with_the_target_of_the_view_read(tmp_path):
    n, views = 10, 3
    items = np.arange(views * n, dtype=np.float16).reshape(views, n, 1, 1)  # item value = view * n + i
    store = write_store(tmp_path / "f.npy", items.shape, iter([items.reshape(-1, 1, 1)]), total=n * views,
                        description="test")  # fmt: skip
    labels = np.arange(n) % 2
    targets = np.random.default_rng(0).uniform(size=(views, n)).astype(np.float32)
    batches = feature_batches(store, labels, batch_size=4, shuffle=True, seed=0, targets=targets)
    seen_views = set()
    for k in range(len(batches)):
        x, y = batches[k]
        view, index = divmod(x.reshape(-1).astype(int), n)
        seen_views.update(view)
        np.testing.assert_array_equal(y[:, 0], labels[index])
        np.testing.assert_allclose(y[:, 1], targets[view, index])
    assert len(seen_views) > 1  # the draw covers several views, so the pairing is really checked
    with pytest.raises(ValueError, match="for 3 views of 10 items"):
        feature_batches(store, labels, batch_size=4, shuffle=True, seed=0, targets=targets[:, :5])


def _student(tmp_path, **train_fields):
    return dict(
        preprocess_cfg=PreprocessConfig(size=64),
        model_cfg=ModelConfig(backbone="mobilenetv2", weights="none", image_size=64),
        train_cfg=TrainConfig(epochs=1, cache_dir=str(tmp_path / "cache"), workers=1, **train_fields),
    )


def test_a_teacher_with_other_preprocessing_is_refused_in_one_line(tiny_run, sample_dir, tmp_path):
    settings = _student(tmp_path, teacher=str(tiny_run))
    settings["preprocess_cfg"] = PreprocessConfig(size=64, clahe_clip_limit=3.0)
    with pytest.raises(distill.TeacherError) as error:
        train(sample_dir / "train", tmp_path / "run", **settings)
    message = str(error.value)
    assert "preprocessing differs from the student's" in message and "clahe_clip_limit 2.0 vs 3.0" in message
    assert "\n" not in message
    assert not (tmp_path / "run" / "model.keras").exists()


def test_a_teacher_that_trained_on_the_students_validation_patients_is_refused(
    tiny_run, sample_dir, tmp_path
):
    """Another seed splits the patients differently: some of the student's validation patients
    were the teacher's training patients."""
    with pytest.raises(distill.TeacherError, match=r"trained on \d+ of the student's validation patients"):
        train(sample_dir / "train", tmp_path / "run", **_student(tmp_path, teacher=str(tiny_run), seed=7))
    assert not (tmp_path / "run" / "model.keras").exists()


def test_an_incomplete_teacher_is_refused(sample_dir, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(distill.TeacherError, match="not a usable run"):
        train(sample_dir / "train", tmp_path / "run", **_student(tmp_path, teacher=str(tmp_path / "half")))


def test_cli_teacher_refusal_is_one_line(tiny_run, sample_dir, tmp_path, capsys):
    args = ["train", str(sample_dir / "train"), "--out", str(tmp_path / "run"), "--teacher", str(tiny_run)]
    args += ["--image-size", "64", "--backbone", "mobilenetv2", "--weights", "none", "--seed", "7"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    assert main(args) != EXIT_OK
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "validation patients" in errors[0] and "Traceback" not in err


def test_teacher_path_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(teacher="runs/xception")
    assert cfg.teacher == str(tmp_path / "runs" / "xception")
    assert TrainConfig().teacher is None and TrainConfig().distill_weight == 0.5
