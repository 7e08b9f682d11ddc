"""Grad-CAM heatmaps: where in the image the model found evidence for pneumonia.

:func:`grad_cam` follows the keras-io recipe (gradients of the class score with respect to the
last convolutional feature maps, averaged per channel, weighted sum, ReLU, normalised to
[0, 1]) and returns a float map the size of the input. The class score is the positive class's
*logit*, not the sigmoid output: the sigmoid's gradient vanishes when the model is confident,
which would blank the map exactly on the clearest cases.

:func:`overlay` blends a heatmap onto a grayscale image; :func:`explanation_png` composes the
preprocessed image, the overlay and a caption into one PNG. :class:`Explainer` applies a run's
preprocessing, model and threshold; :func:`explain_paths` writes ``<stem>_gradcam.png`` files
for the ``explain`` and ``predict --heatmaps`` commands and :func:`heatmap_overlay_for_path`
gives the overlays of the ``evaluate`` report. The run's input check (gate) comes first: an
image it rejects gets no heatmap (``gate=False`` draws it anyway, with the reason in the caption).

A heatmap shows what drives the model's score; it is not a lesion segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import cv2
import numpy as np

from cxr_pneumonia.config import atomic_write_bytes
from cxr_pneumonia.io import ImageReadError, load_image, load_image_and_header
from cxr_pneumonia.preprocess import PreprocessError
from cxr_pneumonia.rundir import DISCLAIMER, ascii_text

if TYPE_CHECKING:
    import keras

    from cxr_pneumonia.predict import Prediction, Run

log = logging.getLogger(__name__)

HEAD_PREFIX = "head_"  # model.build_model names every head layer head_*
OUTPUT_SUFFIX = "_gradcam.png"
CAPTION_NOTICE = ascii_text(DISCLAIMER)  # cv2.putText draws ASCII only
_MIN_PANEL_SIDE = 256  # small models (64 px) would give an unreadable PNG at native size


class ExplainError(RuntimeError):
    """Grad-CAM cannot be computed for this model or image."""


# --- Grad-CAM ------------------------------------------------------------------------------


def last_conv_layer_name(model: keras.Model) -> str:
    """The last layer with a 4-D (N, H, W, C) output that is not part of the head.

    Raises:
        ExplainError: the model has no such layer (nothing spatial to explain).
    """
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer) or layer.name.startswith(HEAD_PREFIX):
            continue
        output = getattr(layer, "output", None)
        if output is not None and not isinstance(output, list | tuple) and len(output.shape) == 4:
            return layer.name
    raise ExplainError(f"model {model.name!r} has no layer with a 4-D output to explain")


def run_layer_name(run: Run) -> str:
    """The Grad-CAM layer of a run: its backbone's registered last conv layer, else found by shape."""
    from cxr_pneumonia.model import BACKBONES

    spec = BACKBONES.get(str(run.config.get("model", {}).get("backbone")))
    if spec is not None and any(layer.name == spec.last_conv_layer for layer in run.model.layers):
        return spec.last_conv_layer
    return last_conv_layer_name(run.model)


