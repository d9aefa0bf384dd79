"""Reading what an image is (laterality, view, energy, geometry) from its DICOM header.

Every decision names the tag it came from, and disagreement between two tags that
should agree (ImageLaterality vs Laterality, ViewPosition vs ViewCodeSequence, ImageType
vs SeriesDescription) is a rejection: guessing would silently mislabel a breast.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.multival import MultiValue

from fedbreast.shared.errors import FedbreastError

from .rules import IngestRules
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
