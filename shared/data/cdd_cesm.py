"""``fedbreast site import-cdd-cesm``: the public CDD-CESM release -> one (or more) site directories.

CDD-CESM (Categorized Digital Database for Low energy and Subtracted Contrast Enhanced
Spectral Mammography images; TCIA, Khaled et al., Scientific Data 2022) ships JPEG images,
not DICOM, so it cannot go through ``site ingest``. This importer writes the same site
directory layout (manifest.jsonl, site.json, rejected.jsonl/txt, secret.key) so everything
downstream treats it like an ingested DICOM site. See docs/cdd-cesm.md.

The release, as published::

    Low energy images of CDD-CESM/   P{id}_{L|R}_DM_{CC|MLO}.jpg   (DM = low energy)
    Subtracted images of CDD-CESM/   P{id}_{L|R}_CM_{CC|MLO}.jpg   (CM = subtracted)
    Radiology manual annotations.xlsx        sheet "all": one row per image
    Radiology_hand_drawn_segmentations_v2.csv   VGG Image Annotator (VIA) export

Its quirks are handled here rather than by hand-editing the download: stray spaces and
"(2)" suffixes in file names, "CESM" in the Type column but "CM" in file names, density
only on DM rows ("_" on CESM rows), "$"-joined multiple findings, misspelt descriptors
("Speculated", "Heterogenous"), and VIA file names that lack ".jpg" or differ by spaces.
Anything that cannot be matched becomes a rejection with its reason; the import goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbreast.shared.errors import FedbreastError

from .birads import parse_birads_cell
from .manifest import MANIFEST, write_manifest
from .pseudonym import load_or_create_key, pseudonymise
from .rejects import Rejection, write_rejections
from .schema import BIRADS_LEXICON, BiRads, Energy, ImageRecord, Label, Laterality, Lesion, Modality, ShapeKind, View
from .splits import DEFAULT_FRACTIONS, assign_splits

LOW_ENERGY_DIR = "Low energy images of CDD-CESM"
SUBTRACTED_DIR = "Subtracted images of CDD-CESM"
ANNOTATIONS_XLSX = "Radiology manual annotations.xlsx"
SEGMENTATIONS_CSV = "Radiology_hand_drawn_segmentations_v2.csv"
SHEET = "all"
SOURCE = "CDD-CESM"

# (patient number, laterality, "DM" | "CM", view): one image of the release.
ImageKey = tuple[int, str, str, str]

_NAME = re.compile(r"P(\d+)_([LR])_(DM|CM)_(CC|MLO)", re.IGNORECASE)
_COPY_SUFFIX = re.compile(r"\(\d+\)$")  # "P2_L_CM_MLO (2)": a second copy saved by a browser
_JPEG = re.compile(r"\.jpe?g$", re.IGNORECASE)
_ENERGY = {"DM": Energy.LE, "CM": Energy.DES}
_TYPE_CODE = {"dm": "DM", "cesm": "CM", "cm": "CM"}  # Type column says CESM where file names say CM
_FOLDER_CODE = {LOW_ENERGY_DIR: "DM", SUBTRACTED_DIR: "CM"}


class CddCesmError(FedbreastError, ValueError):
    """The import cannot run at all (missing folder, workbook or sheet); the message names it."""


@dataclass
class ImportReport:
    sites: list[Path] = field(default_factory=list)  # site directories written
    images: int = 0  # images in the manifests, all sites together
    images_by_site: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    lesions: int = 0  # outlines in the manifests, copies included
    outlines_copied: int = 0  # outlines copied from one energy of a view to the other
    unknown_descriptors: dict[str, int] = field(default_factory=dict)  # "column=value" -> rows
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"CDD-CESM: {self.images} images in {len(self.sites)} site(s), {self.rejected} rejected"]
        lines += [f"  {name}: {n} images" for name, n in sorted(self.images_by_site.items())]
        lines.append(f"  outlines: {self.lesions} ({self.outlines_copied} copied from the other energy of the view)")
        if self.rejections:
            for fld, n in sorted(Counter(r.field for r in self.rejections).items()):
                lines.append(f"  rejected {n:5d}  {fld}")
        if self.unknown_descriptors:
            top = sorted(self.unknown_descriptors.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            lines.append(
                f"  unknown descriptors: {sum(self.unknown_descriptors.values())} "
                f"({len(self.unknown_descriptors)} distinct); most common:"
            )
            lines += [f"    {n:5d}  {text}" for text, n in top]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  site directory: {p}" for p in self.sites]
        return "\n".join(lines)


# --- names -------------------------------------------------------------------------------


def parse_image_name(name: str) -> ImageKey | None:
    """Key of a CDD-CESM image name (file name, ``Image_name`` cell or VIA ``#filename``).

    Tolerates the release's spellings: a missing or present ``.jpg``, stray spaces
    anywhere, and a trailing copy suffix such as ``(2)``. None if it is not an image name.
    """
    s = _JPEG.sub("", name.strip().strip("'\"").strip())
    s = _COPY_SUFFIX.sub("", re.sub(r"\s+", "", s))
    m = _NAME.fullmatch(s)
    if not m:
        return None
    return (int(m[1]), m[2].upper(), m[3].upper(), m[4].upper())


def canonical_name(key: ImageKey) -> str:
    return f"P{key[0]}_{key[1]}_{key[2]}_{key[3]}"


def _norm_name(name: str) -> str:
    # TCIA has published the same files as "Radiology manual annotations.xlsx" and
    # "Radiology-manual-annotations.xlsx"; compare names with spaces/hyphens/underscores folded.
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _find(root: Path, match: Callable[[Path], bool], depth: int = 2) -> Path | None:
    """The first path under ``root`` (itself, then up to ``depth`` folders down) that matches."""
    level = [root]
    for _ in range(depth + 1):
        hits: list[Path] = []
        below: list[Path] = []
        for d in level:
            try:
                children = sorted(d.iterdir())
            except OSError:
                continue
            for p in children:
                if p.name.startswith("."):
                    continue
                if match(p):
                    hits.append(p)
                elif p.is_dir():
                    below.append(p)
        if hits:
            return hits[0]
        level = below
    return None


@dataclass(frozen=True)
class CddCesmLayout:
    root: Path
    annotations: Path
    segmentations: Path | None
    image_dirs: dict[str, Path]  # "DM" / "CM" -> folder; a partial download may lack one


def find_layout(root: Path, annotations: Path | None = None, segmentations: Path | None = None) -> CddCesmLayout:
    """Locate the release's files under ``root`` (as unpacked, or one or two folders down)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise CddCesmError(f"{root}: no such folder (expected the unpacked CDD-CESM download)")
    if annotations is not None:
        annotations = Path(annotations).resolve()
        if not annotations.is_file():
            raise CddCesmError(f"{annotations}: no such file (the CDD-CESM annotation workbook)")
    else:
        want = _norm_name(ANNOTATIONS_XLSX)
        annotations = _find(root, lambda p: p.is_file() and _norm_name(p.name) == want)
        if annotations is None:
            raise CddCesmError(
                f"{root}: no '{ANNOTATIONS_XLSX}' in this folder or two levels below; "
                "download it from the CDD-CESM page on TCIA and put it next to the image folders"
            )
    if segmentations is not None:
        segmentations = Path(segmentations).resolve()
        if not segmentations.is_file():
            raise CddCesmError(f"{segmentations}: no such file (the CDD-CESM segmentation CSV)")
    else:
        prefix = _norm_name("Radiology_hand_drawn_segmentations")
        segmentations = _find(
            root, lambda p: p.is_file() and _norm_name(p.name).startswith(prefix) and p.suffix.lower() == ".csv"
        )
    image_dirs: dict[str, Path] = {}
    for folder, code in _FOLDER_CODE.items():
        want_dir = _norm_name(folder)

        def is_wanted(p: Path, w: str = want_dir) -> bool:
            return p.is_dir() and _norm_name(p.name) == w

        found = _find(root, is_wanted)
        if found is not None:
            image_dirs[code] = found
    if not image_dirs:
        raise CddCesmError(
            f"{root}: neither '{LOW_ENERGY_DIR}' nor '{SUBTRACTED_DIR}' found in this folder or two levels below"
        )
    return CddCesmLayout(root=root, annotations=annotations, segmentations=segmentations, image_dirs=image_dirs)


# --- descriptors -------------------------------------------------------------------------

# Misspellings seen in the release (and in radiology exports generally) -> the lexicon word.
_WORD_FIXES = {
    "speculated": "spiculated",
    "spiculed": "spiculated",
    "speculation": "spiculation",
    "speculations": "spiculations",
    "heterogenous": "heterogeneous",
    "hetrogeneous": "heterogeneous",
    "hetrogenous": "heterogeneous",
    "heterogenously": "heterogeneously",
    "heterogenic": "heterogeneous",
    "homogenous": "homogeneous",
    "homogeneus": "homogeneous",
    "homogenously": "homogeneously",
    "circumscibed": "circumscribed",
    "circumcribed": "circumscribed",
    "ovoid": "oval",
    "enhacement": "enhancement",
    "enhancment": "enhancement",
}

# Finding words that are understood but have no lexicon group here (calcifications, distortion,
# ...): a piece made of these is not "unknown", so the unknown count flags real surprises.
_KNOWN_WORDS = frozenset(
    """
    mass masses non nonmass enhancement enhancing enhanced enhance calcification calcifications
    microcalcification microcalcifications calcific architectural distortion asymmetry asymmetric
    focal global developing normal negative benign suspicious malignant no finding findings
    postoperative post operative surgical scar changes lymph node nodes intramammary axillary
    skin thickening nipple retraction cyst cysts fibroadenoma duct ectasia dilated ducts edema
    punctate amorphous coarse pleomorphic fine linear branching grouped clustered segmental regional
    diffuse scattered dense density fatty fibroglandular extremely almost entirely fat
    neoadjuvant chemotherapy residual seen upper lower outer inner central retroareolar subareolar
    quadrant region bilateral left right breast breasts small large multiple single few tiny faint
    """.split()
)
# Words that recognise nothing on their own ("a galactocele" is still unknown).
_STOPWORDS = frozenset("a an and or with without of the in at on is are to by for as".split())

# "no enhancement", "without spiculations": drop the negated words up to the next punctuation.
_NEGATED = re.compile(r"\b(no|without|absent)\b[^,;.:$]*")
_DENSITY_PHRASES = re.compile(
    r"\b(heterogeneously dense|extremely dense|scattered (areas of )?fibroglandular|almost entirely fat(ty)?)\b"
)
_NON_MASS = re.compile(r"\bnon ?mass\b")
_MASS = re.compile(r"(?<!non )\bmass(es)?\b")
_SHAPE = re.compile(r"\b(round|oval|irregular)\b(?! margins?\b)")
_MARGIN_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(not|non) circumscribed\b"), "not_circumscribed"),
    (re.compile(r"(?<!not )(?<!non )\b(circumscribed|well defined)\b"), "circumscribed"),
    (re.compile(r"\b(ill defined|indistinct)\b"), "indistinct"),
    (re.compile(r"\bobscured\b"), "obscured"),
    (re.compile(r"\b(micro ?lobulated|lobulated)\b"), "microlobulated"),  # as birads.SYNONYMS
    (re.compile(r"\birregular margins?\b"), "irregular"),
    (re.compile(r"\b(spiculated|spiculations?)\b"), "spiculated"),
)
_ENHANCEMENT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(homogeneous|homogeneously)\b"), "homogeneous"),
    (re.compile(r"\b(heterogeneous|heterogeneously)\b"), "heterogeneous"),
    (re.compile(r"\b(rim|ring)\b"), "rim"),
)
_BPE_NAME = r"(?:bpe|background (?:parenchymal )?enhancement)"
_BPE_BEFORE = re.compile(rf"\b(minimal|mild|moderate|marked) {_BPE_NAME}\b")  # "mild BPE"
_BPE_AFTER = re.compile(rf"\b{_BPE_NAME}\W*(?:is )?(minimal|mild|moderate|marked)\b")  # "BPE: mild"
_VOCAB = (
    _KNOWN_WORDS
    | {w for values in BIRADS_LEXICON.values() for w in values}
    | {
        "bpe",
        "background",
        "parenchymal",
        "well",
        "ill",
        "defined",
        "rim",
        "ring",
        "not",
        "lobulated",
        "spiculation",
        "spiculations",
        "margin",
        "margins",
        "heterogeneously",
        "homogeneously",
        "shape",
    }
)
_PIECES = re.compile(r"\s*[,;|/]\s*|\s+-\s+|\s*\n\s*")


