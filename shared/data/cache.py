"""On-disk cache of preprocessed images, memory-mapped, keyed by (file sha256, config hash).

Layout::

    SITE_DIR/cache/<config_hash>/
        config.json          the PreprocessConfig (for people; the folder name is its hash)
        index.json           sha256 -> {shard, offset, shape, geometry, ref, path}; failures
        shard-<id>.npy       1-D float16 arrays, append-only: a build only ever adds shards
        .lock                held while a build runs

A config change lands in another folder, so it rebuilds everything for that config and
touches nothing else; a file whose content changes has another sha256, so only it is
rebuilt. A DES image that borrows the crop/flip of its LE sibling records the LE's sha256
as ``ref``; if the LE file changes, the DES entry is rebuilt too.

Storage is float16, not uint16: values are in [0, 1], where float16 keeps 11 significant
bits (error <= 2.4e-4, finer than one 12-bit grey level over a full-range window), and a
float16 array is usable as is (``torch.from_numpy`` takes it; conversion to float32
happens in the batch), so ``get`` returns a zero-copy view. Both halve the bytes of float32.

Shards are flat so native-resolution configs (every crop has its own shape) share shard
files; for fixed-size configs every entry has the same length, so a shard is also a
``(rows, H*W)`` matrix and batches are gathered with one fancy-index per shard.

Builds are crash-safe: a shard is written to a temp file, fsynced and renamed into place,
then the index is replaced atomically. A build interrupted anywhere leaves at worst an
unreferenced shard or temp file, which the next build deletes.

Source files are re-read as ingest read them: a config the site has not built yet (a
coordinator asks for a new image size) reads every file again, and the DICOM folder may
have changed since ingest. Each file is read through ingest's reader (a regular file, up to
``max_file_mib``: shared/data/files.py), its bytes must hash to the manifest's sha256, and its
header must be within the ingest limits before its pixels are decoded (``headers.check_geometry``,
which also reads each JPEG 2000 / JPEG-LS / JPEG frame's own header). The limits are the ones
ingest stored in ``site.json`` (``ingest_limits``), else the default rules'. A file that fails
is a failure of its own ("changed since ingest: re-run fedbreast site ingest"); the build goes on.

Lesion masks are not cached: they are rasterised on demand from the stored geometry
(PIL, ~20 us at 256x128), because annotations live in the manifest and can be corrected
without the image bytes (hence the sha256 key) changing; a cached mask would go stale silently.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedbreast.shared.errors import FedbreastError

from .files import NotRead, read_regular
from .manifest import SITE_META, atomic_write_text, read_site_meta
from .pixels import decode_source
from .preprocess import Geometry, PreprocessConfig, preprocess_image
from .rules import INGEST_LIMITS, ConfigError, IngestLimits, IngestRules, load_rules
from .schema import Energy, ImageRecord

CACHE_DTYPE = np.float16
CACHE_FORMAT = 1
INDEX = "index.json"
CONFIG = "config.json"
LOCK = ".lock"
DEFAULT_CHUNK_BYTES = 256 << 20  # one shard per 256 MiB of output: bounds memory and lost work
CHANGED = "changed since ingest: re-run fedbreast site ingest"


class CacheError(FedbreastError, RuntimeError):
    """A cache folder that cannot be used; the message names the file at fault."""


class SourceChanged(FedbreastError, ValueError):
    """A source file is not the file ingest read (other bytes, or no longer a regular file)."""


@dataclass(frozen=True)
class CacheFailure:
    path: str
    sha256: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class CacheStats:
    cache_dir: Path
    total: int = 0  # distinct images asked for
    hits: int = 0  # already cached
    built: int = 0  # preprocessed in this build
    shards_written: int = 0
    seconds: float = 0.0
    failures: list[CacheFailure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def __str__(self) -> str:
        return (
            f"{self.cache_dir}: {self.total} images, {self.hits} cached, {self.built} built, "
            f"{self.failed} failed, {self.shards_written} shard(s), {self.seconds:.1f} s"
        )


def cache_dir_for(site_dir: str | Path, cfg: PreprocessConfig) -> Path:
    return Path(site_dir) / "cache" / cfg.config_hash()


def _empty_index(cfg: PreprocessConfig) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "config_hash": cfg.config_hash(), "entries": {}, "shards": {}, "failures": {}}


def _read_index(cache_dir: Path, cfg: PreprocessConfig) -> dict[str, Any]:
    path = cache_dir / INDEX
    if not path.exists():
        return _empty_index(cfg)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc.msg}); delete {cache_dir} to rebuild") from None
    if index.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{path}: format {index.get('format')!r}, expected {CACHE_FORMAT}; delete {cache_dir} to rebuild"
        )
    if index.get("config_hash") != cfg.config_hash():
        raise CacheError(
            f"{path}: config_hash {index.get('config_hash')!r} does not match the config ({cfg.config_hash()})"
        )
    return index


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock so two builds of one config cannot drop each other's index entries."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(cache_dir / LOCK, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _clean_orphans(cache_dir: Path, index: dict[str, Any]) -> None:
    """Delete temp files and shards no index entry points at (left by an interrupted build)."""
    for p in cache_dir.iterdir():
        if p.name.endswith(".tmp") or (p.name.startswith("shard-") and p.name not in index["shards"]):
            p.unlink(missing_ok=True)


# --- the worker ------------------------------------------------------------------------------

# (record, reference sha or None, reference geometry dict if the reference is already cached)
_Item = tuple[ImageRecord, "str | None", "dict[str, Any] | None"]
# (sha256, path, array or None, geometry dict or None, ref sha or None, error or None)
_Result = tuple[str, str, "np.ndarray | None", "dict[str, Any] | None", "str | None", "str | None"]


def source_rules(site_dir: str | Path) -> IngestRules:
    """The rules a cache build reads source files under: the default ingest rules with the
    limits ingest stored in the site's site.json (a site may have raised them), if it did."""
    rules = load_rules()
    stored = read_site_meta(Path(site_dir)).get(INGEST_LIMITS)
    if stored is None:  # ingested before the limits were stored, or not by ingest (CDD-CESM import)
        return rules
    try:
        limits = IngestLimits.from_dict(f"{Path(site_dir) / SITE_META}: {INGEST_LIMITS}", stored)
    except ConfigError as exc:
        raise CacheError(str(exc)) from None
    return replace(rules, limits=limits)


