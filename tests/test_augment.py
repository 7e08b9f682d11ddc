"""Perturbations for augmentation and robustness checks: shapes, ranges, determinism, no flips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxr_pneumonia.augment import (
    PERTURBATIONS,
    AugmentConfig,
    add_noise,
    adjust_contrast,
    adjust_gamma,
    center_crop_resize,
    random_augment,
    random_crop,
    random_detector,
    random_raw_augment,
    resample,
    unsharp_mask,
)


def half_bright(h: int = 96, w: int = 80) -> np.ndarray:
    """Left half bright, right half dark: a flip would be obvious."""
    img = np.full((h, w), 40, np.uint8)
    img[:, : w // 2] = 200
    return img


def textured(h: int = 96, w: int = 80) -> np.ndarray:
    """A ramp with noise: no 8x8 block is flat, so even JPEG must change it."""
    noise = np.random.default_rng(0).normal(0, 10, (h, w))
    return np.clip(np.add.outer(np.arange(h), np.arange(w)) * 1.2 + noise, 0, 255).astype(np.uint8)


def centred_square(side: int = 20, size: int = 100) -> np.ndarray:
    img = np.full((size, size), 30, np.uint8)
    start = (size - side) // 2
    img[start : start + side, start : start + side] = 220
    return img


def bright_side(img: np.ndarray) -> float:
    """Side of the bright square, from its area."""
    return float(np.sqrt((img > 125).sum()))


def column_centre(img: np.ndarray, row: int) -> float:
    values = img[row].astype(float)
    return float((values * np.arange(len(values))).sum() / values.sum())


def vertical_bar() -> np.ndarray:
    img = np.zeros((101, 101), np.uint8)
    img[:, 48:53] = 255
    return img


def stripes(period: int = 1, size: int = 64) -> np.ndarray:
    """Vertical stripes of ``period`` pixels: detail a coarser grid cannot hold."""
    img = np.full((size, size), 60, np.uint8)
    img[:, (np.arange(size) // period) % 2 == 0] = 190
    return img


def gamma_of(level: int, gamma: float) -> int:
    return round(255 * (level / 255) ** gamma)


HB = half_bright()  # left 200, right 40
# What each named perturbation must do, measured on an image where the effect is known.
EFFECTS = {
    "contrast_0.6": (HB, lambda out: out.std() == pytest.approx(HB.std() * 0.6, rel=0.02)),
    "contrast_1.4": (HB, lambda out: (out[0, 0], out[0, -1]) == (232, 8)),  # 120 ± 80 * 1.4
    "gamma_0.7": (HB, lambda out: (out[0, 0], out[0, -1]) == (gamma_of(200, 0.7), gamma_of(40, 0.7))),
    "gamma_1.4": (HB, lambda out: (out[0, 0], out[0, -1]) == (gamma_of(200, 1.4), gamma_of(40, 1.4))),
    # the 160-level step at column 40 spreads over a few pixels; flat parts far from it stay put
    "blur_1.5": (
        HB,
        lambda out: np.abs(np.diff(out[0].astype(int))).max() < 60 and (out[:, :30] == 200).all(),
    ),
    "jpeg_30": (textured(), lambda out: 2 < np.abs(out.astype(int) - textured()).mean() < 15),
    # a tighter field of view: the square's side grows by 1/0.85; zooming out shrinks it by 0.85
    "crop_0.85": (centred_square(), lambda out: bright_side(out) == pytest.approx(20 / 0.85, rel=0.05)),
    "zoom_out_0.85": (
        centred_square(),
        lambda out: bright_side(out) == pytest.approx(20 * 0.85, rel=0.05) and out[0, 0] == 0,
    ),
    # 5 degrees counter-clockwise: the bar's top leans left, its bottom right, tan(5°) per row
    # half the grid cannot hold 1-pixel stripes: they average out to the mid grey
    "resample_0.5": (stripes(), lambda out: out[:, 8:-8].std() < 0.2 * stripes().std()),
    # unsharp masking overshoots on both sides of an edge, and leaves flat parts alone
    "sharpen_1": (HB, lambda out: out[0, 39] > 200 and out[0, 40] < 40 and out[0, 5] == 200),
    "noise_6": (HB, lambda out: (out.astype(float) - HB)[:, 45:].std() == pytest.approx(6.0, rel=0.1)),
    "rotate_5": (
        vertical_bar(),
        lambda out: (
            column_centre(out, 80) - column_centre(out, 20)
            == pytest.approx(np.tan(np.radians(5)) * 60, rel=0.05)
        ),
    ),
}


def test_every_perturbation_has_a_known_effect():
    assert sorted(EFFECTS) == sorted(PERTURBATIONS)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbations_keep_shape_dtype_and_do_not_mutate(name):
    img = textured()
    before = img.copy()
    out = PERTURBATIONS[name](img)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(img, before)
    assert not np.array_equal(out, img)  # an identity "perturbation" would test nothing


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbations_change_the_image_by_the_intended_amount(name):
    img, expected = EFFECTS[name]
    out = PERTURBATIONS[name](img.copy())
    assert expected(out), name


@pytest.mark.parametrize("fn", [lambda img: adjust_contrast(img, 1.0), lambda img: adjust_gamma(img, 1.0)])
def test_neutral_settings_are_identity(fn):
    img = half_bright()
    np.testing.assert_array_equal(fn(img), img)


def test_contrast_and_gamma_move_intensities_the_known_way():
    img = half_bright()
    assert adjust_contrast(img, 0.5).std() == pytest.approx(img.std() * 0.5, rel=0.02)
    assert adjust_gamma(img, 2.0)[0, 0] == round(255 * (200 / 255) ** 2)


def test_center_crop_zooms_in():
    img = np.zeros((100, 100), np.uint8)
    img[45:55, 45:55] = 255
    out = center_crop_resize(img, 0.5)
    assert (out > 127).sum() == pytest.approx(4 * 100, rel=0.15)  # the square doubles in side


@pytest.mark.parametrize("seed", range(5))
def test_random_crop_keeps_the_promised_share(seed):
    out = random_crop(np.zeros((200, 100), np.uint8), np.random.default_rng(seed), 0.2)
    assert 160 <= out.shape[0] <= 200 and 80 <= out.shape[1] <= 100


def test_random_augmentations_are_seeded_and_never_flip():
    cfg = AugmentConfig()
    img = half_bright()
    a = random_augment(random_raw_augment(img, np.random.default_rng(7), cfg), np.random.default_rng(7), cfg)
    b = random_augment(random_raw_augment(img, np.random.default_rng(7), cfg), np.random.default_rng(7), cfg)
    np.testing.assert_array_equal(a, b)
    for seed in range(10):
        out = random_augment(img, np.random.default_rng(seed), cfg)
        w = out.shape[1]
        assert out[:, : w // 3].mean() > out[:, -w // 3 :].mean()  # the bright side stays left


def test_resample_keeps_coarse_structure_and_loses_fine_detail():
    coarse = stripes(period=16)
    assert np.abs(resample(coarse, 0.5).astype(int) - coarse).mean() < 10
    assert resample(stripes(period=1), 0.5)[:, 8:-8].std() < 0.2 * stripes(period=1).std()


def test_unsharp_mask_and_noise_are_identity_at_zero_strength():
    img = textured()
    np.testing.assert_array_equal(unsharp_mask(img, 0.0), img)
    np.testing.assert_array_equal(add_noise(img, 0.0, np.random.default_rng(0)), img)


def test_detector_views_apply_each_change_with_its_probability():
    img = textured()
    rng = np.random.default_rng(3)
    never = AugmentConfig(resample_probability=0, sharpen_probability=0, noise_probability=0)
    np.testing.assert_array_equal(random_detector(img, rng, never), img)
    noise_only = never.model_copy(update={"noise_probability": 1.0, "noise_sigma": 8.0})
    changed = [not np.array_equal(random_detector(img, rng, noise_only), img) for _ in range(20)]
    assert all(changed)
    half = AugmentConfig(resample_probability=0.5, sharpen_probability=0, noise_probability=0)
    rate = np.mean([not np.array_equal(random_detector(img, rng, half), img) for _ in range(400)])
    assert rate == pytest.approx(0.5, abs=0.08)


def test_zero_strength_switches_a_random_change_off():
    # "0 switches one off": a largest strength of 0 with the change's probability at 1 leaves the
    # image alone (the draws used to be floored at 0.2 amount / 1 grey level, or refused for blur)
    img = textured()
    rng = np.random.default_rng(5)
    off = AugmentConfig(resample_probability=0, sharpen_probability=1, sharpen_amount=0,
                        noise_probability=1, noise_sigma=0)  # fmt: skip
    np.testing.assert_array_equal(random_detector(img, rng, off), img)
    still = AugmentConfig(scale=0, rotate_degrees=0, translate=0, jpeg_probability=0, blur_probability=1)
    np.testing.assert_array_equal(random_augment(img, rng, still.model_copy(update={"blur_sigma": 0})), img)


def test_a_largest_blur_below_the_usual_weakest_is_drawn_up_to_itself():
    img = textured()
    cfg = AugmentConfig(scale=0, rotate_degrees=0, translate=0, jpeg_probability=0, blur_probability=1,
                        blur_sigma=0.2)  # fmt: skip
    blurred = random_augment(img, np.random.default_rng(0), cfg)  # used to raise "high - low < 0"
    np.testing.assert_array_equal(blurred, cv2.GaussianBlur(img, (0, 0), sigmaX=0.2))
