"""ONNX export, the bf16/fp32 precision plan and the OpenVINO runtime behind predict/evaluate/serve."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from cxr_pneumonia import export, runtime
from cxr_pneumonia.cli import EXIT_OK, EXIT_USAGE, main
from cxr_pneumonia.export import (
    ExportConfig,
    ExportError,
    choose_cuts,
    export_run,
    search_plan,
    single_tensor_cuts,
)
from cxr_pneumonia.io import list_image_files, load_image
from cxr_pneumonia.predict import Run
from cxr_pneumonia.rundir import EXPORT_DIR, EXPORT_INFO_FILE, ONNX_FILE, RunError


@pytest.fixture(scope="module")
def exported_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with an export (the shared tiny run must not change)."""
    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(tiny_run, run)
    export_run(run)
    return run


@pytest.fixture(scope="module")
def test_images(sample_dir: Path) -> list[Path]:
    """Images the calibration never saw (the sample's test folder)."""
    return list_image_files(sample_dir / "test")


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---- cutting the graph ------------------------------------------------------------------------


def test_cuts_are_where_a_single_tensor_flows():
    x = keras.Input((8, 8, 3), name="x")
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(x)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    c = keras.layers.Add(name="c")([a, b])  # a's output lives until here: no cut after b
    d = keras.layers.GlobalAveragePooling2D(name="d")(c)
    out = keras.layers.Dense(1, name="out")(d)
    model = keras.Model(x, out)
    assert single_tensor_cuts(model) == ["a", "c", "d"]


def test_chosen_cuts_split_a_resnet_into_callable_segments():
    from cxr_pneumonia.model import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="resnet50v2", weights="none", image_size=64))
    cuts = choose_cuts(model, "post_relu", 4)
    names = [layer.name for layer in model.layers]
    assert cuts[-1] == "post_relu" and len(cuts) == 4
    assert [names.index(c) for c in cuts] == sorted(names.index(c) for c in cuts)
    bounds = [model.input, *(model.get_layer(c).output for c in cuts), model.output]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype(np.float32)
    h = x
    for start, end in itertools.pairwise(bounds):
        h = keras.Model(start, end)(h)  # "graph disconnected" here would mean a bad cut
    np.testing.assert_allclose(np.asarray(h), np.asarray(model(x)), atol=1e-5)


# ---- the plan search ----------------------------------------------------------------------------


def test_greedy_search_keeps_the_most_saving_per_error_within_tolerance():
    errors, savings = [0.02, 0.004, 0.005, 0.003], [5.0, 1.0, 3.0, 1.0]

    def evaluate(segments):  # errors add up, as bf16 rounding errors roughly do
        return {"max_abs_diff": sum(errors[i] for i in segments)}

    chosen, trials = search_plan(4, savings, evaluate, lambda c: c["max_abs_diff"] <= 0.01)
    # segment 0 fails alone; order by saving/error: 2 (600), 3 (333), 1 (250); 2+3 = 0.008 fits,
    # adding 1 makes 0.012 and is refused
    assert chosen == frozenset({2, 3})
    assert [t["bf16_segments"] for t in trials if not t["accepted"]] == [[0], [1, 2, 3]]


# ---- export_run -------------------------------------------------------------------------------


def test_export_writes_onnx_and_a_checked_plan(exported_run):
    folder = exported_run / EXPORT_DIR
    info = json.loads((folder / EXPORT_INFO_FILE).read_text())
    assert (folder / ONNX_FILE).stat().st_size > 1_000_000
    assert info["segments"][-1]["precision"] == "fp32"  # the head
    assert info["segments"][0]["input"] == "image" and info["segments"][-1]["output"] == "probability"
    # cut at (at least) the configured number of single-tensor points, the last one the backbone's output
    cuts = [s["last_layer"] for s in info["segments"]]
    assert len(cuts) >= ExportConfig().segments + 1 and cuts[-2:] == ["post_relu", "head"]
    assert [s["output"] for s in info["segments"][:-1]] == [s["input"] for s in info["segments"][1:]]
    checks = info["checks"]
    assert checks["onnx_fp32_vs_keras_max_abs_diff"] < 1e-5
    assert checks["max_abs_diff"] <= ExportConfig().tolerance and checks["within_tolerance"]
    assert info["calibration"]["source"] == "the run's validation split"
    assert (
        info["threshold"]["threshold"]
        == json.loads((exported_run / "threshold.json").read_text())["threshold"]
    )
    if info["cpu_bf16"]:
        assert info["search"], "a CPU with bf16 must try bf16 segments"
    assert not list(exported_run.glob(".export-*")), "no temporary folder left behind"


