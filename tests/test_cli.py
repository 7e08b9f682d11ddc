"""The command line: preprocess and inspect on real and broken files, exit codes, skip-on-rerun."""

from __future__ import annotations

import csv
import inspect as pyinspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from cxr_pneumonia.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main

PREDICT_COLUMNS = ["path", "status", "probability", "label", "threshold", "operating_point", "domain_score"]
PREDICT_COLUMNS += ["domain_limit", "reason", "error"]

SHARED = Path(__file__).resolve().parents[2] / "shared"
FULLRES = SHARED / "data" / "kermany-fullres"
CLI = Path(sys.executable).with_name("cxr-pneumonia")


def read_failures(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {Path(row["file"]).name: row["reason"] for row in csv.DictReader(handle)}


@pytest.mark.skipif(not FULLRES.is_dir(), reason="../shared/data/kermany-fullres not present")
def test_preprocess_full_resolution_then_rerun_skips_everything(tmp_path, capsys):
    out, preview = tmp_path / "out", tmp_path / "p.png"
    # a subprocess: the CLI forks its workers, which is only safe from a fresh process
    first = subprocess.run(
        [CLI, "preprocess", FULLRES, out, "--preview", preview, "--workers", "2"],
        capture_output=True,
        text=True,
    )
    assert first.returncode == EXIT_OK, first.stderr
    outputs = sorted(out.rglob("*.png"))
    assert len(outputs) == 40
    assert {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape for p in outputs} == {(224, 224)}
    # the tree is mirrored: split/class/name.png
    assert (out / "val" / "NORMAL" / "NORMAL2-IM-1427-0001.png").is_file()
    assert cv2.imread(str(preview)).shape[0] > 300
    assert (out / "preprocess_config.json").is_file() and read_failures(out / "failures.csv") == {}
    assert "40 processed, 0 skipped" in first.stdout

    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    assert (
        main(["preprocess", str(FULLRES), str(out), "--preview", str(preview), "--workers", "1"]) == EXIT_OK
    )
    assert "0 processed, 40 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes  # nothing rewritten

    # a different config is a different output: everything is redone
    assert main(["preprocess", str(FULLRES), str(out), "--size", "128", "--workers", "1"]) == EXIT_OK
    assert "40 processed, 0 skipped" in capsys.readouterr().out
    assert cv2.imread(str(outputs[0]), cv2.IMREAD_UNCHANGED).shape == (128, 128)


def test_preprocess_mixed_folder_processes_valid_and_lists_broken(bad_inputs_dir, tmp_path, capsys):
    folder, expected_failures = bad_inputs_dir
    out = tmp_path / "out"
    code = main(["preprocess", str(folder), str(out), "--workers", "1"])
    assert code == EXIT_PARTIAL
    assert read_failures(out / "failures.csv").keys() == expected_failures.keys()
    written = {p.stem for p in out.rglob("*.png")}
    assert written == {"normal_1", "normal_2", "scan_16bit", "scan_rgba", "scan"}  # DICOM included
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for name in expected_failures:
        assert any(name in line and line.startswith("error: ") for line in captured.err.splitlines())
    assert "3 of 8 files failed" in captured.out


def test_console_script_exit_codes_and_one_line_errors(bad_inputs_dir, tmp_path):
    folder, _ = bad_inputs_dir
    partial = subprocess.run(
        [CLI, "preprocess", folder, tmp_path / "o", "--workers", "2"], capture_output=True, text=True
    )
    assert partial.returncode == EXIT_PARTIAL and "Traceback" not in partial.stderr
    missing = subprocess.run(
        [CLI, "preprocess", tmp_path / "nope", tmp_path / "o2"], capture_output=True, text=True
    )
    assert missing.returncode == EXIT_USAGE and "Traceback" not in missing.stderr
    assert "nope" in missing.stderr


def test_the_command_list_names_every_command_without_importing_tensorflow():
    """``--help`` lists each command with its docstring's first line, without building the
    commands whose options come from config models (which import Keras: five seconds)."""
    listing = subprocess.run(
        [sys.executable, "-c", "import sys; from cxr_pneumonia.cli import main; code = main(['--help']); "
         "print('tensorflow' in sys.modules, code)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listing.stdout.splitlines()[-1] == "False 0"
    for name in ("preprocess", "train", "gate", "export", "predict", "serve", "calibrate"):
        assert f"│ {name} " in listing.stdout
    assert "Fit (or refit) the run's input gate on its own training images" in listing.stdout
    # the deferred command itself is still built, with its config options, when asked for
    gate_help = subprocess.run([CLI, "gate", "--help"], capture_output=True, text=True)
    assert "--orientation-check" in gate_help.stdout


def test_an_output_path_that_cannot_be_written_is_refused_before_any_image_is_scored(
    tiny_run: Path, sample_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The outputs are written last: a folder given as predict's --out once ended in a traceback
    after every image was scored, and the predictions were lost."""
    from cxr_pneumonia.predict import Run

    monkeypatch.setattr(Run, "load", staticmethod(lambda *a, **k: pytest.fail("the run was loaded")))
    image = str(sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (
            ["predict", str(tiny_run), image, "--out", str(tmp_path)],
            f"{tmp_path}: is a folder; give a file name",
        ),
        (
            ["predict", str(tiny_run), image, "--out", str(a_file / "p.csv")],
            f"{a_file / 'p.csv'}: cannot be written ({a_file} is not a writable folder)",
        ),
        (
            ["predict", str(tiny_run), image, "--heatmaps", str(a_file)],
            f"{a_file}: exists and is not a folder",
        ),
        (["explain", str(tiny_run), image, "--out", str(a_file)], f"{a_file}: exists and is not a folder"),
        (
            ["evaluate", str(tiny_run), str(sample_dir), "--out", str(a_file)],
            f"{a_file}: exists and is not a folder",
        ),
    ]
    for args, message in cases:
        assert main(args) == EXIT_USAGE, args
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_preprocess_takes_a_runs_config_json_as_its_help_says(tiny_run, sample_dir, tmp_path):
    """``--config``: "PreprocessConfig JSON (e.g. a run's)"; a run's config.json was refused for its
    other sections. A file that is not a config names itself."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0], src / "a.jpeg")
    size = json.loads((tiny_run / "config.json").read_text())["preprocess"]["size"]
    done = subprocess.run(
        [CLI, "preprocess", src, tmp_path / "dst", "--config", tiny_run / "config.json", "--workers", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stderr
    assert cv2.imread(str(tmp_path / "dst" / "a.png"), cv2.IMREAD_GRAYSCALE).shape == (size, size)
    (tmp_path / "bad.json").write_text('{"size": "large"}')
    bad = subprocess.run(
        [CLI, "preprocess", src, tmp_path / "dst2", "--config", tmp_path / "bad.json"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == EXIT_USAGE and bad.stderr.startswith(
        f"error: {tmp_path / 'bad.json'}: preprocessing"
    )
    assert not (tmp_path / "dst2").exists()


def test_every_command_summary_is_one_line_for_the_command_list():
    """The command list shows a docstring's first paragraph as it is written: a summary broken over
    two source lines is listed broken (it was, for six commands)."""
    from cxr_pneumonia import cli

    docs = {c.callback.__name__: pyinspect.getdoc(c.callback) or "" for c in cli.app.registered_commands}
    docs.update(cli._DEFERRED_HELP)
    assert {"inspect", "export_command", "calibrate", "train", "gate", "predict", "explain"} <= set(docs)
    summaries = {name: doc.split("\n\n")[0] for name, doc in docs.items()}
    broken = {name: s for name, s in summaries.items() if "\n" in s or not 0 < len(s) <= 100}
    assert not broken


def test_no_step_help_names_every_preprocessing_step():
    from cxr_pneumonia.cli import StepsOff
    from cxr_pneumonia.preprocess import DEFAULT_STEPS

    listed = StepsOff.__metadata__[0].help.split(": ", 1)[1].rstrip(".").split(", ")
    assert listed == list(DEFAULT_STEPS)


def test_dicom_files_no_decoder_can_read_are_one_line_errors_without_tracebacks(tmp_path):
    """pydicom's own test files: JPEG Extended at 12 bits (no installed plugin decodes it; pydicom
    logs each plugin's failure with a traceback) and NumberOfFrames '1A' (once a crash)."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("JPEG-lossy.dcm", "badVR.dcm"):
        shutil.copy(get_testdata_file(name, download=False), folder / name)
    run = subprocess.run(
        [CLI, "preprocess", folder, tmp_path / "o", "--workers", "1"], capture_output=True, text=True
    )
    assert run.returncode == EXIT_PARTIAL
    assert "Traceback" not in run.stderr and "ERROR pydicom" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert f"error: {folder / 'JPEG-lossy.dcm'}: cannot decode JPEG Extended" in errors[0]
    assert errors[1] == f"error: {folder / 'badVR.dcm'}: invalid NumberOfFrames '1A'"


@pytest.mark.parametrize(
    "args",
    [
        ["preprocess", "{src}", "{dst}", "--no-step", "sharpen"],  # unknown step
        ["preprocess", "{src}", "{dst}", "--resize-mode", "crop"],  # unknown mode
        ["preprocess", "{src}", "{src}/inside"],  # output inside the source
        ["preprocess", "{src}"],  # missing argument
        ["frobnicate"],  # unknown command
    ],
)
def test_usage_errors_exit_1(args, bad_inputs_dir, tmp_path, capsys):
    folder, _ = bad_inputs_dir
    argv = [a.format(src=folder, dst=tmp_path / "out") for a in args]
    assert main(argv) == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_steps_can_be_switched_off_from_the_cli(bad_inputs_dir, tmp_path):
    folder, expected_failures = bad_inputs_dir
    out = tmp_path / "out"
    code = main(
        [
            "preprocess",
            str(folder),
            str(out),
            "--no-step",
            "clahe",
            "--no-step",
            "crop",
            "--size",
            "64",
            "--workers",
            "1",
        ]
    )
    assert code == EXIT_PARTIAL  # the folder's broken files fail; the valid ones are processed
    assert read_failures(out / "failures.csv").keys() == expected_failures.keys()
    import json

    saved = json.loads((out / "preprocess_config.json").read_text())
    assert saved["steps"] == ["downscale", "denoise", "mask", "morph", "apply_mask", "resize"]
    assert saved["size"] == 64


def test_inspect_reports_counts_and_unreadable(bad_inputs_dir, tmp_path, capsys):
    folder, expected = bad_inputs_dir
    root = tmp_path / "ds"
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    for path in folder.iterdir():
        target = root / ("PNEUMONIA" if path.name.startswith("scan") else "NORMAL") / path.name
        target.write_bytes(path.read_bytes())
    assert main(["inspect", str(root), "--workers", "1"]) == EXIT_PARTIAL
    text = capsys.readouterr().out
    assert all(name in text for name in expected)
    assert "NORMAL" in text and "PNEUMONIA" in text


# --- train's options come from the config models ------------------------------------------------

TRAIN_FLAGS = [
    "--backbone",
    "--weights",
    "--mask-shape",
    "--head",
    "--image-size",
    "--epochs",
    "--fine-tune-blocks",
    "--fine-tune-epochs",
    "--learning-rate",
    "--label-smoothing",
    "--augment-views",
    "--batch-size",
    "--target-recall",
    "--threshold-rule",
    "--val-fraction",
    "--seed",
    "--strategy",
    "--cache-dir",
    "--workers",
    "--config",
    "--resume",
    "--out",
    "--precision",
]


def _command(name: str):
    import typer

    from cxr_pneumonia.cli import app

    group = typer.main.get_command(app)
    return group.get_command(None, name)


def test_train_options_are_the_config_fields_with_their_descriptions():
    from cxr_pneumonia.model import ModelConfig
    from cxr_pneumonia.train import TrainConfig

    options = {opt: param for param in _command("train").params for opt in param.opts}
    assert set(TRAIN_FLAGS) <= set(options)
    for cls in (ModelConfig, TrainConfig):
        for name in cls.cli_fields:
            param = options[f"--{name.replace('_', '-')}"]
            assert param.default is None  # unset: the config's value is kept
            assert param.help.startswith(cls.model_fields[name].description)
    rules = "One of: group_median, group_min, max_specificity, midpoint, bootstrap_margin, fixed."
    assert rules in options["--threshold-rule"].help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--threshold-rule", "max_spec"],
            "error: threshold_rule: must be one of 'group_median', 'group_min', 'max_specificity', "
            "'midpoint', 'bootstrap_margin', 'fixed' (got 'max_spec')",
        ),
        (["--backbone", "resnet"], "error: backbone: must be one of 'resnet50v2', "),
        (
            ["--precision", "float16"],
            "error: precision: must be one of 'auto', 'fp32', 'bf16' (got 'float16')",
        ),
        (["--mask-shape", "blob"], "error: mask_shape: must be one of 'hull', 'contour' (got 'blob')"),
        (["--epochs", "0"], "error: epochs: input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_a_typo_in_a_train_option_fails_before_any_image_is_read(args, message, tmp_path, capsys):
    # DATA does not exist: reading it would fail with another message
    assert main(["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), *args]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and len([e for e in err if e.startswith("error")]) == 1
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_config_file_or_a_resume_state_names_the_field(tmp_path, capsys):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"train": {"threshold_rule": "max_spec"}}))
    assert (
        main(["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "r"), "--config", str(config)]) == 1
    )
    expected = (
        "threshold_rule: must be one of 'group_median', 'group_min', 'max_specificity', 'midpoint', "
        "'bootstrap_margin', 'fixed' (got 'max_spec')"
    )
    assert capsys.readouterr().err.strip() == f"error: {config}: {expected}"

    run = tmp_path / "interrupted"
    run.mkdir()
    state = {
        "data": str(tmp_path / "no-data"),
        "preprocess": {},
        "model": {},
        "train": {"threshold_rule": "max_spec"},
    }
    (run / "train_state.json").write_text(json.dumps(state))
    assert main(["train", "--resume", str(run)]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: {run / 'train_state.json'}: {expected}"
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == EXIT_USAGE
    assert "takes no --epochs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the input check (gate) through predict, explain and evaluate
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_inputs(sample_dir: Path, non_cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sample chest X-rays and two pictures that are not chest X-rays, in one folder."""
    import shutil

    folder = tmp_path_factory.mktemp("mixed")
    for path in [*sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[:2], *non_cxr_dir.iterdir()]:
        shutil.copyfile(path, folder / path.name)
    return folder


def test_predict_gate_on_withholds_rejected_answers_and_exits_0(tiny_run, mixed_inputs, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "pred.csv"
    assert main(["predict", str(tiny_run), str(mixed_inputs), "--out", str(out)]) == EXIT_OK
    table = pd.read_csv(out)
    assert list(table.columns) == PREDICT_COLUMNS
    rejected = table[table["status"] == "rejected"]
    assert sorted(Path(p).name for p in rejected["path"]) == ["colour_noise_1.png", "scanned_page_0.png"]
    assert rejected["probability"].isna().all() and rejected["label"].isna().all()
    assert rejected["reason"].str.startswith("not like the frontal chest X-rays").all()
    assert (rejected["domain_score"] > rejected["domain_limit"]).all()
    ok = table[table["status"] == "ok"]
    assert len(ok) == 2 and ok["probability"].between(0, 1).all() and table["error"].isna().all()
    err = capsys.readouterr().err
    assert "2 of 4 images rejected" in err and "--no-gate" in err and "Traceback" not in err


def test_predict_no_gate_classifies_everything_and_marks_it(tiny_run, mixed_inputs, capsys):
    assert main(["predict", str(tiny_run), str(mixed_inputs), "--no-gate", "--format", "json"]) == EXIT_OK
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert all(0 <= row["probability"] <= 1 and row["label"] for row in rows)
    rejected = [row for row in rows if row["status"] == "rejected"]
    assert len(rejected) == 2 and all(
        row["reason"].endswith("(classified anyway: gate off)") for row in rejected
    )
    assert "2 of 4 images are not like the frontal chest X-rays" in captured.err
    assert "classified anyway" in captured.err


def test_predict_warns_once_when_the_batch_is_unlike_the_training_data(
    tiny_run, sample_dir, make_non_cxr_images, tmp_path, capsys
):
    folder = tmp_path / "batch"
    make_non_cxr_images(folder, 12)
    assert main(["predict", str(tiny_run), str(folder), "--no-gate"]) == EXIT_OK
    err = capsys.readouterr().err
    shift = [line for line in err.splitlines() if "differ from the training data" in line]
    assert len(shift) == 1 and shift[0].startswith("warning: these images differ from the training data")
    assert main(["predict", str(tiny_run), str(sample_dir / "test" / "NORMAL")]) == EXIT_OK
    err = capsys.readouterr().err
    assert "differ from the training data" not in err and "rejected" not in err


def test_explain_skips_rejected_images_unless_no_gate(tiny_run, mixed_inputs, tmp_path, capsys):
    on, off = tmp_path / "on", tmp_path / "off"
    assert main(["explain", str(tiny_run), str(mixed_inputs), "--out", str(on)]) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert err.count("skipped: ") == 2 and "--no-gate draws it anyway" in err and "Traceback" not in err
    assert "2 of 4 overlays written" in err and len(list(on.glob("*.png"))) == 2
    assert main(["explain", str(tiny_run), str(mixed_inputs), "--out", str(off), "--no-gate"]) == EXIT_OK
    assert len(list(off.glob("*.png"))) == 4


def test_evaluate_gate_on_and_off_from_the_cli(tiny_run, sample_dir, non_cxr_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for path in sorted((sample_dir / "test" / label).glob("*.jpeg"))[:4]:
            shutil.copyfile(path, data / label / path.name)
    for path in non_cxr_dir.iterdir():
        shutil.copyfile(path, data / "NORMAL" / path.name)
    common = ["--bootstrap", "20", "--no-heatmaps"]
    assert main(["evaluate", str(tiny_run), str(data), "--out", str(tmp_path / "on"), *common]) == EXIT_OK
    out = capsys.readouterr().out
    assert "input check: 2 of 10 images rejected" in out and "metrics above on accepted images (8)" in out
    assert "all 10 images: recall" in out
    on = json.loads((tmp_path / "on" / "metrics.json").read_text())
    assert on["n"] == 8 and on["all_images"]["n"] == 10 and on["domain"]["n_rejected"] == 2
    args = ["evaluate", str(tiny_run), str(data), "--out", str(tmp_path / "off"), "--no-gate", *common]
    assert main(args) == EXIT_OK
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert off["n"] == 10 and off["evaluated_on"] == "all images" and off["accepted_images"]["n"] == 8
    assert "metrics above on all images (10)" in capsys.readouterr().out
