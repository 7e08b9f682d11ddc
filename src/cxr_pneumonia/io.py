"""Read chest X-rays (PNG, JPEG, DICOM) into one pixel contract: uint8, H×W grayscale.

Formats are recognised by their bytes, not their file names (a ``.dcm``/``.dicom`` suffix only
lets a DICOM without the 128-byte preamble be tried). Every failure raises a subclass of
:class:`ImageReadError` whose message names the file and the reason, and image sizes are checked
from the headers before anything is decoded (decompression-bomb guard).

pydicom is imported only when a DICOM is read.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import simplejpeg

from cxr_pneumonia.header import DicomHeader

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest width × height accepted by default (a 7000×7000 radiograph is 49 MP)."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# The file name DICOM media give their directory record (PS3.10 8.6): an index, without pixels.
DICOMDIR_NAME = "DICOMDIR"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
# The one signature table: what serve accepts and what load_image_bytes decodes.
_SIGNATURES = ((_PNG_MAGIC, "png"), (_JPEG_MAGIC, "jpeg"))
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) are not SOFs.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI/EOI are handled explicitly).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB")


class ImageReadError(ValueError):
    """An image file could not be read; ``str(err)`` is ``"{path}: {reason}"`` on one line."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        path = str(path)
        # Reasons often embed library messages spanning several lines; logs and CSVs want one.
        reason = " ".join(str(reason).split())
        # Both values go to ValueError so the error pickles across worker processes.
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return " ".join(f"{self.path}: {self.reason}".splitlines())


class EmptyFileError(ImageReadError):
    """The file has zero bytes."""


class TruncatedImageError(ImageReadError):
    """The file ends before the image does (an interrupted copy or download)."""


class NotAnImageError(ImageReadError):
    """The bytes are not a decodable PNG, JPEG or DICOM image."""


class UnsupportedDicomError(ImageReadError):
    """A DICOM file this reader cannot turn into a grayscale image."""


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than ``max_pixels`` (decompression-bomb guard)."""


def is_dicom(head: bytes) -> bool:
    """Whether ``head`` (the first 132+ bytes of a file) starts like a DICOM Part 10 file."""
    end = _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)
    return len(head) >= end and bytes(head[_DICOM_MAGIC_OFFSET:end]) == _DICOM_MAGIC


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from the leading bytes; None when it is none of them."""
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            return kind
    return "dicom" if is_dicom(data) else None


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file as a uint8, C-contiguous H×W grayscale array.

    Raises:
        ImageReadError: (or a subclass) naming ``path`` and the reason it cannot be read.
    """
    return load_image_and_header(path, max_pixels=max_pixels)[0]


def load_image_and_header(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, DicomHeader | None]:
    """:func:`load_image` and what a DICOM's header declares about the image (None for PNG and
    JPEG files), for :func:`cxr_pneumonia.header.rejection_reason`."""
    path = Path(path)
    return load_image_bytes_and_header(read_file(path), name=str(path), max_pixels=max_pixels)


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``; :class:`ImageReadError` saying why in one line when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageReadError(path, "no such file") from err
    except IsADirectoryError as err:
        raise ImageReadError(path, "is a directory, not an image file") from err
    except OSError as err:
        raise ImageReadError(path, f"cannot read file: {err.strerror or err}") from err


_MALFORMED_INPUT_ERRORS = (
    ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, NotImplementedError,
)  # fmt: skip


def load_image_bytes(
    data: bytes, *, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes as a uint8, C-contiguous H×W grayscale array.

    ``name`` appears in error messages; its suffix matters only for DICOM without a preamble.
    16-bit images and DICOM values are min-max scaled to 0..255 (after the DICOM modality and
    VOI transforms); colour is converted to gray and alpha is dropped.

    Raises:
        ImageReadError: (or a subclass) naming ``name`` and the reason it cannot be read.
    """
    return load_image_bytes_and_header(data, name=name, max_pixels=max_pixels)[0]


