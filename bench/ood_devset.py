"""A development set of inputs that are not frontal chest X-rays, built from installed packages.

Every image comes from files bundled inside PyPI packages (no download: scikit-image's
``skimage/data`` folder, scikit-learn's sample images, matplotlib's sample data and icons, and
the DICOM test files of pydicom and pydicom-data: CT, MR, nuclear-medicine and ultrasound
images and a radiograph of a lower leg, read through the project's DICOM decoder) or is drawn
here (text pages, charts, noise, blank images, checkerboards), plus transformed chest X-rays
that are no longer frontal chest X-rays as a reader would take them (rotated, grey levels
inverted, a corner crop, a one-sided "lateral-like" proxy). Left-right flips are not included:
a flipped frontal chest X-ray is still one.

Each image goes through the project's own decoder (encoded to PNG, then
``io.load_image_bytes``; DICOM files as they are), so it reaches the gate exactly as an upload
would: uint8 grayscale.

``devset(cxr_images)`` yields ``(category, name, image)``. The CXR-derived categories need
chest X-rays that the gate was NOT fitted or calibrated on.
"""

from __future__ import annotations

import gzip
import io as _io
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from cxr_pneumonia.io import load_image_bytes

# Categories in the order they are produced; CXR-derived ones last.
PACKAGE_CATEGORIES = (
    "photo", "texture", "medical_other", "dicom_other_modality", "xray_other_anatomy", "document", "chart",
    "synthetic",
)  # fmt: skip
CXR_CATEGORIES = ("cxr_rotated", "cxr_inverted", "cxr_corner_crop", "lateral_proxy")
CATEGORIES = PACKAGE_CATEGORIES + CXR_CATEGORIES