def test_onnx_file_runs_in_onnxruntime_like_keras(exported_run, test_images):
    ort = pytest.importorskip("onnxruntime")
    run = Run.load(exported_run, runtime="keras")
    x = np.stack([run.preprocess(load_image(p)) for p in test_images[:16]])[..., None].astype(np.float32)
    session = ort.InferenceSession(str(exported_run / EXPORT_DIR / ONNX_FILE))
    (onnx_p,) = session.run(["probability"], {"image": x})
    np.testing.assert_allclose(onnx_p.reshape(-1), run.predict_preprocessed(x), atol=1e-4)


def test_runtime_auto_uses_the_export_within_tolerance_on_unseen_images(exported_run, test_images):
    fast = Run.load(exported_run)
    reference = Run.load(exported_run, runtime="keras")
    assert fast.runtime["backend"] == "openvino"
    assert reference.runtime["backend"] == "keras"
    p_fast = np.array([p.probability for p in fast.predict_paths(test_images, gate=False)])
    p_ref = np.array([p.probability for p in reference.predict_paths(test_images, gate=False)])
    assert np.abs(p_fast - p_ref).max() <= 0.01
    assert fast.info()["runtime"]["backend"] == "openvino"
    assert not fast._runtime.keras_loaded, "the Keras model is loaded only when needed"
    assert fast.model.name == reference.model.name  # ...and then on demand (Grad-CAM)


def test_cpu_without_bf16_runs_every_segment_in_fp32(exported_run, test_images, monkeypatch):
    monkeypatch.setattr(export, "cpu_supports_bf16", lambda: False)
    run = Run.load(exported_run)
    assert run.runtime["segments"] == ["fp32"] * len(run.runtime["segments"])
    reference = Run.load(exported_run, runtime="keras")
    x = np.stack([run.preprocess(load_image(p)) for p in test_images[:16]])
    # the merged segments compiled in float32 give Keras' answer (to 1e-5, as for every backbone below)
    np.testing.assert_allclose(run.predict_preprocessed(x), reference.predict_preprocessed(x), atol=1e-5)


def test_stale_export_is_not_used(exported_run, tmp_path, caplog):
    run_dir = copy_run(exported_run, tmp_path / "run")
    info_path = run_dir / EXPORT_DIR / EXPORT_INFO_FILE
    info = json.loads(info_path.read_text())
    info["model_sha256"] = "0" * 64  # as after retraining into the same folder
    info_path.write_text(json.dumps(info))
    run = Run.load(run_dir)
    assert run.runtime["backend"] == "keras" and "older than model.keras" in run.runtime["reason"]
    with pytest.raises(RunError, match="export again"):
        Run.load(run_dir, runtime="openvino")


def test_openvino_runtime_without_export_says_how_to_make_one(tiny_run):
    with pytest.raises(RunError, match="cxr-pneumonia export"):
        Run.load(tiny_run, runtime="openvino")
    assert Run.load(tiny_run).runtime["reason"] == "no export"


def test_failed_export_leaves_the_previous_one_intact(exported_run, tmp_path, monkeypatch):
    run_dir = copy_run(exported_run, tmp_path / "run")
    before = (run_dir / EXPORT_DIR / EXPORT_INFO_FILE).read_bytes()

    def fail(model, cuts, workdir):  # interrupted inside the temporary folder, half of it written
        (workdir / "segment0.onnx").write_bytes(b"half an export")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_segment_protos", fail)  # before the (slow) ONNX conversion
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir)
    assert (run_dir / EXPORT_DIR / EXPORT_INFO_FILE).read_bytes() == before
    assert not list(run_dir.glob(".export-*"))


