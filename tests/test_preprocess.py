"""Preprocessing steps on synthetic images of known geometry, and the whole pipeline on real X-rays."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from cxr_pneumonia.preprocess import (
    STEP_NAMES,
    STEPS,
    PreprocessConfig,
    PreprocessError,
    Sample,
    apply_clahe,
    apply_mask,
    build_pipeline,
    contour_box,
    contour_mask,
    crop_sample,
    disable_steps,
    downscale,
    find_largest_contour,
    refine_mask,
    resize_image,
    resolve_steps,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FULLRES = SHARED / "data" / "kermany-fullres"

# (height, width), ellipse centre (x, y), semi-axes (a, b)
ELLIPSES = [
    ((160, 200), (100, 80), (50, 30)),
    ((300, 240), (120, 150), (90, 120)),
    ((256, 256), (90, 160), (60, 70)),
]


def ellipse_image(shape, center, axes, *, value=200, background=20) -> np.ndarray:
    img = np.full(shape, background, dtype=np.uint8)
    cv2.ellipse(img, center, axes, 0, 0, 360, color=value, thickness=cv2.FILLED)
    return img


@pytest.mark.parametrize(("shape", "center", "axes"), ELLIPSES)
def test_largest_contour_box_and_mask_area(shape, center, axes):
    img = ellipse_image(shape, center, axes)
    contour = find_largest_contour(img, min_region_fraction=0.01)
    assert contour is not None
    x, y, w, h = contour_box(contour)
    (cx, cy), (a, b) = center, axes
    assert abs(x - (cx - a)) <= 1 and abs(y - (cy - b)) <= 1
    assert abs(w - (2 * a + 1)) <= 2 and abs(h - (2 * b + 1)) <= 2
    mask = contour_mask(img.shape, contour)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask > 0).sum() == pytest.approx(math.pi * a * b, rel=0.03)


def test_largest_of_several_regions_is_chosen():
    img = ellipse_image((200, 300), (80, 100), (40, 40))
    cv2.ellipse(img, (220, 100), (60, 70), 0, 0, 360, color=200, thickness=cv2.FILLED)
    x, y, w, h = contour_box(find_largest_contour(img, min_region_fraction=0.01))
    assert (x, y) == (160, 30) and abs(w - 121) <= 2 and abs(h - 141) <= 2


@pytest.mark.parametrize(
    ("img", "min_fraction"),
    [
        (np.zeros((64, 64), np.uint8), 0.15),  # nothing bright at all
        (ellipse_image((200, 200), (100, 100), (10, 10)), 0.15),  # a speck, not a thorax
    ],
)
def test_no_usable_contour_falls_back_to_whole_image(img, min_fraction):
    assert find_largest_contour(img, min_region_fraction=min_fraction) is None
    result = build_pipeline(PreprocessConfig(size=32)).run(img)
    assert result.fallback
    assert result.image.shape == (32, 32)
    denoised = cv2.GaussianBlur(img, (0, 0), sigmaX=1.0)  # the "denoise" step runs first
    expected = cv2.resize(
        apply_clahe(denoised, clip_limit=2.0, tile_grid=8), (32, 32), interpolation=cv2.INTER_AREA
    )
    np.testing.assert_array_equal(result.image, expected)


def test_refine_mask_removes_thin_spur_but_keeps_the_region():
    mask = np.zeros((200, 200), np.uint8)
    cv2.ellipse(mask, (80, 100), (50, 50), 0, 0, 360, 255, cv2.FILLED)
    mask[99:101, 130:200] = 255  # a 2-px wire from the region to the border
    refined = refine_mask(mask, kernel_size=5, erode_iterations=2, dilate_iterations=2)
    assert refined[100, 170:].max() == 0
    assert refined[100, 80] == 255
    assert (refined > 0).sum() == pytest.approx(math.pi * 50 * 50, rel=0.05)


def test_apply_mask_zeroes_outside_only():
    img = np.full((10, 10), 77, np.uint8)
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 3:8] = 255
    out = apply_mask(img, mask)
    assert out[2:5, 3:8].min() == 77 and out.sum() == 77 * 15


def test_clahe_raises_contrast_of_a_flat_image():
    rng = np.random.default_rng(0)
    img = (100 + rng.integers(0, 10, size=(128, 128))).astype(np.uint8)
    out = apply_clahe(img, clip_limit=2.0, tile_grid=8)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out.std() > 2 * img.std()


@pytest.mark.parametrize(
    ("shape", "mode", "size"),
    [((100, 50), "stretch", 64), ((50, 100), "stretch", 32), ((100, 50), "pad", 64), ((30, 90), "pad", 60)],
)
def test_resize_modes(shape, mode, size):
    img = np.full(shape, 255, np.uint8)
    out = resize_image(img, size=size, mode=mode)
    assert out.shape == (size, size)
    if mode == "stretch":
        assert out.min() == 255
    else:  # the image's aspect ratio survives as the bright area's aspect ratio
        ys, xs = np.nonzero(out > 127)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert w / h == pytest.approx(shape[1] / shape[0], rel=0.1)
        assert out[0, 0] == 0 or out[-1, -1] == 0


def test_full_pipeline_crops_to_region_and_removes_outside_marker():
    img = ellipse_image((300, 300), (150, 170), (100, 110))
    cv2.rectangle(img, (5, 5), (30, 20), 255, cv2.FILLED)  # an "L" marker in the corner
    result = build_pipeline(PreprocessConfig(size=64)).run(img, keep_stages=True)
    assert not result.fallback
    out = result.image
    assert out.shape == (64, 64) and out.dtype == np.uint8
    # cropped to the ellipse: it touches all four sides, corners are masked out
    assert out[32, :3].max() > 0 and out[32, -3:].max() > 0 and out[:3, 32].max() > 0
    assert out[0, 0] == 0 and out[-1, -1] == 0 and out[0, -1] == 0
    assert {"original", "clahe", "mask", "apply_mask", "resize"} <= set(result.stages)


def test_pipeline_does_not_mutate_input_and_is_deterministic():
    img = ellipse_image((120, 100), (50, 60), (40, 50))
    before = img.copy()
    pipeline = build_pipeline(PreprocessConfig(size=48))
    np.testing.assert_array_equal(pipeline(img), pipeline(img))
    np.testing.assert_array_equal(img, before)


def test_steps_can_be_switched_off():
    img = ellipse_image((100, 100), (50, 50), (30, 30))
    cfg = disable_steps(
        PreprocessConfig(size=100), "downscale", "denoise", "clahe", "crop", "mask", "morph", "apply_mask"
    )
    assert cfg.steps == ("resize",)
    np.testing.assert_array_equal(build_pipeline(cfg)(img), img)
    only_mask = disable_steps(PreprocessConfig(size=100), "clahe", "crop")
    out = build_pipeline(only_mask)(img)
    assert out[0, 0] == 0 and out[50, 50] == 200  # masked but not cropped


@pytest.mark.parametrize("bad", [("clahe", "sharpen"), ("unknown",)])
def test_unknown_step_names_are_rejected_with_the_valid_ones(bad):
    with pytest.raises(ValueError, match="steps: must be one of") as info:
        PreprocessConfig(steps=bad)
    assert all(name in str(info.value) for name in STEP_NAMES)


def test_crop_sample_cuts_image_and_mask_with_one_box():
    image = np.arange(48, dtype=np.uint8).reshape(6, 8)
    mask = (np.arange(48).reshape(6, 8) % 2 * 255).astype(np.uint8)
    sample = Sample(image=image, mask=mask, box=(2, 1, 3, 4))
    cut = crop_sample(sample, (2, 1, 3, 4))
    np.testing.assert_array_equal(cut.image, image[1:5, 2:5])
    np.testing.assert_array_equal(cut.mask, mask[1:5, 2:5])
    assert cut.box is None  # nothing left to cut
    assert sample.image.shape == (6, 8) and sample.box == (2, 1, 3, 4)  # the input sample is untouched


def test_pipeline_crops_image_and_mask_to_the_regions_box():
    # an ellipse centred at (90, 70) with semi-axes (70, 50): its box is x 20..160, y 20..120
    img = ellipse_image((160, 200), (90, 70), (70, 50))
    cfg = PreprocessConfig(steps=("crop", "mask"), mask_shape="contour")
    result = build_pipeline(cfg).run(img)
    assert result.box == (20, 20, 141, 101)
    assert result.image.shape == result.mask.shape == (101, 141)
    np.testing.assert_array_equal(result.image, img[20:121, 20:161])
    full_mask = build_pipeline(disable_steps(cfg, "crop")).run(img).mask
    np.testing.assert_array_equal(result.mask, full_mask[20:121, 20:161])
    # image and mask stay aligned: the contour mask covers exactly the ellipse's pixels
    np.testing.assert_array_equal(result.mask > 0, result.image == 200)


def test_steps_return_a_new_sample_and_leave_theirs_alone():
    img = ellipse_image((160, 200), (90, 70), (70, 50))
    sample = Sample(image=img)
    masked = STEPS["mask"](sample, PreprocessConfig())
    assert masked.mask is not None and masked.located and not masked.fallback
    assert sample.mask is None and not sample.located
    with pytest.raises(AttributeError):
        sample.mask = masked.mask  # frozen


def test_registry_rejects_unknown_step_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="valid steps") as info:
        resolve_steps(("clahe", "sharpen"))
    assert "sharpen" in str(info.value) and all(name in str(info.value) for name in STEP_NAMES)
    # a config that skipped validation is still refused when the pipeline is built
    unchecked = SimpleNamespace(**{**vars(PreprocessConfig()), "steps": ("crop", "blur")})
    with pytest.raises(ValueError, match=r"\['blur'\]; valid steps"):
        build_pipeline(unchecked)


@pytest.mark.parametrize(
    "img",
    [np.zeros((10, 10), np.float32), np.zeros((10, 10, 3), np.uint8), np.zeros((0, 5), np.uint8)],
)
def test_pixel_contract_is_checked(img):
    with pytest.raises(ValueError, match="uint8"):
        build_pipeline()(img)


def test_failing_step_names_step_and_source(monkeypatch):
    import cxr_pneumonia.preprocess as pp

    def broken(*args, **kwargs):
        raise cv2.error("boom")

    monkeypatch.setattr(pp, "apply_clahe", broken)
    with pytest.raises(PreprocessError, match=r"clahe failed on scan\.png"):
        build_pipeline().run(np.zeros((20, 20), np.uint8), source="scan.png")


@pytest.mark.skipif(not FULLRES.is_dir(), reason="../shared/data/kermany-fullres not present")
def test_pipeline_on_real_full_resolution_xrays():
    from cxr_pneumonia.io import list_image_files, load_image

    files = list_image_files(FULLRES)
    assert len(files) == 40
    pipeline = build_pipeline()
    fallbacks = 0
    for path in files:
        img = load_image(path)
        assert min(img.shape) > 500
        result = pipeline.run(img, source=str(path))
        assert result.image.shape == (224, 224) and result.image.dtype == np.uint8
        assert result.image.std() > 20  # an X-ray, not a blank
        fallbacks += result.fallback
        if not result.fallback:
            _, _, w, h = result.box  # found after "downscale", on the 224×224 working image
            assert w * h >= 0.15 * 224 * 224  # the thorax, not a text marker
    assert fallbacks <= 2


@pytest.mark.parametrize(
    ("shape", "expected"), [((1200, 900), (224, 224)), ((224, 224), (224, 224)), ((150, 300), (224, 224))]
)
def test_downscale_brings_large_images_to_the_working_size_only(shape, expected):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = downscale(img, size=224, jpeg_quality=None)
    assert out.shape == (expected if max(shape) > 224 else shape)
    if max(shape) > 224:
        np.testing.assert_array_equal(out, cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA))
        assert not np.array_equal(downscale(img, size=224, jpeg_quality=75), out)  # the round trip
    if max(shape) <= 224:
        assert out is img  # small images pass untouched


@pytest.mark.skipif(not FULLRES.is_dir(), reason="../shared/data/kermany-fullres not present")
def test_a_full_resolution_original_is_preprocessed_as_its_224_copy_would_be():
    """The training images are originals stretched to 224×224: after "downscale" an original and
    such a copy of it give the same model input, so full-resolution files meet the texture the
    model was trained on (CLAHE's tiles work at the image's own scale)."""
    from cxr_pneumonia.io import list_image_files, load_image

    pipeline = build_pipeline()
    for path in list_image_files(FULLRES)[:6]:
        original = load_image(path)
        small = cv2.resize(original, (224, 224), interpolation=cv2.INTER_AREA)
        # as kermany224 was made: stretched to 224×224, saved as JPEG quality 75
        copy_224 = cv2.imdecode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], 0)
        np.testing.assert_array_equal(pipeline(original), pipeline(copy_224))
        without = build_pipeline(disable_steps(PreprocessConfig(), "downscale"))(original)
        assert np.abs(without.astype(int) - pipeline(original).astype(int)).mean() > 2  # it matters


def lung_touching_edge_image() -> np.ndarray:
    """A bright body shaped like a C whose dark 'lung' opens to the dark background on the right."""
    img = np.full((200, 200), 20, np.uint8)
    cv2.rectangle(img, (20, 20), (180, 180), 200, cv2.FILLED)
    cv2.rectangle(img, (70, 60), (199, 140), 60, cv2.FILLED)  # lung field reaching the border
    return img


@pytest.mark.parametrize(("mask_shape", "lung_kept"), [("contour", False), ("hull", True)])
def test_mask_shape_decides_whether_edge_touching_lungs_survive(mask_shape, lung_kept):
    cfg = PreprocessConfig(steps=("mask", "apply_mask"), mask_shape=mask_shape, size=200)
    out = build_pipeline(cfg)(lung_touching_edge_image())
    assert bool(out[100, 100] == 60) == lung_kept  # inside the lung field
    assert out[100, 40] == 200  # the body itself is always kept
    assert out[5, 5] == 0  # the corner background is always masked


def test_unknown_mask_shape_is_rejected():
    with pytest.raises(ValueError, match="mask_shape"):
        PreprocessConfig(mask_shape="blob")


def test_denoise_lowers_pixel_noise_and_keeps_flat_regions():
    """The low-pass before CLAHE: sigma-6 noise on a flat field shrinks, a flat field stays put."""
    from cxr_pneumonia.preprocess import STEPS, Sample

    flat = np.full((96, 96), 120, np.uint8)
    noisy = np.clip(flat + np.random.default_rng(0).normal(0, 6, flat.shape), 0, 255).astype(np.uint8)
    cfg = PreprocessConfig()
    out = STEPS["denoise"](Sample(noisy), cfg).image
    assert out[8:-8, 8:-8].std() < 0.4 * noisy[8:-8, 8:-8].std()
    np.testing.assert_array_equal(STEPS["denoise"](Sample(flat), cfg).image, flat)
    off = PreprocessConfig(denoise_sigma=0)
    np.testing.assert_array_equal(STEPS["denoise"](Sample(noisy), off).image, noisy)
