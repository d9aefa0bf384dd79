"""Heatmaps a radiologist can look at: a PNG overlay, and a DICOM Secondary Capture per view.

The overlay blends matplotlib's ``jet`` colour map over the grey image the model saw (the
preprocessed view: cropped to the breast, resized, chest wall on one side). The Secondary
Capture carries the source image's patient and study (read from the site's own DICOM file,
at the site), so a PACS viewer files it with the study; it is marked as derived, not for
diagnosis. Both are written 0600 under the predict output folder: they never leave the site.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from .heatmap import ViewHeatmap

ALPHA = 0.4  # heatmap opacity over the image
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
# Copied from the source image so the viewer files the capture with its study.
STUDY_TAGS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _write_private(path: Path, data: bytes) -> None:
    """0600 from the start (never world-readable for a moment); no fsync: a heatmap can be remade."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def overlay_rgb(hm: ViewHeatmap) -> np.ndarray:
    """(H, W, 3) uint8: the heatmap in ``jet`` over the grey image, blended at :data:`ALPHA`."""
    from matplotlib import colormaps

    img = np.clip(np.nan_to_num(hm.image.astype(np.float32)), 0.0, None)
    top = float(img.max())
    grey = img / top if top > 0 else img
    heat = colormaps["jet"](np.clip(hm.heat, 0.0, 1.0))[..., :3]
    rgb = (1 - ALPHA) * grey[..., None] + ALPHA * heat
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_png(hm: ViewHeatmap, path: Path, rgb: np.ndarray | None = None) -> Path:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # zlib level 1: a tenth of the default level's encoding time for files about a fifth larger
    Image.fromarray(overlay_rgb(hm) if rgb is None else rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
    _write_private(path, buf.getvalue())
    return path


def write_secondary_capture(
    hm: ViewHeatmap, path: Path, series_uid: str, rgb: np.ndarray | None = None, number: int = 1
) -> Path:
    """A DICOM Secondary Capture of the overlay, in the source image's study (when there is one)."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    rgb = overlay_rgb(hm) if rgb is None else rgb
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    source = _source_header(hm)
    for tag in STUDY_TAGS:
        if source is not None and tag in source:
            setattr(ds, tag, source.data_element(tag).value)  # type: ignore[union-attr]
    if "StudyInstanceUID" not in ds:  # no readable source: a study of its own, named by the local ids
        ds.StudyInstanceUID = generate_uid()
        ds.PatientID = hm.patient
    now = _dt.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = f"fedbreast {hm.method} heatmap (not for diagnosis)"
    ds.ImageComments = (
        f"{hm.method} of the model's malignancy output for the {hm.laterality} breast, view {hm.view}"
        + (f", score {hm.score:.4f}" if hm.score is not None else "")
        + "; overlay on the preprocessed image the model saw"
    )
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesNumber, ds.InstanceNumber = 9901, number
    if hm.laterality in ("L", "R"):
        ds.Laterality = hm.laterality
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    _write_private(path, buf.getvalue())
    return path


def _source_header(hm: ViewHeatmap):  # -> pydicom Dataset | None
    if hm.record is None:
        return None
    import pydicom

    try:
        return pydicom.dcmread(hm.record.path, stop_before_pixels=True)
    except Exception:  # a moved or unreadable source: the capture gets a study of its own
        return None


__all__ = ["overlay_rgb", "write_png", "write_secondary_capture"]
