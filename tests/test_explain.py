"""Tests for explain: Grad-CAM maps, overlays, explanation PNGs and the per-file writer."""

from __future__ import annotations

from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from cxr_pneumonia import explain
from cxr_pneumonia.io import load_image
from cxr_pneumonia.model import BACKBONES
from cxr_pneumonia.predict import Run

SIZE, SQUARE = 32, 6


# --- a small model that learns to find a bright square ------------------------------------


def _square_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Noisy dark 32×32 images; every other one has a bright 6×6 square at a random place.

    Returns ``(images uint8 N×32×32, labels, top-left corner of each square)``.
    """
    images = rng.normal(60, 15, (n, SIZE, SIZE)).clip(0, 255)
    labels = (np.arange(n) % 2).astype(np.float32)
    corners = []
    for i in range(n):
        row, col = (int(v) for v in rng.integers(0, SIZE - SQUARE + 1, 2))
        corners.append((row, col))
        if labels[i]:
            images[i, row : row + SQUARE, col : col + SQUARE] = 230
    return images.astype(np.uint8), labels, corners


def _small_cnn() -> keras.Model:
    image = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255, name="scaling")(image)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    output = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(image, output, name="square_finder")


@pytest.fixture(scope="module")
def square_model() -> keras.Model:
    """The small CNN trained (seeded, ~2 s) to tell images with a square from images without."""
    keras.utils.set_random_seed(0)
    images, labels, _ = _square_images(np.random.default_rng(0), 512)
    model = _small_cnn()
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy", metrics=["accuracy"])
    model.fit(images[..., None], labels, epochs=6, batch_size=32, verbose=0)
    return model


def test_square_model_learned_the_task(square_model: keras.Model) -> None:
    images, labels, _ = _square_images(np.random.default_rng(1), 40)
    _, accuracy = square_model.evaluate(images[..., None], labels, verbose=0)
    assert accuracy >= 0.95  # otherwise the localisation test below would prove nothing


def test_heatmap_peak_falls_inside_the_square(square_model: keras.Model) -> None:
    images, labels, corners = _square_images(np.random.default_rng(2), 24)
    cam = explain.GradCam(square_model)
    assert cam.layer_name == "conv3"
    margin = 1  # conv3 works at half resolution: its cells straddle the square's edge
    for image, label, (row, col) in zip(images, labels, corners, strict=True):
        if not label:
            continue
        heatmap = cam(image)
        peak_row, peak_col = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
        assert row - margin <= peak_row < row + SQUARE + margin, (peak_row, row)
        assert col - margin <= peak_col < col + SQUARE + margin, (peak_col, col)
        # The evidence is concentrated: the square's surroundings hold most of the map's mass.
        box = heatmap[max(row - 2, 0) : row + SQUARE + 2, max(col - 2, 0) : col + SQUARE + 2]
        assert box.sum() > 0.5 * heatmap.sum()


def test_grad_cam_function_equals_the_reusable_object(square_model: keras.Model) -> None:
    images, _, _ = _square_images(np.random.default_rng(3), 2)
    expected = explain.GradCam(square_model, "conv2")(images[1])
    np.testing.assert_allclose(explain.grad_cam(square_model, images[1], layer_name="conv2"), expected)
    assert expected.shape == (SIZE, SIZE)


def test_saturated_model_still_gives_a_map(square_model: keras.Model) -> None:
    """The logit's gradient does not vanish when the sigmoid saturates (p == 1.0 in float32)."""
    images, _, _ = _square_images(np.random.default_rng(4), 2)
    saturated = keras.models.clone_model(square_model)
    saturated.set_weights(square_model.get_weights())
    dense = saturated.get_layer("probability")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + 200.0])  # the bias shifts the logit, not its gradient
    assert float(saturated.predict(images[1:2, ..., None], verbose=0)[0, 0]) == 1.0
    heatmap = explain.grad_cam(saturated, images[1])
    assert heatmap.max() == 1.0 and heatmap.std() > 0.05  # a real map: two blank maps would also agree
    np.testing.assert_allclose(heatmap, explain.grad_cam(square_model, images[1]), atol=1e-5)


def test_zero_gradient_gives_all_zero_map(square_model: keras.Model) -> None:
    images, _, _ = _square_images(np.random.default_rng(5), 2)
    blind = keras.models.clone_model(square_model)
    blind.set_weights(square_model.get_weights())
    dense = blind.get_layer("probability")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), bias])  # the output no longer depends on the image
    heatmap = explain.grad_cam(blind, images[1])
    assert heatmap.dtype == np.float32 and heatmap.shape == (SIZE, SIZE)
    assert np.isfinite(heatmap).all() and not heatmap.any()


@pytest.mark.parametrize(
    "bad_image",
    [
        np.zeros((SIZE, SIZE + 1), np.uint8),
        np.zeros((SIZE, SIZE, 3), np.uint8),
        np.zeros(SIZE, np.uint8),
        np.full((SIZE, SIZE), np.nan, np.float32),
    ],
    ids=["wrong-size", "three-channels", "one-dimensional", "nan"],
)
def test_grad_cam_rejects_bad_images(square_model: keras.Model, bad_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"expected an image of shape|NaN"):
        explain.GradCam(square_model)(bad_image)


