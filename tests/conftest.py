"""Shared pytest fixtures.

Image files: ``io_data_dir`` (the checked-in tiny DICOMs, see ``tests/data/io/make_fixtures.py``)
and ``bad_inputs_dir`` (a folder mixing valid and unreadable images).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

IO_DATA_DIR = Path(__file__).resolve().parent / "data" / "io"


def _synthetic_xray(height: int = 96, width: int = 80, *, seed: int = 0) -> np.ndarray:
    """A uint8 chest-X-ray-like image: dark background, bright body, two darker lungs."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 20, np.uint8)
    centre = (width // 2, height // 2)
    cv2.ellipse(image, centre, (int(width * 0.45), int(height * 0.45)), 0, 0, 360, 180, -1)
    for side in (-1, 1):
        lung = (width // 2 + side * width // 5, height // 2)
        cv2.ellipse(image, lung, (width // 7, height // 3), 0, 0, 360, 70, -1)
    noise = rng.integers(-5, 6, size=image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _encode_image(suffix: str, image: np.ndarray) -> bytes:
    """``image`` (OpenCV channel order) encoded as ``suffix`` ('.png', '.jpg', ...)."""
    ok, buffer = cv2.imencode(suffix, image)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.dtype} {image.shape} image as {suffix}")
    return buffer.tobytes()


@pytest.fixture
def io_data_dir() -> Path:
    """The folder of checked-in tiny DICOM fixtures (``mono2_rescale.dcm`` among them)."""
    return IO_DATA_DIR


@pytest.fixture
def bad_inputs_dir(tmp_path: Path) -> tuple[Path, dict[str, type[Exception]]]:
    """A folder of 5 readable images and 3 unreadable ones, for batch-processing tests.

    Returns ``(folder, expected_failures)``: the failing file names mapped to the
    ``cxr_pneumonia.io`` error class that reading each one raises. Readable: ``normal_1.jpeg``
    (gray JPEG), ``normal_2.jpg`` (RGB JPEG), ``scan_16bit.png``, ``scan_rgba.png``,
    ``scan.dcm`` (a copy of ``mono2_rescale.dcm``).
    """
    # Imported here so that a broken io module fails only the tests that use this fixture.
    from cxr_pneumonia.io import EmptyFileError, NotAnImageError, TruncatedImageError

    folder = tmp_path / "bad_inputs"
    folder.mkdir()
    xray = _synthetic_xray(seed=1)
    (folder / "normal_1.jpeg").write_bytes(_encode_image(".jpg", xray))
    (folder / "normal_2.jpg").write_bytes(
        _encode_image(".jpg", cv2.cvtColor(_synthetic_xray(seed=2), cv2.COLOR_GRAY2BGR))
    )
    sixteen_bit = _synthetic_xray(seed=3).astype(np.uint16) * 16  # 12-bit values in 16 bits
    (folder / "scan_16bit.png").write_bytes(_encode_image(".png", sixteen_bit))
    rgba = cv2.cvtColor(_synthetic_xray(seed=4), cv2.COLOR_GRAY2BGRA)
    rgba[..., 3] = 128
    (folder / "scan_rgba.png").write_bytes(_encode_image(".png", rgba))
    shutil.copyfile(IO_DATA_DIR / "mono2_rescale.dcm", folder / "scan.dcm")

    (folder / "empty.jpg").write_bytes(b"")
    whole = _encode_image(".jpg", _synthetic_xray(seed=5))
    (folder / "truncated.jpeg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.jpeg").write_text("radiologist notes, not an image\n")
    expected_failures: dict[str, type[Exception]] = {
        "empty.jpg": EmptyFileError,
        "truncated.jpeg": TruncatedImageError,
        "notes.jpeg": NotAnImageError,
    }
    return folder, expected_failures


# --- trained runs ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"
SHARED_DIR = REPO.parent / "shared"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled 160-image sample: ``train/`` and ``test/`` class folders, patient-disjoint."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run directory trained in seconds: random-weight ResNet50V2 at 64×64 on the sample.

    Shared by every test that needs a trained model (predict, evaluate, explain, serve).
    Tests must not modify it.
    """
    from cxr_pneumonia.model import ModelConfig
    from cxr_pneumonia.preprocess import PreprocessConfig
    from cxr_pneumonia.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    train(
        SAMPLE_DIR / "train",
        root / "run",
        preprocess_cfg=PreprocessConfig(size=64),
        model_cfg=ModelConfig(backbone="resnet50v2", weights="none", image_size=64),
        train_cfg=TrainConfig(epochs=3, cache_dir=str(root / "cache"), workers=1),
    )
    return root / "run"


# --- inputs that are not chest X-rays, and runs with a changed gate ------------------------------


def non_cxr_images(n: int = 2) -> dict[str, np.ndarray]:
    """``n`` synthetic pictures no chest-X-ray gate should accept (BGR uint8), by file name:
    scanned-page-like text and colour noise in turn. The tiny run's gate scores them far above
    its limit (about 14 against 5)."""
    images = {}
    for i in range(n):
        if i % 2 == 0:
            page = np.full((400, 300, 3), 255, np.uint8)
            for k, line in enumerate(["Invoice 2024", f"Total: {1234 + i}.00", "Thank you", "Lorem ipsum"]):
                cv2.putText(page, line, (10, 40 + 60 * k), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2)
            images[f"scanned_page_{i}.png"] = page
        else:
            images[f"colour_noise_{i}.png"] = np.random.default_rng(i).integers(
                0, 256, (256, 256, 3), np.uint8
            )
    return images


def write_non_cxr_images(folder: Path, n: int = 2) -> list[Path]:
    """:func:`non_cxr_images` written as PNG files into ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in non_cxr_images(n).items():
        (folder / name).write_bytes(_encode_image(".png", image))
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="session")
def non_cxr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two pictures that are not chest X-rays (a text page, colour noise)."""
    folder = tmp_path_factory.mktemp("non_cxr")
    write_non_cxr_images(folder, 2)
    return folder


def copy_run(run_dir: Path, target: Path, *, drop_gate: bool = False, **gate_fields: float) -> Path:
    """A copy of a run directory; ``drop_gate`` removes its gate (a run from before gates),
    ``gate_fields`` overwrite values in its ``gate/gate.json`` (e.g. ``unusual_level=3.0``)."""
    import json

    shutil.copytree(run_dir, target)
    gate_json = target / "gate" / "gate.json"
    if drop_gate:
        shutil.rmtree(target / "gate")
    elif gate_fields:
        meta = json.loads(gate_json.read_text())
        meta.update(gate_fields)
        gate_json.write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="session")
def ungated_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run without its gate, as a run trained before gates existed."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("ungated") / "run", drop_gate=True)


@pytest.fixture(scope="session")
def make_run_copy():
    """:func:`copy_run`, for tests that need a run with a changed gate."""
    return copy_run


# --- DICOM headers that declare what an image is ----------------------------------------------

# File name: the header beside the pixels of one frontal chest X-ray. Only frontal_pa.dcm
# declares what the model reads; each of the others is ruled out by its header alone.
DECLARED_VIEWS = {
    "frontal_pa.dcm": {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"},
    "lateral_ll.dcm": {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "LL"},
    "knee.dcm": {"Modality": "CR", "BodyPartExamined": "KNEE", "ViewPosition": "AP"},
    "ct.dcm": {"Modality": "CT"},
}


def fixture_builder():
    """``tests/data/io/make_fixtures.py`` (a script, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", IO_DATA_DIR / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chest_dicom_bytes(image: np.ndarray, **attributes: object) -> bytes:
    """A uint8 grayscale image as a DICOM file (8-bit MONOCHROME2) with the header ``attributes``."""
    from io import BytesIO

    buffer = BytesIO()
    dataset = fixture_builder().build_dataset(np.ascontiguousarray(image, np.uint8), **attributes)
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_declared_views(folder: Path, image: np.ndarray) -> dict[str, Path]:
    """:data:`DECLARED_VIEWS` of ``image`` in ``folder``, by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, attributes in DECLARED_VIEWS.items():
        paths[name] = folder / name
        paths[name].write_bytes(chest_dicom_bytes(image, **attributes))
    return paths


@pytest.fixture(scope="session")
def declared_views_dir(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`DECLARED_VIEWS` of the sample's first NORMAL test image (one the tiny run's gate
    accepts), as four DICOM files."""
    from cxr_pneumonia.io import load_image

    folder = tmp_path_factory.mktemp("declared_views")
    write_declared_views(folder, load_image(sorted((sample_dir / "test" / "NORMAL").glob("*.jpeg"))[0]))
    return folder


@pytest.fixture(scope="session")
def make_non_cxr_images():
    """:func:`write_non_cxr_images`, for tests that need more pictures that are not chest X-rays."""
    return write_non_cxr_images
