"""What the coordinator's and the sites' Prometheus exporters share.

In deployment every Flower message starts a fresh ClientApp process and the ServerApp
runs in its own process, so no metric can live in a daemon's memory. The apps append
JSONL files (the site's audit log, the run's metrics.jsonl); the exporters are custom
collectors that read those files incrementally at scrape time (:class:`JsonlTail`).
This module also serves ``/metrics`` and ``/healthz`` (:func:`serve`) and checks an
exposition against Prometheus' naming rules (:func:`lint_exposition`), which tests use
where ``promtool`` is not installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("fedbreast.observability")

HealthCheck = Callable[[], "tuple[bool, str]"]

# Bytes before the read offset that must be unchanged for the file to count as only appended to.
_FINGERPRINT = 256


class JsonlTail:
    """Reads the complete lines appended to a JSONL file since the last call.

    A partially written last line is left for the next call. If the file was replaced or
    rewritten (a resumed run drops the rows of its interrupted round), :meth:`read` says so
    and starts again from the top, so the caller rebuilds its state instead of counting twice.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0  # complete lines that were not a JSON object
        self._inode: int | None = None
        self._fingerprint = b""

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """Return (reset, new rows); ``reset`` means earlier rows are void and all rows follow."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            reset = self.offset > 0
            self.offset, self._inode, self._fingerprint = 0, None, b""
            return reset, []
        with fh:
            st = os.fstat(fh.fileno())
            reset = False
            if self._inode is not None and (
                st.st_ino != self._inode or st.st_size < self.offset or not self._same_prefix(fh)
            ):
                reset = True
                self.offset, self.bad_lines = 0, 0
            self._inode = st.st_ino
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return reset, []
        complete = chunk[: end + 1]
        self.offset += len(complete)
        self._fingerprint = (self._fingerprint + complete)[-_FINGERPRINT:]
        rows = []
        for line in complete.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                self.bad_lines += 1
        return reset, rows

    def _same_prefix(self, fh) -> bool:
        n = len(self._fingerprint)
        if n == 0:
            return True
        fh.seek(self.offset - n)
        return hashlib.sha256(fh.read(n)).digest() == hashlib.sha256(self._fingerprint).digest()


class ExporterServer:
    """A running ``/metrics`` + ``/healthz`` endpoint; :meth:`shutdown` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        host = httpd.server_address[0]
        assert isinstance(host, str)  # an AF_INET / AF_INET6 server: getsockname() gives (host, port, ...)
        self.host, self.port = host, int(httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def check_health(health: HealthCheck | None) -> tuple[bool, str]:
    if health is None:
        return True, ""
    try:
        ok, reason = health()
    except Exception as exc:  # a broken check is itself unhealthy, never a crashed endpoint
        log.exception("health check failed")
        return False, f"health check raised {type(exc).__name__}"
    return bool(ok), str(reason or "")


def serve(
    registry: CollectorRegistry, port: int, host: str = "127.0.0.1", health: HealthCheck | None = None
) -> ExporterServer:
    """Serve ``registry`` on ``/metrics`` and ``health`` on ``/healthz`` from a daemon thread.

    Port 0 picks a free port (see ``.port``). The default host is loopback: exposing the
    endpoint to the network is an explicit choice of the operator.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                except Exception as exc:
                    log.exception("collecting metrics failed")
                    body, status, ctype = (
                        f"collecting metrics failed: {type(exc).__name__}\n".encode(),
                        500,
                        "text/plain",
                    )
            elif path == "/healthz":
                ok, reason = check_health(health)
                body = json.dumps({"ok": ok, "reason": reason} if reason else {"ok": ok}).encode() + b"\n"
                status, ctype = (200 if ok else 503), "application/json"
            else:
                body, status, ctype = b"fedbreast exporter: see /metrics and /healthz\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"exporter-{httpd.server_address[1]}", daemon=True)
    thread.start()
    return ExporterServer(httpd, thread)


# ---- Prometheus naming rules (the subset of promtool's promlint that applies to us) ---------

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z_][a-z0-9_]*$")
# promlint: units must be base units and not abbreviated.
_NON_BASE_UNITS = (
    "milliseconds",
    "microseconds",
    "nanoseconds",
    "minutes",
    "hours",
    "days",
    "weeks",
    "years",
    "kilobytes",
    "megabytes",
    "gigabytes",
    "terabytes",
    "bits",
    "percent",
    "celsius",
    "fahrenheit",
)
_ABBREVIATED = ("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d")
_TYPES_IN_NAME = ("counter", "gauge", "histogram", "summary")


def lint_exposition(text: str, prefix: str = "fedbreast_") -> list[str]:
    """Problems with a text exposition, as promtool's ``check metrics`` words them (empty = clean).

    Rules: HELP and TYPE for every family; snake_case metric and label names; counters end
    in ``_total``; base, unabbreviated units; no type in the name; ``_sum``/``_count``/
    ``_bucket`` only on histograms and summaries; histograms have a ``+Inf`` bucket; every
    name carries ``prefix``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    problems: list[str] = []
    helps, types = {}, {}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if line.startswith("# HELP ") and len(parts) >= 3:
            helps[parts[2]] = parts[3] if len(parts) > 3 else ""
        elif line.startswith("# TYPE ") and len(parts) >= 4:
            types[parts[2]] = parts[3]
    for name, kind in types.items():
        if not helps.get(name, "").strip():
            problems.append(f"{name} no help text")
        if not _NAME.match(name):
            problems.append(f"{name} metric names should be written in 'snake_case' not 'camelCase'")
        if not name.startswith(prefix):
            problems.append(f"{name} does not start with {prefix!r}")
        tokens = name.split("_")
        for unit in _NON_BASE_UNITS:
            if unit in tokens:
                problems.append(f"{name} use base unit instead of {unit!r}")
        if any(t in _ABBREVIATED for t in tokens[1:]):
            problems.append(f"{name} metric names should not contain abbreviated units")
        for t in _TYPES_IN_NAME:
            if t in tokens:
                problems.append(f"{name} metric name should not include type '{t}'")
        if kind == "counter" and not name.endswith("_total"):
            # prometheus_client writes "# TYPE x counter" with samples "x_total": accept that form.
            if not any(s.startswith(name + "_total") for s in _sample_names(text)):
                problems.append(f'{name} counter metrics should have "_total" suffix')
        if kind not in ("histogram", "summary") and name.endswith(("_sum", "_count", "_bucket")):
            problems.append(
                f'{name} non-histogram and non-summary metrics should not have "_sum", "_count" or "_bucket" suffix'
            )
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{name} only counters should end in _total")
    for family in text_string_to_metric_families(text):
        if family.name not in types and family.name + "_total" not in types:
            problems.append(f"{family.name} has no TYPE line")
        buckets = [s for s in family.samples if s.name.endswith("_bucket")]
        if family.type == "histogram" and buckets and not any(s.labels.get("le") == "+Inf" for s in buckets):
            problems.append(f"{family.name} histogram without a +Inf bucket")
        for s in family.samples:
            for label in s.labels:
                if not _LABEL.match(label):
                    problems.append(
                        f"{family.name} label names should be written in 'snake_case' not 'camelCase': {label}"
                    )
    return problems


def _sample_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
