"""The small backbone through everything: a MobileNetV2 student with the ported ImageNet weights,
distilled from the tiny run, then its input gate, its export (OpenVINO, the checked bf16 plan)
and Grad-CAM, as any backbone.

One student is trained for the module (64 px, the sample, a head and a fine-tuning epoch); it
needs the shared PyTorch weights (skips without ../shared). The gate's layer choice for both
ported backbones needs none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_pneumonia import backbones, distill, explain
from cxr_pneumonia.config import read_json
from cxr_pneumonia.export import ExportConfig, export_run
from cxr_pneumonia.features import image_batches
from cxr_pneumonia.gate import gate_layers
from cxr_pneumonia.io import list_image_files, load_image
from cxr_pneumonia.model import ModelConfig, build_model
from cxr_pneumonia.predict import Run
from cxr_pneumonia.preprocess import PreprocessConfig, build_pipeline
from cxr_pneumonia.rundir import model_sha256
from cxr_pneumonia.train import TrainConfig, _teacher_split_cache, prepare_data, train

REPO = Path(__file__).resolve().parents[1]
TORCH_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenetv2_imagenet_features_torch.pt"
SIZE = 64
MOBILENETV2_GATE = ["block3_add", "block5_add", "block10_add", "block15_add"]


@pytest.fixture(scope="module")
def student(tiny_run: Path, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MobileNetV2 (ported ImageNet weights) distilled from the tiny run on the same sample,
    seed and views, so the tiny run's own feature cache gives the teacher's probabilities."""
    if not TORCH_WEIGHTS.is_file():
        pytest.skip(f"{TORCH_WEIGHTS} not available")
    root = tmp_path_factory.mktemp("student")
    weights = backbones.import_torch_weights(TORCH_WEIGHTS, root / "weights")
    return train(
        sample_dir / "train",
        root / "run",
        preprocess_cfg=PreprocessConfig(size=SIZE),
        model_cfg=ModelConfig(backbone="mobilenetv2", weights=str(weights), image_size=SIZE),
        train_cfg=TrainConfig(
            epochs=1, fine_tune_epochs=1, cache_dir=str(root / "cache"), workers=1, teacher=str(tiny_run)
        ),
    )


@pytest.fixture(scope="module")
def exported_student(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exported_student") / "run"
    shutil.copytree(student, run)
    export_run(run, ExportConfig(segments=2))
    return run


@pytest.fixture(scope="module")
def test_images(sample_dir: Path) -> list[Path]:
    paths = list_image_files(sample_dir / "test")
    return paths[:8] + paths[-8:]  # both classes


def test_student_records_its_teacher(student, tiny_run):
    config = read_json(student / "config.json")
    assert config["model"]["backbone"] == "mobilenetv2"
    assert config["train"]["teacher"] == str(tiny_run) and config["train"]["distill_weight"] == 0.5
    assert config["teacher"]["path"] == str(tiny_run)
    assert config["teacher"]["model_sha256"] == model_sha256(tiny_run)
    assert config["teacher"]["backbone"] == "resnet50v2"


def test_teacher_probabilities_are_the_teachers_outputs_on_the_students_views(student, tiny_run, tmp_path):
    """The student's cached teacher probabilities came from the tiny run's own cached activations
    of the same views, and equal the teacher model run on those views, rebuilt here from their
    seeds; so does the other route (running the teacher on the images)."""
    config = read_json(student / "config.json")
    cache = Path(config["train"]["cache_dir"])
    [stored] = list((cache / "features").glob("*/teacher_*.npy"))
    stored = np.load(stored)[..., 0]
    pcfg, tcfg = PreprocessConfig(size=SIZE), TrainConfig(**config["train"])
    train_df, val_df = prepare_data(Path(config["data"]["source"]), pcfg, tcfg, cache, tmp_path)
    views = 1 + tcfg.augment_views
    assert stored.shape == (views, len(train_df))

    teacher = distill.load_teacher(tiny_run, pcfg)
    split = _teacher_split_cache(teacher, pcfg, tcfg, train_df, val_df, cache)
    assert split is not None and split.is_relative_to(teacher.cache_dir)  # the tiny run's own cache
    cached, images = list(train_df["cached"]), list(train_df["path"])
    route = dict(views=views, augment=tcfg.augment, seed=tcfg.seed, raw=(images, build_pipeline(pcfg)))
    from_split = distill.teacher_probabilities(
        teacher, cached, tmp_path / "a.npy", teacher_split=split, **route
    )
    np.testing.assert_array_equal(from_split, stored)

    n = 16
    route["raw"] = (images[:n], route["raw"][1])
    by_running = distill.teacher_probabilities(teacher, cached[:n], tmp_path / "b.npy", **route)
    for view in range(views):
        [batch] = image_batches(cached[:n], view, tcfg.augment, tcfg.seed, n, route["raw"])
        direct = np.asarray(teacher.model(batch, training=False)).reshape(-1)
        np.testing.assert_allclose(by_running[view], direct, atol=1e-3)  # float16 on disk
        # from bfloat16 activations where the CPU has them: about 1e-2 at worst
        np.testing.assert_allclose(stored[view, :n], direct, atol=0.02)
    # The teacher is not constant, so the 1e-3 comparison above is a real one. (The tiny teacher's
    # spread depends on the CPU's kernels: 0.02 over 8 images on one machine, above 0.05 on
    # others, so the bound is the exact route's tolerance times ten, not a share of the bfloat16 one.)
    assert np.ptp(stored[:, :n]) > 10 * 1e-3


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("mobilenetv2", MOBILENETV2_GATE),
        ("efficientnet_lite0", ["block2b_add", "block3b_add", "block5a_project_bn", "block6c_add"]),
    ],
)
def test_gate_reads_four_depths_of_the_ported_backbones(backbone, expected):
    """As Xception's blocks 2/4/8/12: block outputs at about 0.15, 0.3, 0.55, 0.85 of the depth,
    here one per resolution (strides 4, 8, 16, 32)."""
    cfg = ModelConfig(backbone=backbone, weights="none", image_size=SIZE)
    model = build_model(cfg)
    layers = gate_layers(model, cfg)
    assert layers == expected
    sides = [model.get_layer(name).output.shape[1] for name in layers]
    assert sides == [SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32]


