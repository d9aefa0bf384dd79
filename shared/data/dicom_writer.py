"""Writing standards-conformant MG and US DICOM files with pydicom.

Used by the phantom generator (simulated hospitals go through the same ingest as real
ones) and by the tests, which need real files on disk rather than mocks.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    UltrasoundImageStorage,
    generate_uid,
)

# Digital Mammography X-Ray Image Storage - For Presentation
MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")

# ViewCodeSequence codes (SNOMED-RT), as vendors write them.
VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}
IMAGE_TYPE = {
    "LE": ["ORIGINAL", "PRIMARY", "", "LOW_ENERGY"],
    "DES": ["DERIVED", "PRIMARY", "", "RECOMBINED"],
    "FFDM": ["ORIGINAL", "PRIMARY"],
}
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}


@dataclass
class DicomMeta:
    """What a generated image says about itself. Empty strings leave a tag out."""

    patient_id: str
    study_uid: str
    accession: str = ""
    modality: str = "MG"  # MG or US
    laterality: str = "L"
    view: str = "CC"  # CC / MLO for MG; free text for US (goes to SeriesDescription)
    energy: str = "FFDM"  # LE / DES / FFDM for MG
    manufacturer: str = "FEDBREAST-PHANTOM"
    pixel_spacing_mm: float = 0.1
    bits_stored: int = 12
    window: tuple[float, float] | None = None  # (center, width)
    series_description: str | None = None  # default: derived from view and energy
    transfer_syntax: str = "explicit"  # explicit | rle | jpeg2000
    study_date: str = "20260101"
    # Empty: a fresh random UID. The phantom generator passes seed-derived UIDs so that
    # the same seed writes byte-identical files.
    sop_instance_uid: str = ""
    series_uid: str = ""
    extra: dict[str, object] = field(default_factory=dict)  # any further tag keyword -> value


def write_dicom(path: str | Path, pixels: np.ndarray, meta: DicomMeta) -> Path:
    """Write ``pixels`` (2-D unsigned ints) as an MG or US DICOM file and return the path."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels must be uint8 or uint16, got {pixels.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    sop_class = MG_FOR_PRESENTATION if meta.modality == "MG" else UltrasoundImageStorage
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = UID(meta.sop_instance_uid or generate_uid())
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = meta.patient_id
    ds.PatientName = f"PHANTOM^{meta.patient_id}"
    ds.StudyInstanceUID = meta.study_uid
    ds.SeriesInstanceUID = meta.series_uid or generate_uid()
    ds.AccessionNumber = meta.accession
    ds.StudyDate = meta.study_date
    ds.ContentDate = meta.study_date
    ds.ContentTime = _dt.time(12, 0).strftime("%H%M%S")
    ds.Modality = meta.modality
    ds.Manufacturer = meta.manufacturer
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1

    if meta.laterality:
        ds.ImageLaterality = meta.laterality
    if meta.modality == "MG":
        ds.ImageType = IMAGE_TYPE.get(meta.energy, IMAGE_TYPE["FFDM"])
        if meta.view:
            ds.ViewPosition = meta.view
            code, meaning = VIEW_CODES.get(meta.view, ("", ""))
            if code:
                item = Dataset()
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SRT", meaning
                ds.ViewCodeSequence = [item]
        ds.ImagerPixelSpacing = [meta.pixel_spacing_mm, meta.pixel_spacing_mm]
        ds.PresentationIntentType = "FOR PRESENTATION"
        default_desc = f"{meta.laterality}-{meta.view} {meta.energy}"
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        default_desc = f"{meta.laterality} BREAST {meta.view}"
    ds.SeriesDescription = meta.series_description if meta.series_description is not None else default_desc
    ds.PixelSpacing = [meta.pixel_spacing_mm, meta.pixel_spacing_mm]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = min(meta.bits_stored, ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if meta.window:
        ds.WindowCenter, ds.WindowWidth = float(meta.window[0]), float(meta.window[1])
    for keyword, value in meta.extra.items():
        setattr(ds, keyword, value)

    syntax = TRANSFER_SYNTAXES.get(meta.transfer_syntax)
    if syntax is None:
        raise ValueError(f"unknown transfer syntax {meta.transfer_syntax!r}; use one of {sorted(TRANSFER_SYNTAXES)}")
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        # Lossless: the image is the same instance, so it keeps its seeded SOP Instance UID (pydicom
        # would otherwise draw a random one, and a generated site would differ from run to run).
        ds.compress(
            syntax,
            pixels,
            encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "",
            generate_instance_uid=False,
        )
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def new_study_uid() -> str:
    return generate_uid()
