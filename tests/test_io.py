"""Tests for cxr_pneumonia.io: decoding to uint8 gray, typed errors, size guard, file listing."""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from conftest import fixture_builder
from cxr_pneumonia import io
from cxr_pneumonia.io import (
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedDicomError,
    list_image_files,
    load_image,
    load_image_bytes,
)

DATA = Path(__file__).resolve().parent / "data" / "io"
SHARED_FULLRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-fullres"

# OpenCV's BGR -> gray weights (ITU-R BT.601) applied to pure red, green and blue.
GRAY_OF_RED, GRAY_OF_GREEN, GRAY_OF_BLUE = 76, 150, 29


def _encode(suffix: str, image: np.ndarray, *params: int) -> bytes:
    ok, buffer = cv2.imencode(suffix, image, list(params))
    assert ok, f"test setup: cannot encode {suffix}"
    return buffer.tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _gradient(height: int, width: int, high: int, dtype: type = np.uint8) -> np.ndarray:
    """Row-major ramp from 0 to ``high`` inclusive."""
    return np.linspace(0, high, height * width).round().astype(dtype).reshape(height, width)


def _bgr_quadrants() -> np.ndarray:
    """64x64 BGR: red, green, blue and white 32x32 quadrants (aligned to JPEG blocks)."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32, :32] = (0, 0, 255)
    image[:32, 32:] = (0, 255, 0)
    image[32:, :32] = (255, 0, 0)
    image[32:, 32:] = (255, 255, 255)
    return image


QUADRANT_GRAYS = np.kron(
    np.array([[GRAY_OF_RED, GRAY_OF_GREEN], [GRAY_OF_BLUE, 255]]), np.ones((32, 32))
).astype(np.uint8)


def _rgba_quadrants() -> np.ndarray:
    image = cv2.cvtColor(_bgr_quadrants(), cv2.COLOR_BGR2BGRA)
    image[:, ::2, 3] = 0  # alpha must be ignored, not composited
    return image


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.rint((values.astype(np.float64) - low) * 255 / (high - low)).astype(np.uint8)


# --- raster images --------------------------------------------------------------------------

RASTER_CASES = [
    # (id, suffix, image as OpenCV writes it, expected gray, max abs error)
    ("png-gray8", ".png", _gradient(24, 40, 255), _gradient(24, 40, 255), 0),
    (
        "png-gray16-12bit",
        ".png",
        _gradient(32, 32, 4095, np.uint16),
        _scaled(_gradient(32, 32, 4095, np.uint16), 0, 4095),
        0,
    ),
    (
        "png-gray16-offset-range",
        ".png",
        _gradient(32, 32, 2000, np.uint16) + 1000,
        _scaled(_gradient(32, 32, 2000, np.uint16), 0, 2000),
        0,
    ),
    ("png-rgb", ".png", _bgr_quadrants(), QUADRANT_GRAYS, 0),
    ("png-rgba", ".png", _rgba_quadrants(), QUADRANT_GRAYS, 0),
    ("jpeg-gray", ".jpg", _gradient(64, 48, 255), _gradient(64, 48, 255), 3),
    ("jpeg-rgb", ".jpeg", _bgr_quadrants(), QUADRANT_GRAYS, 3),
]


@pytest.mark.parametrize(
    ("suffix", "written", "expected", "atol"),
    [case[1:] for case in RASTER_CASES],
    ids=[case[0] for case in RASTER_CASES],
)
def test_load_raster_images(
    tmp_path: Path, suffix: str, written: np.ndarray, expected: np.ndarray, atol: int
) -> None:
    # Full-resolution chroma (4:4:4) keeps JPEG colour edges sharp enough for a tight tolerance.
    params = (cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, 0x111111)
    path = _write(tmp_path / f"image{suffix}", _encode(suffix, written, *params))
    image = load_image(path)
    assert image.dtype == np.uint8
    assert image.shape == expected.shape
    assert image.flags.c_contiguous
    np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=atol, rtol=0)


def test_16bit_png_uses_the_full_range_with_known_pixels(tmp_path: Path) -> None:
    values = np.array([[0, 1024, 2048, 4095]], np.uint16)  # 12-bit data stored in 16 bits
    image = load_image(_write(tmp_path / "12bit.png", _encode(".png", values)))
    # (v / 4095) * 255, rounded: not v / 257, which would leave the image nearly black.
    assert image.tolist() == [[0, 64, 128, 255]]


def test_constant_16bit_image_becomes_zeros(tmp_path: Path) -> None:
    path = _write(tmp_path / "flat.png", _encode(".png", np.full((4, 4), 999, np.uint16)))
    assert load_image(path).tolist() == [[0] * 4] * 4


def test_load_image_bytes_matches_load_image(tmp_path: Path) -> None:
    data = _encode(".png", _gradient(8, 8, 255))
    path = _write(tmp_path / "x.png", data)
    np.testing.assert_array_equal(load_image_bytes(data), load_image(str(path)))


def test_format_is_sniffed_from_bytes_not_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "really_a_png.jpg", _encode(".png", _gradient(8, 8, 255)))
    np.testing.assert_array_equal(load_image(path), _gradient(8, 8, 255))


# --- DICOM ----------------------------------------------------------------------------------


def _stored(name: str) -> np.ndarray:
    """The stored pixel values of a fixture, read by pydicom directly (not through io)."""
    return pydicom.dcmread(DATA / name).pixel_array.astype(np.float64)


def _expected_mono2_rescale() -> np.ndarray:
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window on the rescaled values, output mapped onto 0..255.
    values = _stored("mono2_rescale.dcm") * 2 - 1024
    center, width = 3000 - 0.5, 4000 - 1
    out = ((values - center) / width + 0.5) * 255
    out[values <= center - width / 2] = 0
    out[values > center + width / 2] = 255
    return np.rint(out)


def _expected_voilut() -> np.ndarray:
    return np.clip(2 * _stored("mono2_voilut.dcm") - 100, 0, 255)


def _expected_mono1() -> np.ndarray:
    return 255 - _scaled(_stored("mono1.dcm"), 10, 200).astype(np.float64)


def _expected_first_frame() -> np.ndarray:
    return np.arange(256, dtype=np.float64).reshape(16, 16)


def _expected_rgb() -> np.ndarray:
    return np.kron(np.array([[GRAY_OF_RED, GRAY_OF_GREEN]]), np.ones((16, 8)))


DICOM_CASES = [
    # (file, expected gray from an independent computation, warning expected or None)
    ("mono2_rescale.dcm", _expected_mono2_rescale, None),
    ("no_preamble.dcm", _expected_mono2_rescale, None),
    ("mono2_voilut.dcm", _expected_voilut, None),
    ("mono1.dcm", _expected_mono1, "MONOCHROME1"),
    ("multiframe.dcm", _expected_first_frame, "2 frames"),
    ("rgb.dcm", _expected_rgb, None),
    # the same dataset as mono2_rescale.dcm, JPEG Lossless compressed: decoded by python-gdcm
    ("jpeg_lossless.dcm", _expected_mono2_rescale, None),
]


@pytest.mark.parametrize(("filename", "expected", "warning"), DICOM_CASES)
def test_load_dicom(filename: str, expected: Callable[[], np.ndarray], warning: str | None, recwarn) -> None:
    if warning is None:
        image = load_image(DATA / filename)
        assert not recwarn.list
    else:
        with pytest.warns(UserWarning, match=warning):
            image = load_image(DATA / filename)
    assert image.dtype == np.uint8
    assert image.flags.c_contiguous
    want = expected()
    assert image.shape == want.shape
    np.testing.assert_allclose(image.astype(float), want, atol=1, rtol=0)


def test_dicom_window_clips_both_ends_with_known_pixels() -> None:
    image = load_image(DATA / "mono2_rescale.dcm")
    # Stored 0 -> -1024 HU-like value, far below the window [1000, 5000]; 4095 -> 7166, above.
    assert image[0, 0] == 0 and image[-1, -1] == 255
    assert (image == 0).sum() > 100 and (image == 255).sum() > 100
    # Pixels 500 and 503 store 2001 and 2013 -> 2978 and 3002, near the window centre:
    # ((x - 2999.5) / 3999 + 0.5) * 255 = 126.1 and 127.7.
    assert _stored("mono2_rescale.dcm").ravel()[[500, 503]].tolist() == [2001, 2013]
    assert image.ravel()[[500, 503]].tolist() == [126, 128]


def _mono2_variant(**changes: object) -> bytes:
    """``mono2_rescale.dcm`` with attributes changed (None deletes one), as file bytes."""
    ds = pydicom.dcmread(DATA / "mono2_rescale.dcm")
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buffer = BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _rescaled_mono2() -> np.ndarray:
    return _stored("mono2_rescale.dcm") * 2 - 1024


def _sigmoid_window() -> np.ndarray:
    # PS3.3 C.11.2.1.3.1: the sigmoid's output range (its asymptotes) maps onto 0..255.
    return np.rint(255 / (1 + np.exp(-4 * (_rescaled_mono2() - 3000) / 4000)))


def _wide_window() -> np.ndarray:
    return np.rint(((_rescaled_mono2() - 2999.5) / 19999 + 0.5) * 255)


def _full_range() -> np.ndarray:
    return _scaled(_rescaled_mono2(), -1024, 7166).astype(np.float64)


WINDOW_VARIANTS = [
    # (attribute changes, expected gray, warning expected or None)
    pytest.param({"VOILUTFunction": "SIGMOID"}, _sigmoid_window, None, id="sigmoid"),
    # A window wider than the data keeps the data mid-gray instead of stretching it to 0..255.
    pytest.param({"WindowWidth": 20000}, _wide_window, None, id="wide-window"),
    pytest.param({"WindowCenter": None, "WindowWidth": None}, _full_range, None, id="no-window"),
    pytest.param({"WindowWidth": 0}, _full_range, "invalid VOI LUT or window", id="zero-width"),
    pytest.param(
        {"PhotometricInterpretation": "MONOCHROME1"},
        lambda: 255 - _expected_mono2_rescale(),
        "MONOCHROME1",
        id="mono1-windowed-then-inverted",
    ),
]


@pytest.mark.parametrize(("changes", "expected", "warning"), WINDOW_VARIANTS)
def test_dicom_window_variants(
    changes: dict[str, object], expected: Callable[[], np.ndarray], warning: str | None, recwarn
) -> None:
    data = _mono2_variant(**changes)
    if warning is None:
        image = load_image_bytes(data)
        assert not recwarn.list
    else:
        with pytest.warns(UserWarning, match=warning):
            image = load_image_bytes(data)
    np.testing.assert_allclose(image.astype(float), expected(), atol=1, rtol=0)


def test_dicom_without_preamble_needs_a_dicom_suffix() -> None:
    data = (DATA / "no_preamble.dcm").read_bytes()
    assert load_image_bytes(data, name="scan.dcm").shape == (32, 32)
    with pytest.raises(NotAnImageError, match="<upload>"):
        load_image_bytes(data)


# --- bad input ------------------------------------------------------------------------------


def _real_jpeg() -> bytes:
    return _encode(".jpg", cv2.GaussianBlur(_gradient(64, 64, 255), (5, 5), 0))


def _png() -> bytes:
    return _encode(".png", _gradient(16, 16, 255))


def _dicom_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


JPEG, PNG = _real_jpeg(), _png()
BAD_INPUTS = [
    # file name, bytes, expected error class, words expected in the reason
    pytest.param("empty.jpg", b"", EmptyFileError, "empty", id="zero-bytes"),
    pytest.param("half.jpeg", JPEG[: len(JPEG) // 2], TruncatedImageError, "cut short", id="jpeg-half"),
    pytest.param("head.jpg", JPEG[:40], TruncatedImageError, "header", id="jpeg-cut-in-header"),
    pytest.param("half.png", PNG[: len(PNG) // 2], TruncatedImageError, "IEND", id="png-half"),
    pytest.param("ihdr.png", PNG[:20], TruncatedImageError, "IHDR", id="png-cut-in-ihdr"),
    pytest.param("notes.jpeg", b"some text\n", NotAnImageError, "not a PNG, JPEG", id="text-as-jpeg"),
    pytest.param("notes.dcm", b"some text\n" * 20, NotAnImageError, "not a PNG, JPEG", id="text-as-dcm"),
    pytest.param("scan.png", _encode(".bmp", _gradient(8, 8, 255)), NotAnImageError, "BM", id="bmp"),
    pytest.param("bad.jpg", JPEG[:20] + b"junk" * 4, NotAnImageError, "corrupt JPEG", id="jpeg-junk"),
    pytest.param("a.dcm", _dicom_bytes("no_pixels.dcm"), UnsupportedDicomError, "no pixel", id="no-pixels"),
    pytest.param("b.dcm", _dicom_bytes("jpegls_garbage.dcm"), UnsupportedDicomError, "JPEG-LS", id="jpeg-ls"),
    pytest.param("c.dcm", _dicom_bytes("jpeg2000_garbage.dcm"), UnsupportedDicomError, "JPEG 2000", id="j2k"),
    pytest.param("d.dcm", _dicom_bytes("palette.dcm"), UnsupportedDicomError, "PALETTE", id="palette"),
    pytest.param("e.dcm", _dicom_bytes("mono2_rescale.dcm")[:-100], TruncatedImageError, "cut", id="dcm-cut"),
]


@pytest.mark.parametrize(("filename", "data", "error", "reason"), BAD_INPUTS)
def test_bad_input_raises_a_specific_error(
    tmp_path: Path, filename: str, data: bytes, error: type[ImageReadError], reason: str
) -> None:
    path = _write(tmp_path / filename, data)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert type(info.value) is error
    assert info.value.path == str(path)
    assert reason in info.value.reason
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_rgb_dicom_with_32_bit_samples_is_read_as_gray(tmp_path: Path) -> None:
    """OpenCV's colour conversion refuses 32-bit samples; such a file once ended a whole batch."""
    value = 2**31
    pixels = np.zeros((8, 12, 3), np.uint32)
    pixels[:, 4:8, 0] = value  # red
    pixels[:, 8:, 1] = value  # green
    path = tmp_path / "rgb32.dcm"
    fixture_builder().build_dataset(pixels, photometric="RGB").save_as(path, enforce_file_format=True)
    image = load_image(path)
    # luminance 0, 0.299 and 0.587 of the value, min-max scaled: black, 0.299 / 0.587 of 255, 255
    expected = np.repeat([[0, round(0.299 / 0.587 * 255), 255]], 4, axis=1).repeat(8, axis=0)
    assert image.dtype == np.uint8 and image.shape == (8, 12)
    np.testing.assert_allclose(image, expected, atol=1)


