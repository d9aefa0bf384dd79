"""Decoding stored images to float arrays in the display sense (bright = dense / enhancing).

DICOM goes through pydicom's pixel-data plugins (pylibjpeg for JPEG, JPEG-LS and
JPEG 2000; RLE natively). MONOCHROME1 is inverted so every consumer sees
MONOCHROME2. JPEG/PNG (the public CDD-CESM release) goes through Pillow.

:func:`read_pixels` opens a path as it is; :func:`decode_source` decodes the bytes of a file
ingest accepted, read again (shared/data/files.py, shared/data/cache.py), and checks the
header's geometry against the ingest limits before anything is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedbreast.shared.errors import FedbreastError

if TYPE_CHECKING:
    from .rules import IngestLimits, IngestRules

RASTER_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


class PixelDecodeError(FedbreastError, ValueError):
    """The file's pixels cannot be decoded; the message names the file and the reason."""


def read_pixels(path: str | Path) -> np.ndarray:
    """Return the image as a 2-D float32 array (rows, cols) in MONOCHROME2 sense."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _read_raster(path)
    return _read_dicom(path)


def _read_raster(path: Path, source: io.BytesIO | None = None, limits: IngestLimits | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source or path) as im:  # reads the header only; convert() decodes
            if limits is not None:
                _check_raster(path, im.size, len(im.getbands()), limits)
            converted = im.convert("I;16") if im.mode in ("I;16", "I;16B", "I") else im.convert("L")
            return np.asarray(converted, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise PixelDecodeError(f"{path}: cannot decode image ({exc})") from None


def _check_raster(path: Path, size: tuple[int, int], bands: int, limits: IngestLimits) -> None:
    from .rules import MIB

    cols, rows = size
    if rows * cols > limits.max_pixels:
        raise PixelDecodeError(
            f"{path}: {rows}x{cols} = {rows * cols / 1e6:.0f} megapixels exceeds the limit of "
            f"{limits.max_pixels / 1e6:g} megapixels (ingest rules max_megapixels)"
        )
    if rows * cols * bands * 2 > limits.max_decoded_bytes:  # up to 16 bits a band
        raise PixelDecodeError(
            f"{path}: {rows}x{cols} x {bands} bands decodes to over the limit of "
            f"{limits.max_decoded_bytes / MIB:g} MiB (ingest rules max_decoded_mib)"
        )


def decode_source(data: bytes, path: str | Path, modality: str, rules: IngestRules) -> np.ndarray:
    """Decode the bytes of an ingested file, as :func:`read_pixels` would the file, once its
    header is within the ingest limits (``headers.check_geometry``); raises PixelDecodeError
    or HeaderRejection naming what is wrong."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .headers import HeaderRejection, check_geometry

    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _read_raster(path, io.BytesIO(data), rules.limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise PixelDecodeError(f"{path}: not a readable DICOM file ({exc})") from None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise HeaderRejection("Rows/Columns", f"invalid image size {rows}x{cols}")
    check_geometry(ds, modality, rows, cols, rules)
    return dicom_pixels(ds, path)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise PixelDecodeError(f"{path}: not a readable DICOM file ({exc})") from None
    return dicom_pixels(ds, path)


def dicom_pixels(ds, path: str | Path = "<dataset>") -> np.ndarray:
    """Decode an already-read dataset's pixels (used by ingest to validate decodability)."""
    if "PixelData" not in ds:
        raise PixelDecodeError(f"{path}: PixelData: the file holds no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for missing plugins / corrupt streams
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise PixelDecodeError(f"{path}: PixelData: cannot decode (transfer syntax {name}): {exc}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour ultrasound: luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    if arr.ndim != 2:
        raise PixelDecodeError(f"{path}: PixelData: expected a 2-D image, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        arr = arr * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return arr
