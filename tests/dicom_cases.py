"""Real DICOM files for tests: small CEM / FFDM exams and the broken files ingest must survive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom


def breast_pixels(rows: int = 96, cols: int = 64, laterality: str = "L", seed: int = 0) -> np.ndarray:
    """A half-ellipse breast against the chest wall with a bright blob, as uint16."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0 if laterality == "L" else cols - 1  # chest wall on the image's left for L
    inside = ((xx - cx) / (0.8 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 < 1
    img = np.where(inside, 1800 + 200 * rng.random((rows, cols)), 100)
    blob = ((xx - cols * (0.35 if laterality == "L" else 0.65)) ** 2 + (yy - rows / 2) ** 2) < (rows / 10) ** 2
    img = np.where(blob & inside, 2800, img)
    return img.astype(np.uint16)


def write_exam(
    root: Path,
    patient_id: str,
    energies: tuple[str, ...] = ("LE", "DES"),
    study_uid: str | None = None,
    accession: str = "",
    transfer_syntax: str = "explicit",
    seed: int = 0,
) -> list[Path]:
    """Write all views of one exam (both breasts, CC+MLO, each energy); return the paths."""
    study_uid = study_uid or new_study_uid()
    paths = []
    for lat in ("L", "R"):
        for view in ("CC", "MLO"):
            for energy in energies:
                meta = DicomMeta(
                    patient_id=patient_id,
                    study_uid=study_uid,
                    accession=accession,
                    laterality=lat,
                    view=view,
                    energy=energy,
                    transfer_syntax=transfer_syntax,
                    window=(2200.0, 1200.0),
                )
                path = root / patient_id / f"{lat}{view}_{energy}.dcm"
                paths.append(write_dicom(path, breast_pixels(laterality=lat, seed=seed), meta))
    return paths


def write_one(path: Path, **meta_kwargs) -> Path:
    meta_kwargs.setdefault("patient_id", "PX")
    meta_kwargs.setdefault("study_uid", new_study_uid())
    return write_dicom(path, breast_pixels(), DicomMeta(**meta_kwargs))


def edit(path: Path, **changes) -> Path:
    """Rewrite tags of an existing file; a value of None deletes the tag."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def graft_compressed(path: Path, source: str, patient_id: str = "PX", laterality: str = "L", view: str = "CC") -> Path:
    """An MG file whose pixel data is a compressed stream from pydicom's bundled test files.

    Nothing in our stack can *encode* JPEG-LS or 12-bit JPEG, so the encoded stream is taken
    from a real file and the MG header is written around it.
    """
    src = pydicom.dcmread(get_testdata_file(source))
    ds = pydicom.dcmread(write_one(path, patient_id=patient_id, laterality=laterality, view=view, energy="FFDM"))
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        setattr(ds, keyword, getattr(src, keyword))
    ds.file_meta.TransferSyntaxUID = src.file_meta.TransferSyntaxUID
    ds.PixelData = src.PixelData
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_baseline(path: Path, patient_id: str = "PX") -> Path:
    """An 8-bit JPEG Baseline MG file: Pillow encodes the stream, pydicom encapsulates it."""
    import io

    from PIL import Image

    pixels = (breast_pixels() // 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    ds = pydicom.dcmread(write_one(path, patient_id=patient_id, energy="FFDM"))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


JPEG_LS_SOURCE = ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless)
