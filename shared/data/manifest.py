"""Reading and writing a site directory's manifest.

Layout of a site directory (``SITE_DIR``)::

    site.json          schema version, site name, counts, split seed
    manifest.jsonl     one ImageRecord per line (see schema.py)
    rejected.jsonl     one {"path", "reason", "field"} per rejected file
    rejected.txt       the same, for humans
    secret.key         the site-local key for pseudonymisation (never leaves the site)
    cache/             preprocessed arrays, keyed by file hash and preprocessing config

Writes are atomic and durable (temp file, fsync, rename, fsync the folder:
shared/durable.py), so an interrupted ingest or a power cut never leaves a half-written
file. manifest.jsonl and site.json change together, but POSIX cannot rename two files at
once: the manifest is renamed first and site.json, which records the manifest's sha256
(``manifest_sha256``), last. A crash between the two renames leaves a new manifest beside
the old site.json, which :func:`meta_mismatch` (and ``fedbreast site check``) recognises.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbreast.shared.durable import atomic_write_text, replace_together
from fedbreast.shared.errors import FedbreastError

from .schema import SCHEMA_VERSION, Energy, ImageRecord, Label, Laterality, View, record_from_dict

MANIFEST = "manifest.jsonl"
SITE_META = "site.json"
REJECTED = "rejected.jsonl"
REJECTED_TXT = "rejected.txt"
MANIFEST_HASH = "manifest_sha256"  # in site.json: the manifest.jsonl it describes


class ManifestError(FedbreastError, ValueError):
    """A site directory whose manifest cannot be used; the message names file and line."""


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):  # a bare list or number is valid JSON but no record
                raise ManifestError(f"{path}:{i}: a row must be a JSON object, not {type(row).__name__}")
            rows.append(row)
    return rows


def write_manifest(site_dir: Path, records: Iterable[ImageRecord], meta: dict[str, Any] | None = None) -> None:
    """Write manifest.jsonl and site.json. Rows are sorted so re-runs are byte-identical."""
    site_dir = Path(site_dir)
    records = sorted(
        records, key=lambda r: (r.patient, r.exam, r.laterality.value, r.view.value, r.energy.value, r.sha256)
    )
    manifest = jsonl_text(r.to_dict() for r in records).encode("utf-8")
    info = dict(meta or {})
    info[MANIFEST_HASH] = hashlib.sha256(manifest).hexdigest()
    info["schema_version"] = SCHEMA_VERSION
    info["images"] = len(records)
    info["exams"] = len({r.exam for r in records})
    info["patients"] = len({r.patient for r in records})
    if records and "site" not in info:
        info["site"] = records[0].site
    site_json = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    # site.json last: it names the manifest by hash, so it is the commit record of the pair.
    replace_together({site_dir / MANIFEST: manifest, site_dir / SITE_META: site_json})


def meta_mismatch(site_dir: Path) -> str | None:
    """Why site.json does not describe manifest.jsonl (None: it does, or it records no hash,
    as site.json files written before the hash existed)."""
    site_dir = Path(site_dir)
    expected = read_site_meta(site_dir).get(MANIFEST_HASH)
    path = site_dir / MANIFEST
    if not expected or not path.exists():
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() == expected:
        return None
    return (
        f"{site_dir / SITE_META} describes another {MANIFEST} ({MANIFEST_HASH} differs): an ingest stopped "
        f"between writing the two, or {path} was edited; run `fedbreast site ingest` again"
    )


def read_site_meta(site_dir: Path) -> dict[str, Any]:
    path = Path(site_dir) / SITE_META
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg})") from None


def load_manifest(site_dir: Path) -> list[ImageRecord]:
    """Load a site's manifest; raises ManifestError naming the file, line and field."""
    path = Path(site_dir) / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path}: no manifest (run `fedbreast site ingest` first)")
    records = []
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            records.append(record_from_dict(row))
        except ValueError as exc:
            raise ManifestError(f"{path}:{i}: {exc}") from None
    return records


# --- exams -------------------------------------------------------------------------------

MAMMO_VIEWS = ("LCC", "LMLO", "RCC", "RMLO")  # the seed-001 view order


@dataclass
class Exam:
    """All images of one study of one patient, indexed by (laterality, view, energy)."""

    patient: str
    exam: str
    images: dict[tuple[str, str, str], ImageRecord] = field(default_factory=dict)
    ultrasound: list[ImageRecord] = field(default_factory=list)

    @property
    def energies(self) -> set[str]:
        return {k[2] for k in self.images}

    @property
    def is_cem(self) -> bool:
        return {"LE", "DES"} <= self.energies

    def expected_keys(self) -> list[tuple[str, str, str]]:
        """The mammography images a complete exam of this kind has."""
        present = self.energies
        if "FFDM" in present and "DES" in present and "LE" not in present:
            energies: tuple[str, ...] = ("FFDM", "DES")  # an FFDM exam with virtual DES (shared/data/virtual.py)
        else:
            energies = ("LE", "DES") if present & {"LE", "DES"} else ("FFDM",)
        return [(lat, view, e) for lat in ("L", "R") for view in ("CC", "MLO") for e in energies]

    def missing(self) -> list[str]:
        if not self.images:
            return []
        return [f"{lat}{view}-{e}" for (lat, view, e) in self.expected_keys() if (lat, view, e) not in self.images]

    def breast_label(self, laterality: str) -> Label | None:
        labels = [r.label for k, r in self.images.items() if k[0] == laterality and r.label is not None]
        labels += [r.label for r in self.ultrasound if r.laterality.value == laterality and r.label is not None]
        return max(labels, key=lambda lab: lab.severity) if labels else None

    @property
    def split(self):
        splits = {r.split for r in list(self.images.values()) + self.ultrasound}
        return splits.pop() if len(splits) == 1 else None


def group_exams(records: Iterable[ImageRecord]) -> dict[str, Exam]:
    """Group records into exams (patient + study). Duplicate keys keep the first record."""
    exams: dict[str, Exam] = {}
    for r in records:
        ex = exams.setdefault(r.exam, Exam(patient=r.patient, exam=r.exam))
        if r.view.is_mammo:
            ex.images.setdefault((r.laterality.value, r.view.value, r.energy.value), r)
        else:
            ex.ultrasound.append(r)
    return exams


def records_by_breast(records: Iterable[ImageRecord]) -> dict[tuple[str, str, str], list[ImageRecord]]:
    out: dict[tuple[str, str, str], list[ImageRecord]] = defaultdict(list)
    for r in records:
        out[r.breast_key].append(r)
    return out


__all__ = [
    "Energy",
    "Exam",
    "ImageRecord",
    "Laterality",
    "ManifestError",
    "View",
    "atomic_write_text",
    "group_exams",
    "load_manifest",
    "meta_mismatch",
    "read_jsonl",
    "read_site_meta",
    "records_by_breast",
    "write_jsonl",
    "write_manifest",
]
