"""The site audit log: one JSONL line for every message the ClientApp sends.

The privacy officer's record of what left the site: run id, app hash, round, message type,
every array's name / shape / dtype / bytes, every metric key and value, the site's status
and reason, and ε spent. It lives on the site's disk (``<site_dir>/audit/audit.jsonl``),
is appended and fsync'd before the reply goes out, and is read by ``fedbreast site audit``
and the site's Prometheus exporter.

The log is hash-chained, so an edit is evident: every line carries ``seq`` (its line number,
from 1) and ``prev`` (the sha256 of the bytes of the last complete record before it, without
its newline; :data:`GENESIS` for the first). A line cut by a crash mid-write is terminated by
the next append and is then one unreadable line that the chain skips: no later record is
lost, and ``fedbreast site audit SITE_DIR --verify`` (:func:`verify_audit`) names it. The
chain shows edits, deletions and reordering of records *inside* the log; someone who can
rewrite the whole file can forge a new chain, and removing the last records leaves a
shorter valid chain, so keep the printed chain head elsewhere and check it with ``--head``.

:func:`egress_mod` is a Flower mod on the whole ClientApp, so it is the outermost layer:
it sees the final reply of every handler (after any per-handler mod such as DP clipping),
and is the one place where the site's reply can be checked before it leaves. It also
keeps local paths and exception texts in the site: an unable reason has the site's data
folder replaced by ``<site-data>``, and an exception raised by a handler reaches the
coordinator only as its type (Flower would send ``str(exc)``, which can name files).
If the audit line cannot be written, the reply is withheld (fail closed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedbreast.shared.durable import fsync_dir
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.protocol import record_int

log = logging.getLogger("fedbreast.client.audit")

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.jsonl"
# The ``prev`` of the first record: a fixed string's hash, so a log whose first lines were
# removed does not verify (its first record's ``prev`` names a record that is gone).
GENESIS = hashlib.sha256(b"fedbreast site audit log v1").hexdigest()
_TAIL_CHUNK = 64 * 1024  # bytes read back from the end to find the chain head (a line is a few KB)
SITE_DATA = "<site-data>"
# An absolute POSIX path not already redacted: "/" at the start or after a space, quote, bracket or "=".
_ABS_PATH = re.compile(r"(?:^|(?<=[\s'\"(\[=,]))/[^\s'\",)\]]+")


class AuditUnavailable(FedbreastError, RuntimeError):
    """The audit line could not be written; the reply must not leave without it."""


def audit_path(site_dir: Path) -> Path:
    return Path(site_dir) / AUDIT_DIR / AUDIT_FILE


@lru_cache(maxsize=1)
def app_hash() -> str:
    """sha256 over the fedbreast sources this process runs (every .py of the package, sorted),
    so each audit line names the exact code that produced the message."""
    import fedbreast
    import fedbreast.client
    import fedbreast.server
    import fedbreast.shared
    import fedbreast.simulation

    h = hashlib.sha256()
    for pkg in (fedbreast, fedbreast.client, fedbreast.server, fedbreast.shared, fedbreast.simulation):
        assert pkg.__file__ is not None  # regular packages, each with its __init__.py
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(f"{pkg.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def fab_hash_prefix() -> str:
    """The sha256 of the app bundle this message came with: the pinned runtime's (a site
    daemon: client/pinned_clientapp.py, which never installs the bundle), else the hash prefix
    of the folder Flower installed it to, ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>``
    (on ``sys.path``); empty in simulation or when run from a source tree.
    """
    from fedbreast.client.pinned_clientapp import current_bundle_sha256

    return current_bundle_sha256() or _installed_fab_prefix()


@lru_cache(maxsize=1)
def _installed_fab_prefix() -> str:
    for entry in sys.path:
        p = Path(entry)
        if p.parent.name == "apps":
            last = p.name.rsplit(".", 1)
            if len(last) == 2 and re.fullmatch(r"[0-9a-f]{8,64}", last[1]):
                return last[1]
    return ""


def redact(text: str, site_dir: Path | None) -> str:
    """Keep local paths in the site: the data folder becomes ``<site-data>``, any other
    absolute path ``<path>`` (its file name could be a patient id or a DICOM UID)."""
    if site_dir is not None:
        for form in sorted({str(Path(site_dir)), str(Path(site_dir).resolve())}, key=len, reverse=True):
            text = text.replace(form, SITE_DATA)
    return _ABS_PATH.sub("<path>", text)


def _json_value(value: Any) -> Any:
    # JSON has no NaN: null, as in metrics.jsonl. Bytes are described, never copied.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def round_of(msg: Message) -> int | None:
    content = msg.content
    config = content.config_records.get("config") if content is not None else None
    if config is not None and "server-round" in config:
        return record_int(config["server-round"])
    group = msg.metadata.group_id
    return int(group) if str(group).isdigit() else None


def describe(
    request: Message, reply: Message | None, context: Context, status: str | None = None, reason: str = ""
) -> dict[str, Any]:
    """The audit line for ``reply`` (None when the handler raised: Flower sends an error)."""
    arrays: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    config: dict[str, dict[str, Any]] = {}
    if reply is not None and reply.has_content():
        for rec_name, array_rec in reply.content.array_records.items():
            for name, arr in array_rec.items():
                arrays.append(
                    {
                        "record": rec_name,
                        "name": name,
                        "shape": list(arr.shape),
                        "dtype": str(arr.dtype),
                        "bytes": len(arr.data),
                    }
                )
        for rec_name, metric_rec in reply.content.metric_records.items():
            for key, value in metric_rec.items():
                metrics[key if rec_name == "metrics" else f"{rec_name}.{key}"] = _json_value(value)
        for rec_name, config_rec in reply.content.config_records.items():
            config[rec_name] = {k: _json_value(v) for k, v in config_rec.items()}
    site_info = config.get("site", {})
    if status is None:
        if reply is not None and reply.has_error():
            status, reason = "error", str(reply.error.reason)
        else:
            status, reason = str(site_info.get("status", "ok")), str(site_info.get("reason", "") or "")
    now = time.time()
    eps = metrics.get(
        "dp_epsilon", config.get("fitres.metrics", {}).get("dp_epsilon")
    )  # SecAgg+ replies: legacy FitRes metrics
    return {
        "time": round(now, 3),
        "utc": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": int(context.run_id),
        "node_id": int(context.node_id),
        "app_hash": app_hash(),
        "fab_hash": fab_hash_prefix(),
        "site": str(site_info.get("name") or context.node_config.get("site-name", "")),
        "round": round_of(request),
        "type": str(request.metadata.message_type),
        "message_id": str(request.metadata.message_id),
        "status": status,
        "reason": reason,
        "arrays": arrays,
        "array_count": len(arrays),
        "array_bytes": sum(a["bytes"] for a in arrays),
        "metrics": metrics,
        "config": config,
        "dp_epsilon": eps if isinstance(eps, (int, float)) else None,
    }


def line_hash(raw: bytes) -> str:
    """The chain hash of one line: sha256 of its bytes, without the newline."""
    return hashlib.sha256(raw).hexdigest()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _is_chained(row: dict[str, Any]) -> bool:
    return type(row.get("seq")) is int and isinstance(row.get("prev"), str)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _chain_head(fd: int, size: int) -> tuple[str, int, bool]:
    """(prev, seq, torn) for the next record of the log open on ``fd`` (``size`` bytes).

    Reads back from the end only as far as the last line that is a JSON object, so an
    append costs one small read, not the whole log. ``torn``: the file does not end with a
    newline (a writer died mid-line); the fragment becomes a line of its own.
    """
    if size == 0:
        return GENESIS, 1, False
    torn = _pread_all(fd, 1, size - 1) != b"\n"
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        lines = _pread_all(fd, size - start, start).split(b"\n")
        if not torn:
            lines.pop()  # the empty piece after the final newline
        whole = lines if start == 0 else lines[1:]  # the first piece may be the end of an earlier line
        for back, raw in enumerate(reversed(whole)):
            row = _parse(raw)
            if row is None:
                continue  # a torn fragment: skipped by the chain, but it still takes a line number
            if _is_chained(row):
                return line_hash(raw), int(row["seq"]) + back + 1, torn
            if start == 0:  # a line from before the chain: the new record's number is its place in the file
                return line_hash(raw), len(whole) + 1, torn
            chunk = size  # ... which needs the whole file (once: the next line is chained)
            break
        else:
            if start == 0:  # no readable line at all
                return GENESIS, len(whole) + 1, torn
            chunk *= 4


def append_line(path: Path, line: dict[str, Any]) -> dict[str, Any]:
    """Append ``line`` as the next chained record and fsync it: the record exists before the
    message leaves. Returns the record as written (with ``prev`` and ``seq``).

    Several ClientApp processes of one site may append at once: an exclusive ``flock`` on the
    log covers reading the chain head, writing and fsync, so no two records name the same
    predecessor.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        size = os.fstat(fd).st_size
        prev, seq, torn = _chain_head(fd, size)
        record = {**line, "prev": prev, "seq": seq}
        data = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        if torn:  # end the torn fragment first, or it would swallow this record
            data = b"\n" + data
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
        if size == 0:  # a new log: its directory entry must survive a power cut too
            fsync_dir(path.parent)
    finally:
        os.close(fd)
    return record


