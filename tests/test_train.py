"""Training, resume, evaluation and prediction end to end (random weights, 64×64, seconds each)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from cxr_pneumonia import api
from cxr_pneumonia.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from cxr_pneumonia.config import override
from cxr_pneumonia.evaluate import choose_threshold
from cxr_pneumonia.io import load_image
from cxr_pneumonia.model import ModelConfig
from cxr_pneumonia.predict import Run, RunError
from cxr_pneumonia.preprocess import PreprocessConfig
from cxr_pneumonia.train import STATE_FILE, TrainConfig, TrainingError, train

TINY_MODEL = ModelConfig(backbone="resnet50v2", weights="none", image_size=64)
METRIC_KEYS = {
    "n", "threshold", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
    "confusion_matrix", "ci95", "at_0_5",
}  # fmt: skip


def test_run_directory_holds_every_artefact(tiny_run):
    for name in (
        "model.keras",
        "config.json",
        "threshold.json",
        "history.csv",
        "metrics_val.json",
        "plots/training_curves.png",
        "training_images.csv",
        "val_predictions.csv",
    ):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / STATE_FILE).exists() and not (tiny_run / "checkpoints").exists()
    config = json.loads((tiny_run / "config.json").read_text())
    assert {"preprocess", "model", "train", "package_version", "data"} <= config.keys()
    assert config["preprocess"]["size"] == config["model"]["image_size"] == 64
    assert config["data"]["train"]["n"] + config["data"]["val"]["n"] == 120
    # defaults: head epochs, then fine-tuning of the top blocks
    assert list(pd.read_csv(tiny_run / "history.csv")["stage"]) == ["head"] * 3 + ["fine_tune"] * 2
    assert json.loads((tiny_run / "metrics_val.json").read_text()).keys() >= METRIC_KEYS


def test_threshold_is_chosen_on_validation_scores_only(tiny_run, sample_dir):
    saved = json.loads((tiny_run / "threshold.json").read_text())
    val = pd.read_csv(tiny_run / "val_predictions.csv")
    # 20 validation positives: too few for acquisition groups (50 each at recall 0.98), so the
    # default group rule fell back to the pooled one, and says so
    assert saved["rule"] == "group_median" and "max_specificity" in saved["fallback"]
    assert sum(g["n"] for g in saved["groups"]) == len(val) and saved["group_definition"]["groups"]

    def rechoose(labels, scores) -> float:
        return choose_threshold(labels, scores, target_recall=saved["target_recall"]).threshold

    assert saved["threshold"] == pytest.approx(rechoose(val["label"], val["probability"]))
    assert saved["chosen_on"].startswith("validation")
    assert (val["probability"][val["label"] == 1] >= saved["threshold"]).mean() >= saved["target_recall"]
    # val_predictions.csv holds exactly the validation patients, none trained on ...
    seen = pd.read_csv(tiny_run / "training_images.csv")
    assert len(val) == (seen.role == "val").sum()
    assert set(val["patient_id"]) == set(seen.loc[seen.role == "val", "patient_id"])
    assert not set(val["patient_id"]) & set(seen.loc[seen.role == "train", "patient_id"])
    # ... and the choice depends on which images it is made on: the saved model's scores on the
    # training images or on the test images would each have given another threshold.
    run = Run.load(tiny_run)
    val_paths = {Path(p).resolve() for p in val["path"]}
    for folder in (sample_dir / "train", sample_dir / "test"):
        others = [p for p in sorted(folder.rglob("*.jpeg")) if p.resolve() not in val_paths]
        labels = [int(p.parent.name == "PNEUMONIA") for p in others]
        scores = run.predict_images([load_image(p) for p in others])
        assert rechoose(labels, scores) != pytest.approx(saved["threshold"], abs=1e-6), folder.name


def test_validation_patients_never_trained_on(tiny_run):
    seen = pd.read_csv(tiny_run / "training_images.csv")
    train_ids = set(seen.loc[seen.role == "train", "patient_id"])
    val_ids = set(seen.loc[seen.role == "val", "patient_id"])
    assert val_ids and not train_ids & val_ids
    assert not set(seen.loc[seen.role == "train", "sha256"]) & set(seen.loc[seen.role == "val", "sha256"])


def test_saved_model_reproduces_validation_scores(tiny_run):
    run = Run.load(tiny_run)
    val = pd.read_csv(tiny_run / "val_predictions.csv")
    probabilities = run.predict_images([load_image(p) for p in val["path"]])
    # the threshold was chosen on exactly these numbers
    np.testing.assert_allclose(probabilities, val["probability"], atol=1e-5)


class CrashAfter(keras.callbacks.Callback):
    """Simulates a crash (power cut, OOM kill) after a given epoch."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.crash_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.crash_epoch:
            raise RuntimeError("simulated crash")


