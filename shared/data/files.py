"""Reading a source file that anyone with access to the DICOM folder may have replaced.

Ingest reads every file through :func:`read_regular`, and so does the preprocessing cache
when it re-reads a file ingest accepted (shared/data/cache.py): only a regular file (or a
link to one) is opened, and no more than the ingest rules' size limit is read.
"""

from __future__ import annotations

import os
import stat

from .rules import MIB

_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


class NotRead(Exception):
    """The file was refused before (or while) reading it; ``reason`` says why. ``kind`` is
    "folder" for a folder that is not a link (ingest names the listing error), else ""."""

    def __init__(self, reason: str, kind: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


def read_regular(path: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is (or links to) a regular file within the size limit.

    Checked before opening: opening a FIFO waits for a writer, reading /dev/zero never ends
    and opening some devices has side effects. The open is non-blocking anyway and re-checks
    the type, in case the path was swapped after the check; the read stops at the limit
    whatever the size said (a file still being written, /proc files that report 0).
    """
    try:
        st = os.stat(path)  # follows a symlink: what matters is what would be read
    except OSError as exc:
        if os.path.islink(path):
            # Broken, or a loop of links (a -> b -> a).
            raise NotRead(f"symbolic link to {os.readlink(path)} cannot be followed ({exc.strerror})") from None
        raise NotRead(f"cannot read the file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        if os.path.islink(path):
            raise NotRead(f"not a regular file (symbolic link to a {kind}, {os.readlink(path)}; not followed)")
        raise NotRead(f"not a regular file ({kind})", kind="folder" if stat.S_ISDIR(st.st_mode) else "")
    if st.st_size > max_bytes:
        raise NotRead(f"{mib(st.st_size)} exceeds the limit of {mib(max_bytes)} (ingest rules max_file_mib)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise NotRead(f"cannot read the file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRead(f"not a regular file ({_kind(mode)}; the path was replaced after it was checked)")
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise NotRead(f"cannot read the file ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise NotRead(f"grew past the limit of {mib(max_bytes)} while being read (ingest rules max_file_mib)")
    return data


__all__ = ["NotRead", "read_regular"]