def test_an_unforeseen_opencv_failure_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch) -> None:
    def failing_decoder(data, name, max_pixels):
        return cv2.cvtColor(np.zeros((2, 2, 3), np.uint32), cv2.COLOR_RGB2GRAY)  # a real cv2.error

    monkeypatch.setattr(io, "_decode_png", failing_decoder)
    path = _write(tmp_path / "odd.png", PNG)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: could not be decoded (Unsupported depth of input image")
    assert "\n" not in message and "cv::" not in message


def test_malformed_dicom_attribute_is_an_error_not_a_crash() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("badVR.dcm", download=False)  # NumberOfFrames '1A'
    with pytest.raises(UnsupportedDicomError) as info, pytest.warns(UserWarning, match="VR IS: '1A'"):
        load_image(path)
    assert str(info.value) == f"{path}: invalid NumberOfFrames '1A'"


def test_a_dicom_element_of_the_wrong_length_is_a_one_line_error() -> None:
    """Rows (US, 2 bytes) stored with length 3: pydicom raises its BytesLengthException, derived from
    Exception only, when the element is first read. It once escaped: a 500 from serve, a crashed
    batch in predict."""
    from pydicom.data import get_testdata_file

    data = bytearray(Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    rows = data.find(b"\x28\x00\x10\x00US\x02\x00")  # (0028,0010), explicit VR little endian
    assert rows > 0
    data[rows + 6] = 3
    data[rows + 8 : rows + 8] = b"\x00"
    with pytest.raises(UnsupportedDicomError) as info:
        load_image_bytes(bytes(data), name="bad.dcm")
    message = str(info.value)
    assert message.startswith("bad.dcm: could not be decoded (BytesLengthException: Expected total bytes")
    assert "\n" not in message


def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path: Path) -> None:
    """Orientation 6 (a phone held upright): stored 40x60, shown 60x40 turned clockwise, as
    Pillow's exif_transpose shows it."""
    from PIL import Image, ImageOps

    stored = np.zeros((40, 60), np.uint8)
    stored[:10, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)
    image = load_image(path)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L"))
    assert image.shape == (60, 40) and np.array_equal(image, shown)
    assert image[:20, -10:].mean() > 200 and image[-20:, :10].mean() < 50  # the block went top-right


def _deflated_ct(extra_zero_bytes: int) -> bytes:
    """pydicom's CT_small.dcm re-saved deflated, with a private element of zeros (0: none)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    if extra_zero_bytes:
        ds.add_new(0x00091010, "OB", b"\0" * extra_zero_bytes)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflated_dicom_is_read_and_a_deflate_bomb_is_refused_before_it_is_inflated() -> None:
    """pydicom inflates a deflated data set whole before any attribute can be checked: 36 kB that
    inflate to 10 MB are refused under a limit of 16 bytes per allowed pixel, counted a chunk at a
    time, while the same image without the zeros reads as the uncompressed file does."""
    from pydicom.data import get_testdata_file

    plain = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    expected = load_image_bytes(plain, name="plain.dcm")
    np.testing.assert_array_equal(load_image_bytes(_deflated_ct(0), name="d.dcm"), expected)
    bomb = _deflated_ct(10_000_000)
    assert len(bomb) < 50_000
    with pytest.raises(io.ImageTooLargeError) as info:
        load_image_bytes(bomb, name="bomb.dcm", max_pixels=100_000)
    assert str(info.value) == (
        "bomb.dcm: deflated DICOM data set inflates to more than 1,600,000 bytes, more than an image "
        "of the limit of 100,000 pixels (max_pixels) needs"
    )
    np.testing.assert_array_equal(load_image_bytes(bomb, name="bomb.dcm", max_pixels=1_000_000), expected)


def _implicit_vr_meta(data: bytes) -> bytes:
    """The same file with its file meta group written implicit VR, as some broken writers do."""
    parts, offset = [data[:132]], 132
    while data[offset : offset + 2] == b"\x02\x00":
        if data[offset + 4 : offset + 6] in (b"OB", b"UN", b"UT", b"SQ"):
            length, start = struct.unpack_from("<I", data, offset + 8)[0], offset + 12
        else:
            length, start = struct.unpack_from("<H", data, offset + 6)[0], offset + 8
        parts.append(data[offset : offset + 4] + struct.pack("<I", length) + data[start : start + length])
        offset = start + length
    return b"".join([*parts, data[offset:]])


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # pydicom's note on the broken meta
def test_a_deflated_dicom_behind_a_file_meta_the_guard_cannot_walk_is_refused() -> None:
    """The bomb guard found the transfer syntax by walking the explicit-VR file meta; written
    implicit VR, the walk stopped at once and the guard let pydicom inflate it whole (8 kB to
    8 MB in the reviewer's case)."""
    bomb = _implicit_vr_meta(_deflated_ct(10_000_000))
    assert pydicom.dcmread(BytesIO(bomb), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_deflated
    with pytest.raises(
        io.UnsupportedDicomError, match="deflated data set behind a file meta group that cannot"
    ):
        load_image_bytes(bomb, name="bomb.dcm", max_pixels=100_000)


def test_an_unforeseen_decoder_exception_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    def failing_decoder(data, name, max_pixels):
        return {}["PixelSpacing"]  # as pydicom's lazy parsing of a malformed header may raise

    monkeypatch.setattr(io, "_decode_png", failing_decoder)
    path = _write(tmp_path / "odd.png", PNG)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: could not be decoded (KeyError: 'PixelSpacing')"


def test_missing_dicom_decoder_names_the_packages(monkeypatch) -> None:
    """python-gdcm is a dependency; where it is missing (or broken), a compressed file says so."""
    from types import SimpleNamespace

    real = io._pydicom

    def without_decoders() -> SimpleNamespace:
        def first_frame(ds):
            raise RuntimeError("no plugin can decode it")

        unavailable = lambda syntax: SimpleNamespace(is_available=False)  # noqa: E731
        return SimpleNamespace(**{**vars(real()), "first_frame": first_frame, "get_decoder": unavailable})

    monkeypatch.setattr(io, "_pydicom", without_decoders)
    with pytest.raises(UnsupportedDicomError) as info:
        load_image(DATA / "jpeg_lossless.dcm")
    reason = info.value.reason
    assert "1.2.840.10008.1.2.4.70" in reason and "needs a decoder: pip install python-gdcm" in reason


@pytest.mark.parametrize("target", [lambda p: p, str], ids=["path", "str"])
def test_missing_file_and_directory(tmp_path: Path, target: Callable) -> None:
    with pytest.raises(ImageReadError, match="no such file") as info:
        load_image(target(tmp_path / "absent.png"))
    assert info.value.path == str(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="directory"):
        load_image(target(tmp_path))


def test_truncated_jpeg_is_rejected_before_libjpeg_prints_anything(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = _real_jpeg()
    path = _write(tmp_path / "cut.jpg", data[: len(data) * 3 // 4])
    with pytest.raises(TruncatedImageError):
        load_image(path)
    assert capfd.readouterr().err == ""


def test_jpeg_cut_short_and_closed_with_an_end_marker_is_truncated(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The end-of-image marker check passed such a file; OpenCV then printed libjpeg's warning
    and returned the image with its lower part grey."""
    data = _real_jpeg()
    path = _write(tmp_path / "closed.jpg", data[: len(data) // 2] + b"\xff\xd9")
    with pytest.raises(TruncatedImageError, match=r"closed\.jpg: JPEG data ends before the image does"):
        load_image(path)
    assert capfd.readouterr().err == ""
    assert load_image(_write(tmp_path / "whole.jpg", data)).shape == (64, 64)
    # with restart markers, a cut at one of them makes libjpeg name the marker it found instead
    _, encoded = cv2.imencode(
        ".jpg", cv2.GaussianBlur(_gradient(64, 64, 255), (5, 5), 0), [cv2.IMWRITE_JPEG_RST_INTERVAL, 1]
    )
    restart = encoded.tobytes()
    cut = restart.index(b"\xff\xd3", restart.index(b"\xff\xda"))  # the fourth restart marker
    with pytest.raises(TruncatedImageError, match="ends before the image does"):
        load_image(_write(tmp_path / "restart.jpg", restart[:cut] + b"\xff\xd9"))
    assert load_image(_write(tmp_path / "restart_whole.jpg", restart)).shape == (64, 64)
    assert capfd.readouterr().err == ""


def test_jpeg_with_trailing_bytes_after_eoi_is_accepted(tmp_path: Path) -> None:
    data = _real_jpeg()
    for tail in (b"\x00" * 10, b"vendor trailer"):
        assert load_image(_write(tmp_path / "t.jpg", data + tail)).shape == (64, 64)


def test_error_message_names_the_upload() -> None:
    with pytest.raises(EmptyFileError, match=r"^<upload>: empty file"):
        load_image_bytes(b"")
    with pytest.raises(NotAnImageError, match=r"^chest\.jpg: "):
        load_image_bytes(b"hello", name="chest.jpg")


# --- decompression-bomb guard ---------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """PNG signature and IHDR declaring ``width`` x ``height``, and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _jpeg_header_only(width: int, height: int) -> bytes:
    """SOI and a baseline SOF0 declaring ``width`` x ``height``, then SOS and nothing more."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"


SIZE_CASES = [
    # (id, bytes, suffix, width x height)
    ("png", _encode(".png", _gradient(30, 40, 255)), ".png", 1200),
    ("jpeg", _encode(".jpg", _gradient(30, 40, 255)), ".jpg", 1200),
    ("dicom", _dicom_bytes("mono2_rescale.dcm"), ".dcm", 1024),
]


@pytest.mark.parametrize(
    ("data", "suffix", "pixels"), [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES]
)
def test_max_pixels_limit(tmp_path: Path, data: bytes, suffix: str, pixels: int) -> None:
    path = _write(tmp_path / f"img{suffix}", data)
    assert load_image(path, max_pixels=pixels).size == pixels
    with pytest.raises(ImageTooLargeError, match=f"{pixels:,} pixels") as info:
        load_image(path, max_pixels=pixels - 1)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "data",
    [_png_header_only(100_000, 100_000), _jpeg_header_only(60_000, 60_000)],
    ids=["png", "jpeg"],
)
def test_size_is_checked_from_the_header_before_decoding(data: bytes) -> None:
    # These files hold no pixel data at all: only a header check can give this error.
    with pytest.raises(ImageTooLargeError, match="more than the limit of 50,000,000"):
        load_image_bytes(data)


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image_bytes(_png(), max_pixels=0)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_class",
    [
        ImageReadError,
        EmptyFileError,
        TruncatedImageError,
        NotAnImageError,
        UnsupportedDicomError,
        ImageTooLargeError,
    ],
)
def test_errors_are_value_errors_that_survive_pickling(error_class: type[ImageReadError]) -> None:
    err = error_class("dir/a.png", "first line\nsecond line")
    assert isinstance(err, ValueError)
    assert str(err) == "dir/a.png: first line second line"
    copy = pickle.loads(pickle.dumps(err))  # errors cross process-pool boundaries
    assert type(copy) is error_class
    assert (copy.path, copy.reason, str(copy)) == (err.path, err.reason, str(err))


# --- DICOM sniffing and listing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x00" * 128 + b"DICM", True),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", True),
        (b"\x00" * 128 + b"DICX", False),
        (b"\x00" * 131, False),
        (b"DICM" + b"\x00" * 128, False),
        (b"", False),
    ],
)
def test_is_dicom(head: bytes, expected: bool) -> None:
    assert io.is_dicom(head) is expected


def test_list_image_files(tmp_path: Path) -> None:
    dicom = _dicom_bytes("mono2_rescale.dcm")
    for name, data in {
        "b.PNG": _png(),
        "a/scan.JPG": _real_jpeg(),
        "a/deep/x.dicom": dicom,
        "a/deep/y.DCM": dicom,
        "IM0001": dicom,  # suffix-less DICOM
        "series/1.2.840.113619.5": dicom,  # UID-named DICOM
        "README": b"no suffix, not DICOM",
        "notes.txt": dicom,  # only suffix-less / UID-named files are sniffed
        "series/1.2.840.9": b"\x00" * 200,  # UID-named, not DICOM
        ".hidden.png": _png(),
        ".cache/c.png": _png(),
        "a/.git/d.jpg": _real_jpeg(),
        "empty.jpeg": b"",  # listed by suffix: reading it is what fails
    }.items():
        _write(tmp_path / name, data)
    found = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert found == [
        "IM0001",
        "a/deep/x.dicom",
        "a/deep/y.DCM",
        "a/scan.JPG",
        "b.PNG",
        "empty.jpeg",
        "series/1.2.840.113619.5",
    ]
    assert frozenset({".jpg", ".jpeg", ".png", ".dcm", ".dicom"}) == io.IMAGE_SUFFIXES


def test_list_image_files_finds_and_loads_suffixless_dicom(tmp_path: Path) -> None:
    shutil.copyfile(DATA / "mono2_rescale.dcm", tmp_path / "IM0001")
    (found,) = list_image_files(tmp_path)
    np.testing.assert_array_equal(load_image(found), load_image(DATA / "mono2_rescale.dcm"))


def test_list_image_files_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="absent"):
        list_image_files(tmp_path / "absent")


# --- shared fixtures and real images --------------------------------------------------------


def test_bad_inputs_dir_fixture_matches_the_reader(bad_inputs_dir) -> None:
    folder, expected_failures = bad_inputs_dir
    files = list_image_files(folder)
    assert len(files) == 8
    for path in files:
        if path.name in expected_failures:
            with pytest.raises(expected_failures[path.name]):
                load_image(path)
        else:
            image = load_image(path)
            assert image.dtype == np.uint8 and image.ndim == 2 and image.max() > image.min()


def _real_images() -> list[Path]:
    if not SHARED_FULLRES.is_dir():
        return []
    files = list_image_files(SHARED_FULLRES)
    return files[:2] + files[-2:]  # both classes (NORMAL and PNEUMONIA sort apart)


@pytest.mark.parametrize("index", range(4))
def test_real_full_resolution_images(index: int) -> None:
    files = _real_images()
    if len(files) <= index:
        pytest.skip(f"real images not found under {SHARED_FULLRES}")
    path = files[index]
    image = load_image(path)
    reference = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image.dtype == np.uint8 and image.flags.c_contiguous
    assert image.shape == reference.shape and min(image.shape) > 500
    # Colour JPEGs go through BGR->gray rather than libjpeg's luma: equal up to rounding.
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 1.0


def test_real_jpeg_cut_in_half_is_truncated(tmp_path: Path) -> None:
    files = _real_images()
    if not files:
        pytest.skip(f"real images not found under {SHARED_FULLRES}")
    data = files[0].read_bytes()
    path = _write(tmp_path / files[0].name, data[: len(data) // 2])
    with pytest.raises(TruncatedImageError, match=files[0].name):
        load_image(path)


def test_pydicom_is_imported_only_when_a_dicom_is_read() -> None:
    code = (
        "import sys, cxr_pneumonia.io as io; assert 'pydicom' not in sys.modules; "
        f"io.load_image({str(DATA / 'mono2_rescale.dcm')!r}); assert 'pydicom' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_dicom_objects_that_are_not_images_are_left_out_of_listings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS export holds structured reports and plans beside the images; each was an
    unreadable file ("no pixel data") that made every command exit 2. An image object without
    its pixels is still listed: it is a broken image, and loading it says so."""
    from pydicom.data import get_testdata_file

    build = fixture_builder().build_dataset
    build(np.full((8, 8), 100, np.uint8)).save_as(tmp_path / "chest.dcm", enforce_file_format=True)
    broken = build(np.full((8, 8), 100, np.uint8))
    del broken.PixelData
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    shutil.copy(get_testdata_file("test-SR.dcm", download=False), tmp_path / "1.2.826.0.1.3680043.2.1")
    shutil.copy(get_testdata_file("rtplan.dcm", download=False), tmp_path / "plan.dcm")
    with caplog.at_level("INFO", logger="cxr_pneumonia.io"):
        listed = io.list_image_files(tmp_path)
    assert [p.name for p in listed] == ["broken.dcm", "chest.dcm"]
    assert caplog.messages == [
        f"{tmp_path}: skipped 2 DICOM objects that hold no image (Comprehensive SR Storage, RT Plan Storage)"
    ]
    assert io.holds_no_image(tmp_path / "plan.dcm") == "RT Plan Storage"
    assert io.holds_no_image(tmp_path / "broken.dcm") is None  # Secondary Capture Image Storage
    with pytest.raises(io.UnsupportedDicomError, match="no pixel data in this Secondary Capture"):
        load_image(tmp_path / "broken.dcm")
