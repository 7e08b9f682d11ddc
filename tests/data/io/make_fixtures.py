"""Write the tiny DICOM fixtures under ``tests/data/io/`` (run once; outputs are checked in).

    python tests/data/io/make_fixtures.py

Needs pydicom >= 3 (``save_as(enforce_file_format=...)``) and python-gdcm (the JPEG Lossless
file). Every file is a few KB at most.
The pixel contents are documented here because the tests compute the expected output from
the stored values and these attributes independently of ``cxr_pneumonia.io``:

- ``mono2_rescale.dcm``: 32x32 MONOCHROME2, 12 bits stored in 16, stored values a row-major
  gradient 0..4095; RescaleSlope 2, RescaleIntercept -1024 (modality values -1024..7166);
  WindowCenter 3000, WindowWidth 4000 (LINEAR), so both ends are clipped.
- ``mono1.dcm``: 32x32 MONOCHROME1, 8 bits, stored values a gradient 10..200, no window.
- ``multiframe.dcm``: 2 frames of 16x16 MONOCHROME2 8 bit; frame 0 a gradient, frame 1 constant.
- ``rgb.dcm``: 16x16 RGB 8 bit, pure red on the left half and pure green on the right half.
- ``palette.dcm``: 16x16 PALETTE COLOR 8 bit (unsupported photometric interpretation).
- ``no_pixels.dcm``: a valid DICOM header (Rows/Columns set) without Pixel Data.
- ``mono2_voilut.dcm``: 16x16 MONOCHROME2 8 bit, stored values 0..255 (row-major), no rescale,
  a VOI LUT Sequence item with descriptor [256, 0, 8] and data ``clip(2 * v - 100, 0, 255)``.
- ``jpeg2000_garbage.dcm``: transfer syntax JPEG 2000 Lossless with encapsulated garbage,
  which no decoder can read.
- ``jpegls_garbage.dcm``: transfer syntax JPEG-LS Lossless with encapsulated garbage, which no
  decoder can read either.
- ``no_preamble.dcm``: the ``mono2_rescale`` dataset written without preamble or file meta
  (implicit VR little endian), recognised only through its ``.dcm`` suffix.
- ``jpeg_lossless.dcm``: the ``mono2_rescale`` dataset recompressed by GDCM (python-gdcm) to
  JPEG Lossless, Process 14, Selection Value 1 (1.2.840.10008.1.2.4.70), the syntax most
  computed and digital radiography archives store; the same pixels after decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

HERE = Path(__file__).resolve().parent

# An example-only UID root (pydicom's); the UID values do not matter to any test.
_UID_ROOT = "1.2.826.0.1.3680043.8.498."


def build_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attributes: object,
) -> Dataset:
    """A minimal Secondary Capture dataset holding ``pixels`` (uint8/uint16, (F,)H,W(,3))."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=_UID_ROOT)
    meta.TransferSyntaxUID = transfer_syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PatientID = "FIXTURE"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    rows_cols = pixels.shape[1:3] if frames > 1 else pixels.shape[:2]
    ds.Rows, ds.Columns = (int(v) for v in rows_cols)
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype(f"<u{bits // 8}").tobytes()
    return ds


def mono2_rescale() -> Dataset:
    """The ``mono2_rescale.dcm`` dataset (see the module docstring)."""
    return build_dataset(
        np.linspace(0, 4095, 32 * 32).round().astype(np.uint16).reshape(32, 32),
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=3000,
        WindowWidth=4000,
    )


def write(ds: Dataset, name: str) -> Path:
    path = HERE / name
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless(source: Path, target: Path) -> None:
    """``source`` recompressed to JPEG Lossless (Process 14, SV1) by GDCM."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {source}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError("GDCM could not compress to JPEG Lossless")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {target}")


def main() -> None:
    """Write every fixture listed in the module docstring."""
    write(mono2_rescale(), "mono2_rescale.dcm")

    mono1 = build_dataset(
        np.linspace(10, 200, 32 * 32).round().astype(np.uint8).reshape(32, 32),
        photometric="MONOCHROME1",
    )
    write(mono1, "mono1.dcm")

    frames = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16), np.full((16, 16), 7, np.uint8)])
    write(build_dataset(frames, frames=2), "multiframe.dcm")

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8, 0] = 255
    rgb[:, 8:, 1] = 255
    write(build_dataset(rgb, photometric="RGB"), "rgb.dcm")

    write(
        build_dataset(np.zeros((16, 16), np.uint8), photometric="PALETTE COLOR"),
        "palette.dcm",
    )

    no_pixels = build_dataset(np.zeros((16, 16), np.uint8))
    del no_pixels.PixelData
    write(no_pixels, "no_pixels.dcm")

    for syntax, filename in (
        (JPEG2000Lossless, "jpeg2000_garbage.dcm"),
        (JPEGLSLossless, "jpegls_garbage.dcm"),
    ):
        compressed = build_dataset(np.zeros((16, 16), np.uint8), transfer_syntax=syntax)
        compressed.PixelData = encapsulate([b"\x00\x01 not a compressed codestream \xfe\xff"])
        compressed["PixelData"].VR = "OB"
        write(compressed, filename)

    voi = build_dataset(np.arange(256, dtype=np.uint8).reshape(16, 16))
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = np.clip(2 * np.arange(256) - 100, 0, 255).tolist()
    item["LUTData"].VR = "US"
    voi.VOILUTSequence = [item]
    write(voi, "mono2_voilut.dcm")

    jpeg_lossless(HERE / "mono2_rescale.dcm", HERE / "jpeg_lossless.dcm")

    # A raw dataset: no 128-byte preamble, no "DICM", no file meta.
    raw = mono2_rescale()
    del raw.file_meta
    raw.preamble = None
    raw.save_as(HERE / "no_preamble.dcm", implicit_vr=True, little_endian=True)


if __name__ == "__main__":
    main()
