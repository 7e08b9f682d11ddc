"""A run's forward pass behind one call: Keras float32, or its OpenVINO export.

``load_runtime(run_dir, "auto" | "keras" | "openvino")`` returns a :class:`Runtime`:
``runtime(batch)`` maps float32 N×H×W×1 preprocessed pixels to N probabilities, and
``runtime.info`` says which backend and precision answer (shown in the model card and reports).
When the run has an input gate (``RUN/gate/``, :mod:`cxr_pneumonia.gate`), ``runtime.features(batch)``
gives the probabilities and the gate's features from the same single forward pass.
``auto`` takes the run's export when it is there, current and OpenVINO is installed, except on a
machine with an NVIDIA GPU, where TensorFlow is faster and exact. The OpenVINO pieces that the
export's plan search also runs (:class:`~cxr_pneumonia.export.SegmentedModel`,
:func:`~cxr_pneumonia.export.compile_parts`) live in :mod:`cxr_pneumonia.export`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxr_pneumonia import rundir
from cxr_pneumonia.config import file_sha256, one_line
from cxr_pneumonia.gate import GATE_DIR, DomainModel, GateError, pool_activations, pooled_features, run_gated
from cxr_pneumonia.rundir import RunError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "openvino")
RuntimeKind = Literal["auto", "keras", "openvino"]
KERAS_INFO = {"backend": "keras", "precision": "fp32"}
NO_GATE_WARNING = "this run has no domain model; fit one with `cxr-pneumonia gate RUN`"


class Runtime:
    """A run's model as one callable; the Keras model is loaded only when something needs it."""

    def __init__(
        self,
        path: Path,
        info: dict[str, Any],
        *,
        export_model: Any = None,
        keras_model: Any = None,
        gate: DomainModel | None = None,
    ) -> None:
        self.path = Path(path)
        self.info = info
        self.gate = gate
        self._export_model = export_model
        self._keras_model = keras_model
        self._forward: Any = export_model
        self._gated: Any = None

    @property
    def keras_model(self) -> Any:
        """The Keras model (Grad-CAM needs it even when the export answers)."""
        if self._keras_model is None:
            import keras

            self._keras_model = keras.models.load_model(self.path / rundir.MODEL_FILE, compile=False)
        return self._keras_model

    @property
    def keras_loaded(self) -> bool:
        return self._keras_model is not None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (float32, shape N) for a float32 N×H×W×1 batch."""
        if self._forward is None:
            from cxr_pneumonia.model import inference_function

            self._forward = inference_function(self.keras_model)
        return np.asarray(self._forward(batch), dtype=np.float32).reshape(-1)

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(probabilities, the gate's per-depth float64 feature matrices) of a float32 N×H×W×1
        batch, in one forward pass; the probabilities equal ``self(batch)``'s."""
        if self.gate is None:
            raise GateError(f"{self.path}: {NO_GATE_WARNING}")
        cfg, n_layers = self.gate.cfg, len(self.gate.layers)
        if self._export_model is not None:
            probabilities, activations = self._export_model.features(batch)
            return probabilities, pooled_features(pool_activations(activations, batch, cfg), cfg, n_layers)
        if self._gated is None:
            self._gated = self.gate.gated_model(self.keras_model)
        return run_gated(self._gated, batch, cfg, n_layers)


def load_runtime(path: str | Path, kind: RuntimeKind = "auto", *, threads: int | None = None) -> Runtime:
    """The runtime ``kind`` for the run at ``path`` (see the module docstring); ``threads``: CPU
    threads for a compiled export (None: OpenVINO's default, every core).

    Raises:
        RunError: unknown ``kind``, or ``openvino`` asked for and the export is missing, stale or
            cannot be compiled.
    """
    path = Path(path)
    check_kind(kind)
    gate = load_gate(path)
    export_model, info = _choose(path, kind, gate, threads)
    runtime = Runtime(path, info, export_model=export_model, gate=gate)
    if export_model is None:
        runtime.keras_model  # noqa: B018 - load now, so that a broken model.keras fails at load time
    return runtime