def _cut(path: Path, kept: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * kept)])  # a copy cut short


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())  # 4 KiB of the weights overwritten: it still parses and runs
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def _unrecorded(run_dir: Path) -> None:
    """An export made before export.json recorded the ONNX file's checksum."""
    info_file = run_dir / EXPORT_DIR / EXPORT_INFO_FILE
    info = json.loads(info_file.read_text())
    del info["onnx_sha256"]
    info_file.write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("file", "damage", "why"),
    [
        (ONNX_FILE, lambda p: _cut(p, 0.5), "not the exported model (sha256"),
        (ONNX_FILE, _garble, "not the exported model (sha256"),
        (ONNX_FILE, lambda p: (_unrecorded(p.parents[1]), _cut(p, 0.5)), "unreadable ONNX model ("),
        # an empty file parses: as a model without tensors
        (ONNX_FILE, lambda p: (_unrecorded(p.parents[1]), _cut(p, 0.0)), "cannot be compiled ("),
        (EXPORT_INFO_FILE, lambda p: _cut(p, 0.5), "unreadable ("),
    ],
    ids=["onnx-cut", "onnx-garbled", "old-export-onnx-cut", "old-export-onnx-empty", "json-cut"],
)
def test_a_damaged_export_is_one_error_line_and_auto_runs_keras(
    exported_run, test_images, tmp_path, capsys, caplog, file, damage, why
):
    run_dir = copy_run(exported_run, tmp_path / "run")
    damaged = run_dir / EXPORT_DIR / file
    damage(damaged)
    message = f"{damaged}: {why}"
    with caplog.at_level(logging.WARNING, logger="cxr_pneumonia.runtime"):
        run = Run.load(run_dir)  # auto: as without an export, saying why
    assert run.runtime["backend"] == "keras" and run.runtime["reason"].startswith(message)
    assert [r.getMessage() for r in caplog.records] == [f"{run.runtime['reason']}; using Keras float32"]
    with pytest.raises(RunError, match=re.escape(message)):
        Run.load(run_dir, runtime="openvino")
    out = tmp_path / "p.csv"
    argv = ["predict", str(run_dir), str(test_images[0]), "--runtime", "openvino", "-o", str(out)]
    assert main(argv) == EXIT_USAGE and not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and errors[0].startswith(f"error: {message}") and errors[0].endswith("export again")
    )


def test_missing_calibration_images_are_named(exported_run, tmp_path):
    run_dir = copy_run(exported_run, tmp_path / "run")
    csv = run_dir / "val_predictions.csv"
    lines = csv.read_text().splitlines()
    lines[1] = "/nonexistent/x.png," + lines[1].split(",", 1)[1]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match=re.escape("/nonexistent/x.png: calibration image not found")):
        export_run(run_dir)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def cli_fp32_export(exported_run, sample_dir, tmp_path_factory):
    """One float32 export through the command line, shared by the two tests below (an export
    converts the model to ONNX again: seconds): a copy of the exported run, calibrated on a
    labelled folder (the sample's test images) holding one broken JPEG.

    Returns ``(run_dir, exit code, stdout, warnings logged by export, the broken file)``."""
    root = tmp_path_factory.mktemp("cli_fp32_export")
    run_dir = copy_run(exported_run, root / "run")
    folder = root / "calibration"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(sample_dir / "test" / label, folder / label)
    broken = folder / "NORMAL" / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    logger, handler = logging.getLogger("cxr_pneumonia.export"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["export", str(run_dir), "--precision", "fp32", "--calibration", str(folder)])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, code, out.getvalue(), handler.records, broken


def test_cli_export_fp32_and_predict_on_it(cli_fp32_export, test_images, tmp_path):
    run_dir, code, stdout, _, _ = cli_fp32_export
    assert code == EXIT_OK
    info = json.loads((run_dir / EXPORT_DIR / EXPORT_INFO_FILE).read_text())
    assert {s["precision"] for s in info["segments"]} == {"fp32"}
    assert info["checks"]["onnx_fp32_vs_keras_max_abs_diff"] < 1e-4 and info["search"] == []
    assert "segments fp32" in stdout
    out = tmp_path / "p.csv"
    code = main(["predict", str(run_dir), str(test_images[0]), "--runtime", "openvino", "-o", str(out)])
    assert code == EXIT_OK
    (row,) = list(csv.DictReader(out.open()))
    assert row["path"] == str(test_images[0]) and row["status"] == "ok"
    assert row["label"] in ("NORMAL", "PNEUMONIA") and 0 <= float(row["probability"]) <= 1


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == EXIT_USAGE
    assert main(["export", str(tmp_path), "--precision", "int3"]) == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "not a complete run directory" in lines[0]
    assert "precision: must be one of 'auto', 'fp32', 'bf16' (got 'int3')" in lines[1]