def _site_dir(context: Context) -> Path | None:
    from fedbreast.client.app import site_dir_of  # here: app.py imports this module
    from fedbreast.shared.data.site_data import SiteUnavailable

    try:
        return site_dir_of(context)
    except SiteUnavailable:
        return None


def _redact_reply(reply: Message, site_dir: Path | None) -> None:
    if not reply.has_content():
        return
    for record in reply.content.config_records.values():
        for key, value in list(record.items()):
            if isinstance(value, str):
                clean = redact(value, site_dir)
                if clean != value:
                    record[key] = clean


def egress_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: redact local paths from the reply, write its audit line, then let it go."""
    site_dir = _site_dir(context)
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        # The full exception stays in the site's log; the coordinator gets only its type.
        from fedbreast.client.secure_aggregation import SecureAggregationRefused  # here: it imports app-side code

        if isinstance(exc, SecureAggregationRefused):  # our own refusal, worded for the coordinator (paths redacted)
            log.warning("%s", exc)
            reason = redact(str(exc), site_dir)
        else:
            log.exception("the %s handler failed", msg.metadata.message_type)
            reason = (
                f"{type(exc).__name__} in the site's {msg.metadata.message_type} handler (details in the site's log)"
            )
        _write(site_dir, describe(msg, None, context, status="error", reason=reason))
        raise RuntimeError(reason) from None
    _redact_reply(reply, site_dir)
    _write(site_dir, describe(msg, reply, context))
    return reply


def _write(site_dir: Path | None, line: dict[str, Any]) -> None:
    if site_dir is None:
        # No data folder configured: the reply can only be an "unable" without data.
        log.warning("no data-path: cannot write the audit line for this %s reply", line["type"])
        return
    try:
        append_line(audit_path(site_dir), line)
    except OSError as exc:
        log.error("cannot write the audit log %s: %s", audit_path(site_dir), exc)
        raise AuditUnavailable("the site's audit log cannot be written; reply withheld") from None


# ---- reading -------------------------------------------------------------------------------


def _read_lines(path: Path) -> tuple[list[bytes], bool]:
    """The log's lines (without newlines) and whether the last one is unterminated.

    Read under a shared ``flock``: no append is half-done while we read, so an unterminated
    last line is a torn write, not a record still being written.
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return [], False
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        data = fh.read()
    if not data:
        return [], False
    lines = data.split(b"\n")
    unterminated = lines[-1] != b""
    if not unterminated:
        lines.pop()
    return lines, unterminated


