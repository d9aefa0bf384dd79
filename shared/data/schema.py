"""The site manifest schema: one row per image, versioned.

A site directory holds ``manifest.jsonl`` (one :class:`ImageRecord` per line) and
``site.json`` (schema version, site name, counts). Everything downstream
(preprocessing, datasets, site check, the federated client) reads images through
these records, never through raw DICOM headers, so vendor quirks stay in ingest.

Bump :data:`SCHEMA_VERSION` on any incompatible change and teach
:func:`record_from_dict` to read the old version.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


class Laterality(str, enum.Enum):
    L = "L"
    R = "R"


class Modality(str, enum.Enum):
    MG = "MG"  # mammography: FFDM or CEM (LE / DES)
    US = "US"  # ultrasound


# What a (generated) hospital acquires: CEM (LE + DES), FFDM only, or FFDM with ultrasound.
MODALITY_SETS = ("cem", "ffdm", "ffdm+us")


class Energy(str, enum.Enum):
    LE = "LE"  # CEM low-energy image (equivalent to an FFDM)
    DES = "DES"  # CEM dual-energy subtracted / recombined image
    FFDM = "FFDM"  # plain full-field digital mammogram
    NA = "NA"  # not applicable (ultrasound)


class View(str, enum.Enum):
    CC = "CC"
    MLO = "MLO"
    # Ultrasound probe orientations as commonly exported.
    US_TRANS = "US_TRANS"
    US_LONG = "US_LONG"
    US_RADIAL = "US_RADIAL"
    US_ANTIRADIAL = "US_ANTIRADIAL"
    US_OTHER = "US_OTHER"

    @property
    def is_mammo(self) -> bool:
        return self in (View.CC, View.MLO)


class Label(str, enum.Enum):
    NORMAL = "normal"
    BENIGN = "benign"
    MALIGNANT = "malignant"

    @property
    def severity(self) -> int:
        return {"normal": 0, "benign": 1, "malignant": 2}[self.value]

    @property
    def is_malignant(self) -> int:
        return int(self is Label.MALIGNANT)


class Split(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class ShapeKind(str, enum.Enum):
    POLYGON = "polygon"  # points: [[x, y], ...]
    ELLIPSE = "ellipse"  # points: [[cx, cy], [rx, ry]], params: {"angle_deg": a}
    BOX = "box"  # points: [[x0, y0], [x1, y1]]
    CIRCLE = "circle"  # points: [[cx, cy], [r, r]]
    POINT = "point"  # points: [[x, y]]; no area, kept for completeness


@dataclass(frozen=True)
class Lesion:
    """A lesion outline in the pixel coordinates of the stored image (x = column, y = row)."""

    kind: ShapeKind
    points: tuple[tuple[float, float], ...]
    angle_deg: float = 0.0
    label: Label | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind.value, "points": [list(p) for p in self.points]}
        if self.angle_deg:
            d["angle_deg"] = self.angle_deg
        if self.label is not None:
            d["label"] = self.label.value
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Lesion:
        return Lesion(
            kind=ShapeKind(d["kind"]),
            points=tuple((float(p[0]), float(p[1])) for p in d["points"]),
            angle_deg=float(d.get("angle_deg", 0.0)),
            label=Label(d["label"]) if d.get("label") else None,
        )

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box of the outline."""
        if self.kind in (ShapeKind.ELLIPSE, ShapeKind.CIRCLE):
            (cx, cy), (rx, ry) = self.points[0], self.points[1]
            r = max(rx, ry)  # conservative under rotation
            return (cx - r, cy - r, cx + r, cy + r)
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return (min(xs), min(ys), max(xs), max(ys))


# BI-RADS lexicon (CEM/MG) used by ingest validation and the seed-000 encoder.
# Values are canonical lower-case tokens; "unknown" is always allowed.
BIRADS_LEXICON: dict[str, tuple[str, ...]] = {
    "mass_shape": ("round", "oval", "irregular"),
    "mass_margin": (
        "circumscribed",
        "not_circumscribed",
        "obscured",
        "microlobulated",
        "indistinct",
        "irregular",
        "spiculated",
    ),
    "internal_enhancement": ("homogeneous", "heterogeneous", "rim"),
    "bpe": ("minimal", "mild", "moderate", "marked"),
    "density": ("a", "b", "c", "d"),
    "assessment": ("0", "1", "2", "3", "4", "4a", "4b", "4c", "5", "6"),
}


