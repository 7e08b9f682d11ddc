"""The seed's preprocessing: CLAHE, largest-contour crop, refined mask, bitwise-AND, resize.

Every step is a pure function on uint8 arrays with keyword-only parameters. What must travel
together between steps (the image, its mask, the located region and the crop box) travels in
an immutable :class:`Sample`; the registry :data:`STEPS` maps each step name to a function
``(Sample, PreprocessConfig) -> Sample``. A :class:`Pipeline` built from a
:class:`PreprocessConfig` chains the enabled steps; the same pipeline object (and the same saved
config) is used by training, evaluation, prediction and serving. Batch processing and the cache
live in :mod:`cxr_pneumonia.batch`, the before/after panel in :mod:`cxr_pneumonia.preview`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from cxr_pneumonia.config import StageConfig, override

# The seed's order, after "downscale" and "denoise". "crop", "mask", "morph" and "apply_mask" all
# use the contour found by "crop"/"mask", so the region is located once per image.
DEFAULT_STEPS: tuple[str, ...] = (
    "downscale", "denoise", "clahe", "crop", "mask", "morph", "apply_mask", "resize",
)  # fmt: skip

Box = tuple[int, int, int, int]  # x, y, width, height


class PreprocessError(RuntimeError):
    """A preprocessing step failed on an image; the message names the step and the file."""


class PreprocessConfig(StageConfig):
    """Parameters of every preprocessing step and the ordered names of the enabled steps."""

    cli_fields: ClassVar[tuple[str, ...]] = ("size", "resize_mode", "mask_shape")

    steps: tuple[Literal[DEFAULT_STEPS], ...] = Field(  # type: ignore[valid-type]
        DEFAULT_STEPS, description="Enabled steps, in order."
    )
    # The shared training images are the originals stretched to 224×224 (kermany224). CLAHE's
    # tiles and the contour see texture at the image's own scale, so a full-resolution original
    # (1,000-2,600 px) came out of the same steps with a texture the model and the input gate had
    # never seen; bringing it to the training images' geometry first makes it look like them.
    working_size: int = Field(
        224,
        ge=8,
        description="Images larger than this on either side are first resized to working_size × "
        "working_size (stretched, as the training images were).",
    )
    # kermany224's files are JPEG quality 75 (their quantisation tables say so): a downscaled
    # original gets the same round trip, so its fine texture is the training images' too.
    working_jpeg_quality: int | None = Field(
        75, ge=1, le=100, description="JPEG round trip of a downscaled image (None: none)."
    )
    # Detectors differ most in fine texture (noise, edge enhancement), and CLAHE amplifies it: the
    # first default run's NORMAL median rose from 0.06 to 0.17 under sigma-6 noise (specificity
    # 0.93 -> 0.67), while a sigma-1 blur before CLAHE kept its validation AUC and specificity.
    # A light low-pass at the working size makes every detector's texture alike.
    denoise_sigma: float = Field(
        1.0, ge=0, description="Gaussian low-pass sigma in pixels at the working size (0: none)."
    )
    clahe_clip_limit: float = Field(2.0, gt=0, description="CLAHE contrast limit.")
    clahe_tile_grid: int = Field(8, ge=1, description="CLAHE tiles per side.")
    threshold_method: Literal["otsu", "mean"] = Field(
        "otsu", description="How the body is told from the background before the crop."
    )
    # A region smaller than this share of the image is noise, not a thorax: fall back.
    min_region_fraction: float = Field(
        0.15, ge=0, le=1, description="Smallest share of the image a thorax region may cover."
    )
    # "contour" is the seed's exact mask. On tightly framed images the dark lung fields join the
    # dark background, so that mask cuts the lungs out (the robustness check's crop_0.85 case);
    # "hull" fills the region's convex hull, which keeps them and still drops the corners.
    mask_shape: Literal["hull", "contour"] = Field(
        "hull", description="Preprocessing mask: the region's convex hull, or its exact contour (seed)."
    )
    morph_kernel: int = Field(5, ge=1, description="Kernel size of the mask's erosion and dilation.")
    erode_iterations: int = Field(2, ge=0, description="Erosions of the mask.")
    dilate_iterations: int = Field(2, ge=0, description="Dilations of the mask.")
    size: int = Field(224, ge=8, description="Output size in pixels.")
    resize_mode: Literal["stretch", "pad"] = Field(
        "stretch", description="Resize by stretching (seed) or by padding to a square first."
    )


# ---------------------------------------------------------------------------------------------
# Pure step functions on arrays
# ---------------------------------------------------------------------------------------------


def check_image(img: np.ndarray) -> None:
    """The pixel contract: uint8, 2-D grayscale, non-empty."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2 or img.size == 0:
        what = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img)
        raise ValueError(f"expected a non-empty uint8 H×W grayscale array, got {what}")