def _unreadable(raw: bytes, last_unterminated: bool) -> str:
    if last_unterminated:
        return "torn/partial write: the last line is unfinished (a crash mid-write); the next append ends it"
    if not raw.strip():
        return "empty line (the audit log never writes one: edited by hand?)"
    if raw.lstrip().startswith(b"{") and not raw.rstrip().endswith(b"}"):
        return "torn/partial write: an unfinished record (a crash mid-write); the chain continues past it"
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON (edited by hand?)"
    return "not a JSON object (edited by hand?)"


@dataclass
class AuditScan:
    """The complete records of a site's audit log, and the lines that could not be read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    broken: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


def scan_audit(site_dir: Path) -> AuditScan:
    """Every record of the log, and every unreadable line (number and why) skipped."""
    lines, unterminated = _read_lines(audit_path(site_dir))
    scan = AuditScan()
    for n, raw in enumerate(lines, 1):
        row = _parse(raw)
        if row is None:
            scan.broken.append((n, _unreadable(raw, unterminated and n == len(lines))))
        else:
            scan.records.append(row)
    return scan


def read_audit(site_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of the site's audit log (a line cut by a crash is skipped:
    :func:`scan_audit` says which)."""
    return scan_audit(site_dir).records


@dataclass
class AuditVerification:
    """What :func:`verify_audit` found. ``ok``: every line verifies (lines from before the
    chain existed are allowed only as a prefix, and only if some chained record follows)."""

    path: Path
    records: int = 0  # chained records that verify
    unchained: int = 0  # leading lines written before the chain existed
    head: str = GENESIS  # hash of the last record that verifies
    head_line: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line number, why); 0: the whole log

    @property
    def ok(self) -> bool:
        return not self.problems and (self.records > 0 or self.unchained == 0)

    def render(self) -> str:
        if self.ok:
            out = f"audit log OK: {self.records} records, chain head {self.head}"
            if self.unchained:
                out += (
                    f"\nlines 1-{self.unchained} are unchained (written before the audit log was hash-chained): "
                    "they cannot be verified"
                )
            return out
        if not self.problems:
            return (
                f"audit log unchained (written before the audit log was hash-chained): {self.unchained} records, "
                f"none can be verified; the next message the site sends starts the chain ({self.path})"
            )
        first_line, first_why = self.problems[0]
        where = f"line {first_line}: " if first_line else ""
        report = [f"audit log NOT OK: {where}{first_why} ({self.path})"]
        report += [f"  also line {n}: {why}" if n else f"  also: {why}" for n, why in self.problems[1:]]
        report.append(
            f"{self.records} records verify up to line {self.head_line}, chain head {self.head}"
            if self.head_line
            else "no record verifies"
        )
        return "\n".join(report)


