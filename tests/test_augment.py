"""Perturbations for augmentation and robustness checks: shapes, ranges, determinism, no flips."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pneumonia.augment import (
    PERTURBATIONS,
    AugmentConfig,
    adjust_contrast,
    adjust_gamma,
    center_crop_resize,
    random_augment,
    random_crop,
    random_raw_augment,
)


def half_bright(h: int = 96, w: int = 80) -> np.ndarray:
    """Left half bright, right half dark: a flip would be obvious."""
    img = np.full((h, w), 40, np.uint8)
    img[:, : w // 2] = 200
    return img


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbations_keep_shape_dtype_and_do_not_mutate(name):
    img = half_bright()
    before = img.copy()
    out = PERTURBATIONS[name](img)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(img, before)


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