class GradCam:
    """Grad-CAM for one model and layer, traced once and reused for every image.

    Not thread-safe (like the model it wraps): serialise calls from several threads.
    """

    def __init__(self, model: keras.Model, layer_name: str | None = None) -> None:
        import keras
        import tensorflow as tf

        self.model = model
        self.layer_name = layer_name or last_conv_layer_name(model)
        try:
            features = model.get_layer(self.layer_name).output
        except ValueError as e:
            raise ExplainError(f"model {model.name!r} has no layer {self.layer_name!r}") from e
        if len(model.inputs) != 1:
            raise ExplainError(f"model {model.name!r} has {len(model.inputs)} inputs; expected one image")
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 4 or shape[1] is None or shape[2] is None:
            raise ExplainError(f"expected a model input of (N, H, W, C) with fixed H, W; got {shape}")
        self.input_shape: tuple[int, int, int] = (int(shape[1]), int(shape[2]), int(shape[3] or 1))
        score_input, self._kernel, self._bias = _logit_parts(model)
        # A single input tensor (not a list) so calling it with one array matches its structure.
        self._grad_model = keras.Model(model.inputs[0], [features, score_input])
        spec = tf.TensorSpec((None, *self.input_shape), tf.float32)
        self._maps = tf.function(self._cam_maps, input_signature=[spec])

    def _cam_maps(self, x: Any) -> Any:
        import keras
        import tensorflow as tf

        with tf.GradientTape() as tape:
            features, score = self._grad_model(x, training=False)
            if self._kernel is not None:
                # The sigmoid Dense without its activation: the positive-class logit.
                score = keras.ops.matmul(score, self._kernel) + self._bias
            score = tf.reshape(score, (tf.shape(score)[0], -1))[:, -1]
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(features * weights, axis=-1))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The heatmap of one image (H×W or H×W×C, raw pixel values as the model takes them).

        Returns:
            float32 H×W in [0, 1]; all zeros when nothing in the layer raises the score.
        """
        x = self._as_batch(image)
        cam = np.asarray(self._maps(x)[0], dtype=np.float32)
        return _normalise_and_resize(cam, self.input_shape[:2])

    def _as_batch(self, image: np.ndarray) -> np.ndarray:
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3 or x.shape != self.input_shape:
            raise ValueError(
                f"expected an image of shape {self.input_shape[:2]} (or {self.input_shape}) for "
                f"model {self.model.name!r}; got {np.shape(image)}"
            )
        if not np.isfinite(x).all():
            raise ValueError("image contains NaN or infinite values")
        return x[None]


def _logit_parts(model: keras.Model) -> tuple[Any, Any, Any]:
    """``(score tensor, kernel, bias)``: the final sigmoid Dense's input and weights, when it is one.

    Otherwise ``(model.output, None, None)``: the output itself is the score.
    """
    import keras

    last = model.layers[-1]
    if (
        isinstance(last, keras.layers.Dense)
        and last.units == 1
        and getattr(last.activation, "__name__", None) == "sigmoid"
        and getattr(last, "use_bias", True)
    ):
        return last.input, last.kernel, last.bias
    return model.outputs[0], None, None


def _normalise_and_resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cam = np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    # Resize first, then normalise, so the map's peak is exactly 1 at the input's resolution.
    resized = np.maximum(cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR), 0.0)
    peak = float(resized.max()) if resized.size else 0.0
    # A zero (or denormal) peak means no evidence anywhere: an all-zero map, not 0/0.
    if peak <= 1e-12:
        return np.zeros(size, np.float32)
    return np.clip(resized / peak, 0.0, 1.0).astype(np.float32)


def grad_cam(model: keras.Model, image: np.ndarray, *, layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heatmap of ``image`` for ``model``'s positive class, float32 H×W in [0, 1].

    ``image`` is what the model takes (here: a preprocessed size×size image, uint8 or float raw
    pixels); ``layer_name`` defaults to :func:`last_conv_layer_name`. For many images build one
    :class:`GradCam` instead (this traces the gradient function on every call).
    """
    return GradCam(model, layer_name)(image)


# --- pictures ------------------------------------------------------------------------------


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """``heatmap`` (values in [0, 1]) coloured and blended onto grayscale ``image``: RGB uint8.

    The heatmap is resized to the image when their sizes differ.
    """
    gray = np.asarray(image)
    if gray.ndim == 3 and gray.shape[2] == 1:
        gray = gray[:, :, 0]
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W grayscale image, got {gray.dtype} {gray.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected an H×W heatmap, got shape {heat.shape}")
    if heat.shape != gray.shape:
        heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat8 = np.rint(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat8, colormap), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0.0)