def test_evaluate_and_serve_run_on_the_export_and_say_so(exported_run, sample_dir, tmp_path):
    from fastapi.testclient import TestClient

    from cxr_pneumonia import api
    from cxr_pneumonia.serve import create_app

    run = Run.load(exported_run)
    metrics = api.evaluate(run, sample_dir / "test", tmp_path / "eval", n_bootstrap=20, heatmaps=False)
    assert metrics["runtime"]["backend"] == "openvino"
    assert "openvino" in (tmp_path / "eval" / "report.html").read_text()
    image = next(iter(list_image_files(sample_dir / "test")))
    with TestClient(create_app(run)) as client:
        assert client.get("/v1/model").json()["runtime"]["backend"] == "openvino"
        answer = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert answer.status_code == 200
    expected = run.predict_paths([image])[0].probability
    assert answer.json()["probability"] == pytest.approx(expected, abs=1e-6)


def test_neighbouring_segments_of_one_precision_compile_as_one_part():
    bounds = [("image", "a"), ("a", "b"), ("b", "c"), ("c", "d"), ("d", "probability")]
    parts = export.merge_runs(bounds, ["fp32", "bf16", "bf16", "fp32", "fp32"])
    assert parts == [("image", "a", "fp32"), ("a", "c", "bf16"), ("c", "probability", "fp32")]


def test_a_thread_count_compiles_unpinned_so_processes_spread_over_the_cores():
    # Pinned, every one-thread process (Ray actor, serve worker) sat on the first core: two of
    # them on 2 cores ran at 0.55 core each (5.0 img/s each, against 10.5 alone).
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    ((one,),) = (r.values() for r in export.compile_segments([model], [("fp32",)], threads=1))
    compiled = one.get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    ((default,),) = (r.values() for r in export.compile_segments([model], [("fp32",)]))
    assert default.infer({"x": np.array([[-1.0, 0.0, 2.0, -3.0]], np.float32)})[0].tolist() == [
        [0.0, 0.0, 2.0, 0.0]
    ]


def test_auto_prefers_keras_where_a_gpu_is_present(exported_run, monkeypatch):
    monkeypatch.setattr(runtime, "nvidia_gpu_present", lambda: True)
    assert Run.load(exported_run).runtime["reason"] == "a GPU is present"
    assert Run.load(exported_run, runtime="openvino").runtime["backend"] == "openvino"


# ResNet50V2 is the exported_run's backbone: its cuts, segments, merged graph and float32
# reassembly are checked on the tiny run's export above (to the same 1e-5), which saves one more
# ONNX conversion (the slow part: ~15 s of CPU per backbone).
@pytest.mark.parametrize("backbone", ["xception", "densenet121", "efficientnetv2b0"])
def test_every_backbone_splits_exports_and_reassembles_exactly(backbone, tmp_path):
    """Cut points, per-segment ONNX, the merged graph and its re-extraction agree with Keras."""
    from cxr_pneumonia.model import ModelConfig, build_model, get_backbone

    size = 71 if backbone == "xception" else 64  # Xception's smallest input
    model = build_model(ModelConfig(backbone=backbone, weights="none", image_size=size))
    # three segments in the backbone (each is one more ONNX conversion, the slow part)
    cuts = choose_cuts(model, get_backbone(backbone).last_conv_layer, 3)
    assert len(cuts) >= 3 and cuts[-1] == get_backbone(backbone).last_conv_layer
    merged, bounds = export.merge_segments(export._segment_protos(model, cuts, tmp_path))
    assert bounds[0] == "image" and bounds[-1] == "probability" and len(bounds) == len(cuts) + 2
    x = np.random.default_rng(0).uniform(0, 255, (3, size, size, 1)).astype(np.float32)
    parts = export.merge_runs(list(itertools.pairwise(bounds)), ["fp32"] * (len(bounds) - 1))
    reassembled = export.compile_parts(merged, parts)(x)
    np.testing.assert_allclose(reassembled, np.asarray(model(x)).reshape(-1), atol=1e-5)


def test_calibration_images_from_a_labelled_folder(tmp_path, sample_dir):
    table = export.calibration_images(tmp_path, sample_dir / "test", 10, 0)
    assert len(table) == 10 and table.attrs["source"] == str(sample_dir / "test")
    for path, label in zip(table["path"], table["label"], strict=True):
        assert Path(path).parent.name == ("PNEUMONIA" if label == 1 else "NORMAL")
    with pytest.raises(ExportError, match=r"no val_predictions\.csv"):
        export.calibration_images(tmp_path, None, 10, 0)


