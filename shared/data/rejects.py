"""The record of what ingest could not use, and why: JSONL for machines, text for people."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import REJECTED, REJECTED_TXT, atomic_write_text, write_jsonl


@dataclass(frozen=True)
class Rejection:
    path: str  # the file (or "annotations.csv:17" for an annotation row)
    field: str  # the tag, column or stage that failed ("PixelData", "ImageLaterality", "label", "read")
    reason: str  # a sentence a site operator understands

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.reason}"


def write_rejections(site_dir: Path, rejections: Iterable[Rejection]) -> None:
    """Write rejected.jsonl and rejected.txt (a summary by field, then every line)."""
    rows = sorted(set(rejections), key=lambda r: (r.path, r.field))
    write_jsonl(Path(site_dir) / REJECTED, (asdict(r) for r in rows))
    counts = Counter(r.field for r in rows)
    lines = [f"{len(rows)} rejected" + (":" if rows else "")]
    lines += [f"  {n:5d}  {field}" for field, n in counts.most_common()]
    lines += [""] + [str(r) for r in rows]
    atomic_write_text(Path(site_dir) / REJECTED_TXT, "\n".join(lines) + "\n")