def encode_png(image: np.ndarray, *, rgb: bool = True) -> bytes:
    """PNG bytes of a uint8 gray or RGB image."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if rgb and array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} image as PNG")
    return buffer.tobytes()


def _fit_text(text: str, width: int, scale: float) -> str:
    """``text`` shortened with '...' in the middle so it fits ``width`` pixels (Hershey fonts are ASCII)."""
    text = text.encode("ascii", "replace").decode("ascii")
    font = cv2.FONT_HERSHEY_SIMPLEX
    if cv2.getTextSize(text, font, scale, 1)[0][0] <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 2
        short = f"{text[: keep // 2]}...{text[len(text) - keep // 2 :]}"
        if cv2.getTextSize(short, font, scale, 1)[0][0] <= width:
            return short
    return text[:4]


def explanation_png(
    image: np.ndarray,
    heatmap: np.ndarray,
    probability: float,
    label: str,
    threshold: float,
    *,
    title: str | None = None,
    alpha: float = 0.4,
    note: str | None = None,
) -> bytes:
    """One PNG: preprocessed image | heatmap overlay, with a caption giving the probability,
    the label at ``threshold``, ``title`` (e.g. the file name), ``note`` (e.g. the input check's
    reason for an unusual image) and the research-use notice."""
    gray = np.asarray(image)
    side = max(_MIN_PANEL_SIDE, *gray.shape[:2])
    scale = side / max(gray.shape[:2])
    size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
    left = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), size, interpolation=cv2.INTER_NEAREST)
    right = cv2.resize(overlay(gray, heatmap, alpha=alpha), size, interpolation=cv2.INTER_NEAREST)
    gap = 8
    width = 2 * size[0] + 3 * gap
    lines = [
        *([title] if title else []),
        f"P(pneumonia) = {probability:.3f} -> {label} (threshold {threshold:.3f})",
        *([f"Input check: {note}"] if note else []),
        "Left: preprocessed image. Right: Grad-CAM evidence for PNEUMONIA."
        if np.any(heatmap)
        else "Grad-CAM: no region raises the PNEUMONIA score (empty heatmap).",
        CAPTION_NOTICE,
    ]
    font, font_scale, line_height = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 20
    canvas = np.full((size[1] + 2 * gap + line_height * len(lines) + gap, width, 3), 255, np.uint8)
    canvas[gap : gap + size[1], gap : gap + size[0]] = left
    canvas[gap : gap + size[1], 2 * gap + size[0] : 2 * gap + 2 * size[0]] = right
    y = size[1] + 2 * gap + 14
    for i, line in enumerate(lines):
        colour = (160, 0, 0) if i == len(lines) - 1 else (20, 20, 20)
        text = _fit_text(line, width - 2 * gap, font_scale)
        cv2.putText(canvas, text, (gap, y), font, font_scale, colour, 1, cv2.LINE_AA)
        y += line_height
    return encode_png(canvas, rgb=True)


# --- runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    """One image explained: the model input, its heatmap, and the prediction at the run's threshold."""

    source: str
    preprocessed: np.ndarray
    heatmap: np.ndarray
    probability: float
    label: str
    threshold: float
    layer_name: str
    # The input check's reason when it matters to the reader: an unusual image, or one it
    # rejected that was explained anyway (gate off).
    note: str | None = None

    def overlay(self, *, alpha: float = 0.4) -> np.ndarray:
        """The heatmap blended onto the preprocessed image, RGB uint8."""
        return overlay(self.preprocessed, self.heatmap, alpha=alpha)

    def png(self) -> bytes:
        """The captioned panel written by ``explain`` (see :func:`explanation_png`)."""
        return explanation_png(
            self.preprocessed,
            self.heatmap,
            self.probability,
            self.label,
            self.threshold,
            title=Path(self.source).name if self.source else None,
            note=self.note,
        )


class Explainer:
    """A run's preprocessing, model, threshold and Grad-CAM, built once.

    The probability comes from :meth:`Run.predict_preprocessed`, so it equals what ``predict``
    and the API report for the same image (with test-time views, their mean); the heat map is of
    the image as it is. Not thread-safe.
    """

    def __init__(self, run: Run, *, layer_name: str | None = None) -> None:
        self.run = run
        self.cam = GradCam(run.model, layer_name or run_layer_name(run))

    def explain_preprocessed(
        self, image: np.ndarray, *, source: str = "<array>", prediction: Prediction | None = None
    ) -> Explanation:
        """Explain an image already preprocessed by the run (uint8 size×size).

        ``prediction``: the run's :class:`~cxr_pneumonia.predict.Prediction` of this image when
        the caller has it (its probability is used, and the input check's reason is noted when
        the image was unusual or rejected); otherwise the probability is computed here.
        """
        from cxr_pneumonia.predict import label_for

        if prediction is None or prediction.probability is None:
            probability = float(self.run.predict_preprocessed(np.asarray(image)[None])[0])
        else:
            probability = float(prediction.probability)
        noted = prediction is not None and (prediction.unusual or prediction.status == "rejected")
        return Explanation(
            source=source,
            preprocessed=np.asarray(image),
            heatmap=self.cam(image),
            probability=probability,
            label=label_for(probability, self.run.threshold),
            threshold=self.run.threshold,
            layer_name=self.cam.layer_name,
            note=prediction.reason if noted else None,
        )

    def explain_image(self, image: np.ndarray, *, source: str = "<array>") -> Explanation:
        """Preprocess a raw uint8 grayscale image with the run's pipeline, then explain it.

        Raises:
            PreprocessError: the run's pipeline failed on the image.
        """
        return self.explain_preprocessed(self.run.preprocess(image, source=source), source=source)

    def explain_path(self, path: str | Path) -> Explanation:
        """Read, preprocess and explain one file (raises ``ImageReadError``/``PreprocessError``)."""
        return self.explain_image(load_image(path), source=str(path))