def test_killed_training_leaves_no_model_and_resume_completes(sample_dir, tmp_path):
    out = tmp_path / "run"
    settings = dict(
        preprocess_cfg=PreprocessConfig(size=64), model_cfg=TINY_MODEL,
        # one fine-tuning epoch, no augmented views and no gate: what is checked is where the
        # crash leaves the run and that resuming completes both stages
        train_cfg=TrainConfig(epochs=4, fine_tune_epochs=1, patience=10, augment_views=0, fit_gate=False,
                              cache_dir=str(tmp_path / "cache"), workers=1),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(sample_dir / "train", out, callbacks=[CrashAfter(2)], **settings)
    assert not (out / "model.keras").exists()
    with pytest.raises(RunError, match="not a complete run"):
        Run.load(out)
    state = json.loads((out / STATE_FILE).read_text())
    assert state["stage"] == "head" and state["stage_epoch"] == 2
    assert (out / "checkpoints" / "last.weights.h5").is_file()

    run = Run.load(train(None, out, resume=True))
    assert (out / "model.keras").is_file() and not (out / STATE_FILE).exists()
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]  # 4 head epochs, then 1 fine-tuning epoch
    assert list(history["stage"]) == ["head"] * 4 + ["fine_tune"]
    assert run.predict_images([load_image(next((sample_dir / "test" / "NORMAL").iterdir()))]).shape == (1,)
    with pytest.raises(TrainingError, match="already complete"):
        train(None, out, resume=True)