def _normalise_text(text: str) -> str:
    text = re.sub(r"[\-_]+", " ", text.lower())
    words = re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text)
    return " ".join(_WORD_FIXES.get(w, w) for w in words)


def descriptors_from_text(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """Map one finding's free text (a ``Tags`` or ``Findings`` cell, split on ``$``) to lexicon tokens.

    Returns ``(tokens by group, unknown pieces)``. A piece that is exactly a lexicon value
    ("Oval", "Speculated") goes through :func:`parse_birads_cell`; longer phrases through
    keyword rules that need context: enhancement patterns only where the finding speaks of
    enhancement ("heterogeneous calcifications" is not an enhancement pattern), BPE levels
    only next to "BPE" / "background enhancement", shape words not for non-mass enhancement.
    """
    out: dict[str, list[str]] = defaultdict(list)

    def add(group: str, token: str) -> None:
        if token not in out[group]:
            out[group].append(token)

    unknown: list[str] = []
    segment = _normalise_text(text)
    body = _DENSITY_PHRASES.sub(" ", _NEGATED.sub(" ", segment))  # density words read as enhancement
    non_mass_only = bool(_NON_MASS.search(body)) and not _MASS.search(body)
    enhancing = "enhanc" in body

    for piece in (p for p in _PIECES.split(text) if p.strip()):
        for group in ("mass_shape", "mass_margin", "internal_enhancement"):
            tokens, rest = parse_birads_cell(group, piece)
            if tokens and not rest:
                for t in tokens:
                    add(group, t)
                break
        else:
            words = [w for w in _normalise_text(piece).split() if w.isalpha() and w not in _STOPWORDS]
            if words and not any(w in _VOCAB for w in words):
                unknown.append(piece.strip())

    if not non_mass_only:
        for m in _SHAPE.finditer(body):
            add("mass_shape", m[1])
    for pattern, token in _MARGIN_RULES:
        if pattern.search(body):
            add("mass_margin", token)
    for pattern in (_BPE_BEFORE, _BPE_AFTER):
        for m in pattern.finditer(body):
            add("bpe", m[1])
    if enhancing:
        # "mild background enhancement" is a BPE level, not an internal enhancement pattern.
        lesion_text = _BPE_AFTER.sub(" ", _BPE_BEFORE.sub(" ", body))
        if "enhanc" in lesion_text:
            for pattern, token in _ENHANCEMENT_RULES:
                if pattern.search(lesion_text):
                    add("internal_enhancement", token)
    return {g: v for g, v in out.items() if v}, unknown


def _split_findings(cell: str) -> list[str]:
    return [s.strip() for s in cell.split("$") if s.strip()]


def parse_pathology(cell: str) -> tuple[list[Label], list[str]]:
    """``Pathology Classification/ Follow up``: Normal / Benign / Malignant, ``$``-joined per finding."""
    labels, unknown = [], []
    for piece in _split_findings(cell):
        word = piece.lower().rstrip(".")
        if word in ("normal", "benign", "malignant"):
            labels.append(Label(word))
        else:
            unknown.append(piece)
    return labels, unknown


# --- the annotation workbook ----------------------------------------------------------------

_COLUMNS: dict[str, tuple[str, ...]] = {
    "image_name": ("image_name", "image name"),
    "patient_id": ("patient_id", "patient id"),
    "side": ("side",),
    "type": ("type",),
    "density": ("breast density (acr)", "breast density", "density (acr)", "density", "acr"),
    "birads": ("birads", "bi-rads", "bi rads"),
    "findings": ("findings",),
    "view": ("view",),
    "tags": ("tags",),
    "machine": ("machine",),
    "pathology": ("pathology classification/follow up", "pathology classification", "pathology"),
}
_REQUIRED = ("image_name", "pathology")


def _header_key(text: str) -> str:
    return re.sub(r"\s*/\s*", "/", re.sub(r"\s+", " ", text.strip().lower()))


def _cell(value: Any) -> str:
    """A cell as text: 3.0 -> "3" (Excel stores ids and categories as floats), None -> ""."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_annotation_sheet(xlsx: Path) -> tuple[list[tuple[int, dict[str, str]]], str]:
    """Rows of sheet ``all`` as ``(excel row number, {column: text})``, and the sheet's name."""
    try:
        from openpyxl import load_workbook

        wb = load_workbook(xlsx, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - openpyxl raises zipfile/KeyError/InvalidFileException
        raise CddCesmError(f"{xlsx}: not a readable .xlsx workbook ({exc})") from None
    try:
        names = {n.strip().lower(): n for n in wb.sheetnames}
        if SHEET not in names:
            raise CddCesmError(f"{xlsx}: no sheet '{SHEET}' (the workbook has {wb.sheetnames})")
        sheet = names[SHEET]
        it = wb[sheet].iter_rows(values_only=True)
        header = next(it, None) or ()
        index: dict[str, int] = {}
        keys = [_header_key(_cell(h)) for h in header]
        for col, aliases in _COLUMNS.items():
            hit = next((keys.index(a) for a in aliases if a in keys), None)
            if hit is None and col == "pathology":  # the header's spacing around "/" varies
                hit = next((i for i, k in enumerate(keys) if k.startswith("pathology")), None)
            if hit is not None:
                index[col] = hit
        missing = [c for c in _REQUIRED if c not in index]
        if missing:
            wanted = {"image_name": "Image_name", "pathology": "Pathology Classification/ Follow up"}
            raise CddCesmError(
                f"{xlsx}: sheet '{sheet}' has no column {', '.join(repr(wanted[c]) for c in missing)} "
                f"(its columns: {[_cell(h) for h in header]})"
            )
        rows = []
        for n, values in enumerate(it, start=2):
            row = {c: _cell(values[i]) if i < len(values) else "" for c, i in index.items()}
            if any(row.values()):
                rows.append((n, row))
        return rows, sheet
    finally:
        wb.close()


# --- the VIA segmentation CSV ----------------------------------------------------------------


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what!r} is {value!r}, not a number")
    return float(value)


def lesion_from_via(attrs: Any) -> Lesion | None:
    """One VIA ``region_shape_attributes`` object -> a Lesion; None for ``{}`` (no region).

    Raises ``ValueError`` with the reason when the shape cannot be used.
    """
    if not isinstance(attrs, dict):
        raise ValueError(f"expected a JSON object, got {type(attrs).__name__}")
    if not attrs:
        return None  # VIA lists images without regions with "{}"
    name = attrs.get("name")
    if name in ("polygon", "polyline"):
        xs, ys = attrs.get("all_points_x"), attrs.get("all_points_y")
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
            raise ValueError(f"{name}: all_points_x and all_points_y must be lists of one length")
        pts = tuple((_num(x, "all_points_x"), _num(y, "all_points_y")) for x, y in zip(xs, ys))
        if len(pts) > 3 and pts[0] == pts[-1]:
            pts = pts[:-1]  # some exporters repeat the first vertex to close the ring
        if len(pts) < 3:
            raise ValueError(f"{name} with {len(pts)} points has no area")
        # An open polyline drawn around a lesion is read as its closed outline.
        return Lesion(kind=ShapeKind.POLYGON, points=pts)
    if name == "ellipse":
        cx, cy, rx, ry = (_num(attrs.get(k), k) for k in ("cx", "cy", "rx", "ry"))
        if rx <= 0 or ry <= 0:
            raise ValueError(f"ellipse radii must be positive, got rx={rx}, ry={ry}")
        theta = _num(attrs["theta"], "theta") if "theta" in attrs else 0.0  # radians; VIA 1.x has none
        angle = round(math.degrees(theta), 6) + 0.0  # + 0.0 turns -0.0 into 0.0
        return Lesion(kind=ShapeKind.ELLIPSE, points=((cx, cy), (rx, ry)), angle_deg=angle)
    if name == "circle":
        cx, cy, r = (_num(attrs.get(k), k) for k in ("cx", "cy", "r"))
        if r <= 0:
            raise ValueError(f"circle radius must be positive, got r={r}")
        return Lesion(kind=ShapeKind.CIRCLE, points=((cx, cy), (r, r)))
    if name == "point":
        return Lesion(kind=ShapeKind.POINT, points=((_num(attrs.get("cx"), "cx"), _num(attrs.get("cy"), "cy")),))
    if name == "rect":
        x, y, w, h = (_num(attrs.get(k), k) for k in ("x", "y", "width", "height"))
        if w <= 0 or h <= 0:
            raise ValueError(f"rect must have positive width and height, got {w}x{h}")
        return Lesion(kind=ShapeKind.BOX, points=((x, y), (x + w, y + h)))
    raise ValueError(f"unknown VIA shape {name!r}")


@dataclass
class _ViaRegion:
    where: str  # "Radiology_hand_drawn_segmentations_v2.csv:17"
    lesion: Lesion


def read_segmentations(
    csv_path: Path, where_prefix: str
) -> tuple[dict[ImageKey, list[_ViaRegion]], list[tuple[Rejection, int | None]]]:
    """Outlines of the VIA CSV by image key, and the rows that cannot be used with the
    patient they name (None when the file name is not an image name)."""
    regions: dict[ImageKey, list[_ViaRegion]] = defaultdict(list)
    rejections: list[tuple[Rejection, int | None]] = []
    with open(csv_path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        name_col = next((i for i, h in enumerate(header) if h in ("#filename", "filename")), None)
        shape_col = header.index("region_shape_attributes") if "region_shape_attributes" in header else None
        if name_col is None or shape_col is None:
            raise CddCesmError(
                f"{csv_path}: not a VIA export (needs columns '#filename' and 'region_shape_attributes', "
                f"found {header})"
            )
        for row in reader:
            where = f"{where_prefix}:{reader.line_num}"
            if not any(c.strip() for c in row):
                continue
            if len(row) <= max(name_col, shape_col):
                rejections.append((Rejection(where, "region_shape_attributes", "row has too few columns"), None))
                continue
            key = parse_image_name(row[name_col])
            if key is None:
                reason = f"{row[name_col]!r} is not a CDD-CESM image name"
                rejections.append((Rejection(where, "#filename", reason), None))
                continue
            raw = row[shape_col].strip()
            try:
                lesion = lesion_from_via(json.loads(raw) if raw else {})
            except json.JSONDecodeError as exc:
                reason = f"not valid JSON ({exc.msg}): {raw[:80]}"
                rejections.append((Rejection(where, "region_shape_attributes", reason), key[0]))
                continue
            except ValueError as exc:
                rejections.append((Rejection(where, "region_shape_attributes", str(exc)), key[0]))
                continue
            if lesion is not None and lesion not in (r.lesion for r in regions[key]):
                regions[key].append(_ViaRegion(where, lesion))
    return dict(regions), rejections


# --- images ---------------------------------------------------------------------------------


@dataclass
class _Image:
    key: ImageKey
    path: Path
    sha256: str = ""
    rows: int = 0
    cols: int = 0
    bits: int = 8
    lesions: list[Lesion] = field(default_factory=list)


def _scan_images(layout: CddCesmLayout) -> tuple[dict[ImageKey, _Image], list[Rejection]]:
    """Image files by key. Of several files for one key, the one named exactly wins."""
    candidates: dict[ImageKey, list[Path]] = defaultdict(list)
    rejections: list[Rejection] = []
    for code, folder in sorted(layout.image_dirs.items()):
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if not _JPEG.search(p.name.strip()):
                rejections.append(Rejection(str(p), "filename", "not a .jpg file"))
                continue
            key = parse_image_name(p.name)
            if key is None:
                rejections.append(
                    Rejection(str(p), "filename", "name does not follow P{id}_{L|R}_{DM|CM}_{CC|MLO}.jpg")
                )
            elif key[2] != code:
                rejections.append(Rejection(str(p), "filename", f"a {key[2]} image in the folder of {code} images"))
            else:
                candidates[key].append(p)
    images: dict[ImageKey, _Image] = {}
    for key, paths in candidates.items():
        exact = canonical_name(key) + ".jpg"
        paths.sort(key=lambda p: (p.name != exact, p.name))
        images[key] = _Image(key=key, path=paths[0])
        for dup in paths[1:]:
            rejections.append(
                Rejection(str(dup), "filename", f"second file for {canonical_name(key)}; kept {paths[0].name}")
            )
    return images, rejections


def _read_jpeg(image: _Image) -> str | None:
    """Hash and decode the file fully (so a truncated JPEG is caught now); the failure reason or None."""
    from PIL import Image

    try:
        data = image.path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image.cols, image.rows = im.size
            image.bits = 16 if im.mode.startswith("I") else 8
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot decode the JPEG ({exc})"
    image.sha256 = hashlib.sha256(data).hexdigest()
    return None


def _outside(lesion: Lesion, rows: int, cols: int) -> bool:
    x0, y0, x1, y1 = lesion.bbox()
    return x1 < 0 or y1 < 0 or x0 > cols or y0 > rows


# --- the import -----------------------------------------------------------------------------


@dataclass
class _Breast:
    labels: list[Label] = field(default_factory=list)
    birads: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, group: str, tokens: Iterable[str]) -> None:
        for t in tokens:
            if t not in self.birads[group]:
                self.birads[group].append(t)

    def label(self) -> Label | None:
        return max(self.labels, key=lambda lab: lab.severity) if self.labels else None

    def to_birads(self) -> BiRads:
        return BiRads(**{g: tuple(self.birads.get(g, ())) for g in BIRADS_LEXICON})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-machine"


@dataclass(frozen=True)
class _Rejected:
    rejection: Rejection
    patient: int | None  # decides which per-machine site reports it; None: the import level only
    is_file: bool  # an image file (counted as rejected_files) rather than an annotation row


def import_cdd_cesm(
    root: Path,
    out: Path,
    split_by_machine: bool = False,
    seed: int = 0,
    annotations: Path | None = None,
    segmentations: Path | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> ImportReport:
    """Import the CDD-CESM release at ``root`` into the site directory ``out``.

    With ``split_by_machine`` each distinct ``Machine`` value becomes its own site directory
    under ``out`` (a simulated multi-vendor federation) with its own key and splits; a
    patient goes, whole, to the site of the machine that took most of their images, so no
    patient is split across sites. Re-running on the same inputs rewrites byte-identical
    manifests (the site key is reused, rows are sorted, nothing time-dependent is written).
    """
    layout = find_layout(root, annotations, segmentations)
    out = Path(out).resolve()
    _check_out(out, split_by_machine)
    run = _Import(layout)
    run.read_rows()  # 1. the workbook: one row per image; labels and descriptors gather per breast
    run.join_images()  # 2. the image files, joined to the rows
    run.attach_outlines()  # 3. outlines, copied across the energies of a view
    site_of_patient = run.place_patients(split_by_machine)  # 4. one site, or one per machine
    dir_of = _site_dirs(sorted(set(site_of_patient.values()))) if split_by_machine else {"": out.name}
    for machine, dirname in sorted(dir_of.items(), key=lambda kv: kv[1]):
        run.write_site(
            out / dirname if split_by_machine else out,
            dirname,
            machine if split_by_machine else None,
            site_of_patient,
            seed,
            fractions,
        )
    return run.finish(out, split_by_machine)


class _Import:
    """One CDD-CESM import, stage by stage; every stage adds what it rejects to ``rejected``."""

    def __init__(self, layout: CddCesmLayout) -> None:
        self.layout = layout
        self.report = ImportReport()
        self.rejected: list[_Rejected] = []
        self.unknown_of: dict[int, Counter] = defaultdict(Counter)  # patient -> "column=value" -> rows
        self.unmatched_rows: dict[str, int] = {}  # row ref -> patient
        self.xlsx_name = _rel(layout.annotations, layout.root)
        self.rows_of: dict[ImageKey, list[str]] = defaultdict(list)  # key -> row refs
        self.machine_of: dict[ImageKey, str] = {}
        self.breasts: dict[tuple[int, str], _Breast] = defaultdict(_Breast)
        self.images: dict[ImageKey, _Image] = {}  # every image file found
        self.kept: dict[ImageKey, _Image] = {}  # the ones with a row that decode
        self.n_rows = 0
        self.sheet = SHEET  # the sheet read_rows found

    def reject_row(self, where: str, column: str, reason: str, patient: int | None) -> None:
        self.rejected.append(_Rejected(Rejection(where, column, reason), patient, is_file=False))

    def reject_file(self, path: Path, column: str, reason: str, patient: int | None) -> None:
        self.rejected.append(_Rejected(Rejection(str(path), column, reason), patient, is_file=True))

    def read_rows(self) -> None:
        rows, sheet = read_annotation_sheet(self.layout.annotations)
        self.n_rows, self.sheet = len(rows), sheet
        for n, row in rows:
            where = f"{self.xlsx_name}:{sheet}:{n}"
            key = parse_image_name(row["image_name"])
            if key is None:
                self.reject_row(where, "Image_name", f"{row['image_name']!r} is not a CDD-CESM image name", None)
                continue
            conflict = _row_conflict(key, row)
            if conflict:
                self.reject_row(where, conflict[0], conflict[1], key[0])
                continue
            self.rows_of[key].append(where)
            if row.get("machine") and key not in self.machine_of:
                self.machine_of[key] = row["machine"]
            self._describe(self.breasts[(key[0], key[1])], self.unknown_of[key[0]], row)

    @staticmethod
    def _describe(breast: _Breast, unknown: Counter, row: dict[str, str]) -> None:
        """Gather a row's label and BI-RADS descriptors on its breast; count what is not understood."""
        labels, bad = parse_pathology(row["pathology"])
        breast.labels += labels
        unknown.update(f"Pathology={b.lower()}" for b in bad)
        density = row.get("density", "")
        if density.strip("_ -"):  # "_" marks the CESM rows: density is given on DM rows only
            tokens, bad = parse_birads_cell("density", density)
            breast.add("density", tokens)
            unknown.update(f"Breast density (ACR)={b.strip().lower()}" for b in bad)
        tokens, bad = parse_birads_cell("assessment", row.get("birads", ""))
        breast.add("assessment", tokens)
        unknown.update(f"BIRADS={b.strip().lower()}" for b in bad)
        for column, cell in (("Findings", row.get("findings", "")), ("Tags", row.get("tags", ""))):
            for finding in _split_findings(cell):
                found, bad = descriptors_from_text(finding)
                for group, toks in found.items():
                    breast.add(group, toks)
                unknown.update(f"{column}={b.lower()}" for b in bad)

    def join_images(self) -> None:
        layout = self.layout
        self.images, file_rejects = _scan_images(layout)
        for r in file_rejects:
            self.rejected.append(_Rejected(r, _patient_of_path(r.path), is_file=True))
        for key in sorted(set(self.rows_of) - set(self.images)):
            reason = _no_image_reason(key, layout)
            for where in self.rows_of[key]:
                self.reject_row(where, "Image_name", reason, key[0])
                self.unmatched_rows[where] = key[0]
        for key in sorted(self.images):
            image = self.images[key]
            if key not in self.rows_of:
                self.reject_file(
                    image.path,
                    "Image_name",
                    f"no row in sheet '{self.sheet}' of {self.xlsx_name} names this image",
                    key[0],
                )
                continue
            problem = _read_jpeg(image)
            if problem:
                self.reject_file(image.path, "read", problem, key[0])
                continue
            self.kept[key] = image

    def attach_outlines(self) -> None:
        """Attach the VIA outlines, then copy them across energies of a view (LE and DES are co-registered)."""
        layout, kept = self.layout, self.kept
        regions: dict[ImageKey, list[_ViaRegion]] = {}
        if layout.segmentations is None:
            self.report.warnings.append(
                f"no '{SEGMENTATIONS_CSV}' under {layout.root}: images imported without outlines"
            )
        else:
            regions, via_rejects = read_segmentations(layout.segmentations, _rel(layout.segmentations, layout.root))
            self.rejected += [_Rejected(r, pid, is_file=False) for r, pid in via_rejects]
        for key in sorted(regions):
            outlined = kept.get(key)
            if outlined is None:
                if key not in self.images:  # an image rejected above is already reported once
                    for region in regions[key]:
                        self.reject_row(region.where, "#filename", _no_image_reason(key, layout), key[0])
                continue
            for region in regions[key]:
                if _outside(region.lesion, outlined.rows, outlined.cols):
                    self.reject_row(
                        region.where,
                        "region_shape_attributes",
                        f"outline lies outside {canonical_name(key)} ({outlined.cols}x{outlined.rows} pixels)",
                        key[0],
                    )
                else:
                    outlined.lesions.append(region.lesion)
        size_mismatch = 0
        for key in sorted(kept):
            if key[2] != "DM":
                continue
            le, des = kept[key], kept.get((key[0], key[1], "CM", key[3]))
            if des is None or bool(le.lesions) == bool(des.lesions):
                continue
            if (le.rows, le.cols) != (des.rows, des.cols):
                size_mismatch += 1  # not pixel-aligned: a copied outline would land in the wrong place
                continue
            src, dst = (le, des) if le.lesions else (des, le)
            dst.lesions = list(src.lesions)
            self.report.outlines_copied += len(src.lesions)
        if size_mismatch:
            self.report.warnings.append(
                f"{size_mismatch} views have LE and DES images of different sizes; outlines not copied"
            )

    def place_patients(self, split_by_machine: bool) -> dict[int, str]:
        """Patient -> machine when splitting by machine: a patient goes whole to their most frequent one."""
        if not split_by_machine:
            return {}
        votes: dict[int, Counter] = defaultdict(Counter)
        for key in self.kept:
            votes[key[0]][self.machine_of.get(key, "")] += 1
        site_of_patient = {pid: min(c, key=lambda m: (-c[m], m)) for pid, c in votes.items()}  # noqa: B023 - used at once
        mixed = sum(len(c) > 1 for c in votes.values())
        if mixed:
            self.report.warnings.append(
                f"{mixed} patients have images from more than one machine; "
                "each was placed whole at the site of their most frequent machine"
            )
        return site_of_patient

    def write_site(
        self,
        site_dir: Path,
        site: str,
        machine: str | None,
        site_of_patient: dict[int, str],
        seed: int,
        fractions: tuple[float, float, float],
    ) -> None:
        """One site's manifest, rejections and key; ``machine`` None: the whole release is one site."""
        site_dir.mkdir(parents=True, exist_ok=True)

        def mine(patient: int | None) -> bool:
            return machine is None or (patient is not None and site_of_patient.get(patient) == machine)

        secret = load_or_create_key(site_dir)
        records = []
        for key, image in sorted(self.kept.items()):
            if not mine(key[0]):
                continue
            breast = self.breasts[(key[0], key[1])]
            raw_patient = str(key[0])
            records.append(
                ImageRecord(
                    site=site,
                    patient=pseudonymise(secret, "patient", raw_patient),
                    exam=pseudonymise(secret, "exam", raw_patient),  # one study per patient in this release
                    laterality=Laterality(key[1]),
                    view=View(key[3]),
                    modality=Modality.MG,
                    energy=_ENERGY[key[2]],
                    path=str(image.path),
                    sha256=image.sha256,
                    rows=image.rows,
                    cols=image.cols,
                    manufacturer=self.machine_of.get(key, ""),
                    bits_stored=image.bits,
                    label=breast.label(),
                    lesions=tuple(image.lesions),
                    birads=breast.to_birads(),
                )
            )
        records = assign_splits(records, seed=seed, fractions=fractions)
        here = [r for r in self.rejected if mine(r.patient)]
        write_rejections(site_dir, (r.rejection for r in here))
        unknown = sum((c for pid, c in self.unknown_of.items() if mine(pid)), Counter())
        layout = self.layout
        meta = {
            "site": site,
            "source": SOURCE,
            "source_root": str(layout.root),
            "machine": machine if machine is not None else sorted(set(self.machine_of.values())),
            "split_seed": seed,
            "split_fractions": list(fractions),
            "annotations": {
                "file": str(layout.annotations),
                "segmentations": str(layout.segmentations) if layout.segmentations else None,
                "rows": self.n_rows,
                "rejected": len({r.rejection for r in here if not r.is_file}),
                "unmatched": sorted(w for w, pid in self.unmatched_rows.items() if mine(pid)),
                "unknown_descriptors": dict(sorted(unknown.items())),
            },
            "rejected_files": len({r.rejection for r in here if r.is_file}),
        }
        write_manifest(site_dir, records, meta)
        report = self.report
        report.sites.append(site_dir)
        report.images_by_site[site] = len(records)
        report.images += len(records)
        report.lesions += sum(len(r.lesions) for r in records)

    def finish(self, out: Path, split_by_machine: bool) -> ImportReport:
        report = self.report
        all_rejections = sorted({r.rejection for r in self.rejected}, key=lambda r: (r.path, r.field))
        if split_by_machine:
            # The import-level record holds every rejection, including those no site can claim
            # (an image without a row has no machine; a VIA row may name no image at all).
            write_rejections(out, all_rejections)
        report.rejections = all_rejections
        report.rejected = len(all_rejections)
        report.unknown_descriptors = dict(sorted(sum(self.unknown_of.values(), Counter()).items()))
        return report


def _no_image_reason(key: ImageKey, layout: CddCesmLayout) -> str:
    folder = LOW_ENERGY_DIR if key[2] == "DM" else SUBTRACTED_DIR
    if key[2] not in layout.image_dirs:
        return f"folder '{folder}' is missing, so {canonical_name(key)} has no image"
    return f"no image file {canonical_name(key)}.jpg in '{folder}'"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _row_conflict(key: ImageKey, row: dict[str, str]) -> tuple[str, str] | None:
    """A row whose columns contradict its Image_name cannot be trusted for either."""
    name = canonical_name(key)
    pid = row.get("patient_id", "")
    if pid and re.sub(r"\D", "", pid) and int(re.sub(r"\D", "", pid)) != key[0]:
        return "Patient_ID", f"Patient_ID {pid} contradicts Image_name {name}"
    side = row.get("side", "").upper()[:1]
    if side and side != key[1]:
        return "Side", f"Side {row['side']} contradicts Image_name {name}"
    view = row.get("view", "").upper()
    if view and view != key[3]:
        return "View", f"View {row['view']} contradicts Image_name {name}"
    typ = row.get("type", "")
    if typ and _TYPE_CODE.get(typ.lower()) != key[2]:
        return "Type", f"Type {typ} contradicts Image_name {name}"
    return None


def _patient_of_path(path: str) -> int | None:
    key = parse_image_name(Path(path).name)
    return key[0] if key else None


def _site_dirs(machines: list[str]) -> dict[str, str]:
    """Machine value -> a safe, unique directory name ("GE Senographe DS" -> "ge-senographe-ds")."""
    out: dict[str, str] = {}
    used: Counter = Counter()
    for m in machines:
        slug = _slug(m)
        used[slug] += 1
        out[m] = slug if used[slug] == 1 else f"{slug}-{used[slug]}"
    return out


def _check_out(out: Path, split_by_machine: bool) -> None:
    """Refuse to mix the one-site and per-machine layouts in one folder: downstream tools
    would pick up a stale manifest from the other mode."""
    if split_by_machine and (out / MANIFEST).exists():
        raise CddCesmError(
            f"{out} already holds a single-site import ({MANIFEST}); use another --out for --split-by-machine"
        )
    if not split_by_machine and out.is_dir() and any((d / MANIFEST).exists() for d in out.iterdir() if d.is_dir()):
        raise CddCesmError(f"{out} already holds per-machine sites; use another --out for a single-site import")


__all__ = [
    "ANNOTATIONS_XLSX",
    "LOW_ENERGY_DIR",
    "SEGMENTATIONS_CSV",
    "SUBTRACTED_DIR",
    "CddCesmError",
    "CddCesmLayout",
    "ImportReport",
    "descriptors_from_text",
    "find_layout",
    "import_cdd_cesm",
    "lesion_from_via",
    "parse_image_name",
    "parse_pathology",
    "read_annotation_sheet",
    "read_segmentations",
]