def test_unknown_layer_is_an_explain_error(square_model: keras.Model) -> None:
    with pytest.raises(explain.ExplainError, match="no_such_layer"):
        explain.GradCam(square_model, "no_such_layer")


def test_last_conv_layer_name_skips_the_head() -> None:
    assert explain.last_conv_layer_name(_small_cnn()) == "conv3"
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(explain.ExplainError, match="no layer with a 4-D output"):
        explain.last_conv_layer_name(dense_only)


# --- the project's own model (tiny_run) ---------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Run:
    return Run.load(tiny_run)


def _sample_images(sample_dir: Path, n: int = 2) -> list[Path]:
    return sorted((sample_dir / "test" / "PNEUMONIA").glob("*.jpeg"))[:n]


def test_run_layer_is_the_registered_last_conv_layer(run: Run) -> None:
    expected = BACKBONES[run.config["model"]["backbone"]].last_conv_layer
    assert explain.run_layer_name(run) == expected
    assert explain.last_conv_layer_name(run.model) == expected  # the generic search agrees


def test_grad_cam_on_a_run_model(run: Run, sample_dir: Path) -> None:
    """A real map (not blank, not flat) from the project's own architecture and layer.

    The tiny run's random backbone holds no evidence for pneumonia (its map is all zero), so the
    head is made all-positive: every feature then raises the logit and Grad-CAM must show it.
    Localisation itself is proved on the square model above, where the right region is known.
    """
    model = keras.models.clone_model(run.model)
    model.set_weights(run.model.get_weights())
    for layer in model.layers[-3:]:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.abs(kernel), bias])
    image = run.preprocess(load_image(_sample_images(sample_dir)[0]))
    heatmap = explain.grad_cam(model, image, layer_name=explain.run_layer_name(run))
    assert heatmap.shape == image.shape == (run.image_size, run.image_size)
    assert heatmap.dtype == np.float32 and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() == 1.0  # normalised to an exact peak
    assert heatmap.std() > 0.02 and heatmap.min() < 0.9  # not constant


def test_explainer_probability_equals_predict(run: Run, sample_dir: Path) -> None:
    path = _sample_images(sample_dir)[0]
    explanation = explain.Explainer(run).explain_path(path)
    [prediction] = run.predict_paths([path])
    assert explanation.probability == pytest.approx(prediction.probability, abs=1e-6)
    assert explanation.label == prediction.label
    assert explanation.threshold == run.threshold
    assert explanation.overlay().shape == (run.image_size, run.image_size, 3)


# --- pictures -------------------------------------------------------------------------------


def test_overlay_blends_colour_onto_the_image() -> None:
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[:, 32:] = 1.0
    result = explain.overlay(gray, heatmap)
    assert result.shape == (64, 64, 3) and result.dtype == np.uint8
    # JET: 0 is dark blue, 1 is dark red (RGB order out).
    assert result[:, 40:, 0].mean() > result[:, 40:, 2].mean()
    assert result[:, :24, 2].mean() > result[:, :24, 0].mean()
    np.testing.assert_array_equal(explain.overlay(gray, heatmap, alpha=0.0), np.dstack([gray] * 3))


def test_overlay_resizes_a_smaller_heatmap() -> None:
    gray = np.full((40, 60), 128, np.uint8)
    small = np.zeros((4, 6), np.float32)
    small[:, 3:] = 1.0
    result = explain.overlay(gray, small, alpha=1.0)
    assert result.shape == (40, 60, 3)
    assert (result[:, -1, 0] > 100).all() and (result[:, 0, 2] > 100).all()  # red right, blue left
    assert (result[:, -1, 2] < 50).all() and (result[:, 0, 0] < 50).all()


@pytest.mark.parametrize(
    ("image", "heatmap", "alpha", "message"),
    [
        (np.zeros((8, 8), np.float32), np.zeros((8, 8)), 0.4, "uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), 0.4, "grayscale"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3)), 0.4, "heatmap"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8)), 1.5, "alpha"),
    ],
)
def test_overlay_rejects_bad_inputs(
    image: np.ndarray, heatmap: np.ndarray, alpha: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        explain.overlay(image, heatmap, alpha=alpha)


def test_explanation_png_has_both_panels_and_a_caption() -> None:
    gray = np.full((64, 64), 90, np.uint8)
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[10:20, 10:20] = 1.0
    png = explain.explanation_png(gray, heatmap, 0.873, "PNEUMONIA", 0.42, title="a" * 300)
    panel = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    side, gap = 256, 8  # small images are enlarged to 256 px panels
    assert panel.shape[1] == 2 * side + 3 * gap
    left = panel[gap : gap + side, gap : gap + side]
    right = panel[gap : gap + side, 2 * gap + side : 2 * gap + 2 * side]
    assert (left == 90).all()  # the preprocessed image, unchanged
    hot = right[10 * 4 + 4 : 20 * 4 - 4, 10 * 4 + 4 : 20 * 4 - 4]  # inside the square, scaled by 4
    assert hot[..., 2].mean() > hot[..., 0].mean() + 50  # red in BGR
    caption = panel[gap + side + gap :]
    assert (caption < 128).any()  # text was drawn under the panels


# --- writing files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["a/x.png", "b/y.jpeg"], ["x_gradcam.png", "y_gradcam.png"]),
        (["a/x.png", "b/x.png", "c/x.dcm"], ["x_gradcam.png", "x_1_gradcam.png", "x_2_gradcam.png"]),
        (["a/X.png", "b/x.png"], ["X_gradcam.png", "x_1_gradcam.png"]),
        (["scans/1.2.840.113619"], ["1.2.840_gradcam.png"]),
    ],
)
def test_output_names_never_collide(paths: list[str], expected: list[str]) -> None:
    assert explain.output_names(paths) == expected