def check_kind(kind: str) -> None:
    if kind not in RUNTIMES:
        raise RunError(f"unknown runtime {kind!r}; valid: {list(RUNTIMES)}")


def load_gate(path: Path) -> DomainModel | None:
    """The run's gate, or None (with a warning) when it has none.

    Raises:
        RunError: the gate folder is there but unreadable.
    """
    if not (Path(path) / GATE_DIR).is_dir():
        log.warning("%s: %s", path, NO_GATE_WARNING)
        return None
    try:
        return DomainModel.load(path)
    except GateError as e:
        raise RunError(str(e)) from e


def _choose(
    path: Path, kind: str, gate: DomainModel | None = None, threads: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """(compiled export or None for Keras, description of the runtime in use)."""
    from cxr_pneumonia.export import ExportError

    if kind == "keras":
        return None, {**KERAS_INFO, "reason": "asked for"}
    try:
        info = read_export(path)
    except ExportError as e:  # a damaged export.json: as a missing export, with the reason said
        return _without_export(kind, e)
    if kind == "auto" and info is None:
        return None, {**KERAS_INFO, "reason": "no export"}
    if kind == "auto" and nvidia_gpu_present():
        # The export runs on the CPU; TensorFlow on a GPU is faster and exact.
        return None, {**KERAS_INFO, "reason": "a GPU is present"}
    problem = _gate_problem(info, gate)
    if problem and kind == "openvino":
        raise RunError(f"{path}: {problem}")
    if problem:
        log.warning("%s: %s; using Keras float32", path, problem)
        return None, {**KERAS_INFO, "reason": problem}
    try:
        gate_tensors = list((info or {}).get("gate_tensors") or ()) if gate else []
        loaded = load_export(path, threads=threads, gate_tensors=gate_tensors)
    except (ExportError, ImportError, RuntimeError) as e:
        return _without_export(kind, e)
    return loaded.model, _export_info(loaded)


def _without_export(kind: str, e: Exception) -> tuple[None, dict[str, Any]]:
    """Keras in place of an export that cannot be used (``auto``); ``openvino`` asked for it: RunError."""
    if kind == "openvino":
        raise RunError(str(e)) from e
    log.warning("%s; using Keras float32", e)
    return None, {**KERAS_INFO, "reason": str(e)}


def read_export(path: str | Path) -> dict[str, Any] | None:
    """The run's ``export/export.json``, or None when it has no complete export.

    Raises:
        ExportError: export.json is there but unreadable (cut short, hand-edited): the one-line
            error naming it, which ``auto`` answers with Keras as it does a missing export.
    """
    from cxr_pneumonia.export import ExportError

    file = rundir.export_dir(path) / rundir.EXPORT_INFO_FILE
    try:
        info = rundir.read_export_info(path)
    except (OSError, ValueError) as e:  # json's errors (and UnicodeDecodeError) are ValueErrors
        raise ExportError(f"{file}: unreadable ({one_line(e)}); export again") from e
    if info is not None and not isinstance(info, dict):
        raise ExportError(f"{file}: not a JSON object; export again")
    return info


def _export_info(loaded: LoadedExport) -> dict[str, Any]:
    checks = loaded.info.get("checks", {})
    n_bf16 = loaded.precisions.count("bf16")
    info = {
        "backend": "openvino",
        "precision": "fp32" if not n_bf16 else f"bf16 in {n_bf16} of {len(loaded.precisions)} segments",
        "segments": loaded.precisions,
        "checked_max_abs_diff": checks.get("max_abs_diff") if n_bf16 else 0.0,
        "checked_on": loaded.info.get("calibration"),
    }
    if loaded.note:
        info["reason"] = loaded.note
    return info


def _gate_problem(info: dict[str, Any] | None, gate: DomainModel | None) -> str | None:
    """Why the export cannot give this gate's features (None when it can, or there is no gate)."""
    if gate is None or info is None:
        return None
    if "gate_layers" not in info:
        return "export predates the gate; re-export"
    if info["gate_layers"] is None:
        return f"the export has no gate activations ({info.get('gate_note')}); re-export"
    if not isinstance(info["gate_layers"], list) or info["gate_layers"] != list(gate.layers):
        return "the export was cut for another gate's layers; re-export"
    return None


def nvidia_gpu_present() -> bool:
    """Cheap check (no TensorFlow import): the NVIDIA driver lists a GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


# ---- the OpenVINO export ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedExport:
    model: Any  # export.SegmentedModel
    info: dict[str, Any]
    precisions: list[str]
    note: str


def load_export(
    run_dir: str | Path, *, threads: int | None = None, gate_tensors: Sequence[str] = ()
) -> LoadedExport:
    """Compile a run's export with OpenVINO in its precision plan (float32 where the CPU
    lacks bfloat16); parts end at ``gate_tensors``, whose activations ``model.features`` returns.

    Raises:
        ExportError: no export, OpenVINO missing, the export is older than model.keras, or its
            export.json or model.onnx is damaged (one line naming the file).
    """
    from cxr_pneumonia import export

    info = read_export(run_dir)
    if info is None:
        raise export.ExportError(f"{run_dir}: no export; run `cxr-pneumonia export {run_dir}` first")
    if not export.openvino_available():
        raise export.ExportError("OpenVINO is not installed (pip install openvino)")
    if rundir.export_is_stale(run_dir, info):
        raise export.ExportError(f"{run_dir}: the export is older than {rundir.MODEL_FILE}; export again")
    try:
        precisions = [str(s["precision"]) for s in info["segments"]]
        bounds = [(str(s["input"]), str(s["output"])) for s in info["segments"]]
    except (KeyError, TypeError) as e:  # a hand-edited export.json
        file = rundir.export_dir(run_dir) / rundir.EXPORT_INFO_FILE
        raise export.ExportError(f"{file}: no readable segments ({e!r}); export again") from e
    note = ""
    if "bf16" in precisions and not export.cpu_supports_bf16():
        precisions = ["fp32"] * len(precisions)
        note = "this CPU lacks bfloat16; running every segment in float32"
        log.info(note)
    _check_onnx_checksum(run_dir, info.get("onnx_sha256"))
    model = _compile(run_dir, export.merge_runs(bounds, precisions, gate_tensors), threads, gate_tensors)
    return LoadedExport(model, info, precisions, note)


def _check_onnx_checksum(run_dir: str | Path, expected: Any) -> None:
    """Refuse a model.onnx whose bytes are not the ones exported (export.json's ``onnx_sha256``;
    exports made before it was recorded are not checked): overwritten weights still parse and
    run, and would give other probabilities without an error."""
    from cxr_pneumonia import export

    if expected is None:
        return
    file = rundir.export_dir(run_dir) / rundir.ONNX_FILE
    try:
        actual = file_sha256(file)
    except OSError as e:
        raise export.ExportError(f"{file}: unreadable ({one_line(e)}); export again") from e
    if actual != expected:
        raise export.ExportError(
            f"{file}: not the exported model (sha256 {actual[:16]}…, export.json says "
            f"{str(expected)[:16]}…); export again"
        )


def _compile(
    run_dir: str | Path, parts: list[tuple[str, str, str]], threads: int | None, taps: Sequence[str]
) -> Any:
    """The export's ONNX model compiled in ``parts`` (:func:`cxr_pneumonia.export.compile_parts`).

    Raises:
        ExportError: model.onnx unreadable (cut short, overwritten) or not compilable: one line naming it.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.checker import ValidationError

    from cxr_pneumonia import export

    file = rundir.export_dir(run_dir) / rundir.ONNX_FILE
    try:
        proto = onnx.load(str(file))
    except (DecodeError, OSError, ValueError) as e:
        raise export.ExportError(f"{file}: unreadable ONNX model ({one_line(e)}); export again") from e
    try:
        return export.compile_parts(proto, parts, threads, taps=taps)
    except export.ExportError:
        raise
    # A file that parses yet lacks the segments' tensors (an empty one parses as an empty model)
    # fails in onnx's extractor; one OpenVINO refuses, with a RuntimeError of many lines.
    except (ValueError, KeyError, IndexError, TypeError, ValidationError, RuntimeError) as e:
        raise export.ExportError(f"{file}: cannot be compiled ({one_line(e)}); export again") from e
