"""The site daemon's Prometheus exporter: ``/metrics`` and ``/healthz``.

Each Flower message runs in a fresh ClientApp process, so the exporter keeps no counters of
its own: at every scrape it reads what was appended to the site's audit log since the last
scrape (one line per message sent) and the manifest (cached by modification time). Only
aggregate numbers are exposed, labelled by site name, never by patient, exam or file.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fedbreast.client.audit import audit_path
from fedbreast.client.pinned_clientapp import BUNDLE_TYPE
from fedbreast.shared.data.manifest import MANIFEST, ManifestError, group_exams, load_manifest, read_site_meta
from fedbreast.shared.observability import ExporterServer, HealthCheck, JsonlTail, serve

log = logging.getLogger("fedbreast.client.observability")

# Local training per round: seconds on a laptop CPU up to an hour on a big site.
TRAIN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
SPLITS = ("train", "val", "test")


class _Buckets:
    """A cumulative histogram built from observed values (for HistogramMetricFamily)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1

    def buckets(self) -> list[tuple[str, float]]:
        return [(repr(float(b)), float(c)) for b, c in zip(self.bounds, self.counts)] + [("+Inf", float(self.count))]


class SiteState:
    """Everything the exporter knows from the audit log, rebuilt if the log is rewritten."""

    def __init__(self) -> None:
        self.messages: Counter[tuple[str, str]] = Counter()  # (type, status) -> messages sent
        self.sent_bytes = 0
        self.train_seconds = _Buckets(TRAIN_BUCKETS)
        self.images_per_s: float | None = None
        self.last_success_time: float | None = None
        self.last_success_round: int | None = None
        self.epsilon: tuple[str, float] | None = None  # (run id, ε) of the latest line that reported one
        self.bundles_refused = 0  # app bundles the site did not approve (their code never ran)
        self.last_bundle_refusal = ""

    def add(self, line: dict[str, Any]) -> None:
        kind, status = str(line.get("type", "unknown")), str(line.get("status", "unknown"))
        self.messages[(kind, status)] += 1
        self.sent_bytes += int(line.get("array_bytes", 0) or 0)
        metrics = line.get("metrics") or {}
        if status == "ok" and kind == "train":
            seconds = metrics.get("train_seconds")
            if isinstance(seconds, (int, float)):
                self.train_seconds.observe(float(seconds))
            ips = metrics.get("train_images_per_s")
            if isinstance(ips, (int, float)):
                self.images_per_s = float(ips)
        if status == "ok" and kind in ("train", "evaluate") and isinstance(line.get("time"), (int, float)):
            if self.last_success_time is None or line["time"] >= self.last_success_time:
                self.last_success_time = float(line["time"])
                self.last_success_round = line.get("round") if isinstance(line.get("round"), int) else None
        eps = line.get("dp_epsilon")
        if isinstance(eps, (int, float)):
            self.epsilon = (str(line.get("run_id", "")), float(eps))
        if kind == BUNDLE_TYPE and status == "refused":  # client/pinned_clientapp.py
            self.bundles_refused += 1
            self.last_bundle_refusal = f"{line.get('utc', '')}: {line.get('reason', '')}"