def _read_source(record: ImageRecord, rules: IngestRules) -> np.ndarray:
    """The record's pixels, read once: ingest's reader, the manifest's sha256, then the geometry check."""
    try:
        data = read_regular(record.path, rules.limits.max_file_bytes)
    except NotRead as exc:
        raise SourceChanged(f"{exc.reason}; {CHANGED}") from None
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise SourceChanged(CHANGED)
    return decode_source(data, record.path, record.modality.value, rules)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


def _run_task(cfg: PreprocessConfig, items: list[_Item], rules: IngestRules) -> list[_Result]:
    """Preprocess a group of images in order; an LE processed here lends its geometry to its DES."""
    out: list[_Result] = []
    done_geometry: dict[str, dict[str, Any]] = {}
    for record, ref_sha, ref_geometry in items:
        try:
            if ref_sha is not None and ref_geometry is None:
                ref_geometry = done_geometry.get(ref_sha)
            if ref_sha is not None and ref_geometry is None:
                ref_sha = None  # the LE failed: fall back to the DES's own crop, rebuilt next time
            reference = Geometry.from_dict(ref_geometry) if ref_geometry is not None else None
            pixels = _read_source(record, rules)
            arr, geometry = preprocess_image(pixels, record, cfg, reference=reference)
            gd = geometry.to_dict()
            done_geometry[record.sha256] = gd
            out.append((record.sha256, record.path, arr.astype(CACHE_DTYPE), gd, ref_sha, None))
        except SourceChanged as exc:
            out.append((record.sha256, record.path, None, None, None, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad file must never abort a site's build
            out.append((record.sha256, record.path, None, None, None, f"{type(exc).__name__}: {exc}"))
    return out


def _run_task_star(args: tuple[PreprocessConfig, list[_Item], IngestRules]) -> list[_Result]:
    return _run_task(*args)


# --- building --------------------------------------------------------------------------------


def _needs_reference(cfg: PreprocessConfig) -> bool:
    return cfg.crop_breast or cfg.orientation != "none"


def _plan(
    records: Iterable[ImageRecord], cfg: PreprocessConfig, index: dict[str, Any]
) -> tuple[int, int, list[list[_Item]]]:
    """(distinct images, cache hits, tasks). A DES is grouped with its LE sibling when both are missing."""
    unique: dict[str, ImageRecord] = {}
    for r in records:
        unique.setdefault(r.sha256, r)
    le_of: dict[tuple[str, str, str, str], ImageRecord] = {}
    for r in unique.values():
        if r.energy is Energy.LE:
            le_of.setdefault((r.patient, r.exam, r.laterality.value, r.view.value), r)
    entries = index["entries"]

    def ref_for(r: ImageRecord) -> ImageRecord | None:
        if r.energy is not Energy.DES or not _needs_reference(cfg):
            return None
        le = le_of.get((r.patient, r.exam, r.laterality.value, r.view.value))
        return le if le is not None and le.sha256 != r.sha256 else None

    missing: dict[str, ImageRecord] = {}
    hits = 0
    for sha, r in unique.items():
        ref = ref_for(r)
        e = entries.get(sha)
        if e is not None and e.get("ref") == (ref.sha256 if ref is not None else None):
            hits += 1
        else:
            missing[sha] = r
    tasks: list[list[_Item]] = []
    grouped: set[str] = set()
    for sha, r in missing.items():
        if sha in grouped:
            continue
        ref = ref_for(r)
        if ref is None:
            if r.energy is Energy.LE:
                continue  # scheduled with its DES below, or alone at the end
            tasks.append([(r, None, None)])
        elif ref.sha256 in missing:
            tasks.append([(ref, None, None), (r, ref.sha256, None)])
            grouped.add(ref.sha256)
        else:
            tasks.append([(r, ref.sha256, entries[ref.sha256]["geometry"])])
    for sha, r in missing.items():
        if r.energy is Energy.LE and sha not in grouped:
            tasks.append([(r, None, None)])
    return len(unique), hits, tasks


def _write_shard(cache_dir: Path, results: list[_Result], index: dict[str, Any]) -> None:
    """Write one shard atomically, then publish its entries in the index."""
    ok = [r for r in results if r[2] is not None]
    if ok:
        name = f"shard-{uuid.uuid4().hex[:16]}.npy"
        tmp = cache_dir / f".{name}.tmp"
        total = sum(int(r[2].size) for r in ok if r[2] is not None)  # all of ok; the test narrows the type
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=CACHE_DTYPE, shape=(total,))
        offset = 0
        placed = []
        for sha, path, arr, geometry, ref, _ in ok:
            assert arr is not None
            mm[offset : offset + arr.size] = arr.ravel()
            placed.append((sha, path, offset, arr.shape, geometry, ref))
            offset += arr.size
        mm.flush()
        del mm
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, cache_dir / name)
        index["shards"][name] = {"size": total}
        for sha, path, off, shape, geometry, ref in placed:
            index["entries"][sha] = {
                "shard": name,
                "offset": int(off),
                "shape": [int(v) for v in shape],
                "geometry": geometry,
                "ref": ref,
                "path": path,
            }
            index["failures"].pop(sha, None)
    for sha, path, arr, _, _, error in results:
        if arr is None:
            index["failures"][sha] = {"path": path, "reason": error}
    atomic_write_text(cache_dir / INDEX, json.dumps(index, sort_keys=True, separators=(",", ":")))


