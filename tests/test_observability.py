"""The coordinator's and the site's Prometheus endpoints, scraped over real HTTP.

The values must match the files they are read from (the run's metrics.jsonl written by the
real round loop, the site's audit log written by the real egress mod, the manifest), the
exposition must pass promtool's rules, and the Grafana dashboard may only use metric names
the exporters expose.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from clientapp_messages import as_task, reply, request, site_context
from flwr.app import Array
from promcheck import PROMTOOL, get, validate_exposition
from prometheus_client.parser import text_string_to_metric_families
from test_federation_loop import StubGrid, initial

from fedbreast.client.audit import audit_path, egress_mod, read_audit
from fedbreast.client.observability import TRAIN_BUCKETS, start_site_exporter
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.observability import ROUND_BUCKETS, failure_kind, start_server_exporter
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.manifest import group_exams, load_manifest, write_manifest
from fedbreast.shared.data.schema import Energy, ImageRecord, Label, Laterality, Modality, Split, View

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity():
    as_task()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


def scrape(server) -> str:
    status, body = get(server.url + "/metrics")
    assert status == 200, body
    return body


# ---- coordinator ------------------------------------------------------------------------------


def run_federation(run_dir: Path) -> MetricStore:
    """Two real rounds of the round loop: two honest sites, one NaN update, one silent site."""
    cfg = RunConfig(backbone="smallcnn", rounds=2, round_timeout=1, wait_for_sites=1, min_available_sites=2)
    grid = StubGrid({"site-a": "ok", "site-b": "ok", "poisoned": "nan", "mute": "silent"})
    FederatedRun(grid, cfg, run_dir, initial(), echo=lambda line: None).run()
    return MetricStore(run_dir)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    as_task()
    runs = tmp_path_factory.mktemp("runs")
    run_federation(runs / "run-a")
    return runs


def test_coordinator_metrics_match_the_run_files(runs_dir):
    server = start_server_exporter(runs_dir, port=0)
    try:
        text = scrape(server)
        status, health = get(server.url + "/healthz")
    finally:
        server.shutdown()
    validate_exposition(text)
    assert status == 200 and json.loads(health) == {"ok": True}
    found = samples(text)
    rows = MetricStore(runs_dir / "run-a").rows()
    rounds = [r for r in rows if r["phase"] == "round"]
    assert value(found, "fedbreast_server_rounds_completed_total", run="run-a") == len(rounds) == 2
    assert value(found, "fedbreast_server_round_duration_seconds_count", run="run-a") == 2
    assert value(found, "fedbreast_server_round_duration_seconds_sum", run="run-a") == pytest.approx(
        sum(r["seconds"] for r in rounds)
    )
    for bound in ROUND_BUCKETS:
        expected = sum(r["seconds"] <= bound for r in rounds)
        assert value(found, "fedbreast_server_round_duration_seconds_bucket", run="run-a", le=repr(bound)) == expected
    assert value(found, "fedbreast_server_last_round", run="run-a") == 2
    assert (
        value(found, "fedbreast_server_sites_participating", run="run-a", phase="train")
        == rounds[-1]["sites_trained"]
        == 2
    )
    evaluated = [r for r in rows if r["phase"] == "aggregate"][-1]["sites"]
    assert value(found, "fedbreast_server_sites_participating", run="run-a", phase="evaluate") == evaluated == 3

    # Failures by reason, from the failure rows: the NaN update dropped, the silent site timed out.
    failures = Counter((r["site"], failure_kind(r["reason"]), r["stage"]) for r in rows if r["phase"] == "failure")
    # The silent site never said its name, so it is known by its node id.
    assert failures[("poisoned", "update_dropped", "train")] == 2 and failures[("node-103", "timeout", "evaluate")] == 2
    for (site, reason, stage), n in failures.items():
        assert value(found, "fedbreast_server_failures_total", run="run-a", site=site, reason=reason, stage=stage) == n

    # Per-site AUC and loss of each site's latest evaluation.
    latest = {r["site"]: r for r in rows if r["phase"] == "evaluate" and r["round"] == 2}
    assert set(latest) == {"site-a", "site-b", "poisoned"}
    for site, row in latest.items():
        assert value(found, "fedbreast_server_site_auc", run="run-a", site=site, split="val") == row["val_auc"]
        assert value(found, "fedbreast_server_site_auc", run="run-a", site=site, split="test") == row["test_auc"]
        assert value(found, "fedbreast_server_site_last_evaluated_round", run="run-a", site=site) == 2

    # Bytes: the model goes to all 4 sites for training and to the 3 that answered for evaluation
    # (the silent site is skipped after its train timeout); 3 train replies carry it back.
    model_bytes = sum(len(Array(np.require(v, requirements="C")).data) for v in initial().values())
    assert [r["bytes_sent"] for r in rounds] == [7 * model_bytes] * 2
    assert [r["bytes_received"] for r in rounds] == [3 * model_bytes] * 2
    assert value(found, "fedbreast_server_sent_bytes_total", run="run-a") == 14 * model_bytes
    assert value(found, "fedbreast_server_received_bytes_total", run="run-a") == 6 * model_bytes


def test_coordinator_reads_incrementally_and_survives_partial_lines_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    store = MetricStore(runs / "run-b")
    for rnd in (1, 2):
        store.append(rnd, "failure", "site-x", {"stage": "train", "reason": "unable: dp ceiling reached"})
        store.append(
            rnd,
            "round",
            "ALL",
            {"seconds": 12.0 * rnd, "sites_trained": 1, "failures": 1, "bytes_sent": 100, "bytes_received": 50},
        )
    server = start_server_exporter(runs, port=0)
    try:
        first = samples(scrape(server))
        assert value(first, "fedbreast_server_rounds_completed_total", run="run-b") == 2
        assert (
            value(first, "fedbreast_server_failures_total", run="run-b", site="site-x", reason="unable", stage="train")
            == 2
        )
        # The ServerApp is mid-write: half a line is not a row yet.
        row = json.dumps(
            {"round": 3, "phase": "round", "site": "ALL", "seconds": 30.0, "sites_trained": 1, "bytes_sent": 100}
        )
        with open(store.path, "a") as fh:
            fh.write(row[:25])
        assert value(samples(scrape(server)), "fedbreast_server_rounds_completed_total", run="run-b") == 2
        with open(store.path, "a") as fh:
            fh.write(row[25:] + "\n")
        third = samples(scrape(server))
        assert value(third, "fedbreast_server_rounds_completed_total", run="run-b") == 3
        assert value(third, "fedbreast_server_round_duration_seconds_sum", run="run-b") == 12 + 24 + 30
        assert value(third, "fedbreast_server_sent_bytes_total", run="run-b") == 300
        # A resume drops the interrupted round 3 and writes it again, longer than before.
        store.truncate_after(2)
        store.append(
            3, "failure", "site-y", {"stage": "evaluate", "reason": "no reply within the round timeout (60 s)"}
        )
        store.append(
            3,
            "round",
            "ALL",
            {"seconds": 40.0, "sites_trained": 1, "failures": 1, "bytes_sent": 100, "bytes_received": 50},
        )
        fourth = samples(scrape(server))
        assert value(fourth, "fedbreast_server_rounds_completed_total", run="run-b") == 3
        assert value(fourth, "fedbreast_server_round_duration_seconds_sum", run="run-b") == 12 + 24 + 40
        assert (
            value(
                fourth,
                "fedbreast_server_failures_total",
                run="run-b",
                site="site-y",
                reason="timeout",
                stage="evaluate",
            )
            == 1
        )
        assert value(fourth, "fedbreast_server_received_bytes_total", run="run-b") == 150
        # A second run appears in the same runs directory without a restart.
        MetricStore(runs / "run-c").append(1, "round", "ALL", {"seconds": 1.0, "sites_trained": 3})
        assert value(samples(scrape(server)), "fedbreast_server_rounds_completed_total", run="run-c") == 1
    finally:
        server.shutdown()


# ---- site ---------------------------------------------------------------------------------------


def make_site(site_dir: Path) -> list[ImageRecord]:
    """A manifest of 5 four-view FFDM exams: 3 train, 1 val, 1 test (no pixels needed here)."""
    splits = [Split.TRAIN, Split.TRAIN, Split.TRAIN, Split.VAL, Split.TEST]
    records = []
    for i, split in enumerate(splits):
        for lat in (Laterality.L, Laterality.R):
            for view in (View.CC, View.MLO):
                records.append(
                    ImageRecord(
                        site="hospital-a",
                        patient=f"p{i}",
                        exam=f"e{i}",
                        laterality=lat,
                        view=view,
                        modality=Modality.MG,
                        energy=Energy.FFDM,
                        path=f"/nowhere/{i}{lat.value}{view.value}.dcm",
                        sha256=f"{i}{lat.value}{view.value}",
                        rows=64,
                        cols=32,
                        label=Label.NORMAL,
                        split=split,
                    )
                )
    write_manifest(site_dir, records)
    return records


def write_audit_history(site_dir: Path) -> None:
    """Real egress-mod lines: roll call, two trained rounds with DP, evaluations, one refusal."""
    ctx = site_context(site_dir)
    weights = initial()
    egress_mod(request("query", 0), ctx, lambda m, c: reply(m, {"num-examples": 3, "train_exams": 3}))
    for rnd, seconds in ((1, 4.0), (2, 70.0)):
        metrics = {
            "num-examples": 3,
            "train_seconds": seconds,
            "train_images_per_s": 10.0 * rnd,
            "dp_epsilon": 0.5 * rnd,
        }
        egress_mod(request("train", rnd, weights), ctx, lambda m, c: reply(m, metrics, arrays=weights))  # noqa: B023 - called at once
        egress_mod(request("evaluate", rnd, weights), ctx, lambda m, c: reply(m, {"num-examples": 1, "val_auc": 0.5}))
    egress_mod(
        request("train", 3, weights),
        ctx,
        lambda m, c: reply(
            m, {"num-examples": 0}, status="unable", reason="this run would spend epsilon 9 > the site's ceiling 8"
        ),
    )


def test_site_metrics_match_the_audit_log_and_the_manifest(tmp_path):
    site = tmp_path / "site"
    records = make_site(site)
    write_audit_history(site)
    lines = read_audit(site)
    server = start_site_exporter(site, port=0, site_name="hospital-a")
    try:
        text = scrape(server)
        status, health = get(server.url + "/healthz")
    finally:
        server.shutdown()
    validate_exposition(text)
    assert status == 200 and json.loads(health)["ok"] is True
    found = samples(text)
    by_split = Counter(e.split.value for e in group_exams(load_manifest(site)).values())
    assert by_split == {"train": 3, "val": 1, "test": 1} and len(records) == 20
    for split, n in by_split.items():
        assert value(found, "fedbreast_site_exams", site="hospital-a", split=split) == n
    train_ok = [ln for ln in lines if ln["type"] == "train" and ln["status"] == "ok"]
    assert value(found, "fedbreast_site_train_duration_seconds_count", site="hospital-a") == len(train_ok) == 2
    assert value(found, "fedbreast_site_train_duration_seconds_sum", site="hospital-a") == 74.0
    for bound in TRAIN_BUCKETS:
        expected = sum(ln["metrics"]["train_seconds"] <= bound for ln in train_ok)
        assert (
            value(found, "fedbreast_site_train_duration_seconds_bucket", site="hospital-a", le=repr(bound)) == expected
        )
    assert value(found, "fedbreast_site_train_images_per_second", site="hospital-a") == 20.0
    last_ok = [ln for ln in lines if ln["status"] == "ok" and ln["type"] in ("train", "evaluate")][-1]
    assert value(found, "fedbreast_site_last_success_timestamp_seconds", site="hospital-a") == last_ok["time"]
    assert value(found, "fedbreast_site_last_success_round", site="hospital-a") == 2
    assert value(found, "fedbreast_site_dp_epsilon", site="hospital-a", run="42") == 1.0
    assert value(found, "fedbreast_site_refused_messages_total", site="hospital-a", type="train") == 1
    assert value(found, "fedbreast_site_messages_sent_total", site="hospital-a", type="evaluate", status="ok") == 2
    assert (
        value(found, "fedbreast_site_sent_bytes_total", site="hospital-a") == sum(ln["array_bytes"] for ln in lines) > 0
    )
    assert value(found, "fedbreast_site_healthy", site="hospital-a") == 1


def test_a_site_without_a_readable_manifest_is_unhealthy_and_still_serves_metrics(tmp_path):
    site = tmp_path / "site"
    make_site(site)
    server = start_site_exporter(site, port=0)  # the site label defaults to site.json's name
    try:
        (site / "manifest.jsonl").write_text("{not json\n")
        status, health = get(server.url + "/healthz")
        assert status == 503 and json.loads(health)["ok"] is False and "manifest" in json.loads(health)["reason"]
        found = samples(scrape(server))
        assert value(found, "fedbreast_site_healthy", site="hospital-a") == 0
        assert value(found, "fedbreast_site_manifest_readable", site="hospital-a") == 0
        assert not [k for k in found if k[0] == "fedbreast_site_exams"]
    finally:
        server.shutdown()
    # The daemon's own check (e.g. "SuperLink unreachable") takes precedence.
    server = start_site_exporter(site, port=0, health=lambda: (False, "certificates unreadable"))
    try:
        status, health = get(server.url + "/healthz")
        assert status == 503 and json.loads(health) == {"ok": False, "reason": "certificates unreadable"}
        assert get(server.url + "/nothing")[0] == 404
    finally:
        server.shutdown()


def test_the_site_audit_log_is_read_incrementally(tmp_path):
    site = tmp_path / "site"
    make_site(site)
    server = start_site_exporter(site, port=0, site_name="hospital-a")
    try:
        assert not [k for k in samples(scrape(server)) if k[0] == "fedbreast_site_messages_sent_total"]
        write_audit_history(site)
        with open(audit_path(site), "a") as fh:
            fh.write('{"type": "train", "status": "ok", "metr')  # a ClientApp mid-write
        found = samples(scrape(server))
        assert value(found, "fedbreast_site_messages_sent_total", site="hospital-a", type="train", status="ok") == 2
        with open(audit_path(site), "a") as fh:
            fh.write('ics": {"train_seconds": 2.0}, "array_bytes": 10}\n')
        found = samples(scrape(server))
        assert value(found, "fedbreast_site_messages_sent_total", site="hospital-a", type="train", status="ok") == 3
        assert value(found, "fedbreast_site_train_duration_seconds_count", site="hospital-a") == 3
        assert value(found, "fedbreast_site_audit_unreadable_lines_total", site="hospital-a") == 0
    finally:
        server.shutdown()


# ---- deploy/: Grafana dashboard and Prometheus scrape config -----------------------------------


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_panel_queries_metrics_the_exporters_expose(runs_dir, tmp_path):
    site = tmp_path / "site"
    make_site(site)
    write_audit_history(site)
    servers = [start_server_exporter(runs_dir, port=0), start_site_exporter(site, port=0)]
    try:
        names = set().union(*(exposed_names(scrape(s)) for s in servers))
    finally:
        for s in servers:
            s.shutdown()
    dashboard = json.loads((REPO / "deploy" / "grafana" / "fedbreast-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("rounds", "auc", "round time", "epsilon"):
        assert topic in titles, f"no panel about {topic}"
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = set(re.findall(r"\bfedbreast_[a-z0-9_]+", target["expr"]))
            assert used, f"panel {panel['title']!r}: {target['expr']!r} uses no fedbreast metric"
            assert used <= names, f"panel {panel['title']!r} uses unexposed {sorted(used - names)}"


def test_prometheus_scrapes_the_coordinator_and_three_sites():
    path = REPO / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {job: [t for sc in j["static_configs"] for t in sc["targets"]] for job, j in jobs.items()}
    assert len(targets["fedbreast-coordinator"]) == 1 and len(targets["fedbreast-sites"]) == 3
    assert all(j.get("metrics_path", "/metrics") == "/metrics" for j in jobs.values())
    if PROMTOOL:
        done = subprocess.run(
            [PROMTOOL, "check", "config", "--syntax-only", str(path)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        print("prometheus.yml validated by: promtool check config")
    else:
        print("prometheus.yml validated by: YAML structure only (promtool not on PATH)")