@dataclass
class BiRads:
    """BI-RADS descriptors of one breast. Multi-valued groups keep every value ("round - oval")."""

    mass_shape: tuple[str, ...] = ()
    mass_margin: tuple[str, ...] = ()
    internal_enhancement: tuple[str, ...] = ()
    bpe: tuple[str, ...] = ()
    density: tuple[str, ...] = ()
    assessment: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items() if v}

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> BiRads:
        d = d or {}
        return BiRads(**{k: tuple(d.get(k, ())) for k in BIRADS_LEXICON})

    def is_empty(self) -> bool:
        return not any(dataclasses.astuple(self))


@dataclass
class ImageRecord:
    """One manifest row. Paths are relative to the ingested root when possible."""

    site: str
    patient: str  # keyed hash of the raw patient id; raw ids are never written
    exam: str  # keyed hash of the study (StudyInstanceUID / accession)
    laterality: Laterality
    view: View
    modality: Modality
    energy: Energy
    path: str  # absolute path of the source file
    sha256: str  # content hash of the source file; the cache key
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None = None  # (row mm, col mm)
    manufacturer: str = ""
    bits_stored: int = 0
    window: tuple[float, float] | None = None  # (center, width) from the DICOM, if any
    photometric: str = "MONOCHROME2"
    label: Label | None = None  # per-breast label; None = unlabelled
    lesions: tuple[Lesion, ...] = ()
    birads: BiRads = field(default_factory=BiRads)
    split: Split | None = None
    schema_version: int = SCHEMA_VERSION
    # A virtual image made at the site (``fedbreast site synthesize``: a DES from this breast's
    # FFDM / LE view), never an acquisition; ``source_sha256`` names the image it was made from.
    # Kept in the site's virtual manifest (shared/data/virtual.py), used only when a run asks.
    synthetic: bool = False
    source_sha256: str = ""

    @property
    def breast_key(self) -> tuple[str, str, str]:
        return (self.patient, self.exam, self.laterality.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "site": self.site,
            "patient": self.patient,
            "exam": self.exam,
            "laterality": self.laterality.value,
            "view": self.view.value,
            "modality": self.modality.value,
            "energy": self.energy.value,
            "path": self.path,
            "sha256": self.sha256,
            "rows": self.rows,
            "cols": self.cols,
            "pixel_spacing": list(self.pixel_spacing) if self.pixel_spacing else None,
            "manufacturer": self.manufacturer,
            "bits_stored": self.bits_stored,
            "window": list(self.window) if self.window else None,
            "photometric": self.photometric,
            "label": self.label.value if self.label else None,
            "lesions": [les.to_dict() for les in self.lesions],
            "birads": self.birads.to_dict(),
            "split": self.split.value if self.split else None,
        } | ({"synthetic": True, "source_sha256": self.source_sha256} if self.synthetic else {})


def record_from_dict(d: dict[str, Any]) -> ImageRecord:
    """Parse one manifest row; raises ``ValueError`` naming the bad field."""
    version = int(d.get("schema_version", SCHEMA_VERSION))
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this fedbreast ({SCHEMA_VERSION}); upgrade fedbreast")
    try:
        return ImageRecord(
            site=str(d["site"]),
            patient=str(d["patient"]),
            exam=str(d["exam"]),
            laterality=Laterality(d["laterality"]),
            view=View(d["view"]),
            modality=Modality(d["modality"]),
            energy=Energy(d["energy"]),
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            rows=int(d["rows"]),
            cols=int(d["cols"]),
            pixel_spacing=tuple(d["pixel_spacing"]) if d.get("pixel_spacing") else None,
            manufacturer=str(d.get("manufacturer", "")),
            bits_stored=int(d.get("bits_stored", 0)),
            window=tuple(d["window"]) if d.get("window") else None,
            photometric=str(d.get("photometric", "MONOCHROME2")),
            label=Label(d["label"]) if d.get("label") else None,
            lesions=tuple(Lesion.from_dict(x) for x in d.get("lesions", ())),
            birads=BiRads.from_dict(d.get("birads")),
            split=Split(d["split"]) if d.get("split") else None,
            schema_version=version,
            synthetic=bool(d.get("synthetic", False)),
            source_sha256=str(d.get("source_sha256", "")),
        )
    except KeyError as exc:
        raise ValueError(f"manifest row is missing field {exc.args[0]!r}") from None
