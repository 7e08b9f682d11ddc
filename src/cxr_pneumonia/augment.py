"""Intensity and geometry perturbations: training augmentation and robustness checks.

Pure functions on uint8 grayscale images; randomness only through an explicit
``np.random.Generator``. No horizontal flips: the heart's side is anatomy, not noise.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from pydantic import Field

from cxr_pneumonia.config import StageConfig


class AugmentConfig(StageConfig):
    """Ranges of the random perturbations (0 switches one off)."""

    contrast: float = Field(0.4, ge=0, lt=1, description="Multiply by U[1-c, 1+c] around the mean.")
    brightness: float = Field(0.1, ge=0, le=1, description="Add U[-b, b] × 255.")
    gamma: float = Field(0.3, ge=0, description="Gamma = exp(U[-g, g]).")
    # zoom U[1-s, 1+s]: framing differs between sites, and a tighter field of view must not
    # read as disease (the robustness check's crop_0.85 showed exactly that at 0.1)
    scale: float = Field(0.15, ge=0, lt=1, description="Zoom by U[1-s, 1+s].")
    rotate_degrees: float = Field(7.0, ge=0, le=180, description="Rotate by U[-d, d] degrees.")
    translate: float = Field(0.08, ge=0, lt=1, description="Shift by U[-t, t] of the side.")
    blur_probability: float = Field(0.3, ge=0, le=1, description="Share of views blurred.")
    blur_sigma: float = Field(1.6, ge=0, description="Largest Gaussian blur sigma, in pixels.")
    jpeg_probability: float = Field(0.3, ge=0, le=1, description="Share of views JPEG-compressed.")
    jpeg_quality_min: int = Field(40, ge=1, le=95, description="Lowest JPEG quality.")
    # Before preprocessing (where a different scanner or export differs): keep a random window
    # of U[1-c, 1] of each side. Intensity changes are applied there too.
    raw_crop: float = Field(
        0.2, ge=0, lt=1, description="Keep a random U[1-c, 1] window of each side of the raw image."
    )
    # Detectors and export chains differ in resolution, edge enhancement and noise; the default
    # model's score for one image moved by up to 0.2 between two resamplings of the same original
    # (kermany224 copy vs our downscale), so the views must vary exactly those.
    resample_probability: float = Field(
        0.3, ge=0, le=1, description="Share of raw views resampled through a lower resolution."
    )
    resample_min: float = Field(
        0.4, gt=0, le=1, description="Smallest side factor of the lower resolution (U[min, 1])."
    )
    sharpen_probability: float = Field(
        0.2, ge=0, le=1, description="Share of raw views edge-enhanced (unsharp mask)."
    )
    sharpen_amount: float = Field(1.0, ge=0, description="Largest unsharp-mask amount.")
    noise_probability: float = Field(0.3, ge=0, le=1, description="Share of raw views with added noise.")
    noise_sigma: float = Field(6.0, ge=0, description="Largest Gaussian noise sigma, in grey levels.")


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    mean = float(img.mean())
    return np.clip((img.astype(np.float32) - mean) * factor + mean, 0, 255).astype(np.uint8)


def adjust_brightness(img: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) + delta * 255.0, 0, 255).astype(np.uint8)


def adjust_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    table = np.clip(((np.arange(256) / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(img, table)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return img.copy() if sigma <= 0 else cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def resample(img: np.ndarray, factor: float, *, upsample: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Through a grid ``factor`` times as fine and back: a detector or export of lower resolution."""
    h, w = img.shape
    small = cv2.resize(
        img, (max(8, round(w * factor)), max(8, round(h * factor))), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (w, h), interpolation=upsample)


def unsharp_mask(img: np.ndarray, amount: float, *, sigma: float = 2.0) -> np.ndarray:
    """Edge enhancement as CR/DR consoles apply it: img + amount × (img − blur(img))."""
    if amount <= 0:
        return img.copy()
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma).astype(np.float32)
    return np.clip(img + amount * (img - blurred), 0, 255).astype(np.uint8)


