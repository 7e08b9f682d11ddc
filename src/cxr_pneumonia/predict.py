"""A trained run and predictions with it.

:class:`Run` loads a run directory once (its files: :mod:`cxr_pneumonia.rundir`; its model:
:mod:`cxr_pneumonia.runtime`, Keras or the OpenVINO export) and applies the run's preprocessing,
model and threshold; predict, evaluate, explain and serve all go through it, so they apply the
identical pipeline and runtime.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pneumonia import rundir
from cxr_pneumonia.config import from_dict
from cxr_pneumonia.data import CLASS_NAMES
from cxr_pneumonia.evaluate import apply_threshold
from cxr_pneumonia.io import ImageReadError, list_image_files, load_image
from cxr_pneumonia.preprocess import Pipeline, PreprocessConfig, PreprocessError, build_pipeline
from cxr_pneumonia.rundir import DISCLAIMER, RunError
from cxr_pneumonia.runtime import KERAS_INFO, Runtime, RuntimeKind, check_kind, load_runtime

__all__ = ["DISCLAIMER", "Prediction", "Run", "RunError", "expand_inputs", "label_for"]

log = logging.getLogger(__name__)


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
    """The class name under :func:`~cxr_pneumonia.evaluate.apply_threshold` (the rule the
    threshold was chosen with: PNEUMONIA when probability >= threshold)."""
    return CLASS_NAMES[int(apply_threshold(probability, threshold))]


class Run:
    """A loaded run: runtime (model), preprocessing pipeline and operating threshold."""

    def __init__(
        self,
        path: Path,
        model: Any,
        config: dict[str, Any],
        threshold: dict[str, Any],
        *,
        runtime: Runtime | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.threshold_info = threshold
        self.threshold = float(threshold["threshold"])
        self.preprocess_config = from_dict(PreprocessConfig, config["preprocess"])
        self.pipeline: Pipeline = build_pipeline(self.preprocess_config)
        self.image_size = int(config["model"]["image_size"])
        # Without a runtime, ``model`` (or model.keras, loaded on first use) answers in float32.
        self._runtime = runtime or Runtime(self.path, dict(KERAS_INFO), keras_model=model)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, runtime: RuntimeKind = "auto") -> Run:
        """Load a complete run directory (a half-written one has no model.keras and is refused).

        ``runtime``: ``keras`` (float32 Keras), ``openvino`` (the run's export, see
        :mod:`cxr_pneumonia.export`; an error without one) or ``auto`` (the export when it is
        there, current and OpenVINO is installed, else Keras). The Keras model itself is loaded
        only when needed (Keras runtime, Grad-CAM).
        """
        path = Path(path)
        check_kind(runtime)
        rundir.check_complete(path)
        config, threshold = rundir.read_config(path), rundir.read_threshold(path)
        return cls(path, None, config, threshold, runtime=load_runtime(path, runtime))

    @property
    def model(self) -> Any:
        """The Keras model (loaded on first use when the run runs on its export)."""
        return self._runtime.keras_model

    @property
    def runtime(self) -> dict[str, Any]:
        """Which backend and precision answer (``runtime.Runtime.info``)."""
        return self._runtime.info

    # ---- information ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        backbone = self.config["model"].get("backbone", "model")
        return self.path.name if backbone in self.path.name else f"{backbone}-{self.path.name}"

    @property
    def metrics_val(self) -> dict[str, Any] | None:
        return rundir.read_metrics_val(self.path)

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
        probabilities = [
            self._runtime(x[start : start + batch_size]) for start in range(0, len(x), batch_size)
        ]
        return np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)

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