class ExplainResult(NamedTuple):
    """One input of :func:`explain_paths`: ``(path, PNG written, None)`` or ``(path, None, reason)``;
    ``rejected`` when the reason is the input check's (the image is not like the training data)."""

    path: str
    output: Path | None
    error: str | None
    rejected: bool = False


def output_names(paths: Iterable[str | Path]) -> list[str]:
    """``<stem>_gradcam.png`` per input; inputs sharing a stem get ``<stem>_1_gradcam.png``, ..."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, counter = f"{stem}{OUTPUT_SUFFIX}", 0
        while name.lower() in used:  # lower(): case-insensitive file systems would collide too
            counter += 1
            name = f"{stem}_{counter}{OUTPUT_SUFFIX}"
        used.add(name.lower())
        names.append(name)
    return names


# One entry: an Explainer holds its run, so a per-run mapping would keep every run alive.
_LAST_EXPLAINER: list[Explainer] = []


def explainer_for(run: Run) -> Explainer:
    """An :class:`Explainer` for ``run``, reused while the same run is asked for again
    (building one traces the gradient function, which would dominate per-image calls)."""
    if not _LAST_EXPLAINER or _LAST_EXPLAINER[0].run is not run:
        _LAST_EXPLAINER[:] = [Explainer(run)]
    return _LAST_EXPLAINER[0]


def explain_paths(
    run: Run,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    explainer: Explainer | None = None,
    gate: bool = True,
) -> list[ExplainResult]:
    """Write ``out_dir/<stem>_gradcam.png`` for each image; unreadable files are recorded, not fatal.

    The run's input check comes first: an image it rejects gets no heatmap and is recorded with
    the reason and ``rejected=True`` (``gate=False``: explained anyway, the reason in the caption).
    Each PNG is written atomically, so an interrupted run never leaves half a file.
    """
    paths = [str(p) for p in paths]
    out_dir = Path(out_dir)
    explainer = explainer or explainer_for(run)
    results = []
    for path, name in zip(paths, output_names(paths), strict=True):
        try:
            raw, header = load_image_and_header(path)
            image = run.preprocess(raw, source=path)
        except (ImageReadError, PreprocessError) as e:
            log.debug("no heatmap for %s: %s", path, e)  # returned to the caller, who reports it
            results.append(ExplainResult(path, None, _reason(e)))
            continue
        prediction = run.classify_preprocessed(image[None], gate=gate, sources=[path], headers=[header])[0]
        if prediction.probability is None:  # rejected by the input check
            results.append(ExplainResult(path, None, prediction.reason or "rejected", rejected=True))
            continue
        explanation = explainer.explain_preprocessed(image, source=path, prediction=prediction)
        target = out_dir / name
        atomic_write_bytes(target, explanation.png())
        log.debug("wrote %s (p=%.3f)", target, explanation.probability)
        results.append(ExplainResult(path, target, None))
    return results


def heatmap_overlay_for_path(run: Run, path: str | Path) -> np.ndarray | None:
    """The RGB uint8 Grad-CAM overlay of one file (for the HTML report); None when it is unreadable."""
    try:
        return explainer_for(run).explain_path(path).overlay()
    except (ImageReadError, PreprocessError) as e:
        log.warning("no heatmap for %s: %s", path, e)
        return None


def overlays_for_paths(run: Run, paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """``{path: RGB uint8 overlay}`` for the readable images among ``paths``."""
    overlays = {str(path): heatmap_overlay_for_path(run, path) for path in paths}
    return {path: image for path, image in overlays.items() if image is not None}


def _reason(error: Exception) -> str:
    return error.reason if isinstance(error, ImageReadError) else str(error)