def add_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` grey levels (quantum noise of another detector)."""
    if sigma <= 0:
        return img.copy()
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


_UPSAMPLING = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)


def _strength(rng: np.random.Generator, weakest: float, strongest: float) -> float:
    """U[weakest, strongest]; a largest value below the usual weakest is drawn up to itself
    (U[weakest, strongest] would be refused, and a floor above it would strengthen it)."""
    return float(rng.uniform(min(weakest, strongest), strongest))


def random_detector(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Resolution, edge enhancement and noise of another detector, each with its probability."""
    out = img
    if cfg.resample_probability and rng.random() < cfg.resample_probability:
        upsample = _UPSAMPLING[int(rng.integers(len(_UPSAMPLING)))]
        out = resample(out, float(rng.uniform(cfg.resample_min, 1.0)), upsample=upsample)
    if cfg.sharpen_probability and cfg.sharpen_amount > 0 and rng.random() < cfg.sharpen_probability:
        out = unsharp_mask(out, _strength(rng, 0.2, cfg.sharpen_amount))
    if cfg.noise_probability and cfg.noise_sigma > 0 and rng.random() < cfg.noise_probability:
        out = add_noise(out, _strength(rng, 1.0, cfg.noise_sigma), rng)
    return out


def affine(
    img: np.ndarray, *, scale: float = 1.0, degrees: float = 0.0, shift: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Zoom/rotate about the centre and shift (share of the side); borders filled black."""
    h, w = img.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    matrix[:, 2] += (shift[0] * w, shift[1] * h)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


# Fixed test-time views, (zoom, degrees) each, inside the training augmentation's ranges (zoom
# ±15 %, rotation ±7°; never a flip). A run with ``test_time_views`` other than "none" averages
# its probability over the image and these views. Measured with bench/tta_eval.py on a held-out
# acquisition group: "zoom_rotate" raised the default model's AUC by +0.005 (+0.001 to +0.009,
# patient bootstrap) and left the in-distribution AUC where it was (+0.000).
TEST_TIME_VIEWS: dict[str, tuple[tuple[float, float], ...]] = {
    "none": (),
    "zoom": ((0.92, 0.0), (1.08, 0.0)),
    "zoom_rotate": ((0.92, 0.0), (1.08, 0.0), (1.0, 4.0), (1.0, -4.0)),
}


def extra_views(images: np.ndarray, name: str) -> list[np.ndarray]:
    """``images`` (N×H×W or N×H×W×1) under each view of ``TEST_TIME_VIEWS[name]`` (the image
    itself not included), one batch of the same shape and dtype per view."""
    views = TEST_TIME_VIEWS[name]
    if not views:  # most runs: nothing to copy on the prediction path
        return []
    images = np.asarray(images)  # a batch may come as a tensor (features.score_images)
    flat = images.reshape(images.shape[:3])
    return [
        np.stack([affine(img, scale=scale, degrees=degrees) for img in flat]).reshape(images.shape)
        for scale, degrees in views
    ]


def center_crop_resize(img: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the central ``fraction`` of each side and resize back (a tighter field of view)."""
    h, w = img.shape
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(img[top : top + ch, left : left + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def random_crop(img: np.ndarray, rng: np.random.Generator, max_cut: float) -> np.ndarray:
    """A random window keeping U[1-max_cut, 1] of each side (a tighter field of view)."""
    h, w = img.shape
    keep = float(rng.uniform(1 - max_cut, 1))
    ch, cw = max(8, round(h * keep)), max(8, round(w * keep))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return img[top : top + ch, left : left + cw]


def random_raw_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Acquisition-like changes on the raw image, before preprocessing: framing, detector, intensity."""
    out = random_crop(img, rng, cfg.raw_crop) if cfg.raw_crop else img
    out = random_detector(out, rng, cfg)
    if cfg.contrast:
        out = adjust_contrast(out, float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)))
    if cfg.brightness:
        out = adjust_brightness(out, float(rng.uniform(-cfg.brightness, cfg.brightness)))
    if cfg.gamma:
        out = adjust_gamma(out, float(np.exp(rng.uniform(-cfg.gamma, cfg.gamma))))
    return np.ascontiguousarray(out)


def random_augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Changes on the preprocessed image: small geometry, blur, JPEG re-compression."""
    out = img
    if cfg.scale or cfg.rotate_degrees or cfg.translate:
        out = affine(
            out,
            scale=float(rng.uniform(1 - cfg.scale, 1 + cfg.scale)),
            degrees=float(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)),
            shift=tuple(rng.uniform(-cfg.translate, cfg.translate, size=2)),
        )
    if cfg.blur_probability and cfg.blur_sigma > 0 and rng.random() < cfg.blur_probability:
        out = gaussian_blur(out, _strength(rng, 0.3, cfg.blur_sigma))
    if cfg.jpeg_probability and rng.random() < cfg.jpeg_probability:
        out = jpeg_roundtrip(out, int(rng.integers(cfg.jpeg_quality_min, 96)))
    return np.ascontiguousarray(out)


# Fixed-strength perturbations for robustness checks, applied to raw images before preprocessing
# (acquisition differs between hospitals; the pipeline should absorb it).
PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "contrast_0.6": lambda img: adjust_contrast(img, 0.6),
    "contrast_1.4": lambda img: adjust_contrast(img, 1.4),
    "gamma_0.7": lambda img: adjust_gamma(img, 0.7),
    "gamma_1.4": lambda img: adjust_gamma(img, 1.4),
    "blur_1.5": lambda img: gaussian_blur(img, 1.5),
    "jpeg_30": lambda img: jpeg_roundtrip(img, 30),
    "crop_0.85": lambda img: center_crop_resize(img, 0.85),
    "zoom_out_0.85": lambda img: affine(img, scale=0.85),
    "rotate_5": lambda img: affine(img, degrees=5.0),
    "resample_0.5": lambda img: resample(img, 0.5),
    "sharpen_1": lambda img: unsharp_mask(img, 1.0),
    # seeded per image shape so a rerun gives the same noise
    "noise_6": lambda img: add_noise(img, 6.0, np.random.default_rng(list(img.shape))),
}