def test_student_gate_accepts_chest_xrays_and_rejects_other_pictures(student, test_images, non_cxr_dir):
    run = Run.load(student, runtime="keras")
    assert run.gate is not None and run.gate.layers == MOBILENETV2_GATE
    accepted = [p.status for p in run.predict_paths(test_images)]
    assert accepted.count("ok") >= 0.75 * len(test_images)
    rejected = run.predict_paths(list_image_files(non_cxr_dir))
    assert [p.status for p in rejected] == ["rejected", "rejected"]


def test_student_export_runs_on_openvino_with_a_checked_plan(exported_student, test_images):
    info = read_json(exported_student / "export" / "export.json")
    assert info["gate_layers"] == MOBILENETV2_GATE
    assert {s["precision"] for s in info["segments"]} <= {"fp32", "bf16"}
    assert info["segments"][-1]["precision"] == "fp32"  # the head
    assert info["checks"]["within_tolerance"] and info["checks"]["onnx_fp32_vs_keras_max_abs_diff"] < 1e-3
    keras_run = Run.load(exported_student, runtime="keras")
    ov_run = Run.load(exported_student, runtime="auto")
    assert ov_run.runtime["backend"] == "openvino"
    # gate=False: every image gets a probability; the domain scores are there all the same
    ours, theirs = (
        keras_run.predict_paths(test_images, gate=False),
        ov_run.predict_paths(test_images, gate=False),
    )
    p_keras, p_ov = (np.array([p.probability for p in side]) for side in (ours, theirs))
    assert np.abs(p_keras - p_ov).max() <= ExportConfig().tolerance
    assert np.ptp(p_keras) > 1e-3  # the student's outputs vary: the comparison means something
    s_keras, s_ov = (np.array([p.domain_score for p in side]) for side in (ours, theirs))
    np.testing.assert_allclose(s_ov, s_keras, rtol=0.1)  # the gate reads the export's own activations


def test_grad_cam_on_the_student(student, test_images, tmp_path):
    run = Run.load(student, runtime="keras")
    layer = explain.run_layer_name(run)
    assert layer == "top_relu"
    image = run.preprocess(load_image(test_images[-1]))
    heatmap = explain.grad_cam(run.model, image, layer_name=layer)
    assert heatmap.shape == (SIZE, SIZE) and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() == 1.0 and heatmap.std() > 0.02
    [result] = explain.explain_paths(run, test_images[-1:], tmp_path)
    assert result.error is None and result.output.is_file()