def downscale(img: np.ndarray, *, size: int, jpeg_quality: int | None = None) -> np.ndarray:
    """``img`` stretched to size×size (then JPEG round-tripped at ``jpeg_quality``) when it is
    larger than that on either side, else ``img`` as it is."""
    if max(img.shape) <= size:
        return img
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if jpeg_quality is None:
        return small
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def apply_clahe(img: np.ndarray, *, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(img)


def find_largest_contour(
    img: np.ndarray, *, method: str = "otsu", min_region_fraction: float = 0.15
) -> np.ndarray | None:
    """The largest connected bright region's outer contour, or None when none is big enough."""
    if int(img.max()) == int(img.min()):  # no contrast: any threshold would be arbitrary
        return None
    if method == "otsu":
        _, binary = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(img, float(img.mean()), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    if cv2.contourArea(largest) < min_region_fraction * img.size:
        return None
    return largest


def contour_box(contour: np.ndarray) -> Box:
    """Bounding box (x, y, w, h) of a contour."""
    x, y, w, h = cv2.boundingRect(contour)
    return int(x), int(y), int(w), int(h)


def contour_mask(shape: tuple[int, int], contour: np.ndarray) -> np.ndarray:
    """A filled 0/255 mask of the contour."""
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.drawContours(mask, [contour], -1, color=255, thickness=cv2.FILLED)
    return mask


def refine_mask(
    mask: np.ndarray, *, kernel_size: int, erode_iterations: int, dilate_iterations: int
) -> np.ndarray:
    """Erosion then dilation: removes thin spurs (text markers, wires) attached to the region."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    eroded = cv2.erode(mask, kernel, iterations=erode_iterations)
    return cv2.dilate(eroded, kernel, iterations=dilate_iterations)


def apply_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Bitwise-AND: keep only the pixels inside the mask."""
    return cv2.bitwise_and(img, img, mask=mask)


def crop_to_box(img: np.ndarray, box: Box) -> np.ndarray:
    """The (x, y, w, h) box of ``img``, as a new array."""
    x, y, w, h = box
    return img[y : y + h, x : x + w].copy()


def resize_image(img: np.ndarray, *, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize to size×size: stretched as the seed does, or aspect-preserving with black padding."""
    interpolation = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    if mode == "stretch":
        return cv2.resize(img, (size, size), interpolation=interpolation)
    h, w = img.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(img, (new_w, new_h), interpolation=interpolation)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


# ---------------------------------------------------------------------------------------------
# The sample: image, mask and region travelling together
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """An image and what travels with it through the steps; steps return a new Sample.

    ``contour`` is the region, located once (by the first step that needs it) on the image as it
    was then; ``located`` says whether that search has run. ``box`` is a crop still to be cut:
    :func:`crop_sample` cuts image and mask with it together, as MONAI's ``CropForegroundd``
    crops every key of a sample with one box.
    """

    image: np.ndarray
    mask: np.ndarray | None = None
    contour: np.ndarray | None = None
    located: bool = False
    box: Box | None = None

    @property
    def fallback(self) -> bool:
        """True when the region was searched and none was usable: the whole image is kept."""
        return self.located and self.contour is None


def locate_region(sample: Sample, *, method: str, min_region_fraction: float) -> Sample:
    """The sample with its region located (a no-op when already searched)."""
    if sample.located:
        return sample
    contour = find_largest_contour(sample.image, method=method, min_region_fraction=min_region_fraction)
    return replace(sample, contour=contour, located=True)


def crop_sample(sample: Sample, box: Box) -> Sample:
    """Image and mask cut with the same box; nothing is left to cut afterwards."""
    mask = None if sample.mask is None else crop_to_box(sample.mask, box)
    return replace(sample, image=crop_to_box(sample.image, box), mask=mask, box=None)


def resize_sample(sample: Sample, *, size: int, mode: str) -> Sample:
    """Image and mask resized alike, after cutting any pending crop."""
    if sample.box is not None:
        sample = crop_sample(sample, sample.box)
    mask = None if sample.mask is None else resize_image(sample.mask, size=size, mode=mode)
    return replace(sample, image=resize_image(sample.image, size=size, mode=mode), mask=mask)


# ---------------------------------------------------------------------------------------------
# The step registry: each name binds a config's parameters to the functions above
# ---------------------------------------------------------------------------------------------

Step = Callable[[Sample, PreprocessConfig], Sample]


def _located(sample: Sample, cfg: PreprocessConfig) -> Sample:
    """The region, searched by whichever of "crop" and "mask" comes first."""
    return locate_region(sample, method=cfg.threshold_method, min_region_fraction=cfg.min_region_fraction)


def _step_downscale(sample: Sample, cfg: PreprocessConfig) -> Sample:
    image = downscale(sample.image, size=cfg.working_size, jpeg_quality=cfg.working_jpeg_quality)
    return replace(sample, image=image)


def _step_denoise(sample: Sample, cfg: PreprocessConfig) -> Sample:
    if cfg.denoise_sigma <= 0:
        return sample
    return replace(sample, image=cv2.GaussianBlur(sample.image, (0, 0), sigmaX=cfg.denoise_sigma))


def _step_clahe(sample: Sample, cfg: PreprocessConfig) -> Sample:
    image = apply_clahe(sample.image, clip_limit=cfg.clahe_clip_limit, tile_grid=cfg.clahe_tile_grid)
    return replace(sample, image=image)


def _step_crop(sample: Sample, cfg: PreprocessConfig) -> Sample:
    # Only the box is recorded here; the cut comes before resizing (or at the end). Cutting now
    # would change the mask's erosion along the box edges, and the seed's outputs with it.
    sample = _located(sample, cfg)
    return sample if sample.contour is None else replace(sample, box=contour_box(sample.contour))


def _step_mask(sample: Sample, cfg: PreprocessConfig) -> Sample:
    sample = _located(sample, cfg)
    if sample.contour is None:
        return sample
    region = cv2.convexHull(sample.contour) if cfg.mask_shape == "hull" else sample.contour
    return replace(sample, mask=contour_mask(sample.image.shape, region))


def _step_morph(sample: Sample, cfg: PreprocessConfig) -> Sample:
    if sample.mask is None:
        return sample
    mask = refine_mask(
        sample.mask,
        kernel_size=cfg.morph_kernel,
        erode_iterations=cfg.erode_iterations,
        dilate_iterations=cfg.dilate_iterations,
    )
    return replace(sample, mask=mask)


def _step_apply_mask(sample: Sample, cfg: PreprocessConfig) -> Sample:
    return sample if sample.mask is None else replace(sample, image=apply_mask(sample.image, sample.mask))


def _step_resize(sample: Sample, cfg: PreprocessConfig) -> Sample:
    return resize_sample(sample, size=cfg.size, mode=cfg.resize_mode)


STEPS: dict[str, Step] = {
    "downscale": _step_downscale,
    "denoise": _step_denoise,
    "clahe": _step_clahe,
    "crop": _step_crop,
    "mask": _step_mask,
    "morph": _step_morph,
    "apply_mask": _step_apply_mask,
    "resize": _step_resize,
}
STEP_NAMES = tuple(STEPS)


def resolve_steps(names: tuple[str, ...] | list[str]) -> list[tuple[str, Step]]:
    """The registry's functions for ``names``, in order; unknown names fail listing the valid ones."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown preprocessing steps {unknown}; valid steps: {list(STEP_NAMES)}")
    return [(name, STEPS[name]) for name in names]


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessResult:
    """The final image plus what each stage produced (for previews and audits)."""

    image: np.ndarray
    stages: dict[str, np.ndarray] = field(default_factory=dict)
    mask: np.ndarray | None = None
    box: Box | None = None  # the located region's box, in the coordinates it was found in
    fallback: bool = False  # True when no usable contour was found and the whole image was kept


def _keep_stage(stages: dict[str, np.ndarray], name: str, sample: Sample) -> None:
    """What step ``name`` produced: the "mask" stage its mask, every other stage the image.

    A "mask" step that found no contour made no mask: its stage is left out (not the image in
    its place), so that a preview says "no contour" there rather than show the image as the mask.
    """
    if name != "mask":
        stages[name] = sample.image.copy()
    elif sample.mask is not None:
        stages[name] = sample.mask.copy()


class Pipeline:
    """The enabled steps of a config, applied in order to a uint8 grayscale image."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._steps = resolve_steps(cfg.steps)

    def __repr__(self) -> str:
        return f"Pipeline(steps={list(self.cfg.steps)}, size={self.cfg.size})"

    def run(self, img: np.ndarray, *, source: str = "<array>", keep_stages: bool = False) -> PreprocessResult:
        """Apply every step; the input is never modified."""
        check_image(img)
        sample = Sample(image=img)
        stages: dict[str, np.ndarray] = {"original": img} if keep_stages else {}
        for name, step in self._steps:
            try:
                sample = step(sample, self.cfg)
            except Exception as e:
                raise PreprocessError(f"{name} failed on {source}: {e}") from e
            if keep_stages:
                _keep_stage(stages, name, sample)
        if sample.box is not None:  # "crop" enabled without "resize": cut at the end
            sample = crop_sample(sample, sample.box)
        # Steps never write into arrays, so with no step changing it the output is the input: copy it.
        image = sample.image.copy() if sample.image is img else sample.image
        return PreprocessResult(
            image=np.ascontiguousarray(image),
            stages=stages,
            mask=sample.mask,
            box=None if sample.contour is None else contour_box(sample.contour),
            fallback=sample.fallback,
        )

    def __call__(self, img: np.ndarray, *, source: str = "<array>") -> np.ndarray:
        """The final image only."""
        return self.run(img, source=source).image


def build_pipeline(cfg: PreprocessConfig | None = None) -> Pipeline:
    """The pipeline for ``cfg`` (the seed's defaults when None); unknown step names fail."""
    return Pipeline(cfg or PreprocessConfig())


def disable_steps(cfg: PreprocessConfig, *names: str) -> PreprocessConfig:
    """A copy of ``cfg`` without the named steps (validated)."""
    resolve_steps(names)
    return override(cfg, steps=tuple(s for s in cfg.steps if s not in names))
