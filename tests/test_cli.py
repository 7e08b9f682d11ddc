"""The command line: preprocess and inspect on real and broken files, exit codes, skip-on-rerun."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from cxr_pneumonia.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main

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
    assert saved["steps"] == ["mask", "morph", "apply_mask", "resize"] and saved["size"] == 64


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
    assert "One of: max_specificity, midpoint." in options["--threshold-rule"].help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--threshold-rule", "max_spec"],
            "error: threshold_rule: must be one of 'max_specificity', 'midpoint' (got 'max_spec')",
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
    expected = "threshold_rule: must be one of 'max_specificity', 'midpoint' (got 'max_spec')"
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