class CrashAtEpochEnd(keras.callbacks.Callback):
    """Simulates a crash at the end of the n-th epoch of the whole training (all stages counted)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def on_epoch_end(self, epoch, logs=None):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")


def _final(run_dir: Path) -> tuple[list[np.ndarray], float, pd.DataFrame]:
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    roc_auc = json.loads((run_dir / "metrics_val.json").read_text())["roc_auc"]
    return model.get_weights(), roc_auc, pd.read_csv(run_dir / "history.csv")


def _largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def test_resumed_fine_tuning_ends_as_an_uninterrupted_run(sample_dir, tmp_path):
    settings = dict(
        preprocess_cfg=PreprocessConfig(size=64),
        # a high fine-tuning rate, so that Adam's moments visibly matter
        model_cfg=override(TINY_MODEL, fine_tune_blocks=1, fine_tune_learning_rate=1e-3),
        # no gate: it is fitted after the last epoch, from the final weights, and is no part of resuming
        train_cfg=TrainConfig(epochs=1, fine_tune_epochs=2, augment_views=0, precision="fp32", fit_gate=False,
                              cache_dir=str(tmp_path / "cache"), workers=1),
    )  # fmt: skip
    train(sample_dir / "train", tmp_path / "whole", **settings)
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):  # after the first fine-tuning epoch
        train(sample_dir / "train", cut, callbacks=[CrashAtEpochEnd(2)], **settings)
    state = json.loads((cut / STATE_FILE).read_text())
    assert (state["stage"], state["stage_epoch"]) == ("fine_tune", 1)
    assert state["early_stopping"]["best_epoch"] == 0 and state["early_stopping"]["wait"] == 0
    for name in ("last.weights.h5", "best.weights.h5", "optimizer.npz", "random_state.npz"):
        assert (cut / "checkpoints" / name).is_file(), name
    # the same interruption, resumed without the optimiser's state: the control
    shutil.copytree(cut, tmp_path / "no_optimizer")
    (tmp_path / "no_optimizer" / "checkpoints" / "optimizer.npz").unlink()

    train(None, cut, resume=True)
    train(None, tmp_path / "no_optimizer", resume=True)
    whole, resumed, control = (_final(tmp_path / n) for n in ("whole", "cut", "no_optimizer"))
    assert abs(resumed[1] - whole[1]) <= 0.002  # the acceptance
    assert _largest_difference(resumed[0], whole[0]) <= 1e-5  # in fact the very same numbers
    # every epoch's training loss and validation metrics, the resumed one included, are the same
    pd.testing.assert_frame_equal(resumed[2][whole[2].columns], whole[2], check_exact=False, atol=1e-6)
    # without the optimiser's moments the resumed epoch trains differently: the check above can fail
    assert abs(control[2]["loss"].iloc[-1] - whole[2]["loss"].iloc[-1]) > 1e-4


def test_early_stopping_state_survives_the_start_of_a_fit():
    from cxr_pneumonia.train import _early_stopping

    stop = _early_stopping(patience=3)
    saved = {"wait": 2, "best": 0.75, "best_epoch": 4, "stopped_epoch": 0}
    best_weights = [np.ones(3, np.float32)]
    stop.restore(saved, best_weights)
    stop.on_train_begin()  # Keras resets the counters here
    assert stop.state() == saved and stop.best_weights is best_weights


def test_fine_tuning_stage_trains_top_blocks_from_cached_activations(tiny_run):
    # The tiny run fine-tunes its top blocks (the defaults: 2 blocks, 2 epochs) after 3 head
    # epochs; its cache (conftest: next to the run) holds what both stages were trained on.
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["fine_tune_blocks"] > 0 and config["train"]["augment_views"] > 0
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["stage"]) == ["head"] * 3 + ["fine_tune"] * 2
    features = list((tiny_run.parent / "cache" / "features").rglob("*.npy"))
    assert {f.name for f in features} == {
        "train_split.npy",
        "val_split.npy",
        "train_backbone.npy",
        "val_backbone.npy",
    }


def test_cli_train_evaluate_predict_end_to_end(sample_dir, bad_inputs_dir, tmp_path, capsys):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    assert (
        main(
            [
                "train",
                str(sample_dir / "train"),
                "--out",
                str(run_dir),
                "--weights",
                "none",
                "--image-size",
                "64",
                "--epochs",
                "2",
                # no augmented views, no gate: neither is checked here (both are in test_train and
                # test_cli's gate tests on the tiny run), and both cost seconds of CPU
                "--augment-views",
                "0",
                "--no-fit-gate",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == EXIT_OK
    )
    assert "threshold" in capsys.readouterr().out

    assert (
        main(
            ["evaluate", str(run_dir), str(sample_dir / "test"), "--out", str(eval_dir), "--bootstrap", "200"]
        )
        == EXIT_OK
    )
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    # the headline counts only what the gate accepted (a 64-px untrained gate may refuse one)
    assert metrics.keys() >= METRIC_KEYS and 35 <= metrics["n"] <= 40
    assert metrics["threshold"] == json.loads((run_dir / "threshold.json").read_text())["threshold"]
    assert metrics["all_images"]["n"] == 40
    (tn, fp), (fn, tp) = metrics["all_images"]["confusion_matrix"]
    assert tn + fp == 20 and fn + tp == 20
    assert metrics["leakage"]["n_same_image"] == 0
    html = (eval_dir / "report.html").read_text()
    assert "data:image/png;base64" in html and "not a medical device" in html.lower()
    assert "report.html" in capsys.readouterr().out

    folder, expected_failures = bad_inputs_dir
    out_csv = tmp_path / "pred.csv"
    # --no-gate: the synthetic "X-rays" are rightly rejected by the gate; this checks unreadable files
    assert main(["predict", str(run_dir), str(folder), "--out", str(out_csv), "--no-gate"]) == EXIT_PARTIAL
    table = pd.read_csv(out_csv)
    failed = table[table["error"].notna()]
    assert {Path(p).name for p in failed["path"]} == set(expected_failures)
    ok = table[table["error"].isna()]
    assert len(ok) == 5 and ok["probability"].between(0, 1).all()
    assert set(ok["label"]) <= {"NORMAL", "PNEUMONIA"}
    assert ((ok["probability"] >= ok["threshold"]) == (ok["label"] == "PNEUMONIA")).all()
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(f"{name}" in err for name in expected_failures)

    assert main(["predict", str(run_dir), str(sample_dir / "test" / "NORMAL"), "--format", "json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20 and {"path", "probability", "label", "threshold"} <= rows[0].keys()


def test_evaluating_on_training_images_is_flagged_as_leakage(tiny_run, sample_dir, tmp_path):
    with pytest.warns(UserWarning, match="data leakage"):
        metrics = api.evaluate(
            tiny_run, sample_dir / "train", tmp_path / "eval", n_bootstrap=50, heatmaps=False
        )
    assert metrics["leakage"]["n_same_image"] == 120


def test_training_refuses_to_overwrite_a_complete_run(tiny_run, sample_dir):
    with pytest.raises(TrainingError, match="already holds a trained model"):
        train(sample_dir / "train", tiny_run)


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(sample_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from cxr_pneumonia.model import ModelConfig
        from cxr_pneumonia.preprocess import PreprocessConfig
        from cxr_pneumonia.train import TrainConfig, train
        from cxr_pneumonia.predict import Run
        run_dir = train({str(sample_dir / "train")!r}, {str(tmp_path / "run")!r},
                    preprocess_cfg=PreprocessConfig(size=64),
                    model_cfg=ModelConfig(backbone="resnet50v2", weights="none", image_size=64),
                    train_cfg=TrainConfig(epochs=2, fine_tune_epochs=0, strategy="mirrored",
                                          cache_dir={str(tmp_path / "c")!r}, workers=1, augment_views=0,
                                          fit_gate=False))
        run = Run.load(run_dir)
        print("replicas", tf.distribute.MirroredStrategy().num_replicas_in_sync, "threshold", run.threshold)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replicas 2" in done.stdout
    assert "MirroredStrategy over 2 devices" in done.stderr
    assert (tmp_path / "run" / "model.keras").is_file()


def test_robustness_on_validation_images_needs_no_test_data(tiny_run, tmp_path, capsys):
    from cxr_pneumonia.augment import PERTURBATIONS

    assert main(["robustness", str(tiny_run), "--out", str(tmp_path)]) == EXIT_OK
    text = capsys.readouterr().out
    assert all(name in text for name in PERTURBATIONS)
    results = json.loads((tmp_path / "robustness.json").read_text())["results"]
    clean, val = results["clean"], json.loads((tiny_run / "metrics_val.json").read_text())
    # unperturbed validation images through the saved model give the validation metrics
    assert (clean["n"], clean["n_failed"]) == (val["n"], 0)
    assert clean["recall"] == pytest.approx(val["recall"]) and clean["specificity"] == pytest.approx(
        val["specificity"]
    )
    assert clean["roc_auc"] == pytest.approx(val["roc_auc"])
    assert set(results) == {"clean", *PERTURBATIONS}


def test_robustness_names_what_it_leaves_out_and_refuses_an_empty_split(
    tiny_run, sample_dir, tmp_path, capsys, caplog
):
    """A split that matches nothing was "y_true and scores are empty"; an unreadable image was
    skipped without a word."""
    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / "test" / label).mkdir(parents=True)
        for path in sorted((sample_dir / "test" / label).glob("*.jpeg"))[:3]:
            shutil.copyfile(path, data / "test" / label / path.name)
    (data / "test" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    assert main(["robustness", str(tiny_run), str(data), "--split", "tset"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: {data}: no images in split 'tset'"
    assert main(["robustness", str(tiny_run), "--split", "test"]) == EXIT_USAGE
    assert "needs DATA" in capsys.readouterr().err
    # the rest is scored and written, and the exit code says some inputs failed
    assert (
        main(["robustness", str(tiny_run), str(data), "--split", "test", "--out", str(tmp_path / "r")])
        == EXIT_PARTIAL
    )
    printed = capsys.readouterr().out
    assert "1 of 7 images could not be read or preprocessed" in printed
    assert re.search(r"^clean\s+6\s+1\s", printed, re.MULTILINE)  # n, failed
    left_out = [r.getMessage() for r in caplog.records if "left out of the robustness" in r.getMessage()]
    empty = data / "test" / "NORMAL" / "empty.jpeg"
    assert left_out == [f"{empty}: empty file (0 bytes) (left out of the robustness figures)"]
    results = json.loads((tmp_path / "r" / "robustness.json").read_text())["results"]
    assert (results["clean"]["n"], results["clean"]["n_failed"]) == (6, 1)


# ---- the input gate ------------------------------------------------------------------------------


def test_training_fits_a_gate_and_saves_its_config(tiny_run):
    from cxr_pneumonia.gate import DomainModel, GateConfig

    config = json.loads((tiny_run / "config.json").read_text())
    assert config["train"]["fit_gate"] is True
    assert GateConfig.model_validate(config["train"]["gate"]) == TrainConfig().gate
    gate = DomainModel.load(tiny_run)
    assert gate.backbone == "resnet50v2" and gate.image_size == 64
    assert gate.n_fit == config["data"]["train"]["n"]
    assert gate.limit_info["n_val"] == config["data"]["val"]["n"]


def test_cli_gate_fits_one_for_an_old_run_and_predict_applies_it(tiny_run, sample_dir, tmp_path, capsys):
    from cxr_pneumonia.gate import DomainModel

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old, ignore=shutil.ignore_patterns("gate"))
    assert Run.load(old).gate is None
    no_gate = api.predict(old, [sample_dir / "test"])
    assert {(p.status, p.domain_score, p.reason) for p in no_gate} == {("ok", None, None)}

    code = main(["gate", str(old), "--max-fit-images", "40", "--fit-augmented-views", "0"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "40 training images" in out and "limit" in out
    fitted = DomainModel.load(old)
    assert fitted.orientation is not None and fitted.cfg.symmetry_check  # both checks on by default
    refit = ["gate", str(old), "--max-fit-images", "40", "--no-orientation-check", "--no-symmetry-check"]
    assert main(refit) == EXIT_OK
    assert DomainModel.load(old).orientation is None and not DomainModel.load(old).cfg.orientation_check
    assert not DomainModel.load(old).cfg.symmetry_check
    capsys.readouterr()
    gated = api.predict(old, [sample_dir / "test"])
    assert all(p.status in ("ok", "rejected") and p.domain_score is not None for p in gated)
    by_path = {p.path: p.probability for p in no_gate}
    assert all(p.probability == by_path[p.path] for p in gated if p.status == "ok")  # metrics unchanged

    run = Run.load(old)
    image = load_image(sorted((sample_dir / "test").rglob("*.jpeg"))[0])
    run.gate.limit = run.gate.unusual_level = -1e9  # every image unlike the training images
    (rejected,) = run.classify_images([image], sources=["x.jpeg"])
    assert (rejected.status, rejected.probability, rejected.label, rejected.gated) == (
        "rejected",
        None,
        None,
        True,
    )
    assert rejected.reason.startswith("not like the frontal chest X-rays this model was trained on: score ")
    # the gate was refitted without the checks above: its columns are the four depths
    assert re.search(r", largest on the features at \w+$", rejected.reason), rejected.reason
    (anyway,) = run.classify_images([image], gate=False)
    assert anyway.status == "rejected" and not anyway.gated and anyway.label in ("NORMAL", "PNEUMONIA")
    assert anyway.reason.endswith("(classified anyway: gate off)")
    assert set(anyway.to_dict()) >= {"status", "domain_score", "domain_limit", "reason", "unusual", "gated"}
    far = dataclasses.replace(rejected, domain_score=1e6)
    assert run.batch_shift([far] * 12)["shifted"] is True
    assert run.batch_shift([anyway])["shifted"] is False


def test_cli_gate_errors_are_one_line(tmp_path, capsys):
    assert main(["gate", str(tmp_path)]) == EXIT_USAGE
    assert "not a complete run directory" in capsys.readouterr().err


# ---- the seed preset -----------------------------------------------------------------------------


def test_seed_preset_settings_with_explicit_overrides_are_what_the_run_saves(tmp_path):
    # what `train DATA --preset seed --backbone mobilenetv2 --image-size 64 --epochs 1` trains with
    # (the CLI's settings, validated before any image is read), written as training writes them
    from cxr_pneumonia.cli import _train_settings
    from cxr_pneumonia.rundir import write_metadata
    from cxr_pneumonia.train import _fixed_choice, plan_stages

    given = {"preset": "seed", "backbone": "mobilenetv2", "image_size": 64, "epochs": 1, "weights": None}
    settings = _train_settings(None, given)
    preprocess, model, train_cfg = settings["preprocess_cfg"], settings["model_cfg"], settings["train_cfg"]
    choice = _fixed_choice(np.array([0, 1, 1]), np.array([0.2, 0.4, 0.9]), train_cfg)
    write_metadata(
        tmp_path, preprocess_cfg=preprocess, model_cfg=model, threshold=choice.to_dict(), train_cfg=train_cfg
    )
    config = json.loads((tmp_path / "config.json").read_text())
    preprocess, model, train_cfg = config["preprocess"], config["model"], config["train"]
    assert train_cfg["preset"] == "seed"
    # the seed's pipeline ...
    assert preprocess["mask_shape"] == "contour" and "downscale" not in preprocess["steps"]
    assert (model["head"], model["dense_units"], model["dropout"], model["weights"]) == (
        "flatten", 128, 0.5, "imagenet",
    )  # fmt: skip
    assert (model["fine_tune_blocks"], model["label_smoothing"], model["initial_bias"]) == (0, 0.0, 0.0)
    assert (train_cfg["fine_tune_epochs"], train_cfg["augment_views"]) == (0, 0)
    # ... with the options given (any backbone on request)
    assert (model["backbone"], model["image_size"], train_cfg["epochs"]) == ("mobilenetv2", 64, 1)
    stages = plan_stages(settings["model_cfg"], settings["train_cfg"], head="head", top="top")
    assert [stage.name for stage in stages] == ["head"]  # frozen: no fine-tuning stage
    threshold = json.loads((tmp_path / "threshold.json").read_text())
    assert (threshold["threshold"], threshold["rule"], threshold["recall"]) == (0.5, "fixed", 0.5)


def test_seed_preset_defaults_to_resnet50v2_and_is_a_config_file_too():
    from importlib import resources

    from cxr_pneumonia.cli import _train_settings
    from cxr_pneumonia.train import preset_configs

    preprocess, model, train_cfg = preset_configs("seed")
    assert (model.backbone, model.weights, train_cfg.threshold_rule, train_cfg.fixed_threshold) == (
        "resnet50v2", "imagenet", "fixed", 0.5,
    )  # fmt: skip
    # the shipped file works as `train --config FILE` as well, to the same settings
    shipped = Path(str(resources.files("cxr_pneumonia") / "presets" / "seed.json"))
    settings = _train_settings(shipped, {})
    assert settings["preprocess_cfg"] == preprocess and settings["model_cfg"] == model
    assert settings["train_cfg"] == train_cfg


def test_preset_errors_are_one_line(sample_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert main(["train", str(sample_dir / "train"), *out, "--preset", "sed"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error: preset: unknown preset 'sed'; valid presets: seed"
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert main(["train", str(sample_dir / "train"), *out, "--preset", "seed", "--config", str(config)]) == 1
    assert capsys.readouterr().err.strip() == "error: give --preset or --config, not both"
    with pytest.raises(ValueError, match="unknown preset 'sed'"):
        api.train(sample_dir / "train", tmp_path / "run", preset="sed")
    assert not (tmp_path / "run").exists()


def test_missing_imagenet_weights_fail_before_any_image_is_read(tmp_path, monkeypatch):
    from cxr_pneumonia import train as train_module
    from cxr_pneumonia.model import WEIGHTS_DIR_ENV, WeightsUnavailableError, get_backbone

    def offline(**kwargs):
        raise Exception("URL fetch failure on https://example.invalid/w.h5: None -- [Errno -2] Name unknown")

    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    spec = dataclasses.replace(get_backbone("resnet50v2"), constructor=offline)
    monkeypatch.setattr(train_module, "get_backbone", lambda name: spec)
    with pytest.raises(WeightsUnavailableError) as info:
        api.train(tmp_path / "no-data", tmp_path / "run", preset="seed")  # no data: it never gets that far
    message = str(info.value)
    assert "\n" not in message and message.startswith("ImageNet weights for resnet50v2 are not available")
    assert "the seed preset runs on any backbone" in message and "--backbone xception" in message
    assert not (tmp_path / "run").exists()


def _tiny_settings(tmp_path: Path, **train) -> dict:
    train_cfg = TrainConfig(**{"epochs": 2, "fine_tune_epochs": 0, "augment_views": 0, "fit_gate": False,
                               "cache_dir": str(tmp_path / "cache"), "workers": 1, **train})  # fmt: skip
    return dict(preprocess_cfg=PreprocessConfig(size=64), model_cfg=TINY_MODEL, train_cfg=train_cfg)


def test_resume_refuses_data_that_changed_since_the_run_started(sample_dir, tmp_path):
    # the split is drawn again from DATA on resume: with images added meanwhile, the checkpoint
    # would go on against validation patients it had trained on
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(sample_dir / "train", data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(data, out, callbacks=[CrashAfter(1)], **_tiny_settings(tmp_path))
    assert json.loads((out / STATE_FILE).read_text())["data_fingerprint"]["val"]["n"] > 0
    added = [next((sample_dir / "test" / name).iterdir()) for name in ("NORMAL", "PNEUMONIA")]
    for path in added:
        shutil.copy(path, data / path.parent.name / path.name)
    with pytest.raises(TrainingError, match=r"changed since .* started .* train afresh"):
        train(None, out, resume=True)
    assert (out / "checkpoints" / "last.weights.h5").is_file() and not (out / "model.keras").exists()
    with pytest.raises(TrainingError, match="resumes on that data only"):
        train(sample_dir / "train", out, resume=True)
    for path in added:  # the data as it was: the run resumes and completes
        (data / path.parent.name / path.name).unlink()
    assert api.train(data, out, resume=True).path == out  # given again, the same data is accepted


def test_a_fresh_run_does_not_finish_with_an_interrupted_attempts_gate(sample_dir, tmp_path):
    out = tmp_path / "run"
    (out / "gate").mkdir(parents=True)  # what an attempt stopped after fitting its gate leaves
    (out / "gate" / "gate.json").write_text("{}")
    train(sample_dir / "train", out, **_tiny_settings(tmp_path))
    assert (out / "model.keras").is_file() and not (out / "gate").exists()
    assert Run.load(out).gate is None


def test_api_resume_takes_no_data_or_settings(sample_dir, tmp_path):
    with pytest.raises(TypeError, match="resume=True takes no epochs"):
        api.train(sample_dir / "train", tmp_path / "run", resume=True, epochs=3)
    with pytest.raises(TypeError, match="resume=True takes no train_cfg"):
        api.train(None, tmp_path / "run", resume=True, train_cfg=TrainConfig())
    with pytest.raises(TypeError, match="give the training data"):
        api.train(None, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_feature_cache_key_follows_the_row_order():
    # the feature stores are positional: the same images in another order must not share them
    from cxr_pneumonia.train import _feature_key

    rows = pd.DataFrame(
        {"cached": [f"/c/{h}.png" for h in "abcd"], "label": [0, 1, 0, 1], "patient_id": list("wxyz")}
    )
    key = functools.partial(_feature_key, PreprocessConfig(size=64), TINY_MODEL, TrainConfig())
    assert key(rows, rows.iloc[:1]) == key(rows.copy(), rows.iloc[:1].copy())
    assert key(rows, rows.iloc[:1]) != key(rows.iloc[::-1], rows.iloc[:1])


def test_too_few_patients_to_split_names_the_data(sample_dir, tmp_path, capsys):
    data = tmp_path / "two"
    for name in ("NORMAL", "PNEUMONIA"):
        (data / name).mkdir(parents=True)
        shutil.copy(next((sample_dir / "train" / name).iterdir()), data / name)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--weights", "none"]) != EXIT_OK
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {data}: only 2 patient group(s)")
