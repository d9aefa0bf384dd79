"""Durable file writes: a state file is replaced whole or not at all, even across a power cut.

:func:`atomic_write` (and its ``_bytes`` / ``_text`` / ``_json`` forms) writes a temporary
file in the target's directory, flushes and fsyncs it, renames it over the target with
``os.replace`` (atomic on POSIX: a reader sees the old file or the new one), then fsyncs the
directory: the rename is an update of the directory, and without that fsync a power cut can
bring back the old file, or no file at all for a new one.

``mode`` is applied as :func:`os.open` applies it: the process umask still removes bits, so
``0o600`` is the most a file gets, and a daemon running under ``UMask=0077`` never writes a
group- or world-readable file even when a caller asks for ``0o644``.

:func:`replace_together` is for files that must change together (a manifest and the
``site.json`` that describes it). POSIX has no rename of several files at once, so it is
not atomic; what it guarantees is this: every file is written and fsynced before the first
rename, and the files are renamed one by one in the order given, the directory fsynced
after each. A crash therefore leaves the old set, or the first k files new and the rest
old, and never a half-written file. Put last a file that names the others by hash (a
commit record): a reader that finds the hash does not match knows the set is mixed.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], object]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a directory, so that renames and new entries in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming(exc: OSError, path: Path) -> OSError:
    # A failed write(2) or fsync(2) names no file ("No space left on device"); say which.
    if exc.errno is None or exc.filename == str(path):
        return exc
    return OSError(exc.errno, f"{exc.strerror} (writing {path})", str(path))


def _write_temp(path: Path, write: Writer, mode: int) -> Path:
    """A fully written, fsynced temporary file next to ``path`` (removed again on any failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # Our own name, not mkstemp: os.open applies the umask to ``mode`` (mkstemp fixes 0600).
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Writer, mode: int = 0o600) -> None:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file handle, durably.

    For large payloads written by a library (``torch.save(obj, fh)``) without building
    them in memory first. On any failure the old file is left as it was.
    """
    path = Path(path)
    tmp = _write_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    fsync_dir(path.parent)


def _writing(data: bytes) -> Writer:
    return lambda fh: fh.write(data)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``, durably (see the module docstring)."""
    atomic_write(path, _writing(data), mode)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o600, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text``, durably."""
    atomic_write_bytes(path, text.encode(encoding), mode)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    mode: int = 0o600,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Replace ``path`` with ``obj`` as JSON (keys sorted, a final newline), durably."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=default) + "\n", mode)


def atomic_create_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` if it does not exist yet; False (nothing written) if it does.

    For a file that must never be replaced once it exists, such as a site's pseudonymisation
    key: two processes creating it at once must not each keep a different one. The complete,
    fsynced temporary file is hard-linked into place (``link`` fails if the name exists), so
    the file is never seen empty or half-written, not even after a crash. Needs a filesystem
    with hard links (local filesystems and NFS have them).
    """
    path = Path(path)
    tmp = _write_temp(path, _writing(data), mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _naming(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def replace_together(files: Mapping[Path, bytes], mode: int = 0o600) -> None:
    """Replace several files as nearly together as POSIX allows, in the mapping's order.

    All are written and fsynced first; then each is renamed into place and its directory
    fsynced before the next rename, so after a crash the new files are a prefix of the
    order given. Give last the file that records the others' hashes (the module docstring).
    """
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            temps[Path(path)] = _write_temp(Path(path), _writing(data), mode)
        for path in list(temps):
            try:
                os.replace(temps[path], path)
            except OSError as exc:
                raise _naming(exc, path) from exc
            del temps[path]
            fsync_dir(path.parent)
    finally:
        for tmp in temps.values():  # a failure before every rename: no new file is left half-named
            tmp.unlink(missing_ok=True)


__all__ = [
    "atomic_create_bytes",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "replace_together",
]