def _decode(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` (RGB, RGBA or gray, uint8) through PNG bytes and the project's decoder."""
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{name}: PNG encoding failed")
    return load_image_bytes(encoded.tobytes(), name=name)


def _read_file(path: Path) -> np.ndarray:
    return load_image_bytes(Path(path).read_bytes(), name=str(path))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)


# --- images bundled in packages --------------------------------------------------------------


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _skimage(name: str) -> np.ndarray:
    return _read_file(_skimage_dir() / name)


def _mpl_sample(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _sklearn_images() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {Path(f).stem: img for f, img in zip(bunch.filenames, bunch.images, strict=True)}


def _brain_mri() -> np.ndarray:
    """matplotlib's ``s1045.ima.gz``: a 256×256 16-bit MRI slice of a head (big-endian)."""
    raw = gzip.decompress(_mpl_sample("s1045.ima.gz").read_bytes())
    return _to_uint8(np.frombuffer(raw, dtype=">u2").reshape(256, 256))


def _faces() -> list[np.ndarray]:
    faces = np.load(_skimage_dir() / "lfw_subset.npy")[:2]  # 25×25 floats in [0, 1]
    return [cv2.resize((f * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC) for f in faces]


def photos() -> Iterator[tuple[str, np.ndarray]]:
    for name in ("astronaut", "chelsea", "coffee", "camera", "rocket", "motorcycle_left", "moon", "coins"):
        suffix = ".jpg" if name == "rocket" else ".png"
        yield name, _skimage(name + suffix)
    yield "hubble_deep_field", _skimage("hubble_deep_field.jpg")
    for name, img in _sklearn_images().items():
        yield f"sklearn_{name}", _decode(img, name)
    yield "grace_hopper", _read_file(_mpl_sample("grace_hopper.jpg"))
    for i, face in enumerate(_faces()):
        yield f"lfw_face_{i}", _decode(face, "face")


def textures() -> Iterator[tuple[str, np.ndarray]]:
    for name in ("brick", "grass", "gravel"):
        yield name, _skimage(f"{name}.png")


def medical_other() -> Iterator[tuple[str, np.ndarray]]:
    """Other medical images: fundus photographs, microscopy, an MRI slice, a CT phantom."""
    yield "retina_fundus", _skimage("retina.jpg")
    yield "microaneurysms_fundus", _skimage("microaneurysms.png")
    yield "ihc_microscopy", _skimage("ihc.png")
    yield "cell_microscopy", _skimage("cell.png")
    yield "brain_mri_s1045", _decode(_brain_mri(), "mri")
    yield "shepp_logan_phantom", _skimage("phantom.png")


def _pydicom_test_file(name: str) -> Path:
    """A DICOM test file of pydicom or of pydicom-data (the ``dev`` extra), never downloaded."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name}: not installed (pip install pydicom-data, in the dev extra)")
    return Path(path)


def _read_dicom(name: str) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():  # MONOCHROME1 inverted, first of several frames: expected here
        warnings.simplefilter("ignore", UserWarning)
        return _read_file(_pydicom_test_file(name))


# One file per image (the packages hold several encodings of some); a segmentation mask and
# 3×3 or 100×100 colour test patterns are left out, they are not pictures of anything.
DICOM_OTHER_MODALITY = {
    "ct_small": "CT_small.dcm",
    "ct_head": "J2K_pixelrep_mismatch.dcm",
    "ct_abdomen": "693_UNCR.dcm",
    "ct_pancreas": "explicit_VR-UN.dcm",
    "mr_small": "MR_small.dcm",
    "mr_head": "emri_small.dcm",
    "mr_abdomen": "examples_overlay.dcm",
    "mr_shoulder": "MR2_UNCR.dcm",
    "nm_whole_body_bone": "JPEG2000_UNC.dcm",
    "us_lymph_node": "US1_UNCR.dcm",
    "us_echocardiogram": "color-pl.dcm",
}
# A computed radiograph of a lower leg (tibia), pydicom-data's RG3: X-ray, wrong anatomy.
XRAY_OTHER_ANATOMY = {"cr_lower_leg": "RG3_UNCR.dcm"}
# pydicom-data's RG1 is an adult frontal chest radiograph (computed radiography, DICOM): a chest
# X-ray from another population, which the gate should accept (bench/gate_run_eval.py reports it).
ADULT_FRONTAL_CXR = {"cr_adult_chest_pa": "RG1_UNCR.dcm"}


def _dicom_images(files: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    for name, filename in files.items():
        yield name, _read_dicom(filename)


def adult_frontal_cxr() -> Iterator[tuple[str, np.ndarray]]:
    """Chest X-rays, not part of the dev set: images the gate should accept."""
    return _dicom_images(ADULT_FRONTAL_CXR)


def _text_page(seed: int, size: tuple[int, int] = (1100, 850)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    page = np.full(size, 250, np.uint8)
    words = [
        "patient",
        "chest",
        "radiograph",
        "findings",
        "impression",
        "normal",
        "lungs",
        "clear",
        "no",
        "acute",
        "process",
    ]
    y = 70
    while y < size[0] - 50:
        line = " ".join(rng.choice(words, size=int(rng.integers(5, 10))))
        cv2.putText(page, line, (60, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 20, 2, cv2.LINE_AA)
        y += int(rng.integers(32, 44))
    return page


def documents() -> Iterator[tuple[str, np.ndarray]]:
    """Scanned or rendered pages, logos and icons."""
    yield "skimage_page", _skimage("page.png")
    yield "skimage_text", _skimage("text.png")
    yield "skimage_logo", _skimage("logo.png")
    for seed in range(2):
        yield f"text_page_{seed}", _decode(_text_page(seed), "page")
    import matplotlib

    icons = Path(matplotlib.get_data_path()) / "images"
    for name in ("matplotlib_large.png", "home_large.png"):
        yield f"mpl_icon_{Path(name).stem}", _read_file(icons / name)


def _chart(kind: str, seed: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    if kind == "line":
        x = np.linspace(0, 10, 200)
        for k in range(3):
            ax.plot(x, np.sin(x + k) + rng.normal(0, 0.1, x.size), label=f"series {k}")
        ax.legend()
    elif kind == "bar":
        ax.bar(list("ABCDEF"), rng.uniform(1, 10, 6))
    elif kind == "scatter":
        ax.scatter(rng.normal(size=300), rng.normal(size=300), s=8)
    else:
        ax.hist(rng.normal(size=2000), bins=40)
    ax.set_title(f"{kind} chart")
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return load_image_bytes(buffer.getvalue(), name=f"{kind}_chart.png")


def charts() -> Iterator[tuple[str, np.ndarray]]:
    for seed, kind in enumerate(("line", "bar", "scatter", "histogram")):
        yield f"{kind}_chart", _chart(kind, seed)


def synthetic() -> Iterator[tuple[str, np.ndarray]]:
    """Noise, constants, checkerboards, a gradient."""
    rng = np.random.default_rng(0)
    yield "uniform_noise", rng.integers(0, 256, (512, 512), dtype=np.uint8)
    yield "gaussian_noise", np.clip(rng.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8)
    yield "blank_black", np.zeros((512, 512), np.uint8)
    yield "blank_white", np.full((512, 512), 255, np.uint8)
    yield "blank_grey", np.full((512, 512), 128, np.uint8)
    yield "skimage_chessboard", _skimage("chessboard_GRAY.png")
    squares = (np.indices((512, 512)) // 32).sum(axis=0) % 2
    yield "checkerboard_32", (squares * 255).astype(np.uint8)
    yield "gradient", np.tile(np.linspace(0, 255, 512), (512, 1)).astype(np.uint8)


# --- transformed chest X-rays ----------------------------------------------------------------


def corner_crop(img: np.ndarray, corner: int, share: float = 0.3) -> np.ndarray:
    """The ``share`` × ``share`` corner ``corner`` (0..3, clockwise from top-left) of ``img``."""
    h, w = img.shape
    ch, cw = max(8, round(h * share)), max(8, round(w * share))
    top = 0 if corner in (0, 1) else h - ch
    left = 0 if corner in (0, 3) else w - cw
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])


def lateral_proxy(img: np.ndarray, side: int) -> np.ndarray:
    """One half of a frontal view stretched to the full width (a proxy for a lateral view).

    A lateral chest X-ray shows one large lung field with the spine along one edge and the
    sternum along the other, with no left-right symmetry; half a frontal view stretched sideways
    has one lung field bounded by the spine on one side and the chest wall on the other. It is a
    proxy, not a lateral view: results on it say little about real laterals.
    """
    h, w = img.shape
    half = img[:, : w // 2] if side == 0 else img[:, w // 2 :]
    return cv2.resize(half, (w, h), interpolation=cv2.INTER_LINEAR)


def from_cxr(cxr_images: Sequence[np.ndarray]) -> Iterator[tuple[str, str, np.ndarray]]:
    """The CXR-derived categories, one or more images per given chest X-ray."""
    rotations = {
        "rot90": cv2.ROTATE_90_CLOCKWISE,
        "rot180": cv2.ROTATE_180,
        "rot270": cv2.ROTATE_90_COUNTERCLOCKWISE,
    }
    for i, img in enumerate(cxr_images):
        name = list(rotations)[i % 3]
        yield "cxr_rotated", f"cxr{i}_{name}", cv2.rotate(img, rotations[name])
    for i, img in enumerate(cxr_images):
        yield "cxr_inverted", f"cxr{i}_inverted", 255 - img
    for i, img in enumerate(cxr_images):
        yield "cxr_corner_crop", f"cxr{i}_corner{i % 4}", corner_crop(img, i % 4)
    for i, img in enumerate(cxr_images):
        yield "lateral_proxy", f"cxr{i}_half{i % 2}", lateral_proxy(img, i % 2)


# --- the whole set ---------------------------------------------------------------------------

_PACKAGE_SOURCES = {
    "photo": photos,
    "texture": textures,
    "medical_other": medical_other,
    "dicom_other_modality": lambda: _dicom_images(DICOM_OTHER_MODALITY),
    "xray_other_anatomy": lambda: _dicom_images(XRAY_OTHER_ANATOMY),
    "document": documents,
    "chart": charts,
    "synthetic": synthetic,
}


def devset(
    cxr_images: Sequence[np.ndarray] = (), *, per_category: int | None = None
) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(category, name, uint8 gray image)`` for every dev-set image.

    ``cxr_images``: raw chest X-rays (uint8 gray) held out of the gate, to transform.
    ``per_category``: at most this many images of each category (the first ones), for tests.
    """
    for category, source in _PACKAGE_SOURCES.items():
        for k, (name, img) in enumerate(source()):
            if per_category is not None and k >= per_category:
                break
            yield category, name, img
    counts: dict[str, int] = {}
    for category, name, img in from_cxr(cxr_images):
        counts[category] = counts.get(category, 0) + 1
        if per_category is None or counts[category] <= per_category:
            yield category, name, img


if __name__ == "__main__":
    for category, name, img in devset():
        print(f"{category:15s} {name:28s} {img.shape} {img.dtype} mean {img.mean():.0f}")
