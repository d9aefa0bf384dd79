"""The site audit log: one JSONL line for every message the ClientApp sends.

The privacy officer's record of what left the site: run id, app hash, round, message type,
every array's name / shape / dtype / bytes, every metric key and value, the site's status
and reason, and ε spent. It lives on the site's disk (``<site_dir>/audit/audit.jsonl``),
is appended and fsync'd before the reply goes out, and is read by ``fedbreast site audit``
and the site's Prometheus exporter.

:func:`egress_mod` is a Flower mod on the whole ClientApp, so it is the outermost layer:
it sees the final reply of every handler (after any per-handler mod such as DP clipping),
and is the one place where the site's reply can be checked before it leaves. It also
keeps local paths and exception texts in the site: an unable reason has the site's data
folder replaced by ``<site-data>``, and an exception raised by a handler reaches the
coordinator only as its type (Flower would send ``str(exc)``, which can name files).
If the audit line cannot be written, the reply is withheld (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.protocol import record_int

log = logging.getLogger("fedbreast.client.audit")

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.jsonl"
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


@lru_cache(maxsize=1)
def fab_hash_prefix() -> str:
    """The FAB's hash prefix when this ClientApp was installed from a FAB by a SuperNode.

    Flower gives the app no handle on the FAB, but installs it under
    ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>``, which is on ``sys.path``;
    empty in simulation or when run from a source tree.
    """
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


def append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one line and fsync it: the record exists before the message leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(line, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        while data:  # O_APPEND: each write lands at the end, so concurrent writers' lines do not overlap
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


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


def read_audit(site_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of the site's audit log (a line cut by a crash is skipped)."""
    path = audit_path(site_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


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
]
