"""A trained run and predictions with it.

:class:`Run` loads a run directory once (its files: :mod:`cxr_pneumonia.rundir`; its model:
:mod:`cxr_pneumonia.runtime`, Keras or the OpenVINO export) and applies the run's preprocessing,
model and threshold; predict, evaluate, explain and serve all go through it, so they apply the
identical pipeline and runtime. When the run has an input gate (:mod:`cxr_pneumonia.gate`),
:meth:`Run.classify_preprocessed` and :meth:`Run.iter_predictions` check every image with it,
from the same forward pass that gives the probability, and withhold the answer for an image
unlike the training images (``status="rejected"``) unless asked not to (``gate=False``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxr_pneumonia import rundir
from cxr_pneumonia.augment import TEST_TIME_VIEWS, extra_views
from cxr_pneumonia.config import from_dict
from cxr_pneumonia.data import CLASS_NAMES
from cxr_pneumonia.evaluate import apply_threshold
from cxr_pneumonia.gate import DomainModel, GateDecision
from cxr_pneumonia.header import DicomHeader, age_note, rejection_reason
from cxr_pneumonia.io import ImageReadError, list_image_files, load_image_and_header
from cxr_pneumonia.preprocess import Pipeline, PreprocessConfig, PreprocessError, build_pipeline
from cxr_pneumonia.rundir import DISCLAIMER, RunError
from cxr_pneumonia.runtime import KERAS_INFO, Runtime, RuntimeKind, check_kind, load_runtime

__all__ = ["DISCLAIMER", "Prediction", "Run", "RunError", "expand_inputs", "label_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One image's prediction, or why there is none.

    ``status``: ``ok`` (classified), ``rejected`` (the gate found it unlike the training
    images, or its DICOM header declares something other than a frontal chest radiograph: no
    probability or label, unless the gate was off) or ``error`` (unreadable, ``error`` says
    why). ``domain_score``/``domain_limit``: the gate's score and acceptance limit (None without
    a gate); ``reason``: the verdict in words; ``unusual``: above the gate's unusual level, or a
    DICOM's declared age outside the training patients' (the reason says which);
    ``gated``: the input check decided what is shown (False with ``gate=False``, or for a run
    without a gate when no header ruled the image out).
    """

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    status: Literal["ok", "rejected", "error"] = "ok"
    domain_score: float | None = None
    domain_limit: float | None = None
    reason: str | None = None
    unusual: bool = False
    gated: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _population_age(config: dict[str, Any], path: Path) -> list[float] | None:
    """``config.json``'s ``data.population.age_years`` ([youngest, oldest]); None when absent."""
    data = config.get("data")
    population = data.get("population") if isinstance(data, dict) else None
    if population is None:
        return None
    ages = population.get("age_years") if isinstance(population, dict) else None
    valid = (
        isinstance(ages, list)
        and len(ages) == 2
        and all(isinstance(a, int | float) and not isinstance(a, bool) for a in ages)
        and 0 <= ages[0] <= ages[1]
    )
    if not valid:
        raise RunError(
            f"{path / rundir.CONFIG_FILE}: data.population.age_years must be [youngest, oldest] in years, "
            f"got {ages!r}"
        )
    return [float(a) for a in ages]