def _chain_break(
    n: int, row: dict[str, Any], raw: bytes, last_good: int, skipped: list[int], lines: list[bytes]
) -> tuple[int, str]:
    """Line ``n`` does not follow the record at line ``last_good``: which line is bad, and why."""
    seq = int(row["seq"])
    rows = [_parse(r) for r in lines]
    if seq == n:  # in its place, but its prev names another record: a record was edited
        if skipped:  # the unreadable line just before it was a record, not a torn write
            return skipped[-1], "record edited (no longer valid JSON): the chain breaks after it"
        nxt = next((r for r in rows[n:] if r is not None and _is_chained(r)), None)
        if last_good and nxt is not None and nxt["prev"] == line_hash(raw):
            return last_good, f"record edited: its hash no longer matches the prev of line {n}"
        if nxt is not None or not last_good:
            return n, "record edited: its prev does not match the record before it"
        return n, f"record edited: its prev does not match the hash of line {last_good} (this record or that one)"
    if seq > n:  # a later record here: earlier ones are missing or out of order
        at = next((j for j, r in enumerate(rows, 1) if r is not None and _is_chained(r) and r["seq"] == n), None)
        if at is not None:
            return n, f"records reordered: line {n} holds record {seq}, record {n} is at line {at}"
        missing = f"record {n} was" if seq == n + 1 else f"records {n}-{seq - 1} were"
        return n, f"record deleted: line {n} holds record {seq}, {missing} removed"
    dup = next((j for j, r in enumerate(lines[: n - 1], 1) if r == raw), None)
    if dup is not None:
        return n, f"duplicate of line {dup}"
    return n, f"line {n} holds record {seq}: a line was inserted before it, or records were reordered"


