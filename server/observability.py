"""The coordinator's Prometheus exporter: ``/metrics`` and ``/healthz``.

The ServerApp runs in its own process (one per run), so the exporter reads what it writes:
``<runs_dir>/<run>/metrics.jsonl`` (see metric_store.py), incrementally at each scrape.
Every series carries a ``run`` label (the run directory's name); per-site series a ``site``
label. A resumed run rewrites its metrics.jsonl without the interrupted round; the
exporter then rebuilds that run's numbers (a counter may step back by one round, which
Prometheus reads as a counter reset).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fedbreast.shared.observability import ExporterServer, HealthCheck, JsonlTail, serve

ROUND_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
FAILURE_REASONS = ("timeout", "error", "unable", "update_dropped")
EVAL_KEYS = ("auc", "loss")


def failure_kind(reason: str) -> str:
    """The failure's class, from the reason federation.py writes (``_fail``)."""
    text = str(reason).strip().lower()
    if text.startswith("no reply"):
        return "timeout"
    if text.startswith("error"):
        return "error"
    if text.startswith("unable"):
        return "unable"
    if text.startswith("update dropped"):
        return "update_dropped"
    if text.startswith("skipped"):  # evaluate after a train timeout (server/phases.py EvaluationWave)
        return "timeout"
    if text.startswith("left secure aggregation"):
        return "secure_aggregation"
    return "other"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class RunState:
    """One run's numbers, from its metrics.jsonl rows."""

    def __init__(self) -> None:
        self.rounds_completed = 0
        self.round_counts = [0] * len(ROUND_BUCKETS)
        self.round_count = 0
        self.round_sum = 0.0
        self.last_round: int | None = None
        self.last_round_time: float | None = None
        self.sites_trained: float | None = None
        self.sites_evaluated: float | None = None
        self.sent_bytes = 0.0
        self.received_bytes = 0.0
        self.failures: Counter[tuple[str, str, str]] = Counter()  # (site, reason kind, stage)
        self.site_eval: dict[str, dict[str, Any]] = {}  # site -> latest evaluate row
        self.site_epsilon: dict[str, float] = {}
        self.pooled_auc: float | None = None

    def add(self, row: dict[str, Any]) -> None:
        phase, site, rnd = row.get("phase"), str(row.get("site", "")), row.get("round")
        if phase == "round":
            seconds = _num(row.get("seconds"))
            self.rounds_completed += 1
            if seconds is not None:
                self.round_count += 1
                self.round_sum += seconds
                for i, bound in enumerate(ROUND_BUCKETS):
                    if seconds <= bound:
                        self.round_counts[i] += 1
            self.last_round, self.last_round_time = rnd, _num(row.get("time"))
            self.sites_trained = _num(row.get("sites_trained"))
            self.sent_bytes += _num(row.get("bytes_sent")) or 0.0
            self.received_bytes += _num(row.get("bytes_received")) or 0.0
        elif phase == "aggregate":
            self.sites_evaluated = _num(row.get("sites"))
            self.pooled_auc = _num(row.get("test_pooled_auc"))
        elif phase == "evaluate":
            previous = self.site_eval.get(site)
            if previous is None or (rnd or 0) >= (previous.get("round") or 0):
                self.site_eval[site] = row
        elif phase == "train":
            eps = _num(row.get("dp_epsilon"))
            if eps is not None:
                self.site_epsilon[site] = eps
        elif phase == "failure":
            self.failures[(site, failure_kind(row.get("reason", "")), str(row.get("stage", "")))] += 1


class _RunFile:
    def __init__(self, path: Path):
        self.tail = JsonlTail(path)
        self.state = RunState()

    def refresh(self) -> RunState:
        reset, rows = self.tail.read()
        if reset:
            self.state = RunState()
        for row in rows:
            self.state.add(row)
        return self.state