def build_cache(
    site_dir: str | Path,
    records: Iterable[ImageRecord],
    cfg: PreprocessConfig,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CacheStats:
    """Preprocess every record not yet cached for ``cfg``; returns what was done.

    ``workers > 1`` preprocesses in a process pool (forkserver/spawn, so it is safe from a
    process that already runs threads). ``progress(done, todo)`` is called after each image
    group. A file that fails to decode or preprocess, or is not the file ingest read (see the
    module docstring), is reported in ``failures`` (path and reason) and skipped; the build goes on.
    """
    t0 = time.perf_counter()
    cache_dir = cache_dir_for(site_dir, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats = CacheStats(cache_dir=cache_dir)
    rules = source_rules(site_dir)
    with _locked(cache_dir):
        index = _read_index(cache_dir, cfg)
        if not (cache_dir / CONFIG).exists():
            atomic_write_text(cache_dir / CONFIG, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        _clean_orphans(cache_dir, index)
        stats.total, stats.hits, tasks = _plan(records, cfg, index)
        todo = sum(len(t) for t in tasks)
        pending: list[_Result] = []
        pending_bytes = 0
        done = 0

        def consume(results: list[_Result]) -> None:
            nonlocal pending_bytes, done
            for res in results:
                if res[2] is None:
                    stats.failures.append(CacheFailure(path=res[1], sha256=res[0], reason=str(res[5])))
                else:
                    stats.built += 1
                    pending_bytes += res[2].nbytes
                pending.append(res)
            done += len(results)
            if pending_bytes >= chunk_bytes:
                flush()
            if progress is not None:
                progress(done, todo)

        def flush() -> None:
            nonlocal pending_bytes
            if pending:
                _write_shard(cache_dir, pending, index)
                stats.shards_written += any(r[2] is not None for r in pending)
                pending.clear()
                pending_bytes = 0

        if tasks and workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload([__name__])  # import torch once in the server, not per worker
            ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
            try:
                for results in ex.map(_run_task_star, [(cfg, t, rules) for t in tasks]):
                    consume(results)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        else:
            for t in tasks:
                consume(_run_task(cfg, t, rules))
        flush()
        if not (cache_dir / INDEX).exists():
            atomic_write_text(cache_dir / INDEX, json.dumps(index, sort_keys=True, separators=(",", ":")))
    stats.seconds = time.perf_counter() - t0
    return stats


# --- reading ---------------------------------------------------------------------------------


class ImageCache:
    """Read side of one config's cache. Pickles without its memmaps (DataLoader workers reopen them)."""

    def __init__(self, cache_dir: Path, cfg: PreprocessConfig, index: dict[str, Any]) -> None:
        self.cache_dir = Path(cache_dir)
        self.cfg = cfg
        self._entries: dict[str, dict[str, Any]] = index["entries"]
        self._failures: dict[str, dict[str, Any]] = index.get("failures", {})
        self._shard_names: list[str] = sorted(index["shards"])
        self._shard_id = {n: i for i, n in enumerate(self._shard_names)}
        self._maps: dict[int, np.ndarray] = {}
        self._geometry: dict[str, Geometry] = {}

    @property
    def config_hash(self) -> str:
        return self.cfg.config_hash()

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        """(H, W) of every entry when the config resizes to a fixed size, else None."""
        return self.cfg.size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sha: object) -> bool:
        return sha in self._entries

    def has(self, sha: str) -> bool:
        return sha in self._entries

    def shas(self) -> list[str]:
        return list(self._entries)

    def failure(self, sha: str) -> str | None:
        """Why the last build could not cache this file, if it failed."""
        f = self._failures.get(sha)
        return f"{f['path']}: {f['reason']}" if f else None

    def _entry(self, sha: str) -> dict[str, Any]:
        try:
            return self._entries[sha]
        except KeyError:
            why = self.failure(sha)
            raise KeyError(
                f"{sha}: not in cache {self.cache_dir}" + (f" (build failed: {why})" if why else "")
            ) from None

    def _map(self, shard_id: int) -> np.ndarray:
        mm = self._maps.get(shard_id)
        if mm is None:
            path = self.cache_dir / self._shard_names[shard_id]
            try:
                mm = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheError(f"{path}: cannot open shard ({exc}); delete {self.cache_dir} to rebuild") from None
            if self.cfg.size is not None:
                mm = mm.reshape(-1, self.cfg.size[0] * self.cfg.size[1])
            self._maps[shard_id] = mm
        return mm

    def shape(self, sha: str) -> tuple[int, int]:
        s = self._entry(sha)["shape"]
        return (int(s[0]), int(s[1]))

    def get(self, sha: str) -> np.ndarray:
        """The preprocessed image as a read-only float16 (H, W) view into the memmap (no copy)."""
        e = self._entry(sha)
        mm = self._map(self._shard_id[e["shard"]])
        h, w = e["shape"]
        if mm.ndim == 2:
            return mm[e["offset"] // mm.shape[1]].reshape(h, w)
        return mm[e["offset"] : e["offset"] + h * w].reshape(h, w)

    def geometry(self, sha: str) -> Geometry:
        g = self._geometry.get(sha)
        if g is None:
            g = self._geometry[sha] = Geometry.from_dict(self._entry(sha)["geometry"])
        return g

    def ref(self, sha: str) -> str | None:
        """sha256 of the LE image whose crop/flip this DES image reuses, if any."""
        return self._entry(sha).get("ref")

    def locate(self, shas: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, rows) for a fixed-size cache; a sha of "" gives shard -1 (a blank slot)."""
        if self.cfg.size is None:
            raise CacheError(f"{self.cache_dir}: locate() needs a fixed-size config; this one has size=None")
        n = self.cfg.size[0] * self.cfg.size[1]
        shard = np.full(len(shas), -1, dtype=np.int32)
        row = np.zeros(len(shas), dtype=np.int64)
        for i, sha in enumerate(shas):
            if sha:
                e = self._entry(sha)
                shard[i] = self._shard_id[e["shard"]]
                row[i] = e["offset"] // n
        return shard, row

    def gather(self, shard: np.ndarray, row: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stack entries located by :meth:`locate` into (N, H, W), one fancy-index per shard.

        ``out`` (N, H, W), of any float dtype, receives the result (cast on assignment, so a
        float32 batch is filled straight from the float16 memmap); blank slots are zeroed.
        """
        if self.cfg.size is None:
            raise CacheError(f"{self.cache_dir}: gather() needs a fixed-size config; this one has size=None")
        H, W = self.cfg.size
        n = len(shard)
        if out is None:
            out = np.empty((n, H, W), dtype=CACHE_DTYPE)
        elif out.shape != (n, H, W):
            raise ValueError(f"gather: out has shape {out.shape}, expected {(n, H, W)}")
        flat = out.reshape(n, H * W)  # a view: out is contiguous
        blank = shard < 0
        if blank.any():
            flat[blank] = 0
        for sid in np.unique(shard[~blank]):
            sel = np.flatnonzero(shard == sid)
            rows = row[sel]
            order = np.argsort(rows, kind="stable")  # ascending rows read the file sequentially
            flat[sel[order]] = self._map(int(sid))[rows[order]]
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # a pickled memmap would be a full copy; reopen in the worker
        return state


def open_cache(site_dir: str | Path, cfg: PreprocessConfig) -> ImageCache:
    """Open the cache of ``cfg`` under ``site_dir``; raises CacheError if it was never built."""
    cache_dir = cache_dir_for(site_dir, cfg)
    if not (cache_dir / INDEX).exists():
        raise CacheError(
            f"{cache_dir}: no cache for this preprocessing config (run build_cache / `fedbreast site cache`)"
        )
    return ImageCache(cache_dir, cfg, _read_index(cache_dir, cfg))


__all__ = [
    "CACHE_DTYPE",
    "CacheError",
    "CacheFailure",
    "CacheStats",
    "ImageCache",
    "SourceChanged",
    "build_cache",
    "cache_dir_for",
    "open_cache",
    "source_rules",
]
