"""``fedbreast site ingest``: a DICOM folder (+ annotation CSV) -> a validated site manifest.

Incremental and idempotent: ``ingest_state.jsonl`` remembers each file's size, mtime and
outcome, so a re-run reads only new or changed files (and files judged under other ingest
rules) and, with nothing changed, rewrites byte-identical outputs. Each file's outcome is appended to a journal as soon as it is
known, so an interrupted ingest loses nothing and a re-run completes it.

Every file is fully decoded once here: a file whose pixels cannot be decoded is rejected
now, with its reason, rather than failing later in the middle of a training round.

Nothing is read that could stall or exhaust the ingest: only regular files (a FIFO, socket,
device or link to one is rejected unopened), up to the rules' size limit, and pixels are
decoded only after the header's geometry is within the rules' limits (``headers.check_geometry``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbreast.shared.errors import FedbreastError

from .annotations import AnnotationSet, join_annotations, read_annotations
from .files import NotRead, read_regular
from .headers import HeaderRejection, read_header
from .manifest import read_site_meta, write_jsonl, write_manifest
from .pixels import PixelDecodeError, dicom_pixels
from .pseudonym import load_or_create_key, pseudonymise
from .rejects import Rejection, write_rejections
from .rules import INGEST_LIMITS, IngestRules, load_rules
from .schema import record_from_dict
from .splits import DEFAULT_FRACTIONS, assign_splits

STATE = "ingest_state.jsonl"
JOURNAL = "ingest_state.partial.jsonl"
SKIP_NAMES = {"DICOMDIR"}


class IngestError(FedbreastError, RuntimeError):
    """The ingest as a whole cannot run (bad input folder, unwritable output, bad config)."""


@dataclass
class IngestReport:
    site: str
    files: int = 0
    processed: int = 0  # new or changed files read this run
    reused: int = 0  # unchanged files taken from the previous run
    removed: int = 0  # files gone since the previous run
    images: int = 0
    exams: int = 0
    patients: int = 0
    rejected: int = 0
    annotation_rows: int = 0
    annotation_rows_rejected: int = 0
    annotation_rows_unmatched: int = 0
    unlabelled_images: int = 0
    seconds: float = 0.0
    rejections_by_field: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"site {self.site}: {self.images} images, {self.exams} exams, {self.patients} patients",
            f"  files: {self.files} seen, {self.processed} read, {self.reused} unchanged, {self.removed} removed",
            f"  rejected: {self.rejected} files"
            + "".join(f"\n    {n:5d}  {f}" for f, n in sorted(self.rejections_by_field.items())),
            f"  annotations: {self.annotation_rows} rows joined, {self.annotation_rows_rejected} rejected, "
            f"{self.annotation_rows_unmatched} without an image; {self.unlabelled_images} images unlabelled",
            f"  {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def _walk(root: Path, exclude: Path) -> Iterator[Path]:
    """Every path ingest must account for: files, and what it will not enter, to be rejected by name.

    Symbolic links to folders are yielded, never followed (one pointing up the tree loops
    forever); a folder that cannot be listed is yielded too, so neither vanishes unreported.
    FIFOs, sockets and devices are in ``filenames`` and are yielded like files.
    """
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=False):
        while unlisted:
            yield Path(unlisted.pop(0).filename)
        entered = []
        for d in sorted(dirnames):
            path = Path(dirpath, d)
            if d.startswith("."):
                continue
            if path.is_symlink():
                yield path
            elif path.resolve() != exclude:
                entered.append(d)
        dirnames[:] = entered
        for name in sorted(filenames):
            if not name.startswith(".") and name not in SKIP_NAMES:
                yield Path(dirpath, name)
    while unlisted:
        yield Path(unlisted.pop(0).filename)


def _list_error(path: str) -> str:
    try:
        os.scandir(path).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return "it can be listed now: ingest again"


def _stat_or_lstat(path: str) -> os.stat_result:
    # A broken symbolic link has no target to stat; its own lstat still identifies it in the
    # state, so it is rejected and reported like any other file rather than skipped.
    try:
        return os.stat(path)
    except OSError:
        return os.lstat(path)


def ingest_file(path: str, key: bytes, rules: IngestRules) -> dict[str, Any]:
    """Read one file; return a state entry with either a partial record or a rejection.

    Runs in worker processes, so it takes and returns only picklable values.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    # size -1 until known: an entry that never learnt it matches nothing, so the next run reads it again.
    entry: dict[str, Any] = {"path": path, "size": -1, "mtime_ns": -1, "rules": rules.fingerprint}

    def rejected(field_name: str, reason: str) -> dict[str, Any]:
        entry["rejection"] = {"path": path, "field": field_name, "reason": reason}
        return entry

    try:
        st = _stat_or_lstat(path)
    except OSError as exc:
        return rejected("file", f"cannot read the file ({exc.strerror})")
    entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    try:
        data = read_regular(path, rules.limits.max_file_bytes)
    except NotRead as exc:
        if exc.kind == "folder":  # only a folder os.walk could not list reaches here
            return rejected(
                "file", f"a folder that could not be listed ({_list_error(path)}): its files were not ingested"
            )
        return rejected("file", exc.reason)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        return rejected("file", f"not a readable DICOM file ({type(exc).__name__}: {exc})")
    try:
        info = read_header(ds, rules)
    except HeaderRejection as exc:
        return rejected(exc.field, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a malformed element can raise anything from pydicom's lazy parsing
        return rejected("header", f"malformed header ({type(exc).__name__}: {exc})")
    try:
        pixels = dicom_pixels(ds, path)
    except PixelDecodeError as exc:
        return rejected("PixelData", str(exc).split("PixelData: ", 1)[-1])
    if pixels.shape != (info.rows, info.cols):
        return rejected(
            "PixelData", f"decoded shape {pixels.shape} disagrees with Rows/Columns {info.rows}x{info.cols}"
        )
    entry["record"] = {
        "patient": pseudonymise(key, "patient", info.patient_id),
        "exam": pseudonymise(key, "exam", info.study_uid),
        "laterality": info.laterality.value,
        "view": info.view.value,
        "modality": info.modality.value,
        "energy": info.energy.value,
        "path": path,
        "sha256": entry["sha256"],
        "rows": info.rows,
        "cols": info.cols,
        "pixel_spacing": list(info.pixel_spacing) if info.pixel_spacing else None,
        "manufacturer": info.manufacturer,
        "bits_stored": info.bits_stored,
        "window": list(info.window) if info.window else None,
        "photometric": info.photometric,
    }
    # Pseudonyms the annotation CSV's accession_number may match (never the raw values).
    entry["accessions"] = sorted({pseudonymise(key, "accession", v) for v in (info.accession, info.study_uid) if v})
    return entry


def _load_state(site_dir: Path) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for name in (STATE, JOURNAL):  # the journal of an interrupted run overrides the last state
        path = site_dir / name
        if path.exists():
            for entry in _read_journal(path):
                state[entry["path"]] = entry
    return state


def _read_journal(path: Path) -> list[dict[str, Any]]:
    # A journal cut mid-line by a crash: keep every complete line.
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _check_writable(site_dir: Path) -> None:
    try:
        site_dir.mkdir(parents=True, exist_ok=True)
        probe = site_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise IngestError(f"cannot write to output folder {site_dir}: {exc.strerror}") from None


def ingest(
    dicom_dir: str | Path,
    site_dir: str | Path,
    annotations: str | Path | None = None,
    site: str | None = None,
    config: str | Path | None = None,
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest ``dicom_dir`` into ``site_dir``; see the module docstring."""
    t0 = time.perf_counter()
    dicom_dir, site_dir = Path(dicom_dir).resolve(), Path(site_dir).resolve()
    if not dicom_dir.is_dir():
        raise IngestError(f"DICOM folder {dicom_dir} does not exist or is not a folder")
    rules = load_rules(config)
    _check_writable(site_dir)
    key = load_or_create_key(site_dir)
    annotation_set = read_annotations(annotations, key) if annotations else AnnotationSet()
    if site is None:
        site = read_site_meta(site_dir).get("site") or site_dir.name

    previous = _load_state(site_dir)
    files = [str(p) for p in _walk(dicom_dir, exclude=site_dir)]
    report = IngestReport(site=site, files=len(files))
    current: dict[str, dict[str, Any]] = {}
    todo = []
    for path in files:
        old = previous.get(path)
        try:
            st = _stat_or_lstat(path)
        except OSError:
            continue  # vanished while walking
        if (
            old
            and old["size"] == st.st_size
            and old["mtime_ns"] == st.st_mtime_ns
            and old.get("rules") == rules.fingerprint
        ):
            current[path] = old
        else:
            todo.append(path)
    report.reused = len(current)
    report.removed = len(set(previous) - set(files))

    with open(site_dir / JOURNAL, "a", encoding="utf-8") as journal:
        for done, entry in enumerate(_run(todo, key, rules, workers), 1):
            journal.write(json.dumps(entry, sort_keys=True) + "\n")
            journal.flush()
            current[entry["path"]] = entry
            if progress:
                progress(done, len(todo))
    report.processed = len(todo)

    write_jsonl(site_dir / STATE, (current[p] for p in sorted(current)))
    (site_dir / JOURNAL).unlink(missing_ok=True)
    records, rejections = [], []
    accession_of: dict[str, set[str]] = {}
    for entry in (current[p] for p in sorted(current)):
        if "rejection" in entry:
            rejections.append(Rejection(**entry["rejection"]))
        else:
            records.append(record_from_dict({**entry["record"], "site": site}))
            accession_of.setdefault(entry["record"]["exam"], set()).update(entry.get("accessions", ()))
    records, unmatched = join_annotations(records, accession_of, annotation_set)
    records = assign_splits(records, seed=split_seed, fractions=split_fractions)

    write_rejections(site_dir, rejections + annotation_set.rejections)
    meta = {
        "site": site,
        "source": str(dicom_dir),
        "split_seed": split_seed,
        "split_fractions": list(split_fractions),
        "annotations": {
            "file": str(Path(annotations).resolve()) if annotations else None,
            "rows": len(annotation_set.rows),
            "rejected": len(annotation_set.rejections),
            "unmatched": unmatched,
            "unknown_descriptors": dict(sorted(annotation_set.unknown_descriptors.items())),
        },
        "rejected_files": len(rejections),
        # The limits every file in the manifest was read under: the preprocessing cache
        # re-reads the files under the same ones (shared/data/cache.py).
        INGEST_LIMITS: rules.limits.to_dict(),
    }
    write_manifest(site_dir, records, meta)
    report.images = len(records)
    report.exams = len({r.exam for r in records})
    report.patients = len({r.patient for r in records})
    report.rejected = len(rejections)
    report.rejections_by_field = dict(sorted(Counter(r.field for r in rejections).items()))
    report.annotation_rows = len(annotation_set.rows) - len(unmatched)
    report.annotation_rows_rejected = len(annotation_set.rejections)
    report.annotation_rows_unmatched = len(unmatched)
    report.unlabelled_images = sum(r.label is None for r in records)
    report.seconds = time.perf_counter() - t0
    return report


def _run(paths: list[str], key: bytes, rules: IngestRules, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(paths) < 8:
        for p in paths:
            yield ingest_file(p, key, rules)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(ingest_file, paths, [key] * len(paths), [rules] * len(paths), chunksize=8)


__all__ = ["IngestError", "IngestReport", "ingest", "ingest_file"]