class SiteCollector:
    """prometheus_client collector for one site directory."""

    def __init__(self, site_dir: Path, site_name: str | None = None, health: HealthCheck | None = None):
        self.site_dir = Path(site_dir)
        self.site = site_name or self._name_from_disk()
        self.health = health
        self._tail = JsonlTail(audit_path(self.site_dir))
        self._state = SiteState()
        self._lock = threading.RLock()  # healthy() re-enters it from collect()
        self._exam_cache: tuple[tuple[int, int], dict[str, int] | None] | None = None

    def _name_from_disk(self) -> str:
        try:
            return str(read_site_meta(self.site_dir).get("site") or self.site_dir.name)
        except ManifestError:
            return self.site_dir.name

    def exams_per_split(self) -> dict[str, int] | None:
        """Exams in the manifest per split (None: no readable manifest); re-read only when it changes."""
        path = self.site_dir / MANIFEST
        try:
            st = path.stat()
        except FileNotFoundError:
            self._exam_cache = None
            return None
        key = (st.st_mtime_ns, st.st_size)
        if self._exam_cache is None or self._exam_cache[0] != key:
            counts: dict[str, int] | None = None
            try:
                exams = group_exams(load_manifest(self.site_dir))
            except (ManifestError, OSError) as exc:
                log.warning("site exporter: manifest unreadable: %s", exc)  # once per manifest change
            else:
                counts = dict.fromkeys(SPLITS, 0)
                counts["unassigned"] = 0
                for exam in exams.values():
                    counts[exam.split.value if exam.split is not None else "unassigned"] += 1
            self._exam_cache = (key, counts)
        return None if self._exam_cache[1] is None else dict(self._exam_cache[1])

    def healthy(self) -> tuple[bool, str]:
        """The daemon's own check if it gave one, else: the manifest is readable and has exams;
        either way, the app bundles the site refused are named (the site stays healthy: it did
        what it should)."""
        ok, reason = self._own_health()
        with self._lock:
            self._refresh()
            refused, last = self._state.bundles_refused, self._state.last_bundle_refusal
        if refused:
            reason = "; ".join(r for r in (reason, f"refused {refused} app bundle(s), the last at {last}") if r)
        return ok, reason

    def _own_health(self) -> tuple[bool, str]:
        if self.health is not None:
            from fedbreast.shared.observability import check_health

            return check_health(self.health)
        counts = self.exams_per_split()
        if counts is None:
            return False, "the site's manifest is missing or unreadable"
        if not counts.get("train"):
            return False, "the site's manifest has no train exams"
        return True, ""

    def _refresh(self) -> None:
        """Fold in what was appended to the audit log since the last read (caller holds the lock)."""
        reset, lines = self._tail.read()
        if reset:
            self._state = SiteState()
        for line in lines:
            self._state.add(line)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._refresh()
            yield from self._families(self._state)

    def _families(self, st: SiteState) -> Iterator[Metric]:
        site = self.site
        ok, _ = self.healthy()
        g = GaugeMetricFamily(
            "fedbreast_site_healthy",
            "1 if the site passes its health check (see /healthz for the reason), else 0",
            labels=["site"],
        )
        g.add_metric([site], 1.0 if ok else 0.0)
        yield g

        counts = self.exams_per_split()
        g = GaugeMetricFamily(
            "fedbreast_site_manifest_readable", "1 if the site's manifest can be read, else 0", labels=["site"]
        )
        g.add_metric([site], 0.0 if counts is None else 1.0)
        yield g
        g = GaugeMetricFamily(
            "fedbreast_site_exams", "Exams in the site's manifest per split", labels=["site", "split"]
        )
        for split, n in (counts or {}).items():
            g.add_metric([site, split], float(n))
        yield g

        c = CounterMetricFamily(
            "fedbreast_site_messages_sent",
            "Replies the ClientApp sent, by message type and status (from the audit log)",
            labels=["site", "type", "status"],
        )
        for (kind, status), n in sorted(st.messages.items()):
            c.add_metric([site, kind, status], float(n))
        yield c
        refused: dict[str, int] = defaultdict(int)
        for (kind, status), n in st.messages.items():
            if status == "unable":
                refused[kind] += n
        c = CounterMetricFamily(
            "fedbreast_site_refused_messages",
            "Messages the site answered with status unable (site policy such as the DP ceiling, or unusable data)",
            labels=["site", "type"],
        )
        for kind in ("query", "train", "evaluate"):
            refused.setdefault(kind, 0)
        for kind, n in sorted(refused.items()):
            c.add_metric([site, kind], float(n))
        yield c
        c = CounterMetricFamily(
            "fedbreast_site_sent_bytes", "Model array bytes the site sent (from the audit log)", labels=["site"]
        )
        c.add_metric([site], float(st.sent_bytes))
        yield c

        h = HistogramMetricFamily(
            "fedbreast_site_train_duration_seconds", "Local training time per round", labels=["site"]
        )
        h.add_metric([site], st.train_seconds.buckets(), sum_value=st.train_seconds.sum)
        yield h
        g = GaugeMetricFamily(
            "fedbreast_site_train_images_per_second",
            "Training throughput of the latest round (images per second)",
            labels=["site"],
        )
        if st.images_per_s is not None:
            g.add_metric([site], st.images_per_s)
        yield g
        g = GaugeMetricFamily(
            "fedbreast_site_last_success_timestamp_seconds",
            "Unix time of the latest successful train or evaluate reply",
            labels=["site"],
        )
        if st.last_success_time is not None:
            g.add_metric([site], st.last_success_time)
        yield g
        g = GaugeMetricFamily(
            "fedbreast_site_last_success_round",
            "Server round of the latest successful train or evaluate reply",
            labels=["site"],
        )
        if st.last_success_round is not None:
            g.add_metric([site], float(st.last_success_round))
        yield g
        g = GaugeMetricFamily(
            "fedbreast_site_dp_epsilon",
            "Privacy budget (epsilon) spent, as reported in the latest reply that carried it",
            labels=["site", "run"],
        )
        if st.epsilon is not None:
            g.add_metric([site, st.epsilon[0]], st.epsilon[1])
        yield g
        c = CounterMetricFamily(
            "fedbreast_site_audit_unreadable_lines",
            "Audit-log lines that are not JSON objects: torn writes (a crash mid-write) or edits; "
            "fedbreast site audit SITE_DIR --verify names them",
            labels=["site"],
        )
        c.add_metric([site], float(self._tail.bad_lines))
        yield c


def site_registry(
    site_dir: Path, site_name: str | None = None, health: HealthCheck | None = None
) -> tuple[CollectorRegistry, SiteCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = SiteCollector(site_dir, site_name, health)
    registry.register(collector)
    return registry, collector


def start_site_exporter(
    site_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    health: HealthCheck | None = None,
    site_name: str | None = None,
) -> ExporterServer:
    """Serve the site's ``/metrics`` and ``/healthz`` on ``host:port`` (port 0: a free one).

    ``health`` returns (ok, reason); without it the site is healthy when its manifest is
    readable and has train exams. ``site_name`` is the ``site`` label (default: site.json's).
    """
    registry, collector = site_registry(Path(site_dir), site_name, health)
    return serve(registry, port, host, health=collector.healthy)