class ServerCollector:
    """prometheus_client collector over every run under ``runs_dir``."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self._runs: dict[str, _RunFile] = {}
        self._lock = threading.Lock()

    def run_files(self) -> dict[str, Path]:
        """Run name -> metrics.jsonl: every ``runs_dir/*/metrics.jsonl``, or runs_dir itself if it is a run."""
        found = {p.parent.name: p for p in sorted(self.runs_dir.glob("*/metrics.jsonl"))}
        own = self.runs_dir / "metrics.jsonl"
        if own.exists():
            found[self.runs_dir.name] = own
        return found

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            states: dict[str, RunState] = {}
            for run, path in self.run_files().items():
                if run not in self._runs or self._runs[run].tail.path != path:
                    self._runs[run] = _RunFile(path)
                states[run] = self._runs[run].refresh()
            yield from self._families(states)

    def _families(self, states: dict[str, RunState]) -> Iterator[Metric]:
        rounds = CounterMetricFamily("fedbreast_server_rounds_completed", "Federated rounds completed", labels=["run"])
        hist = HistogramMetricFamily(
            "fedbreast_server_round_duration_seconds",
            "Wall time of a round (train, validate, aggregate, evaluate)",
            labels=["run"],
        )
        last = GaugeMetricFamily("fedbreast_server_last_round", "Number of the latest completed round", labels=["run"])
        last_t = GaugeMetricFamily(
            "fedbreast_server_last_round_timestamp_seconds", "Unix time the latest round completed", labels=["run"]
        )
        sites = GaugeMetricFamily(
            "fedbreast_server_sites_participating",
            "Sites whose reply was used in the latest round, by phase",
            labels=["run", "phase"],
        )
        sent = CounterMetricFamily("fedbreast_server_sent_bytes", "Model array bytes sent to sites", labels=["run"])
        received = CounterMetricFamily(
            "fedbreast_server_received_bytes", "Model array bytes received from sites", labels=["run"]
        )
        failures = CounterMetricFamily(
            "fedbreast_server_failures",
            "Sites left out of a round phase, by reason (timeout, error, unable, update_dropped)",
            labels=["run", "site", "reason", "stage"],
        )
        auc = GaugeMetricFamily(
            "fedbreast_server_site_auc",
            "Per-site evaluation AUC of the global model in the site's latest evaluated round",
            labels=["run", "site", "split"],
        )
        loss = GaugeMetricFamily(
            "fedbreast_server_site_loss",
            "Per-site evaluation loss of the global model in the site's latest evaluated round",
            labels=["run", "site", "split"],
        )
        eval_round = GaugeMetricFamily(
            "fedbreast_server_site_last_evaluated_round",
            "Round of the site's latest evaluation",
            labels=["run", "site"],
        )
        eps = GaugeMetricFamily(
            "fedbreast_server_site_dp_epsilon",
            "Privacy budget (epsilon) the site reported spent in its latest train reply",
            labels=["run", "site"],
        )
        pooled = GaugeMetricFamily(
            "fedbreast_server_pooled_auc",
            "Test AUC pooled over sites from their score histograms, latest round",
            labels=["run"],
        )
        bad = CounterMetricFamily(
            "fedbreast_server_metric_store_unreadable_lines",
            "Complete metrics.jsonl lines that were not JSON objects",
            labels=["run"],
        )
        for run, st in sorted(states.items()):
            rounds.add_metric([run], float(st.rounds_completed))
            buckets = [(repr(b), float(c)) for b, c in zip(ROUND_BUCKETS, st.round_counts)] + [
                ("+Inf", float(st.round_count))
            ]
            hist.add_metric([run], buckets, sum_value=st.round_sum)
            if st.last_round is not None:
                last.add_metric([run], float(st.last_round))
            if st.last_round_time is not None:
                last_t.add_metric([run], st.last_round_time)
            if st.sites_trained is not None:
                sites.add_metric([run, "train"], st.sites_trained)
            if st.sites_evaluated is not None:
                sites.add_metric([run, "evaluate"], st.sites_evaluated)
            sent.add_metric([run], st.sent_bytes)
            received.add_metric([run], st.received_bytes)
            for (site, kind, stage), n in sorted(st.failures.items()):
                failures.add_metric([run, site, kind, stage], float(n))
            for site, row in sorted(st.site_eval.items()):
                for split in ("val", "test"):
                    for key, family in (("auc", auc), ("loss", loss)):
                        name = f"{split}_{key}"
                        if name in row:  # null (undefined, e.g. one class only) is exposed as NaN
                            value = _num(row[name])
                            family.add_metric([run, site, split], float("nan") if value is None else value)
                if isinstance(row.get("round"), int):
                    eval_round.add_metric([run, site], float(row["round"]))
            for site, value in sorted(st.site_epsilon.items()):
                eps.add_metric([run, site], value)
            if st.pooled_auc is not None:
                pooled.add_metric([run], st.pooled_auc)
            bad.add_metric([run], float(self._runs[run].tail.bad_lines))
        yield from (
            rounds,
            hist,
            last,
            last_t,
            sites,
            sent,
            received,
            failures,
            auc,
            loss,
            eval_round,
            eps,
            pooled,
            bad,
        )


def server_registry(runs_dir: Path) -> tuple[CollectorRegistry, ServerCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = ServerCollector(runs_dir)
    registry.register(collector)
    return registry, collector


def start_server_exporter(
    runs_dir: Path, port: int, host: str = "127.0.0.1", health: HealthCheck | None = None
) -> ExporterServer:
    """Serve the coordinator's ``/metrics`` and ``/healthz`` on ``host:port`` (port 0: a free one).

    ``runs_dir`` is where the ServerApp writes run directories (``run-dir``, by default
    ``runs/<run id>`` under the SuperLink's working directory). ``health`` returns
    (ok, reason); without it the coordinator is healthy when ``runs_dir`` exists.
    """
    runs_dir = Path(runs_dir)
    registry, _ = server_registry(runs_dir)

    def default_health() -> tuple[bool, str]:
        return (True, "") if runs_dir.is_dir() else (False, "the runs directory does not exist yet")

    return serve(registry, port, host, health=health or default_health)