def test_explain_paths_writes_pngs_and_records_failures(run: Run, sample_dir: Path, tmp_path: Path) -> None:
    images = _sample_images(sample_dir, 2)
    twin = tmp_path / "other" / images[0].name  # same stem as the first input
    twin.parent.mkdir()
    twin.write_bytes(images[0].read_bytes())
    broken = tmp_path / "broken.jpeg"
    broken.write_text("not an image")
    out = tmp_path / "heatmaps"

    results = explain.explain_paths(run, [*images, twin, broken], out)

    assert [r.path for r in results] == [str(p) for p in [*images, twin, broken]]
    written = [r.output for r in results if r.output is not None]
    assert [p.name for p in written] == [
        f"{images[0].stem}_gradcam.png",
        f"{images[1].stem}_gradcam.png",
        f"{images[0].stem}_1_gradcam.png",
    ]
    for path in written:
        assert cv2.imread(str(path)) is not None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temp files left
    assert results[3] == (str(broken), None, results[3].error, False)  # unreadable, not rejected
    assert "not a PNG, JPEG or DICOM" in results[3].error
    assert all(r.error is None for r in results[:3])
    # The PNG of the twin is the same picture as the first one's, apart from the file name in the caption.
    first, twin_png = (cv2.imread(str(p)) for p in (written[0], written[2]))
    np.testing.assert_array_equal(first[:256], twin_png[:256])


def test_overlays_for_paths_skips_unreadable_files(run: Run, sample_dir: Path, tmp_path: Path) -> None:
    image = _sample_images(sample_dir, 1)[0]
    missing = tmp_path / "missing.png"
    overlays = explain.overlays_for_paths(run, [image, missing])
    assert list(overlays) == [str(image)]
    expected = explain.Explainer(run).explain_path(image).overlay()
    np.testing.assert_array_equal(overlays[str(image)], expected)
    assert explain.heatmap_overlay_for_path(run, missing) is None


def test_explainer_for_reuses_the_explainer_of_the_same_run(run: Run) -> None:
    first = explain.explainer_for(run)
    assert explain.explainer_for(run) is first
    other = Run(run.path, run.model, run.config, run.threshold_info)
    assert explain.explainer_for(other).run is other


# --- the input check (gate) -----------------------------------------------------------------


def test_a_rejected_image_gets_no_heatmap_unless_the_gate_is_off(
    run: Run, sample_dir: Path, non_cxr_dir: Path, tmp_path: Path
) -> None:
    xray, page = _sample_images(sample_dir, 1)[0], non_cxr_dir / "scanned_page_0.png"
    results = explain.explain_paths(run, [xray, page], tmp_path / "on")
    assert [r.rejected for r in results] == [False, True]
    assert results[0].output.is_file() and results[1].output is None
    assert results[1].error.startswith("not like the frontal chest X-rays this model was trained on")
    assert sorted(p.name for p in (tmp_path / "on").iterdir()) == [f"{xray.stem}_gradcam.png"]

    off = explain.explain_paths(run, [page], tmp_path / "off", gate=False)
    assert off[0].error is None and not off[0].rejected and off[0].output.is_file()


def test_an_explanation_notes_the_input_checks_reason(run: Run, non_cxr_dir: Path) -> None:
    image = run.preprocess(load_image(non_cxr_dir / "scanned_page_0.png"))
    [prediction] = run.classify_preprocessed(image[None], gate=False)
    explanation = explain.explainer_for(run).explain_preprocessed(image, prediction=prediction)
    assert explanation.note == prediction.reason and "classified anyway" in explanation.note
    assert explanation.probability == pytest.approx(prediction.probability)
    plain = explain.explainer_for(run).explain_preprocessed(image)
    assert plain.note is None and plain.probability == pytest.approx(prediction.probability, abs=1e-5)
    with_note = cv2.imdecode(np.frombuffer(explanation.png(), np.uint8), cv2.IMREAD_COLOR)
    without = cv2.imdecode(np.frombuffer(plain.png(), np.uint8), cv2.IMREAD_COLOR)
    assert with_note.shape[0] == without.shape[0] + 20  # one more caption line