def verify_audit(site_dir: Path, head: str | None = None) -> AuditVerification:
    """Check the hash chain of the site's audit log line by line.

    Torn lines (a crash mid-write) are reported and skipped, as the appender skipped them;
    the first break of the chain (an edited, deleted, reordered or inserted line) is reported
    and ends the check. ``head``: a chain head printed earlier, which must still be a record
    of the log (this catches removal of the last records, which the chain alone cannot).
    """
    path = audit_path(site_dir)
    result = AuditVerification(path)
    lines, unterminated = _read_lines(path)
    prev, last_good = GENESIS, 0
    skipped: list[int] = []  # unreadable lines since the last good record
    earlier = (GENESIS, 0)  # the chain head before the last good record
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        row = _parse(raw)
        if row is None:
            result.problems.append((n, _unreadable(raw, unterminated and n == len(lines))))
            skipped.append(n)
            continue
        if not _is_chained(row):
            if result.records:
                result.problems.append((n, "a record without prev/seq among chained records (inserted by hand?)"))
                break
            result.unchained += 1  # a log from before the chain: the first chained record names its last line
        elif row["prev"] != prev or row["seq"] != n:
            bad, why = _chain_break(n, row, raw, last_good, skipped, lines)
            result.problems = sorted([p for p in result.problems if p[0] != bad] + [(bad, why)])
            if bad == last_good and result.head_line == last_good:  # the record taken as good was edited
                result.records -= 1
                result.head, result.head_line = earlier
            break
        else:
            result.records += 1
        prev, last_good, skipped = line_hash(raw), n, []
        seen.add(prev)
        if result.records:
            earlier = (result.head, result.head_line)
            result.head, result.head_line = prev, n
    if head is not None and head not in seen:
        result.problems.append(
            (0, f"the chain head {head} is not in the log: its last records were removed or rewritten")
        )
    return result


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


SUMMARY_FIRST = ("num-examples", "train_loss", "train_seconds", "val_auc", "test_auc", "val_loss", "test_loss")


def _metric_summary(line: dict[str, Any], width: int = 60) -> str:
    if line.get("status") != "ok":
        return f"{line.get('status')}: {line.get('reason', '')}"[:width]
    parts = []
    metrics = line.get("metrics", {})
    # The keys a reader looks for first; then the rest alphabetically. ε has its own column.
    first = [k for k in SUMMARY_FIRST if k in metrics]
    for key in first + sorted(k for k in metrics if k not in first and k != "dp_epsilon"):
        value = metrics[key]
        if isinstance(value, list):
            parts.append(f"{key}[{len(value)}]")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is None:
            parts.append(f"{key}=nan")
        else:
            parts.append(f"{key}={value}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(lines: Iterable[dict[str, Any]], width: int = 80) -> str:
    """What left the site, one row per message, for a person without tools."""
    rows = [("time (UTC)", "run", "round", "type", "status", "arrays", "bytes", "eps", "metrics")]
    total = 0
    n = 0
    for line in lines:
        n += 1
        total += int(line.get("array_bytes", 0) or 0)
        eps = line.get("dp_epsilon")
        rows.append(
            (
                str(line.get("utc", "")),
                str(line.get("run_id", "")),
                "-" if line.get("round") is None else str(line.get("round")),
                str(line.get("type", "")),
                str(line.get("status", "")),
                str(line.get("array_count", 0)),
                _human_bytes(int(line.get("array_bytes", 0) or 0)),
                "-" if eps is None else f"{eps:.3g}",
                _metric_summary(line, width),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"{n} message(s) sent, {_human_bytes(total)} of model arrays in all")
    return "\n".join(out)


__all__ = [
    "AUDIT_FILE",
    "AuditUnavailable",
    "app_hash",
    "append_line",
    "audit_path",
    "describe",
    "egress_mod",
    "read_audit",
    "redact",
    "render_table",
    "scan_audit",
    "verify_audit",
]