def _with_age_note(prediction: Prediction, note: str | None) -> Prediction:
    """``prediction`` marked unusual, ``note`` added to its reason, when it shows a probability
    and the image's declared age lies outside the training patients' (``note``)."""
    if note is None or prediction.probability is None:
        return prediction
    if prediction.status == "rejected":  # classified with the gate off: the rejection comes first
        reason = f"{prediction.reason}; {note}"
    else:
        reason = f"{note}; input check: {prediction.reason}" if prediction.reason else note
    return replace(prediction, unusual=True, reason=reason)


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
        operating_point: str = rundir.DEFAULT_OPERATING_POINT,
    ) -> None:
        self.path = Path(path)
        self.config = config
        # ``threshold`` is threshold.json (the ``default`` point) or a named point (operating_points.json).
        self.operating_point = operating_point
        self.threshold_info = threshold
        self.threshold = float(threshold["threshold"])
        self.preprocess_config = from_dict(PreprocessConfig, config["preprocess"])
        self.pipeline: Pipeline = build_pipeline(self.preprocess_config)
        self.image_size = int(config["model"]["image_size"])
        # The views the run's threshold was chosen on (train.TrainConfig.test_time_views); a run
        # from before the setting existed has none.
        self.test_time_views = str((config.get("train") or {}).get("test_time_views", "none"))
        if self.test_time_views not in TEST_TIME_VIEWS:
            raise RunError(
                f"{self.path / rundir.CONFIG_FILE}: unknown test_time_views {self.test_time_views!r}; "
                f"valid: {', '.join(TEST_TIME_VIEWS)}"
            )
        # The training patients' ages (data.training_population); None when unknown (other data,
        # or a run from before it was recorded): then no declared age marks anything.
        self.population_age = _population_age(config, self.path)
        # Without a runtime, ``model`` (or model.keras, loaded on first use) answers in float32.
        self._runtime = runtime or Runtime(self.path, dict(KERAS_INFO), keras_model=model)

    @property
    def gate(self) -> DomainModel | None:
        """The run's input gate (``RUN/gate/``), None for a run fitted before gates existed."""
        return self._runtime.gate

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        runtime: RuntimeKind = "auto",
        operating_point: str | None = None,
        threads: int | None = None,
    ) -> Run:
        """Load a complete run directory (a half-written one has no model.keras and is refused).

        ``operating_point``: the name of a point in operating_points.json (training's other rules,
        ``validation-<rule>``, or a site's from ``calibrate``) whose threshold the run applies
        (None or ``default``: the threshold chosen on validation); an unknown name is a
        :class:`RunError` listing the known ones.

        ``runtime``: ``keras`` (float32 Keras), ``openvino`` (the run's export, see
        :mod:`cxr_pneumonia.export`; an error without one) or ``auto`` (the export when it is
        there, current and OpenVINO is installed, else Keras). The Keras model itself is loaded
        only when needed (Keras runtime, Grad-CAM). ``threads``: CPU threads for the export
        (TensorFlow's are process-wide: see ``cores.limit_threads``).
        """
        path = Path(path)
        check_kind(runtime)
        rundir.check_complete(path)
        name = operating_point or rundir.DEFAULT_OPERATING_POINT
        config, threshold = rundir.read_config(path), rundir.read_operating_point(path, name)
        return cls(
            path,
            None,
            config,
            threshold,
            runtime=load_runtime(path, runtime, threads=threads),
            operating_point=name,
        )

    def with_operating_point(self, name: str | None) -> Run:
        """This run (same runtime, nothing reloaded) at the operating point ``name``."""
        name = name or rundir.DEFAULT_OPERATING_POINT
        if name == self.operating_point:
            return self
        point = rundir.read_operating_point(self.path, name)
        return Run(self.path, None, self.config, point, runtime=self._runtime, operating_point=name)

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
        """Model card: name, version, training time, configs, threshold (and the operating point
        it belongs to) and validation metrics."""
        return {
            "name": self.name,
            "version": self.config.get("package_version"),
            "trained_at": self.config.get("created_at"),
            "threshold": self.threshold_info,
            "operating_point": self.operating_point,
            "config": self.config,
            "metrics_val": self.metrics_val,
            "runtime": self.runtime,
            "test_time_views": self.test_time_views,
            "disclaimer": DISCLAIMER,
        }

    # ---- prediction ----------------------------------------------------------------------

    def preprocess(self, image: np.ndarray, *, source: str = "<array>") -> np.ndarray:
        """The run's preprocessing on one raw uint8 grayscale image."""
        return self.pipeline(image, source=source)

    def _model_input(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}×{self.image_size}, got {x.shape[1]}×{x.shape[2]}"
            )
        return x

    def _mean_over_views(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """``p`` (the runtime's probabilities for ``x`` as it is) averaged with those of the run's
        test-time views of ``x``; ``p`` itself when the run has none."""
        views = extra_views(x, self.test_time_views)
        others = [np.asarray(self._runtime(view), np.float32) for view in views]
        return np.mean([np.asarray(p, np.float32), *others], axis=0) if others else p

    def predict_preprocessed(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for preprocessed images (N×H×W uint8 or float); no gate. With test-time
        views, each is the mean over the image and its views."""
        x = self._model_input(batch)
        probabilities = []
        for start in range(0, len(x), batch_size):
            part = x[start : start + batch_size]
            probabilities.append(self._mean_over_views(part, self._runtime(part)))
        return np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)

    def predict_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for raw uint8 grayscale images (any size)."""
        if len(images) == 0:
            return np.zeros(0, np.float32)
        return self.predict_preprocessed(
            np.stack([self.preprocess(img) for img in images]), batch_size=batch_size
        )

    def classify_preprocessed(
        self,
        batch: np.ndarray,
        *,
        gate: bool = True,
        sources: Sequence[str] | None = None,
        batch_size: int = 32,
        headers: Sequence[DicomHeader | None] | None = None,
    ) -> list[Prediction]:
        """A :class:`Prediction` per preprocessed image (N×H×W), checked by the run's gate.

        ``gate=False`` classifies rejected images anyway (``gated=False``, the reason says so).
        ``sources`` name the images (default ``<image i>``). ``headers``: what each image's DICOM
        header declares (:func:`cxr_pneumonia.io.load_image_and_header`; None for PNG/JPEG): an
        image declared a lateral view, another modality or another body part is rejected
        (:func:`cxr_pneumonia.header.rejection_reason`), whatever its gate score; one whose declared
        age lies outside the training patients' is classified and marked unusual
        (:func:`cxr_pneumonia.header.age_note`).
        """
        x = self._model_input(batch)
        sources = list(sources) if sources is not None else [f"<image {i}>" for i in range(len(x))]
        headers = list(headers) if headers is not None else [None] * len(x)
        declared = [rejection_reason(h) for h in headers]
        if len(sources) != len(x) or len(declared) != len(x):
            raise ValueError(f"{len(sources)} sources and {len(declared)} headers for {len(x)} images")
        aged = [age_note(h, self.population_age) for h in headers]
        if self.gate is None:
            probabilities = self.predict_preprocessed(x, batch_size=batch_size)
            decisions: list[GateDecision | None] = [None] * len(x)
        else:
            probabilities, decisions = self._gated(x, batch_size)
        return [
            _with_age_note(self._classified(s, float(p), d, gated=gate, declared=r), a)
            for s, p, d, r, a in zip(sources, probabilities, decisions, declared, aged, strict=True)
        ]

    def _gated(self, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[GateDecision | None]]:
        """Probabilities and the gate's decisions, from one forward pass per batch."""
        probabilities, decisions = [], []
        for start in range(0, len(x), batch_size):
            part = x[start : start + batch_size]
            # The gate judges the image as it is; only the probability is averaged over views.
            p, features = self._runtime.features(part)
            probabilities.append(self._mean_over_views(part, p))
            decisions.extend(self.gate.assess(features))
        return (np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)), decisions

    def _classified(
        self, source: str, p: float, decision: GateDecision | None, *, gated: bool, declared: str | None
    ) -> Prediction:
        """The prediction the gate's ``decision`` and the header's ``declared`` reason allow; the
        header wins over the gate (it states what the gate only estimates)."""
        fields: dict[str, Any] = {"status": "ok", "gated": gated}
        if decision is not None:
            fields.update(
                status=decision.status, domain_score=decision.domain_score, domain_limit=decision.limit,
                reason=decision.reason, unusual=decision.unusual,
            )  # fmt: skip
        elif declared is None:  # a run without a gate, and nothing in the header against the image
            return Prediction(source, p, label_for(p, self.threshold), self.threshold, gated=False)
        if declared is not None:
            fields.update(status="rejected", reason=declared)
        if fields["status"] == "rejected" and gated:
            return Prediction(source, None, None, self.threshold, **fields)
        if fields["status"] == "rejected":
            fields["reason"] = f"{fields['reason']} (classified anyway: gate off)"
        return Prediction(source, p, label_for(p, self.threshold), self.threshold, **fields)

    def classify_images(
        self,
        images: Sequence[np.ndarray],
        *,
        gate: bool = True,
        sources: Sequence[str] | None = None,
        batch_size: int = 32,
        headers: Sequence[DicomHeader | None] | None = None,
    ) -> list[Prediction]:
        """:meth:`classify_preprocessed` for raw uint8 grayscale images (any size)."""
        if len(images) == 0:
            return []
        names = list(sources) if sources is not None else [f"<image {i}>" for i in range(len(images))]
        batch = np.stack([self.preprocess(img, source=n) for img, n in zip(images, names, strict=True)])
        return self.classify_preprocessed(
            batch, gate=gate, sources=names, batch_size=batch_size, headers=headers
        )

    def batch_shift(self, predictions: Iterable[Prediction]) -> dict[str, Any] | None:
        """Whether a batch's domain scores differ from validation's (:func:`gate.batch_shift`);
        None without a gate. Unreadable images do not count."""
        if self.gate is None:
            return None
        scores = [p.domain_score for p in predictions if p.status != "error" and p.domain_score is not None]
        return self.gate.batch_shift(np.asarray(scores, dtype=np.float64))

    def iter_predictions(
        self, paths: Iterable[str | Path], *, batch_size: int = 32, gate: bool = True, threads: int = 2
    ) -> Iterator[Prediction]:
        """Predict files in batches (memory stays flat); unreadable files yield an error each.
        Every image goes through the gate; ``gate=False`` classifies rejected images anyway.

        Decoding and preprocessing run in ``threads`` threads (OpenCV releases the GIL), a
        batch ahead of the model, so the model does not wait on image decoding.
        """
        pending: list[tuple[str, tuple[np.ndarray, DicomHeader | None]]] = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for path, outcome in _prefetch(pool, self._load, paths, ahead=2 * batch_size):
                if isinstance(outcome, Exception):
                    yield Prediction(
                        path, None, None, self.threshold, error=_reason(outcome), status="error", gated=False
                    )
                    continue
                pending.append((path, outcome))
                if len(pending) == batch_size:
                    yield from self._flush(pending, batch_size, gate)
                    pending = []
        if pending:
            yield from self._flush(pending, batch_size, gate)

    def _load(self, path: str | Path) -> tuple[np.ndarray, DicomHeader | None] | Exception:
        """The preprocessed image and its DICOM header, or why there is none."""
        try:
            image, header = load_image_and_header(path)
            return self.preprocess(image, source=str(path)), header
        except (ImageReadError, PreprocessError) as e:
            return e

    def _flush(
        self, pending: list[tuple[str, tuple[np.ndarray, DicomHeader | None]]], batch_size: int, gate: bool
    ) -> Iterator[Prediction]:
        yield from self.classify_preprocessed(
            np.stack([image for _, (image, _) in pending]),
            gate=gate,
            sources=[path for path, _ in pending],
            batch_size=batch_size,
            headers=[header for _, (_, header) in pending],
        )

    def predict_paths(
        self, paths: Iterable[str | Path], *, batch_size: int = 32, gate: bool = True
    ) -> list[Prediction]:
        return list(self.iter_predictions(paths, batch_size=batch_size, gate=gate))


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