def load_image_bytes_and_header(
    data: bytes, *, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, DicomHeader | None]:
    """:func:`load_image_bytes` and the DICOM header's declarations (None for PNG and JPEG)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise EmptyFileError(name, "empty file (0 bytes)")
    kind = sniff_format(data)
    header = None
    dicom = kind == "dicom" or (kind not in ("png", "jpeg") and Path(name).suffix.lower() in DICOM_SUFFIXES)
    try:
        if kind == "png":
            image = _decode_png(data, name, max_pixels)
        elif kind == "jpeg":
            image = _decode_jpeg(data, name, max_pixels)
        elif dicom:
            image, header = _decode_dicom(data, name, max_pixels)
        else:
            raise NotAnImageError(name, _not_an_image_reason(data))
    except (ImageReadError, MemoryError):
        raise
    # A case the decoders above do not foresee must still name the file, in one line, and not
    # end a batch. OpenCV's own message spans several lines of C++ signatures.
    except cv2.error as err:
        detail = " ".join(line.strip("> ").strip() for line in (getattr(err, "err", "") or "").splitlines())
        raise ImageReadError(name, f"could not be decoded ({detail or 'OpenCV error'})") from err
    except _MALFORMED_INPUT_ERRORS as err:
        # Malformed headers surface from pydicom's lazy element parsing as any of these.
        raise ImageReadError(name, f"could not be decoded ({type(err).__name__}: {err})") from err
    except Exception as err:
        if not dicom:
            raise
        # pydicom also raises classes of its own from a lazily parsed element (an element of the
        # wrong length: BytesLengthException, derived from Exception only).
        detail = " ".join(str(err).split())[:200]
        raise UnsupportedDicomError(name, f"could not be decoded ({type(err).__name__}: {detail})") from err
    logger.debug("read %s: %dx%d", name, image.shape[1], image.shape[0])
    return np.ascontiguousarray(image), header


def list_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, recursively and sorted.

    A file qualifies by its suffix (``IMAGE_SUFFIXES``, any case), or, when it has no suffix or
    only a numeric one (DICOM files are often named by UID, e.g. ``1.2.840.113619.2.55``), by
    DICOM bytes. Hidden files and folders (names starting with ``.``) are skipped, and so is a
    ``DICOMDIR``: the index of an exported study (a CD or a PACS export folder), not an image.
    So are DICOM objects that are not images (:func:`holds_no_image`: structured reports,
    presentation states...), which an export holds beside the images; how many is logged.

    Raises:
        NotADirectoryError: ``root`` is not an existing folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    found: list[Path] = []
    not_images: list[tuple[Path, str]] = []
    for folder, subfolders, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into .git, .cache, ...
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or filename.upper() == DICOMDIR_NAME:
                continue
            path = Path(folder) / filename
            suffix = path.suffix.lower()
            head = _head(path) if suffix in DICOM_SUFFIXES or _maybe_uid_named(suffix) else b""
            if not (suffix in IMAGE_SUFFIXES or is_dicom(head)):
                continue
            kind = holds_no_image(path, head) if is_dicom(head) else None
            if kind:
                not_images.append((path, kind))
            else:
                found.append(path)
    if not_images:
        kinds = sorted({kind for _, kind in not_images})
        logger.info(
            "%s: skipped %d DICOM objects that hold no image (%s)", root, len(not_images), ", ".join(kinds)
        )
    return sorted(found)


def holds_no_image(path: Path, head: bytes | None = None) -> str | None:
    """The kind of a DICOM object that is not an image and has no pixel data (``"Basic Text SR
    Storage"``, ``"Grayscale Softcopy Presentation State Storage"``, ``"RT Plan Storage"``...);
    None for an image, or a file this cannot tell (loading it says why it fails, if it does).

    Both must hold: an image object that lost its pixels is a broken image, to be reported. The
    SOP class comes from the file meta in the first bytes (``head``, read when not given), walked
    here: pydicom parses the rest of the data set (its large values unread) only when the class is
    not an image's, and never when it is deflated (it could inflate to gigabytes). A file without
    the preamble and file meta is not judged.
    """
    try:
        head = _head(path) if head is None else head
        if not is_dicom(head):
            return None
        elements, _, complete = _file_meta_elements(head)
        dicom = _pydicom()
        if not complete or 0x0002 not in elements:  # rare: let pydicom read the meta (no data set)
            meta = dicom.read_file_meta_info(path)
            elements = {
                0x0002: str(meta.get("MediaStorageSOPClassUID", "")).encode(),
                0x0010: str(meta.get("TransferSyntaxUID", "")).encode(),
            }
        sop_class = elements.get(0x0002, b"").rstrip(b"\x00 ").decode("ascii")
        transfer_syntax = elements.get(0x0010, b"").rstrip(b"\x00 ")
        if not sop_class or transfer_syntax == DEFLATED_TRANSFER_SYNTAX:
            return None
        kind = dicom.uid.UID(sop_class).name
        # pydicom names an unknown UID by the UID itself: only a registered name says what it is.
        if not kind or kind[0].isdigit() or "Image" in kind:
            return None
        return None if _has_pixel_data(dicom.dcmread(path, defer_size=1024)) else kind
    except Exception:  # pydicom raises many exception types on malformed input
        return None


def _head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of ``path`` (a DICOM's preamble and file meta fit); b"" when it
    cannot be read (loading it says why)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def _maybe_uid_named(suffix: str) -> bool:
    return suffix == "" or suffix[1:].isdigit()


def _not_an_image_reason(data: bytes) -> str:
    return f"not a PNG, JPEG or DICOM file (starts with {bytes(data[:16])!r})"


def _check_size(width: int, height: int, name: str, kind: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise NotAnImageError(name, f"{kind} header declares an empty {width}x{height} image")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            name,
            f"{kind} is {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,} (max_pixels)",
        )


# --- PNG and JPEG -----------------------------------------------------------------------------


def _decode_png(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    width, height = _png_size(data, name)
    _check_size(width, height, name, "PNG", max_pixels)
    # Every complete PNG ends with an IEND chunk; without one the file was cut short.
    if data.rfind(b"IEND", len(_PNG_MAGIC)) < 0:
        raise TruncatedImageError(name, "PNG has no IEND chunk (file cut short)")
    return _decode_raster(data, name, "PNG")


def _png_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must come first."""
    header_end = len(_PNG_MAGIC) + 16  # length(4) type(4) width(4) height(4)
    if len(data) < header_end:
        raise TruncatedImageError(name, "PNG ends inside its IHDR header (file cut short)")
    if data[12:16] != b"IHDR":
        raise NotAnImageError(name, "corrupt PNG: the first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _decode_jpeg(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    width, height, scan_start = _jpeg_header(data, name)
    _check_size(width, height, name, "JPEG", max_pixels)
    # Entropy-coded data never contains FF D9 (FF is byte-stuffed), so the last scan is complete
    # only if an EOI marker follows the first SOS; this also tolerates trailing padding.
    if data.rfind(b"\xff\xd9", scan_start) < 0:
        raise TruncatedImageError(name, "JPEG has no end-of-image marker (file cut short)")
    _check_scan_complete(data, name)
    return _decode_raster(data, name, "JPEG")


def _check_scan_complete(data: bytes, name: str) -> None:
    """TruncatedImageError when the entropy-coded data ends before the image does.

    A file cut short and then closed with an end-of-image marker (a broken transfer "repaired",
    a partial write) passes the marker check; libjpeg then only warns, OpenCV prints the warning
    and returns the image with the missing part grey. simplejpeg's strict mode turns libjpeg's
    warnings into errors; a 1/8-scale decode still reads all the entropy-coded data (about 0.6 of
    a full decode's time: 3 ms for a 1800×1500 image). Only the end marker met too early refuses
    the file ("premature end"; with restart markers, "found marker 0xd9 instead of RSTn"): other
    warnings (stray bytes before a marker) are common in files that viewers show as intended, and
    formats simplejpeg does not read are left to OpenCV.
    """
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, min_factor=8)
    except ValueError as err:
        if "premature end of data segment" in str(err) or "found marker 0xd9 instead of RST" in str(err):
            raise TruncatedImageError(
                name, "JPEG data ends before the image does (file cut short; the rest would be grey)"
            ) from err


def _jpeg_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(width, height, offset of the first scan) from the markers before the first SOS."""
    size: tuple[int, int] | None = None
    pos, end = 2, len(data)
    while True:
        if pos >= end:
            raise TruncatedImageError(name, "JPEG ends inside its header (file cut short)")
        if data[pos] != 0xFF:
            raise NotAnImageError(name, f"corrupt JPEG: no marker at byte {pos}")
        while pos < end and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= end:
            raise TruncatedImageError(name, "JPEG ends inside its header (file cut short)")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == _JPEG_EOI:
            raise NotAnImageError(name, "corrupt JPEG: end-of-image marker before any scan")
        if pos + 2 > end:
            raise TruncatedImageError(name, "JPEG ends inside its header (file cut short)")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise NotAnImageError(name, f"corrupt JPEG: segment length {length} at byte {pos}")
        if marker in _JPEG_SOF_MARKERS:
            if pos + 7 > end:
                raise TruncatedImageError(name, "JPEG ends inside its frame header")
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            size = (width, height)
        elif marker == _JPEG_SOS:
            if size is None:
                raise NotAnImageError(name, "corrupt JPEG: scan data before any frame header")
            return size[0], size[1], pos
        pos += length


def _decode_raster(data: bytes, name: str, kind: str) -> np.ndarray:
    try:
        # ANYDEPTH | ANYCOLOR keeps 16 bits and colour as UNCHANGED does, and also applies an EXIF
        # orientation (UNCHANGED ignores it): a photographed film stays upright, as viewers show it.
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as err:
        raise NotAnImageError(name, f"corrupt {kind}: OpenCV failed: {err}") from err
    if image is None:
        raise NotAnImageError(name, f"corrupt {kind}: OpenCV could not decode it")
    return _raster_to_gray_uint8(image, name)


def _raster_to_gray_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray, 8 or 16 bit -> uint8 gray (alpha dropped, 16 bit min-max scaled)."""
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        else:
            raise NotAnImageError(name, f"unsupported number of channels: {channels}")
    if image.dtype == np.uint8:
        return image
    # 12-bit data stored in 16 bits would come out nearly black with a fixed /257.
    return _scale_to_uint8(image)


def _scale_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the array's own range) linearly onto 0..255, clipping outside.

    A constant image (high <= low) becomes all zeros.
    """
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # float32 is exact for 16-bit integers and halves the memory of float64 on large images.
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    np.clip(scaled, 0, 255, out=scaled)
    return np.rint(scaled).astype(np.uint8)


# --- DICOM ------------------------------------------------------------------------------------


def _pydicom() -> SimpleNamespace:
    """The pydicom functions used here, imported lazily (pydicom 3 API, 2.4 fallback)."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
    except ImportError as err:
        raise ImportError("reading DICOM files needs pydicom: pip install pydicom") from err
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

        def first_frame(ds: Any) -> np.ndarray:
            # index=0 decodes only the first frame of a multi-frame file.
            return pixel_array(ds, index=0)

    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

        get_decoder = None

        def first_frame(ds: Any) -> np.ndarray:
            frames = ds.pixel_array
            return frames[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else frames

    return SimpleNamespace(
        dcmread=pydicom.dcmread,
        read_file_meta_info=pydicom.filereader.read_file_meta_info,
        uid=pydicom.uid,
        FileMetaDataset=FileMetaDataset,
        apply_modality_lut=apply_modality_lut,
        apply_voi_lut=apply_voi_lut,
        get_decoder=get_decoder,
        first_frame=first_frame,
    )


DEFLATED_TRANSFER_SYNTAX = b"1.2.840.10008.1.2.1.99"
# Bytes a deflated data set may inflate to per pixel of max_pixels: the widest pixel (RGB at 32
# bits, 12 bytes) with room for the rest of the data set.
DEFLATED_BYTES_PER_PIXEL = 16
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def _file_meta_elements(data: bytes) -> tuple[dict[int, bytes], int, bool]:
    """The file meta group after a preamble (group 2, explicit VR little endian by the standard):
    each element's value by element number, the offset of the data set after it, and whether
    the walk is complete (it ended on a tag of another group, nothing cut off). A broken writer's
    implicit VR or big-endian meta, or one cut short, is incomplete."""
    elements: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(data) and data[offset : offset + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, offset + 2)[0]
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                return elements, offset, False
            length, offset = struct.unpack_from("<I", data, offset + 8)[0], offset + 12
        elif vr.isalpha() and vr.isupper():
            length, offset = struct.unpack_from("<H", data, offset + 6)[0], offset + 8
        else:  # not explicit VR
            return elements, offset, False
        if offset + length > len(data):
            return elements, offset, False
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements, offset, offset + 2 <= len(data)


def _check_inflated_size(data: bytes, name: str, max_pixels: int) -> None:
    """pydicom inflates a deflated data set whole before any attribute can be checked, so a small
    upload could hold gigabytes (a decompression bomb). Inflate it here a chunk at a time, only
    counting, and refuse it past what an image of ``max_pixels`` could need."""
    elements, start, complete = _file_meta_elements(data)
    if not complete:
        # pydicom reads meta this walk cannot (and would inflate what follows): refuse the one case
        # that matters, a deflated transfer syntax, rather than guess where its data set starts
        if DEFLATED_TRANSFER_SYNTAX in data[132 : 132 + 8192]:
            raise UnsupportedDicomError(
                name, "deflated data set behind a file meta group that cannot be read"
            )
        return
    if elements.get(0x0010, b"").rstrip(b"\x00 ") != DEFLATED_TRANSFER_SYNTAX:
        return
    limit = DEFLATED_BYTES_PER_PIXEL * max_pixels
    inflater, pending, size = zlib.decompressobj(-zlib.MAX_WBITS), data[start:], 0
    try:
        while pending and size <= limit:
            size += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
    except zlib.error as err:
        raise UnsupportedDicomError(name, f"deflated data set cannot be inflated ({err})") from err
    if size > limit:
        raise ImageTooLargeError(
            name, f"deflated DICOM data set inflates to more than {limit:,} bytes, more than an image "
            f"of the limit of {max_pixels:,} pixels (max_pixels) needs",
        )  # fmt: skip


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, DicomHeader]:
    dicom = _pydicom()
    has_preamble = is_dicom(data)
    if has_preamble:
        _check_inflated_size(data, name, max_pixels)
    try:
        # force=True also reads datasets without the preamble (tried only for .dcm/.dicom names).
        ds = dicom.dcmread(BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many exception types on malformed input
        if not has_preamble:
            raise NotAnImageError(name, _not_an_image_reason(data)) from err
        raise UnsupportedDicomError(name, f"unreadable DICOM header: {err}") from err
    if not has_preamble and "Rows" not in ds and not _has_pixel_data(ds):
        # force=True "reads" any bytes; without image attributes it was not a DICOM at all.
        raise NotAnImageError(name, _not_an_image_reason(data))
    if not _has_pixel_data(ds):
        raise UnsupportedDicomError(name, _no_pixels_reason(ds))
    return _dicom_pixels(ds, dicom, name, max_pixels), DicomHeader.from_dataset(ds)


def _dicom_pixels(ds: Any, dicom: SimpleNamespace, name: str, max_pixels: int) -> np.ndarray:
    rows, columns = _int_attribute(ds, "Rows", 0, name), _int_attribute(ds, "Columns", 0, name)
    _check_size(columns, rows, name, "DICOM", max_pixels)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UnsupportedDicomError(
            name,
            f"photometric interpretation {photometric or 'missing'!r} is not supported "
            f"(expected one of {', '.join(_SUPPORTED_PHOTOMETRIC)})",
        )
    transfer_syntax = _ensure_transfer_syntax(ds, dicom)
    frames = _int_attribute(ds, "NumberOfFrames", 1, name)
    if frames > 1:
        warnings.warn(f"{name}: DICOM has {frames} frames; using the first", stacklevel=4)

    pixels = _dicom_first_frame(ds, dicom, transfer_syntax, name, rows * columns)
    if photometric == "RGB":
        return _rgb_to_gray(pixels, name)
    if pixels.ndim != 2:
        raise UnsupportedDicomError(name, f"unexpected pixel array shape {pixels.shape}")

    image = _dicom_values_to_uint8(pixels, ds, dicom, name)
    if photometric == "MONOCHROME1":
        warnings.warn(f"{name}: MONOCHROME1 (white = low values) inverted to MONOCHROME2", stacklevel=4)
        image = 255 - image
    return image


def _no_pixels_reason(ds: Any) -> str:
    """Why there is no image: no pixel data, and the kind of object when the header names it (a
    structured report, a presentation state or a DICOMDIR of an export are not images)."""
    meta = getattr(ds, "file_meta", None)
    try:
        uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
        kind = getattr(uid, "name", "") if uid else ""
    except Exception:  # a malformed UID names nothing
        kind = ""
    # pydicom names an unknown UID by the UID itself: only a registered name says what it is.
    return f"no pixel data in this {kind} object" if kind and not kind[0].isdigit() else "no pixel data"


def _rgb_to_gray(pixels: np.ndarray, name: str) -> np.ndarray:
    """An RGB DICOM's pixels (H×W×3, 8 to 32 bits a sample) as uint8 gray."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedDicomError(name, f"unexpected RGB pixel array shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    # OpenCV converts 8-bit, 16-bit and float32 samples only; DICOM also allows 32-bit ones.
    # The weights are OpenCV's (ITU-R BT.601), so 8-bit and deeper files agree.
    return _scale_to_uint8(pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


def _int_attribute(ds: Any, keyword: str, default: int, name: str) -> int:
    """An integer attribute of ``ds`` (``default`` when absent or empty); a malformed value (e.g.
    NumberOfFrames ``'1A'``) is an :class:`UnsupportedDicomError`, not a crash."""
    value = None
    try:
        value = ds.get(keyword)  # may itself raise: pydicom converts the raw value here
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise UnsupportedDicomError(name, f"invalid {keyword} {value!r}") from err


def _has_pixel_data(ds: Any) -> bool:
    return any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _ensure_transfer_syntax(ds: Any, dicom: SimpleNamespace) -> Any:
    """The dataset's transfer syntax, set from the encoding it was read with when absent."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = dicom.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # A dataset without file meta (no preamble): pydicom guessed the encoding while reading.
        implicit, little = getattr(ds, "original_encoding", (ds.is_implicit_VR, ds.is_little_endian))
        if not little:
            meta.TransferSyntaxUID = dicom.uid.ExplicitVRBigEndian
        elif implicit:
            meta.TransferSyntaxUID = dicom.uid.ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = dicom.uid.ExplicitVRLittleEndian
    return meta.TransferSyntaxUID


def _dicom_first_frame(
    ds: Any, dicom: SimpleNamespace, transfer_syntax: Any, name: str, n_pixels: int
) -> np.ndarray:
    if not transfer_syntax.is_compressed and "PixelData" in ds:
        # Checked here because pydicom's own message does not say the file is truncated.
        bits = _int_attribute(ds, "BitsAllocated", 8, name)
        samples = _int_attribute(ds, "SamplesPerPixel", 1, name)
        expected = -(-n_pixels * samples * bits // 8)
        if len(ds.PixelData) < expected:
            raise TruncatedImageError(
                name,
                f"DICOM pixel data has {len(ds.PixelData)} bytes, the first frame needs "
                f"{expected} (file cut short)",
            )
    try:
        return dicom.first_frame(ds)
    except Exception as err:  # decoders raise RuntimeError, ValueError, NotImplementedError...
        if transfer_syntax.is_compressed:
            raise UnsupportedDicomError(name, _compressed_reason(transfer_syntax, dicom, err)) from err
        raise UnsupportedDicomError(name, f"cannot decode DICOM pixel data: {err}") from err


def _compressed_reason(transfer_syntax: Any, dicom: SimpleNamespace, err: Exception) -> str:
    syntax = f"{transfer_syntax.name} ({transfer_syntax})"
    available = False
    if dicom.get_decoder is not None:
        try:
            available = dicom.get_decoder(transfer_syntax).is_available
        except (NotImplementedError, ValueError):
            available = False
    if available:
        return f"cannot decode {syntax} pixel data: {err}"
    # python-gdcm is a dependency (JPEG baseline, lossless and LS, JPEG 2000, RLE); this is a
    # broken or partial install.
    return f"compressed transfer syntax {syntax} needs a decoder: pip install python-gdcm"


def _dicom_values_to_uint8(pixels: np.ndarray, ds: Any, dicom: SimpleNamespace, name: str) -> np.ndarray:
    """Modality LUT/rescale, then VOI LUT/window, then linear scaling onto 0..255.

    With a VOI transform the output range of that transform (e.g. the window) maps onto 0..255,
    so the chosen window is kept; without one, the image's own value range does.
    """
    values = dicom.apply_modality_lut(pixels, ds)
    if not _has_voi(ds):
        return _scale_to_uint8(values)
    try:
        windowed = _apply_voi(values, ds, dicom)
        # Probing the transform with inputs spanning its whole domain gives its output range.
        with np.errstate(over="ignore"):  # a sigmoid window overflows exp() at the extremes
            probe = _apply_voi(_voi_probe(ds), ds, dicom)
    except (ValueError, NotImplementedError, AttributeError, KeyError, IndexError) as err:
        warnings.warn(f"{name}: invalid VOI LUT or window ({err}); using the full value range", stacklevel=5)
        return _scale_to_uint8(values)
    return _scale_to_uint8(windowed, float(probe.min()), float(probe.max()))


def _voi_lut_item(ds: Any) -> Any | None:
    """The first VOI LUT Sequence item when it is usable (pydicom prefers it to a window)."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def _has_voi(ds: Any) -> bool:
    window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    return window or _voi_lut_item(ds) is not None


def _apply_voi(values: np.ndarray, ds: Any, dicom: SimpleNamespace) -> np.ndarray:
    item = _voi_lut_item(ds)
    if item is not None:
        # A LUT is indexed by integer values; clipping to its domain first avoids pydicom
        # wrapping large values around when it casts them to the LUT's dtype.
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        values = np.clip(np.rint(values), first - 1, first + entries - 1).astype(np.int64)
    return dicom.apply_voi_lut(values, ds)


def _voi_probe(ds: Any) -> np.ndarray:
    item = _voi_lut_item(ds)
    if item is not None:
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        return np.arange(first - 1, first + entries, dtype=np.int64)
    # Far below and above any window: linear and sigmoid windows reach their output limits.
    return np.array([-(2.0**40), 2.0**40])
