"""Virtual images a site made itself (``fedbreast site synthesize``: DES from FFDM / LE views
with a trained cyclegan generator), kept apart from what the hospital acquired.

They live under ``<site_dir>/virtual/``: the DICOM files and ``manifest.jsonl``, whose rows are
manifest records with ``synthetic: true`` and ``source_sha256``, the acquired image each was made
from. The site's own manifest is never edited (a re-ingest cannot drop them, a run that does not
ask never sees them). :func:`virtual_records` joins them to the current acquired records: a row
whose source is gone is dropped, and patient, exam, split, label and lesions always come from the
source, so a re-split or a corrected label carries over.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path

from fedbreast.shared.data.manifest import read_jsonl, write_jsonl
from fedbreast.shared.data.schema import ImageRecord, record_from_dict

VIRTUAL_DIR = "virtual"
VIRTUAL_MANIFEST = "manifest.jsonl"


def virtual_dir(site_dir: str | Path) -> Path:
    return Path(site_dir) / VIRTUAL_DIR


def read_virtual(site_dir: str | Path) -> list[ImageRecord]:
    """The site's virtual manifest as written (none: an empty list); ValueError names a bad row."""
    path = virtual_dir(site_dir) / VIRTUAL_MANIFEST
    if not path.exists():
        return []
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            rec = record_from_dict(row)
        except ValueError as exc:
            raise ValueError(f"{path}:{i}: {exc}") from None
        if not rec.synthetic or not rec.source_sha256:
            raise ValueError(f"{path}:{i}: a virtual record must say synthetic = true and name its source_sha256")
        out.append(rec)
    return out


def write_virtual(site_dir: str | Path, records: Iterable[ImageRecord]) -> Path:
    """Replace the virtual manifest (rows sorted by source, one per source image)."""
    by_source = {r.source_sha256: r for r in records}
    path = virtual_dir(site_dir) / VIRTUAL_MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [by_source[k].to_dict() for k in sorted(by_source)])
    return path


def virtual_records(
    site_dir: str | Path, acquired: list[ImageRecord], replace: float = 0.0, seed: int = 0
) -> tuple[list[ImageRecord], set[str]]:
    """The virtual records to use beside ``acquired``, and the acquired records they replace
    (by sha256). Each carries its source's identity, split, label and annotations (the virtual
    image keeps its own file, hash and energy); one whose source is gone is left out.

    A view whose real image of that energy the site holds keeps the real one, except for the
    patients ``replace`` picks: that fraction (rounded) of the patients who have virtual images
    for such views, chosen by ``seed`` (a fixed order of keyed hashes, so 25 % holds the 10 %'s
    patients), whose real images are replaced by the virtual ones (seed 004's experiment)."""
    sources = {r.sha256: r for r in acquired}
    real = {(*r.breast_key, r.view.value, r.energy.value): r for r in acquired}
    fill: list[ImageRecord] = []
    swap: list[ImageRecord] = []
    for v in read_virtual(site_dir):
        src = sources.get(v.source_sha256)
        if src is None:
            continue  # the image it was made from is no longer at the site
        rec = dataclasses.replace(
            src,
            energy=v.energy,
            path=v.path,
            sha256=v.sha256,
            rows=v.rows,
            cols=v.cols,
            manufacturer=v.manufacturer,
            bits_stored=v.bits_stored,
            window=v.window,
            photometric=v.photometric,
            synthetic=True,
            source_sha256=v.source_sha256,
        )
        (swap if (*src.breast_key, src.view.value, v.energy.value) in real else fill).append(rec)
    patients = sorted({r.patient for r in swap}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    chosen = set(patients[: round(replace * len(patients))])
    swapped = [r for r in swap if r.patient in chosen]
    replaced = {real[(*r.breast_key, r.view.value, r.energy.value)].sha256 for r in swapped}
    return fill + swapped, replaced
