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


def virtual_records(site_dir: str | Path, acquired: list[ImageRecord]) -> list[ImageRecord]:
    """The virtual records whose source is among ``acquired``, with the source's identity,
    split, label and annotations (the virtual image keeps its own file, hash and energy); none
    for a view whose real image of that energy the site holds."""
    sources = {r.sha256: r for r in acquired}
    real = {(*r.breast_key, r.view.value, r.energy.value) for r in acquired}
    out = []
    for v in read_virtual(site_dir):
        src = sources.get(v.source_sha256)
        if src is None:
            continue  # the image it was made from is no longer at the site
        if (*src.breast_key, src.view.value, v.energy.value) in real:
            continue  # the site has acquired the real one since: it wins
        out.append(
            dataclasses.replace(
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
        )
    return out
