"""The annotation CSV (docs/annotations.md): parsing rows and joining them to images.

Raw patient ids and accession numbers are hashed with the site key as soon as a row is
read, and matched against the pseudonyms ingest stored, so no raw identifier is kept.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .birads import parse_birads_cell
from .pseudonym import pseudonymise
from .rejects import Rejection
from .schema import BIRADS_LEXICON, BiRads, Energy, ImageRecord, Label, Lesion, ShapeKind, View

BIRADS_COLUMNS = {
    "mass_shape": "mass_shape",
    "mass_margin": "mass_margin",
    "internal_enhancement": "internal_enhancement",
    "bpe": "bpe",
    "density": "density",
    "birads": "assessment",
}
REQUIRED = ("patient_id", "laterality")


@dataclass
class AnnotationRow:
    where: str  # "annotations.csv:17" (file:line)
    patient: str  # pseudonym
    accession: str | None  # pseudonym of the accession / study, or None = any study
    laterality: str
    view: View | None
    energy: Energy | None
    label: Label | None
    lesion: Lesion | None
    birads: BiRads


@dataclass
class AnnotationSet:
    rows: list[AnnotationRow] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    unknown_descriptors: Counter = field(default_factory=Counter)


def _coordinate(text: str) -> float:
    # float() reads "nan", "inf" and "-1e999"; none is a place in an image, and NaN would
    # pass every later bounds comparison (all comparisons with NaN are false).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _non_negative(kind: ShapeKind, values: list[float]) -> None:
    # Pixel coordinates and radii start at 0; only an ellipse's angle (its 5th value) may be negative.
    checked = values[:4] if kind is ShapeKind.ELLIPSE else values
    negative = [v for v in checked if v < 0]
    if negative:
        raise ValueError(f"negative coordinate {negative[0]:g} (pixel coordinates start at 0)")


def _parse_roi(kind: ShapeKind, text: str) -> Lesion:
    if kind is ShapeKind.POLYGON:
        pts = [tuple(_coordinate(v) for v in p.split()) for p in text.split(";") if p.strip()]
        if len(pts) < 3 or any(len(p) != 2 for p in pts):
            raise ValueError("a polygon needs 3 or more 'x y' points separated by ';'")
        _non_negative(kind, [v for p in pts for v in p])
        return Lesion(kind, tuple(pts))  # type: ignore[arg-type]
    nums = [_coordinate(v) for v in text.replace(",", " ").split()]
    _non_negative(kind, nums)
    if kind is ShapeKind.ELLIPSE and len(nums) in (4, 5):
        return Lesion(kind, ((nums[0], nums[1]), (nums[2], nums[3])), angle_deg=nums[4] if len(nums) == 5 else 0.0)
    if kind is ShapeKind.BOX and len(nums) == 4:
        x0, y0, x1, y1 = nums
        return Lesion(kind, ((min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))))
    if kind is ShapeKind.CIRCLE and len(nums) == 3:
        return Lesion(kind, ((nums[0], nums[1]), (nums[2], nums[2])))
    if kind is ShapeKind.POINT and len(nums) == 2:
        return Lesion(kind, ((nums[0], nums[1]),))
    expected = {"ellipse": "cx cy rx ry [angle]", "box": "x0 y0 x1 y1", "circle": "cx cy r", "point": "x y"}
    raise ValueError(f"a {kind.value} needs '{expected[kind.value]}'")


def _parse_row(row: dict[str, str], where: str, key: bytes, out: AnnotationSet) -> AnnotationRow | None:
    def reject(column: str, reason: str) -> None:
        out.rejections.append(Rejection(where, column, reason))

    for column in REQUIRED:
        if not (row.get(column) or "").strip():
            reject(column, f"missing required value {column!r}")
            return None
    lat = row["laterality"].strip().upper()[:1]
    if lat not in ("L", "R"):
        reject("laterality", f"{row['laterality']!r} is not L or R")
        return None
    try:
        view = View(row["view"].strip().upper()) if (row.get("view") or "").strip() else None
    except ValueError:
        reject("view", f"{row['view']!r} is not one of {[v.value for v in View]}")
        return None
    try:
        energy = Energy(row["energy"].strip().upper()) if (row.get("energy") or "").strip() else None
    except ValueError:
        reject("energy", f"{row['energy']!r} is not LE, DES or FFDM")
        return None
    try:
        label = Label(row["label"].strip().lower()) if (row.get("label") or "").strip() else None
    except ValueError:
        reject("label", f"{row['label']!r} is not normal, benign or malignant")
        return None
    lesion = None
    shape = (row.get("roi_shape") or "").strip().lower()
    roi = (row.get("roi") or "").strip()
    if shape or roi:
        if view is None:
            reject("view", "an roi is in one image's pixel coordinates, so the row needs a view")
            return None
        try:
            lesion = replace(_parse_roi(ShapeKind(shape), roi), label=label)
        except ValueError as exc:
            column = "roi_shape" if shape not in {k.value for k in ShapeKind} else "roi"
            reject(column, f"cannot read {column} {roi if column == 'roi' else shape!r}: {exc}")
            return None
    descriptors = {}
    for column, group in BIRADS_COLUMNS.items():
        tokens, unknown = parse_birads_cell(group, row.get(column))
        descriptors[group] = tokens
        for piece in unknown:
            out.unknown_descriptors[f"{column}={piece.strip().lower()}"] += 1
    accession = (row.get("accession_number") or "").strip()
    return AnnotationRow(
        where=where,
        patient=pseudonymise(key, "patient", row["patient_id"]),
        accession=pseudonymise(key, "accession", accession) if accession else None,
        laterality=lat,
        view=view,
        energy=energy,
        label=label,
        lesion=lesion,
        birads=BiRads(**descriptors),
    )


def read_annotations(path: str | Path, key: bytes) -> AnnotationSet:
    """Parse the CSV; bad rows become rejections, the rest are kept."""
    path = Path(path)
    out = AnnotationSet()
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open annotation file ({exc.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty annotation file (no header row)")
        reader.fieldnames = [f.strip().lower() for f in reader.fieldnames]
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: header lacks required column(s) {missing}; see docs/annotations.md")
        for line_no, row in enumerate(reader, start=2):
            parsed = _parse_row({k: v for k, v in row.items() if k is not None}, f"{path.name}:{line_no}", key, out)
            if parsed is not None:
                out.rows.append(parsed)
    return out


def _merge_birads(a: BiRads, b: BiRads) -> BiRads:
    merged = {}
    for group in BIRADS_LEXICON:
        values = list(getattr(a, group))
        values += [v for v in getattr(b, group) if v not in values]
        merged[group] = tuple(values)
    return BiRads(**merged)


def _outside_image(lesion: Lesion, images: list[ImageRecord]) -> str | None:
    """Why ``lesion`` cannot outline one of ``images`` (a point placing it lies outside), or None.

    An ellipse or circle is placed by its centre: an outline drawn round a lesion at the edge
    of the image may run past it.
    """
    anchors = lesion.points[:1] if lesion.kind in (ShapeKind.ELLIPSE, ShapeKind.CIRCLE) else lesion.points
    for r in images:
        for x, y in anchors:
            if not (0 <= x <= r.cols and 0 <= y <= r.rows):
                image = f"{r.laterality.value}{r.view.value} {r.energy.value}"
                return f"point ({x:g}, {y:g}) lies outside the {image} image it outlines ({r.cols}x{r.rows} pixels)"
    return None


def join_annotations(
    records: list[ImageRecord], accession_of: dict[str, set[str]], annotations: AnnotationSet
) -> tuple[list[ImageRecord], list[str]]:
    """Attach labels, lesions and BI-RADS to records; return (records, unmatched row locations).

    ``accession_of`` maps an exam pseudonym to the pseudonyms of its accession number and
    study UID, so a row restricted to one study finds it. A row whose outline lies outside
    an image it would outline is moved from ``annotations.rows`` to ``annotations.rejections``.
    """
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_patient.setdefault(r.patient, []).append(i)
    labels: dict[tuple[str, str, str], Label] = {}
    lesions: dict[int, list[Lesion]] = {}
    birads: dict[tuple[str, str, str], BiRads] = {}
    annotated_exams: set[str] = set()
    unmatched: list[str] = []
    outside: set[int] = set()  # id() of the rows rejected here
    for row in annotations.rows:
        hits = [
            i
            for i in by_patient.get(row.patient, [])
            if records[i].laterality.value == row.laterality
            and (row.accession is None or row.accession in accession_of.get(records[i].exam, set()))
        ]
        if not hits:
            unmatched.append(row.where)
            continue
        outlined = [
            i
            for i in hits
            if row.lesion is not None
            and records[i].view is row.view
            and (row.energy is None or records[i].energy is row.energy)
        ]
        if row.lesion is not None and (refusal := _outside_image(row.lesion, [records[i] for i in outlined])):
            annotations.rejections.append(Rejection(row.where, "roi", refusal))
            outside.add(id(row))
            continue
        for i in hits:
            r = records[i]
            annotated_exams.add(r.exam)
            breast = r.breast_key
            if row.label is not None and (breast not in labels or row.label.severity > labels[breast].severity):
                labels[breast] = row.label
            if not row.birads.is_empty():
                birads[breast] = _merge_birads(birads.get(breast, BiRads()), row.birads)
            if row.lesion is not None and i in outlined:
                lesions.setdefault(i, []).append(row.lesion)
    annotations.rows[:] = [row for row in annotations.rows if id(row) not in outside]
    joined = []
    for i, r in enumerate(records):
        label = labels.get(r.breast_key)
        if label is None and r.exam in annotated_exams:
            label = Label.NORMAL  # contralateral breast of an annotated exam
        joined.append(
            replace(r, label=label, lesions=tuple(lesions.get(i, ())), birads=birads.get(r.breast_key, BiRads()))
        )
    return joined, unmatched
