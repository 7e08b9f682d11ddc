"""A trained run and predictions with it.

A run directory holds everything needed to apply the model exactly as it was validated:
``model.keras``, ``config.json`` (preprocessing, model and training configs, package version,
data fingerprint), ``threshold.json`` (the operating point chosen on validation) and
``metrics_val.json``, and after ``cxr-pneumonia export`` an ``export/`` folder (ONNX model and
precision plan, see :mod:`cxr_pneumonia.export`). :class:`Run` loads it once; predict, evaluate,
explain and serve all go through it, so they apply the identical pipeline and runtime.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pneumonia import __version__
from cxr_pneumonia.config import from_dict, read_json, to_dict, write_json
from cxr_pneumonia.data import CLASS_NAMES
from cxr_pneumonia.io import ImageReadError, list_image_files, load_image
from cxr_pneumonia.preprocess import Pipeline, PreprocessConfig, PreprocessError, build_pipeline

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
THRESHOLD_FILE = "threshold.json"
METRICS_VAL_FILE = "metrics_val.json"
RUNTIMES = ("auto", "keras", "openvino")
DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."


class RunError(RuntimeError):
    """A run directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Prediction:
    """One image's prediction, or the reason it could not be predicted."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "probability": self.probability,
            "label": self.label,
            "threshold": self.threshold,
            "error": self.error,
        }


def label_for(probability: float, threshold: float) -> str:
    """PNEUMONIA when probability >= threshold (the rule the threshold was chosen with)."""
    return CLASS_NAMES[1] if probability >= threshold else CLASS_NAMES[0]


class Run:
    """A loaded run: model, preprocessing pipeline and operating threshold."""

    def __init__(
        self,
        path: Path,
        model: Any,
        config: dict[str, Any],
        threshold: dict[str, Any],
        *,
        fast_model: Any = None,
        runtime: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self._model = model
        self.config = config
        self.threshold_info = threshold
        self.threshold = float(threshold["threshold"])
        self.preprocess_config = from_dict(PreprocessConfig, config["preprocess"])
        self.pipeline: Pipeline = build_pipeline(self.preprocess_config)
        self.image_size = int(config["model"]["image_size"])
        self._forward_fn: Any = fast_model
        self.runtime: dict[str, Any] = runtime or {"backend": "keras", "precision": "fp32"}

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, runtime: str = "auto") -> Run:
        """Load a complete run directory (a half-written one has no model.keras and is refused).

        ``runtime``: ``keras`` (float32 Keras), ``openvino`` (the run's export, see
        :mod:`cxr_pneumonia.export`; an error without one) or ``auto`` (the export when it is
        there, current and OpenVINO is installed, else Keras). The Keras model itself is loaded
        only when needed (Keras runtime, Grad-CAM).
        """
        path = Path(path)
        if runtime not in RUNTIMES:
            raise RunError(f"unknown runtime {runtime!r}; valid: {list(RUNTIMES)}")
        missing = [f for f in (MODEL_FILE, CONFIG_FILE, THRESHOLD_FILE) if not (path / f).is_file()]
        if missing:
            raise RunError(f"{path}: not a complete run directory (missing {', '.join(missing)})")
        config = read_json(path / CONFIG_FILE)
        threshold = read_json(path / THRESHOLD_FILE)
        fast_model, info = _load_runtime(path, runtime)
        run = cls(path, None, config, threshold, fast_model=fast_model, runtime=info)
        if fast_model is None:
            run.model  # noqa: B018 - load now, so that a broken model.keras fails at load time
        return run

    @property
    def model(self) -> Any:
        """The Keras model (loaded on first use when the run runs on its export)."""
        if self._model is None:
            import keras

            self._model = keras.models.load_model(self.path / MODEL_FILE, compile=False)
        return self._model

    @staticmethod
    def write_metadata(
        path: Path,
        *,
        preprocess_cfg: PreprocessConfig,
        model_cfg: Any,
        threshold: dict[str, Any],
        train_cfg: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write config.json and threshold.json for a model saved at ``path / model.keras``."""
        config = {
            "package_version": __version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "preprocess": to_dict(preprocess_cfg),
            "model": to_dict(model_cfg),
            "train": to_dict(train_cfg) if train_cfg is not None else None,
            "class_names": list(CLASS_NAMES),
            **(extra or {}),
        }
        write_json(path / CONFIG_FILE, config)
        write_json(path / THRESHOLD_FILE, threshold)

    # ---- information ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        backbone = self.config["model"].get("backbone", "model")
        return self.path.name if backbone in self.path.name else f"{backbone}-{self.path.name}"

    @property
    def metrics_val(self) -> dict[str, Any] | None:
        path = self.path / METRICS_VAL_FILE
        return read_json(path) if path.is_file() else None

    def info(self) -> dict[str, Any]:
        """Model card: name, version, training time, configs, threshold and validation metrics."""
        return {
            "name": self.name,
            "version": self.config.get("package_version"),
            "trained_at": self.config.get("created_at"),
            "threshold": self.threshold_info,
            "config": self.config,
            "metrics_val": self.metrics_val,
            "runtime": self.runtime,
            "disclaimer": DISCLAIMER,
        }

    # ---- prediction ----------------------------------------------------------------------

    def preprocess(self, image: np.ndarray, *, source: str = "<array>") -> np.ndarray:
        """The run's preprocessing on one raw uint8 grayscale image."""
        return self.pipeline(image, source=source)

    def predict_preprocessed(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for preprocessed images (N×H×W uint8 or float)."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}×{self.image_size}, got {x.shape[1]}×{x.shape[2]}"
            )
        forward = self._forward()
        probabilities = [
            np.asarray(forward(x[start : start + batch_size]), dtype=np.float32).reshape(-1)
            for start in range(0, len(x), batch_size)
        ]
        return np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)

    def _forward(self) -> Any:
        if self._forward_fn is None:
            from cxr_pneumonia.model import inference_function

            self._forward_fn = inference_function(self.model)
        return self._forward_fn

    def predict_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for raw uint8 grayscale images (any size)."""
        if len(images) == 0:
            return np.zeros(0, np.float32)
        return self.predict_preprocessed(
            np.stack([self.preprocess(img) for img in images]), batch_size=batch_size
        )

    def iter_predictions(
        self, paths: Iterable[str | Path], *, batch_size: int = 32, threads: int = 2
    ) -> Iterator[Prediction]:
        """Predict files in batches (memory stays flat); unreadable files yield an error each.

        Decoding and preprocessing run in ``threads`` threads (OpenCV releases the GIL), a
        batch ahead of the model, so the model does not wait on image decoding.
        """
        pending: list[tuple[str, np.ndarray]] = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for path, outcome in _prefetch(pool, self._load, paths, ahead=2 * batch_size):
                if isinstance(outcome, Exception):
                    yield Prediction(path, None, None, self.threshold, error=_reason(outcome))
                    continue
                pending.append((path, outcome))
                if len(pending) == batch_size:
                    yield from self._flush(pending, batch_size)
                    pending = []
        if pending:
            yield from self._flush(pending, batch_size)

    def _load(self, path: str | Path) -> np.ndarray | Exception:
        try:
            return self.preprocess(load_image(path), source=str(path))
        except (ImageReadError, PreprocessError) as e:
            return e

    def _flush(self, pending: list[tuple[str, np.ndarray]], batch_size: int) -> Iterator[Prediction]:
        probabilities = self.predict_preprocessed(
            np.stack([img for _, img in pending]), batch_size=batch_size
        )
        for (path, _), probability in zip(pending, probabilities, strict=True):
            p = float(probability)
            yield Prediction(path, p, label_for(p, self.threshold), self.threshold)

    def predict_paths(self, paths: Iterable[str | Path], *, batch_size: int = 32) -> list[Prediction]:
        return list(self.iter_predictions(paths, batch_size=batch_size))


def _load_runtime(path: Path, runtime: str) -> tuple[Any, dict[str, Any]]:
    """(fast model or None, description of the runtime in use)."""
    from cxr_pneumonia.export import ExportError, load_export, read_export_info

    if runtime == "keras":
        return None, {"backend": "keras", "precision": "fp32", "reason": "asked for"}
    if runtime == "auto" and read_export_info(path) is None:
        return None, {"backend": "keras", "precision": "fp32", "reason": "no export"}
    if runtime == "auto" and _nvidia_gpu_present():
        # The export runs on the CPU; TensorFlow on a GPU is faster and exact.
        return None, {"backend": "keras", "precision": "fp32", "reason": "a GPU is present"}
    try:
        loaded = load_export(path)
    except (ExportError, ImportError, RuntimeError) as e:
        if runtime == "openvino":
            raise RunError(str(e)) from e
        log.warning("%s; using Keras float32", e)
        return None, {"backend": "keras", "precision": "fp32", "reason": str(e)}
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
    return loaded.model, info


def _nvidia_gpu_present() -> bool:
    """Cheap check (no TensorFlow import): the NVIDIA driver lists a GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _prefetch(
    pool: ThreadPoolExecutor, load: Any, paths: Iterable[str | Path], *, ahead: int
) -> Iterator[tuple[str, Any]]:
    """(path, load(path)) in input order, keeping up to ``ahead`` loads in flight."""
    queue: deque[tuple[str, Future]] = deque()
    for path in paths:
        queue.append((str(path), pool.submit(load, path)))
        if len(queue) > ahead:
            name, future = queue.popleft()
            yield name, future.result()
    while queue:
        name, future = queue.popleft()
        yield name, future.result()


def _reason(error: Exception) -> str:
    return error.reason if isinstance(error, ImageReadError) else str(error)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); missing paths kept (they fail later)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        files.extend(list_image_files(item) if item.is_dir() else [item])
    return files
