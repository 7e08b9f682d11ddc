"""Export a run to ONNX with a plan of the precision each part tolerates under OpenVINO.

``export_run(RUN)`` writes ``RUN/export/``:

* ``model.onnx``: the whole model in float32, input ``image`` (N×S×S×1 float32, the run's
  preprocessed pixels in [0, 255]), output ``probability`` (N×1). Any ONNX runtime can use it.
* ``export.json``: the preprocessing config and threshold (so the folder is self-contained), the
  model's SHA-256 (a retrained model makes the export stale), and the precision plan with the
  checks that chose it.

bfloat16 halves the cost of a convolution on CPUs with AVX512-BF16 or AMX, but rounds every
activation to 8 mantissa bits; over a whole backbone that moved probabilities by up to 0.03
(Xception, measured). So the model is cut into consecutive segments at single-tensor points
of the graph (residual adds), and the export keeps a segment in bfloat16 only if the run's
validation images still score within ``tolerance`` of float32 (and ROC-AUC within
``auc_tolerance``). Segments are tried greedily, most time saved per unit of error first.
Where the CPU lacks bfloat16 every segment runs in float32. When the run has an input gate, the
model is also cut at the gate's layers (``gate_layers`` in export.json), so the runtime reads
their activations from the same pass (:meth:`SegmentedModel.features`). :mod:`cxr_pneumonia.runtime` loads
the export with the OpenVINO helpers defined here (the plan search runs them too).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cxr_pneumonia import __version__, rundir
from cxr_pneumonia.config import Precision, StageConfig, file_sha256, from_dict, to_dict, write_json
from cxr_pneumonia.evaluate import apply_threshold
from cxr_pneumonia.io import ImageReadError, load_image
from cxr_pneumonia.preprocess import PreprocessConfig, PreprocessError, build_pipeline
from cxr_pneumonia.rundir import EXPORT_INFO_FILE, ONNX_FILE, export_dir

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


class ExportError(RuntimeError):
    """The run cannot be exported or its export cannot be used."""


class ExportConfig(StageConfig):
    """How a run is exported; saved in ``export.json``."""

    format: Literal["onnx"] = Field("onnx", description="Export format.")
    precision: Precision = Field(
        "auto", description="auto (bf16 per segment where the check allows), fp32, or bf16 (everything)."
    )
    tolerance: float = Field(
        0.01, gt=0, lt=1, description="Largest |p_plan - p_fp32| allowed on the calibration images."
    )
    auc_tolerance: float = Field(0.002, ge=0, lt=1, description="Largest ROC-AUC change allowed.")
    segments: int = Field(
        6, ge=1, description="Backbone parts that may each run in bf16 (the head is always fp32)."
    )
    calibration_images: int = Field(
        512, ge=0, description="Validation images the plan is checked on (0: all)."
    )
    batch_size: int = Field(32, ge=1, description="Images per forward pass.")
    seed: int = Field(0, description="Seed of the calibration sample.")


# ---- graph cutting ---------------------------------------------------------------------------


def _producer(tensor: Any) -> Any:
    # _keras_history is how Keras 3 itself finds the layer that made a tensor.
    return tensor._keras_history.operation


def single_tensor_cuts(model: Any) -> list[str]:
    """Layers whose output is the only tensor flowing past them (valid segment boundaries).

    ``model.layers`` of a functional model is topologically ordered; a cut after layer i is
    valid when no output of an earlier layer is consumed after i.
    """
    layers = model.layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    last_use = list(range(len(layers)))
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "InputLayer":
            continue
        inputs = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
        for tensor in inputs:
            j = index.get(id(_producer(tensor)))
            if j is not None and j != i:
                last_use[j] = max(last_use[j], i)
    cuts, reach = [], -1  # reach: the last consumer of any output before layer i
    for i, layer in enumerate(layers[:-1]):
        if reach <= i < last_use[i] and type(layer).__name__ != "InputLayer":
            cuts.append(layer.name)
        reach = max(reach, last_use[i])
    return cuts


def _layer_cost(layer: Any) -> float:
    """Multiply-adds of a conv/dense layer, roughly: parameters × output positions."""
    if type(layer).__name__ not in _CONV_TYPES:
        return 0.0
    shape = layer.output.shape
    positions = float(np.prod([d for d in shape[1:-1] if d])) if len(shape) > 2 else 1.0
    return float(layer.count_params()) * positions


def choose_cuts(model: Any, backbone_output: str, n_segments: int, forced: Sequence[str] = ()) -> list[str]:
    """``n_segments - 1`` cuts inside the backbone at equal shares of its compute, then the
    backbone output (the head after it is one more, float32 segment); ``forced`` cuts (the
    gate's layers, single-tensor points up to the backbone output) are added."""
    names = [layer.name for layer in model.layers]
    end = names.index(backbone_output)
    candidates = [c for c in single_tensor_cuts(model) if names.index(c) < end]
    cost = np.cumsum([_layer_cost(layer) for layer in model.layers[: end + 1]])
    total = cost[-1] or 1.0
    cuts: list[str] = []
    for k in range(1, n_segments):
        target = total * k / n_segments
        best = min(candidates, key=lambda c: abs(cost[names.index(c)] - target), default=None)
        if best is not None and best not in cuts:
            cuts.append(best)
    cuts.extend(c for c in forced if c not in cuts and c != backbone_output)
    cuts.sort(key=names.index)
    return [*cuts, backbone_output]


def gate_cut_problem(model: Any, gate_layers: Sequence[str], backbone_output: str) -> str | None:
    """Why the export cannot give the gate's activations (None when it can): each gate layer
    must be a single-tensor point of the backbone, where a segment can end."""
    names = [layer.name for layer in model.layers]
    valid = set(single_tensor_cuts(model)) | {backbone_output}
    end = names.index(backbone_output)
    bad = [name for name in gate_layers if name not in valid or names.index(name) > end]
    if bad:
        return f"the gate's layers {bad} are not single-tensor points of the backbone"
    return None


# ---- ONNX -------------------------------------------------------------------------------------


def _segment_protos(model: Any, cuts: Sequence[str], workdir: Path) -> list[Any]:
    """One ONNX graph per segment, exported through Keras (tf2onnx)."""
    import keras
    import onnx

    bounds = [model.input, *(model.get_layer(c).output for c in cuts), model.output]
    protos = []
    for i in range(len(bounds) - 1):
        segment = keras.Model(bounds[i], bounds[i + 1], name=f"segment{i}")
        segment(np.zeros((1, *bounds[i].shape[1:]), np.float32))  # Keras exports called models only
        path = workdir / f"segment{i}.onnx"
        with warnings.catch_warnings():
            # tf2onnx probes np.object, which NumPy 2 warns about; nothing for users to act on.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*np.object.*")
            segment.export(str(path), format="onnx", verbose=False)
        protos.append(onnx.load(str(path)))
    return protos


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def merge_segments(protos: Sequence[Any]) -> tuple[Any, list[str]]:
    """One ONNX model chaining the segments, and the names of its boundary tensors
    (input, each cut, output), by which :func:`extract_segment` cuts it again."""
    from onnx import compose

    prefixed = [compose.add_prefix(p, f"s{i}/") for i, p in enumerate(protos)]
    merged = prefixed[0]
    for nxt in prefixed[1:]:
        merged = compose.merge_models(
            merged, nxt, io_map=[(merged.graph.output[0].name, nxt.graph.input[0].name)]
        )
    _rename_tensor(merged.graph, merged.graph.input[0].name, INPUT_NAME)
    _rename_tensor(merged.graph, merged.graph.output[0].name, OUTPUT_NAME)
    boundaries = [INPUT_NAME, *(p.graph.output[0].name for p in prefixed[:-1]), OUTPUT_NAME]
    return merged, boundaries


def merge_runs(
    boundaries: Sequence[tuple[str, str]], precisions: Sequence[str], keep: Sequence[str] = ()
) -> list[tuple[str, str, str]]:
    """Neighbouring segments of one precision as one part ``(input, output, precision)``: each
    boundary between compiled parts costs a layout conversion, so there are as few as possible.
    A boundary named in ``keep`` (the gate's tensors) always ends a part."""
    parts: list[tuple[str, str, str]] = []
    for (start, end), precision in zip(boundaries, precisions, strict=True):
        if parts and parts[-1][2] == precision and parts[-1][1] not in keep:
            parts[-1] = (parts[-1][0], end, precision)
        else:
            parts.append((start, end, precision))
    return parts


def compile_parts(
    model_proto: Any,
    parts: Sequence[tuple[str, str, str]],
    threads: int | None = None,
    taps: Sequence[str] = (),
) -> SegmentedModel:
    """One compiled model per part of ``merge_runs``; ``taps``: part outputs that
    :meth:`SegmentedModel.features` also returns (each must end a part)."""
    segment_bytes = [extract_segment(model_proto, start, end) for start, end, _ in parts]
    precisions = [precision for _, _, precision in parts]
    ends = [end for _, end, _ in parts]
    missing = [t for t in taps if t not in ends]
    if missing:
        raise ExportError(f"no compiled part ends at {missing}")
    requests = compile_segments(segment_bytes, [(p,) for p in precisions], threads)
    return SegmentedModel(requests, precisions, taps=[ends.index(t) for t in taps])


def extract_segment(model_proto: Any, start: str, end: str) -> bytes:
    import onnx.utils

    return onnx.utils.Extractor(model_proto).extract_model([start], [end]).SerializeToString()


# ---- OpenVINO runtime -------------------------------------------------------------------------


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """True when OpenVINO's CPU plugin reports native bfloat16 (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass
class SegmentedModel:
    """Consecutive OpenVINO models, each compiled in its own precision; callable on a batch."""

    requests: list[dict[str, Any]]
    precisions: list[str]
    taps: list[int] = field(default_factory=list)  # parts whose outputs features() returns
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.features(batch)[0]

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Probabilities (float32, shape N) and copies of the ``taps`` parts' outputs, in one pass."""
        with self.lock:  # an infer request is not re-entrant
            h = np.ascontiguousarray(batch, dtype=np.float32)
            tapped: dict[int, np.ndarray] = {}
            for i, (requests, precision) in enumerate(zip(self.requests, self.precisions, strict=True)):
                h = requests[precision].infer({0: h})[0]
                if i in self.taps:
                    tapped[i] = np.array(h)  # the request's buffer is reused by the next call
            return np.array(h, dtype=np.float32).reshape(-1), [tapped[i] for i in self.taps]


def compile_segments(
    segment_bytes: Sequence[bytes], precisions: Sequence[Sequence[str]], threads: int | None = None
) -> list[dict[str, Any]]:
    """For each segment, an infer request per precision in ``precisions[i]``."""
    import openvino as ov

    core = ov.Core()
    options: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        # Pinning puts the threads of every process that asks for fewer threads than the machine
        # has cores on the same first cores: two one-thread processes (Ray actors, serve workers)
        # then share one core and leave the other idle. The OS spreads unpinned threads.
        options.update(INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False)
    requests = []
    for data, wanted in zip(segment_bytes, precisions, strict=True):
        model = core.read_model(data)
        requests.append(
            {
                p: core.compile_model(
                    model, "CPU", {**options, "INFERENCE_PRECISION_HINT": _OV_PRECISION[p]}
                ).create_infer_request()
                for p in wanted
            }
        )
    return requests


# ---- checks and the plan search ---------------------------------------------------------------


def _batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    parts = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def compare_scores(reference: np.ndarray, scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Largest and mean |Δp|, ROC-AUC of each, and label agreement at ``threshold``."""
    from sklearn.metrics import roc_auc_score

    diff = np.abs(scores.astype(np.float64) - reference.astype(np.float64))
    both = labels.min() != labels.max() if len(labels) else False
    auc_ref = float(roc_auc_score(labels, reference)) if both else None
    auc = float(roc_auc_score(labels, scores)) if both else None
    return {
        "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
        "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
        "roc_auc_fp32": auc_ref,
        "roc_auc": auc,
        "roc_auc_diff": abs(auc - auc_ref) if both else None,
        "label_agreement": float(
            np.mean(apply_threshold(scores, threshold) == apply_threshold(reference, threshold))
        ),
    }


def within(check: dict, cfg: ExportConfig) -> bool:
    auc_ok = check["roc_auc_diff"] is None or check["roc_auc_diff"] <= cfg.auc_tolerance
    return check["max_abs_diff"] <= cfg.tolerance and auc_ok


def search_plan(
    n_segments: int,
    savings: Sequence[float],
    evaluate: Callable[[frozenset[int]], dict],
    accept: Callable[[dict], bool],
) -> tuple[frozenset[int], list[dict]]:
    """Greedy choice of the segments to run in bf16.

    Each segment is first checked alone; those that pass are added one at a time, most
    ``savings`` (seconds saved by bf16) per unit of error first, keeping each addition only if
    the combined plan still passes. ``evaluate(bf16_segments)`` returns a check dict with
    ``max_abs_diff``; ``accept(check)`` says whether it passes.
    """
    trials: list[dict] = []
    alone: dict[int, dict] = {}
    for i in range(n_segments):
        check = evaluate(frozenset({i}))
        alone[i] = check
        trials.append({"bf16_segments": [i], **check, "accepted": accept(check)})
    order = sorted(
        (i for i in alone if accept(alone[i]) and savings[i] > 0),
        key=lambda i: savings[i] / max(alone[i]["max_abs_diff"], 1e-6),
        reverse=True,
    )
    chosen: frozenset[int] = frozenset()
    for i in order:
        candidate = chosen | {i}
        check = alone[i] if not chosen else evaluate(candidate)
        passed = accept(check)
        if chosen:
            trials.append({"bf16_segments": sorted(candidate), **check, "accepted": passed})
        if passed:
            chosen = candidate
    return chosen, trials


def keep_if_faster(chosen: frozenset[int], seconds_fp32: float, seconds_plan: float, precision: str) -> bool:
    """Whether the bf16 segments ``chosen`` by ``precision="auto"`` stay: not when their plan timed
    slower than float32. Segments are timed one by one; together, with the conversions between
    the parts they compile into, they can lose (a MobileNetV2 student's plan did, at 0.5×)."""
    if chosen and precision == "auto" and seconds_plan > seconds_fp32:
        message = "the bf16 plan ran slower than float32 (%.2f s vs %.2f s); keeping float32"
        log.warning(message, seconds_plan, seconds_fp32)
        return False
    return True


def _time_against_fp32(
    merged: Any,
    bounds: list[tuple[str, str]],
    plan: list[str],
    keep: Sequence[str],
    x: np.ndarray,
    batch: int,
) -> tuple[float, float]:
    """Seconds over ``x`` of the float32 model and of ``plan`` (the same model when all float32)."""
    fp32_model = compile_parts(merged, merge_runs(bounds, ["fp32"] * len(bounds), keep))
    seconds_fp32 = _time_plan(fp32_model, x, batch)
    if "bf16" not in plan:
        return seconds_fp32, seconds_fp32
    return seconds_fp32, _time_plan(compile_parts(merged, merge_runs(bounds, plan, keep)), x, batch)


def _time_plan(model: SegmentedModel, x: np.ndarray, batch_size: int) -> float:
    model(x[:batch_size])  # first inference allocates
    start = time.perf_counter()
    _batched(model, x, batch_size)
    return time.perf_counter() - start


def _segment_savings(model: SegmentedModel, x: np.ndarray, batch_size: int) -> list[float]:
    """Seconds each backbone segment saves in bf16, timed on its own float32 input."""
    savings = []
    h = x[: 4 * batch_size]
    for requests in model.requests[:-1]:
        seconds = {}
        for precision in ("fp32", "bf16"):
            requests[precision].infer({0: h[:batch_size]})
            start = time.perf_counter()
            out = _batched(lambda b, r=requests[precision]: np.array(r.infer({0: b})[0]), h, batch_size)
            seconds[precision] = time.perf_counter() - start
            if precision == "fp32":
                nxt = out
        savings.append(seconds["fp32"] - seconds["bf16"])
        h = nxt
    return savings


# ---- calibration images -----------------------------------------------------------------------


def calibration_images(run_dir: Path, folder: Path | None, n: int, seed: int) -> pd.DataFrame:
    """Labelled images to check the plan on: ``folder`` (class sub-folders) or the run's own
    validation split (``val_predictions.csv``). Never use test images here."""
    if folder is not None:
        from cxr_pneumonia.data import discover

        table = discover(folder)[["path", "label"]]
        source = str(folder)
    else:
        csv = run_dir / rundir.VAL_PREDICTIONS_FILE
        if not csv.is_file():
            raise ExportError(
                f"{run_dir}: no {rundir.VAL_PREDICTIONS_FILE}; pass calibration images (class folders)"
            )
        table = pd.read_csv(csv)[["path", "label"]]
        source = "the run's validation split"
    missing = [p for p in table["path"] if not Path(p).is_file()]
    if missing:
        raise ExportError(
            f"{missing[0]}: calibration image not found ({len(missing)} of {len(table)} missing); "
            "pass a folder of validation images (class folders)"
        )
    if 0 < n < len(table):
        table = table.sample(n=n, random_state=seed)
    table = table.reset_index(drop=True)
    table.attrs["source"] = source
    return table


def _preprocessed(images: pd.DataFrame, pcfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(preprocessed batch, labels) of the calibration images; unreadable ones are skipped with a
    warning naming the file, as everywhere else."""
    pipeline = build_pipeline(pcfg)
    arrays, labels = [], []
    for path, label in zip(images["path"], images["label"], strict=True):
        try:
            arrays.append(pipeline(load_image(path), source=path))
        except (ImageReadError, PreprocessError) as e:
            log.warning("skipping calibration image %s: %s", path, e)
            continue
        labels.append(label)
    if not arrays:
        raise ExportError("no calibration image could be read")
    return np.stack(arrays)[..., None].astype(np.float32), np.asarray(labels)


# ---- export -----------------------------------------------------------------------------------


def _keras_scores(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    from cxr_pneumonia.model import inference_function

    forward = inference_function(model)
    return _batched(lambda b: np.asarray(forward(b), np.float32).reshape(-1), x, batch_size)


def export_run(
    run_dir: str | Path,
    cfg: ExportConfig | None = None,
    *,
    calibration: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``RUN/export/`` (see the module docstring) and return its ``export.json`` content.

    The folder is assembled under a temporary name and renamed into place, so an interrupted
    export never leaves a folder that looks complete.
    """
    import keras

    cfg = cfg or ExportConfig()
    run_dir = Path(run_dir)
    say = progress or (lambda message: log.info(message))
    needed = (rundir.MODEL_FILE, rundir.CONFIG_FILE)
    if rundir.missing_files(run_dir, needed):
        raise ExportError(f"{run_dir}: not a complete run directory (needs {' and '.join(needed)})")
    if not openvino_available() and cfg.precision != "fp32":
        raise ExportError("the precision check needs OpenVINO (pip install openvino); or --precision fp32")
    config = rundir.read_config(run_dir)
    threshold = rundir.read_threshold(run_dir)
    pcfg = from_dict(PreprocessConfig, config["preprocess"])
    images = calibration_images(
        run_dir, Path(calibration) if calibration else None, cfg.calibration_images, cfg.seed
    )
    say(f"preprocessing {len(images)} calibration images ({images.attrs['source']})")
    x, labels = _preprocessed(images, pcfg)

    say("exporting to ONNX")
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    model = keras.models.load_model(run_dir / rundir.MODEL_FILE, compile=False)
    reference = _keras_scores(model, x, cfg.batch_size)
    from cxr_pneumonia.model import get_backbone

    backbone_output = get_backbone(config["model"]["backbone"]).last_conv_layer
    gate_info = _gate_cuts(run_dir, model, backbone_output)
    cuts = choose_cuts(model, backbone_output, cfg.segments, forced=gate_info["gate_layers"] or ())
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=run_dir))
    try:
        merged, boundaries = merge_segments(_segment_protos(model, cuts, tmp))
        if gate_info["gate_layers"]:
            layers = gate_info["gate_layers"]
            gate_info["gate_tensors"] = [boundaries[1 + cuts.index(name)] for name in layers]
        del model
        for leftover in tmp.glob("segment*.onnx"):
            leftover.unlink()
        import onnx

        onnx.save(merged, str(tmp / ONNX_FILE))
        keep = gate_info.get("gate_tensors") or ()
        info = _plan_and_checks(merged, boundaries, cuts, x, reference, labels, threshold, cfg, say, keep)
        info.update(
            format=cfg.format,
            file=ONNX_FILE,
            # checked at load: damaged weights inside model.onnx still parse and run, wrongly
            onnx_sha256=file_sha256(tmp / ONNX_FILE),
            input=INPUT_NAME,
            output=OUTPUT_NAME,
            input_shape=[None, pcfg.size, pcfg.size, 1],
            input_values="preprocessed grayscale pixels, float32 in [0, 255]",
            model_sha256=rundir.model_sha256(run_dir),
            package_version=__version__,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            config=to_dict(cfg),
            calibration={"source": images.attrs["source"], "n_images": len(x)},
            preprocess=config["preprocess"],
            threshold=threshold,
            **gate_info,
        )
        write_json(tmp / EXPORT_INFO_FILE, info)
        tmp.chmod(0o755)  # mkdtemp makes 0700; a run is meant to be shared
        _replace_dir(tmp, export_dir(run_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _gate_cuts(run_dir: Path, model: Any, backbone_output: str) -> dict[str, Any]:
    """``gate_layers`` (the run's gate's layers, where the export is also cut; None without a
    gate or when they cannot be cut) and ``gate_note`` (why not)."""
    from cxr_pneumonia.gate import GATE_DIR, DomainModel, GateError

    if not (run_dir / GATE_DIR).is_dir():
        return {"gate_layers": None, "gate_note": "the run has no gate"}
    try:
        layers = DomainModel.load(run_dir).layers
    except GateError as e:
        return {"gate_layers": None, "gate_note": str(e)}
    missing = [name for name in layers if name not in {layer.name for layer in model.layers}]
    problem = f"the model has no layers {missing}" if missing else None
    problem = problem or gate_cut_problem(model, layers, backbone_output)
    if problem:
        log.warning("%s; the gate will run on Keras", problem)
        return {"gate_layers": None, "gate_note": problem}
    return {"gate_layers": list(layers), "gate_note": None}


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _plan_and_checks(
    merged: Any,
    boundaries: list[str],
    cuts: list[str],
    x: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    threshold: dict,
    cfg: ExportConfig,
    say: Callable[[str], None],
    keep: Sequence[str] = (),
) -> dict[str, Any]:
    n_segments = len(boundaries) - 1
    thr = float(threshold["threshold"])
    segments_info = [
        {"input": boundaries[i], "output": boundaries[i + 1], "last_layer": [*cuts, "head"][i]}
        for i in range(n_segments)
    ]
    if not openvino_available():
        return {
            "segments": [{**s, "precision": "fp32"} for s in segments_info],
            "cpu_bf16": None,
            "checks": {},
            "search": [],
        }
    cpu_bf16 = cpu_supports_bf16()
    bf16 = cpu_bf16 and cfg.precision != "fp32"
    wanted = [("fp32", "bf16") if bf16 and i < n_segments - 1 else ("fp32",) for i in range(n_segments)]
    bounds = list(itertools.pairwise(boundaries))
    segment_bytes = [extract_segment(merged, start, end) for start, end in bounds]
    segmented = SegmentedModel(compile_segments(segment_bytes, wanted), ["fp32"] * n_segments)
    fp32_scores = _batched(segmented, x, cfg.batch_size)
    parity = compare_scores(reference, fp32_scores, labels, thr)
    if parity["max_abs_diff"] > 1e-3:
        raise ExportError(f"ONNX float32 differs from Keras by {parity['max_abs_diff']:.2g}; export refused")

    def plan_for(segments: frozenset[int]) -> list[str]:
        return ["bf16" if i in segments else "fp32" for i in range(n_segments)]

    def evaluate(segments: frozenset[int]) -> dict:
        # Checked as loading will compile it: inside a merged bf16 part activations stay bf16.
        candidate = compile_parts(merged, merge_runs(bounds, plan_for(segments), keep))
        return compare_scores(fp32_scores, _batched(candidate, x, cfg.batch_size), labels, thr)

    search: list[dict] = []
    chosen: frozenset[int] = frozenset()
    if bf16 and cfg.precision == "bf16":
        chosen = frozenset(range(n_segments - 1))
    elif bf16:
        say(f"choosing bf16 segments ({n_segments - 1} candidates, {len(x)} images)")
        savings = _segment_savings(segmented, x, cfg.batch_size)
        chosen, search = search_plan(n_segments - 1, savings, evaluate, lambda c: within(c, cfg))
    del segment_bytes, segmented
    plan = plan_for(chosen)
    check = evaluate(chosen) if chosen else compare_scores(fp32_scores, fp32_scores, labels, thr)
    seconds_fp32, seconds_plan = _time_against_fp32(merged, bounds, plan, keep, x, cfg.batch_size)
    if not keep_if_faster(chosen, seconds_fp32, seconds_plan, cfg.precision):
        chosen, seconds_plan = frozenset(), seconds_fp32
        plan, check = plan_for(chosen), compare_scores(fp32_scores, fp32_scores, labels, thr)
    if chosen and not within(check, cfg):
        log.warning(
            "bf16 plan exceeds the tolerance on the calibration images: max |Δp| %.3g", check["max_abs_diff"]
        )
    return {
        "segments": [{**s, "precision": p} for s, p in zip(segments_info, plan, strict=True)],
        "cpu_bf16": cpu_bf16,
        "checks": {
            "onnx_fp32_vs_keras_max_abs_diff": parity["max_abs_diff"],
            **check,
            "within_tolerance": within(check, cfg),
            "images_per_s_fp32": round(len(x) / seconds_fp32, 1),
            "images_per_s": round(len(x) / seconds_plan, 1),
            "speedup_vs_fp32": round(seconds_fp32 / seconds_plan, 2),
        },
        "search": search,
    }
