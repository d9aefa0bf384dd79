"""Reading what an image is (laterality, view, energy, geometry) from its DICOM header.

Every decision names the tag it came from, and disagreement between two tags that
should agree (ImageLaterality vs Laterality, ViewPosition vs ViewCodeSequence, ImageType
vs SeriesDescription) is a rejection: guessing would silently mislabel a breast.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.multival import MultiValue

from fedbreast.shared.errors import FedbreastError

from .rules import MIB, IngestRules
from .schema import Energy, Laterality, Modality, View


class HeaderRejection(FedbreastError, ValueError):
    """The header cannot be used; ``field`` names the tag at fault."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class HeaderInfo:
    patient_id: str
    study_uid: str
    accession: str
    modality: Modality
    laterality: Laterality
    view: View
    energy: Energy
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    manufacturer: str
    bits_stored: int
    window: tuple[float, float] | None
    photometric: str


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _laterality(ds, rules: IngestRules) -> Laterality:
    found: dict[str, str] = {}
    for tag in rules.laterality_tags:
        value = _text(ds, tag).upper()
        if value:
            if value not in ("L", "R"):
                raise HeaderRejection(tag, f"unexpected laterality value {value!r} (expected L or R)")
            found[tag] = value
    if len(set(found.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in found.items())
        raise HeaderRejection("/".join(found), f"conflicting laterality tags ({detail})")
    if found:
        return Laterality(next(iter(found.values())))
    for tag in rules.laterality_text_tags:
        text = _text(ds, tag).upper()
        hits = {lat for lat, pat in rules.laterality_patterns.items() if pat.search(text)}
        if len(hits) == 1:
            return Laterality(hits.pop())
    raise HeaderRejection(
        "ImageLaterality",
        f"missing laterality (none of {', '.join(rules.laterality_tags + rules.laterality_text_tags)} says L or R)",
    )


def _mammo_view(ds, rules: IngestRules) -> View:
    found: dict[str, str] = {}
    position = _text(ds, "ViewPosition").upper()
    if position:
        if position not in rules.view_positions:
            raise HeaderRejection(
                "ViewPosition", f"unsupported view {position!r} (known: {sorted(rules.view_positions)})"
            )
        found["ViewPosition"] = rules.view_positions[position]
    for item in ds.get("ViewCodeSequence", []) or []:
        code = str(item.get("CodeValue", "")).upper()
        if code in rules.view_codes:
            found["ViewCodeSequence"] = rules.view_codes[code]
            break
    if len(set(found.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in found.items())
        raise HeaderRejection("ViewPosition/ViewCodeSequence", f"conflicting view tags ({detail})")
    if not found:
        raise HeaderRejection("ViewPosition", "missing view (no ViewPosition and no known ViewCodeSequence code)")
    return View(next(iter(found.values())))


def _us_view(ds, rules: IngestRules) -> View:
    text = " ".join(_text(ds, t) for t in ("SeriesDescription", "ImageComments", "ProtocolName")).upper()
    # Anti-radial contains "RAD": test it first so it is not read as radial.
    for name in sorted(rules.us_view_patterns, key=lambda n: n != "US_ANTIRADIAL"):
        if rules.us_view_patterns[name].search(text):
            return View(name)
    return View.US_OTHER


def _energy(ds, rules: IngestRules) -> Energy:
    found: dict[str, str] = {}
    image_type = [str(v).upper() for v in (ds.get("ImageType", []) or [])]
    for value in image_type:
        if value in rules.energy_image_type:
            found["ImageType"] = rules.energy_image_type[value]
            break
    description = _text(ds, "SeriesDescription").upper()
    hits = {e for e, pat in rules.energy_description_patterns.items() if pat.search(description)}
    if len(hits) == 1:
        found["SeriesDescription"] = hits.pop()
    if len(set(found.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in found.items())
        raise HeaderRejection("ImageType/SeriesDescription", f"conflicting energy tags ({detail})")
    energy = next(iter(found.values()), "FFDM")
    if energy == "REJECT":
        raise HeaderRejection("ImageType", f"image type {'/'.join(image_type)} is not used by any model")
    return Energy(energy)


def _floats(ds, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise HeaderRejection(keyword, f"malformed value {value!r}") from None
    return tuple(values[:n]) if len(values) >= n else None


def _int_tag(ds, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HeaderRejection(keyword, f"malformed value {value!r}") from None


def check_geometry(ds, modality: str, rows: int, cols: int, rules: IngestRules) -> None:
    """Refuse a header whose declared pixels are over the ingest limits, before anything decodes them.

    The decoder allocates what the header declares (65535x65535 x 16-bit is 8 GiB) whatever
    the payload holds, so a small file can exhaust memory; the header is all there is to check.
    """
    limits = rules.limits
    if rows * cols > limits.max_pixels:
        raise HeaderRejection(
            "Rows/Columns",
            f"{rows}x{cols} = {rows * cols / 1e6:.0f} megapixels exceeds the limit of "
            f"{limits.max_pixels / 1e6:g} megapixels (ingest rules max_megapixels)",
        )
    frames = _int_tag(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise HeaderRejection("NumberOfFrames", f"invalid NumberOfFrames {frames}")
    if frames > limits.frames_for(modality):
        raise HeaderRejection(
            "NumberOfFrames",
            f"{frames} frames exceeds the limit of {limits.frames_for(modality)} for {modality} "
            f"(ingest rules max_frames.{modality})",
        )
    samples = _int_tag(ds, "SamplesPerPixel", 1)
    if samples not in (1, 3):  # grey or colour; 4 (ARGB, CMYK) was retired from DICOM
        raise HeaderRejection("SamplesPerPixel", f"unsupported SamplesPerPixel {samples} (expected 1 or 3)")
    bits = _int_tag(ds, "BitsAllocated", 16)
    if bits not in (1, 8, 16, 32, 64):
        raise HeaderRejection("BitsAllocated", f"unsupported BitsAllocated {bits} (expected 1, 8, 16, 32 or 64)")
    decoded = rows * cols * frames * samples * max(1, bits // 8)
    if decoded > limits.max_decoded_bytes:
        raise HeaderRejection(
            "Rows/Columns/NumberOfFrames",
            f"{rows}x{cols} x {frames} frames x {samples} samples x {bits} bits decodes to "
            f"{decoded / MIB:.0f} MiB, over the limit of {limits.max_decoded_bytes / MIB:g} MiB "
            "(ingest rules max_decoded_mib)",
        )
    _check_codestreams(ds, rows, cols, frames, samples)


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    # pylibjpeg-openjpeg reads the main header only (opj_read_header): 0.1 ms, no tile decoded.
    from openjpeg.utils import get_parameters

    try:
        info = get_parameters(frame)
    except (RuntimeError, ValueError):
        return None
    return int(info["rows"]), int(info["columns"]), int(info["samples_per_pixel"])


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    # pylibjpeg-libjpeg's own get_parameters is no use here: it allocates the whole image
    # (a 64x64 JPEG-LS whose frame header says 65535x65535 took 16 GB and 8 minutes).
    # pydicom parses the SOF segment in Python before it decodes each frame; its parser is
    # private, so a pydicom that drops it refuses JPEG files here rather than decode them unchecked.
    from pydicom.pixels.utils import _get_jpg_parameters

    info = _get_jpg_parameters(frame)
    if "height" not in info:
        return None
    return int(info["height"]), int(info["width"]), int(info["components"])


def _check_codestreams(ds, rows: int, cols: int, frames: int, samples: int) -> None:
    """Refuse compressed pixel data whose codestream declares a larger image than the header.

    A JPEG 2000, JPEG-LS or JPEG decoder allocates what its codestream's own header declares
    (SIZ, SOF), which need not be Rows x Columns: each frame's header is read before anything
    is decoded. Other transfer syntaxes (native, RLE) are decoded into Rows x Columns.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts in JPEG2000TransferSyntaxes:
        name, size_of = "JPEG 2000", _j2k_size
    elif ts in JPEGLSTransferSyntaxes or ts in JPEGTransferSyntaxes:
        name, size_of = "JPEG-LS" if ts in JPEGLSTransferSyntaxes else "JPEG", _jpeg_size
    else:
        return
    frames_read = generate_frames(ds.PixelData, number_of_frames=frames)
    number = 0
    while True:
        try:
            frame = next(frames_read, None)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for malformed encapsulation
            raise HeaderRejection(
                "PixelData", f"cannot read the encapsulated frames ({type(exc).__name__}: {exc})"
            ) from None
        if frame is None:
            return
        number += 1
        try:
            size = size_of(frame)
        except ImportError as exc:
            raise HeaderRejection("PixelData", f"cannot check the {name} codestream before decoding ({exc})") from None
        if size is None:
            raise HeaderRejection("PixelData", f"frame {number}: the {name} codestream's header cannot be read")
        r, c, n = size
        if r > rows or c > cols or n > samples:
            raise HeaderRejection(
                "PixelData",
                f"frame {number}: the {name} codestream declares {r}x{c} x {n} samples, more than "
                f"Rows/Columns/SamplesPerPixel {rows}x{cols} x {samples}",
            )


def read_header(ds, rules: IngestRules) -> HeaderInfo:
    """Interpret a pydicom dataset; raises :class:`HeaderRejection` naming the tag at fault."""
    modality = _text(ds, "Modality").upper()
    if not modality:
        raise HeaderRejection("Modality", "missing Modality")
    if modality not in rules.modalities or modality not in Modality.__members__:
        raise HeaderRejection(
            "Modality", f"unsupported modality {modality!r} (accepted: {', '.join(rules.modalities)})"
        )
    if "PixelData" not in ds:
        raise HeaderRejection("PixelData", "no pixel data (not an image)")
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise HeaderRejection("PatientID", "missing PatientID: the image cannot be grouped into an exam")
    study_uid = _text(ds, "StudyInstanceUID")
    if not study_uid:
        raise HeaderRejection("StudyInstanceUID", "missing StudyInstanceUID: the image cannot be grouped into an exam")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise HeaderRejection("Rows/Columns", f"invalid image size {rows}x{cols}")
    check_geometry(ds, modality, rows, cols, rules)

    laterality = _laterality(ds, rules)
    if modality == "MG":
        view, energy = _mammo_view(ds, rules), _energy(ds, rules)
    else:
        view, energy = _us_view(ds, rules), Energy.NA
    spacing = _floats(ds, "PixelSpacing", 2) or _floats(ds, "ImagerPixelSpacing", 2)
    center, width = _floats(ds, "WindowCenter", 1), _floats(ds, "WindowWidth", 1)
    return HeaderInfo(
        patient_id=patient_id,
        study_uid=study_uid,
        accession=_text(ds, "AccessionNumber"),
        modality=Modality(modality),
        laterality=laterality,
        view=view,
        energy=energy,
        rows=rows,
        cols=cols,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        manufacturer=_text(ds, "Manufacturer"),
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        window=(center[0], width[0]) if center and width else None,
        photometric=_text(ds, "PhotometricInterpretation") or "MONOCHROME2",
    )