def test_unreadable_calibration_images_are_skipped_and_named(cli_fp32_export, sample_dir):
    run_dir, code, _, warnings, broken = cli_fp32_export  # calibrated on a folder with a broken JPEG
    assert code == EXIT_OK
    info = json.loads((run_dir / EXPORT_DIR / EXPORT_INFO_FILE).read_text())
    assert info["calibration"]["n_images"] == len(list_image_files(sample_dir / "test"))
    assert info["calibration"]["source"] == str(broken.parent.parent)
    assert any(str(broken) in record.getMessage() for record in warnings)


# ---- the input gate on the export -----------------------------------------------------------------


def test_forced_cuts_are_added_in_graph_order():
    from cxr_pneumonia.model import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="resnet50v2", weights="none", image_size=64))
    cuts = choose_cuts(model, "post_relu", 2, forced=["conv2_block1_out", "post_relu"])
    names = [layer.name for layer in model.layers]
    assert "conv2_block1_out" in cuts and cuts.count("post_relu") == 1 and cuts[-1] == "post_relu"
    assert [names.index(c) for c in cuts] == sorted(names.index(c) for c in cuts)
    assert export.gate_cut_problem(model, cuts, "post_relu") is None
    assert "not single-tensor points" in export.gate_cut_problem(model, ["conv2_block2_1_conv"], "post_relu")


def test_export_is_cut_at_the_gate_layers_and_records_them(exported_run):
    from cxr_pneumonia.gate import DomainModel

    info = json.loads((exported_run / EXPORT_DIR / EXPORT_INFO_FILE).read_text())
    layers = DomainModel.load(exported_run).layers
    assert info["gate_layers"] == layers and info["gate_note"] is None
    assert len(info["gate_tensors"]) == len(layers)
    ends = {s["last_layer"]: s["output"] for s in info["segments"]}
    assert [ends[name] for name in layers] == info["gate_tensors"]


def test_openvino_gives_the_gate_the_same_features_as_keras_in_fp32(exported_run, test_images, monkeypatch):
    monkeypatch.setattr(export, "cpu_supports_bf16", lambda: False)
    fast, reference = Run.load(exported_run), Run.load(exported_run, runtime="keras")
    assert fast.runtime["backend"] == "openvino" and fast.gate is not None
    x = np.stack([fast.preprocess(load_image(p)) for p in test_images[:16]])[..., None].astype(np.float32)
    p_fast, f_fast = fast._runtime.features(x)
    p_ref, f_ref = reference._runtime.features(x)
    np.testing.assert_array_equal(p_fast, fast.predict_preprocessed(x))  # one pass, the same answer
    np.testing.assert_allclose(p_fast, p_ref, atol=1e-4)
    for a, b in zip(f_fast, f_ref, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    s_fast, s_ref = fast.gate.score(f_fast), reference.gate.score(f_ref)
    assert np.abs(s_fast - s_ref).max() <= 1e-4 * np.abs(s_ref).max()


def test_an_export_that_predates_the_gate_is_not_used(exported_run, tmp_path):
    run_dir = copy_run(exported_run, tmp_path / "run")
    info_path = run_dir / EXPORT_DIR / EXPORT_INFO_FILE
    info = json.loads(info_path.read_text())
    for key in ("gate_layers", "gate_tensors", "gate_note"):
        info.pop(key, None)
    info_path.write_text(json.dumps(info))
    run = Run.load(run_dir)
    assert run.runtime["backend"] == "keras"
    assert run.runtime["reason"] == "export predates the gate; re-export"
    with pytest.raises(RunError, match="re-export"):
        Run.load(run_dir, runtime="openvino")
    assert run.classify_preprocessed(np.zeros((1, 64, 64), np.uint8))[0].domain_score is not None


@pytest.mark.parametrize(
    ("chosen", "seconds_fp32", "seconds_plan", "precision", "kept"),
    [
        (frozenset({1, 2}), 1.0, 0.8, "auto", True),
        (frozenset({1, 2}), 1.0, 1.2, "auto", False),  # the plan lost to float32: float32 it is
        (frozenset({1, 2}), 1.0, 1.2, "bf16", True),  # bf16 everywhere was asked for
        (frozenset(), 1.0, 1.0, "auto", True),
    ],
)
def test_a_bf16_plan_slower_than_float32_is_not_kept(chosen, seconds_fp32, seconds_plan, precision, kept):
    assert export.keep_if_faster(chosen, seconds_fp32, seconds_plan, precision) is kept
