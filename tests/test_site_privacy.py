"""Nothing patient-level in what a site writes about itself or shows the world.

A generated hospital is ingested; the real ClientApp answers a roll call, trains and
evaluates (tiny model); a second copy with a corrupt manifest answers "unable". Then the
site's audit log, its logs, its /metrics output and the replies themselves are scanned for
every patient id, exam id, file path, file hash and DICOM UID of that site (from its
manifest and its DICOM headers), and for lists with one entry per exam.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from clientapp_messages import as_task, request, site_context
from promcheck import get, validate_exposition

from fedbreast.client.audit import audit_path, read_audit
from fedbreast.client.observability import start_site_exporter
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.manifest import load_manifest

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=50, hist_bins=64, rounds=1, batch_size=4, workers=0)
HIST_KEYS = {"test_hist_pos", "test_hist_neg", "val_hist_pos", "val_hist_neg"}  # test, and the federated cut-off's


@pytest.fixture(autouse=True)
def task_identity():
    as_task()


def identifiers(site_dir: Path) -> set[str]:
    """Everything that names a patient, a study or a file at this site."""
    found: set[str] = set()
    for r in load_manifest(site_dir):
        found |= {r.patient, r.exam, r.path, Path(r.path).name, str(Path(r.path).parent), r.sha256}
        ds = pydicom.dcmread(r.path, stop_before_pixels=True)
        for tag in (
            "PatientID",
            "PatientName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "AccessionNumber",
            "StudyID",
        ):
            val = str(ds.get(tag, "") or "")
            if val:
                found.add(val)
    # Short strings ("1", "M") would match anywhere by chance; every real identifier here is long.
    return {s for s in found if len(s) >= 6}


def assert_clean(text: str, needles: set[str], where: str) -> None:
    hits = sorted(n for n in needles if n in text)
    assert not hits, f"{where} contains site identifiers: {hits[:5]}"


def content_text(msg) -> str:
    """Everything a reply carries except the array bytes: names, shapes, metrics, strings."""
    c = msg.content
    parts = {
        "arrays": {k: [[n, list(a.shape), a.dtype] for n, a in rec.items()] for k, rec in c.array_records.items()},
        "metrics": {k: dict(rec) for k, rec in c.metric_records.items()},
        "configs": {k: {kk: str(vv) for kk, vv in rec.items()} for k, rec in c.config_records.items()},
    }
    return json.dumps(parts, default=str)


def test_nothing_patient_level_in_audit_log_logs_metrics_or_replies(tmp_path, caplog):
    from fedbreast.client.app import app
    from fedbreast.server.app import initial_arrays
    from fedbreast.simulation.simulate import prepare_federation

    site = prepare_federation(tmp_path / "data", sites=1, patients=6, seed=3, echo=lambda line: None)[0]
    needles = identifiers(site)
    assert len(needles) > 50  # patients, exams, paths, UIDs of 6 patients

    broken = tmp_path / "broken-site"
    shutil.copytree(site, broken, ignore=shutil.ignore_patterns("cache", "audit"))
    (broken / "manifest.jsonl").write_text("{not json\n")

    cfg = RunConfig(**TINY)
    weights = initial_arrays(cfg)
    caplog.set_level(logging.DEBUG)
    ctx = site_context(site, cfg.to_flower(), site_name="site-1")
    replies = [
        app(request("query", 0), ctx),
        app(request("train", 1, weights), ctx),
        app(request("evaluate", 1, weights), ctx),
    ]
    bad_ctx = site_context(broken, cfg.to_flower(), site_name="site-broken")
    bad_replies = [app(request("query", 0), bad_ctx), app(request("train", 1, weights), bad_ctx)]

    assert [r.content["site"]["status"] for r in replies] == ["ok", "ok", "ok"]
    assert [r.content["site"]["status"] for r in bad_replies] == ["unable", "unable"]
    assert "<site-data>/manifest.jsonl:1" in bad_replies[0].content["site"]["reason"]

    # 1. The audit logs: one line per reply, nothing identifying, no local path.
    for site_dir, sent in ((site, replies), (broken, bad_replies)):
        lines = read_audit(site_dir)
        assert [(ln["type"], ln["status"]) for ln in lines] == [
            (r.metadata.message_type, r.content["site"]["status"]) for r in sent
        ]
        text = audit_path(site_dir).read_text()
        assert_clean(text, needles | {str(site_dir), str(site_dir.resolve())}, f"{site_dir.name} audit log")
        for line in lines:
            for key, value in line["metrics"].items():
                if isinstance(value, list):  # only fixed-size aggregate histograms, never one entry per exam
                    assert key in HIST_KEYS and len(value) == cfg.hist_bins, key
    train_line = read_audit(site)[1]
    assert {a["name"] for a in train_line["arrays"]} == set(weights)  # model arrays only
    assert train_line["array_bytes"] > 0 and train_line["round"] == 1 and train_line["run_id"] == 42

    # 2. The replies themselves (what the coordinator received).
    for r in replies + bad_replies:
        assert_clean(content_text(r), needles | {str(site), str(broken)}, f"{r.metadata.message_type} reply")

    # 3. The site's logs (everything any logger emitted while the ClientApp ran).
    log_text = "\n".join(f"{rec.name} {rec.getMessage()} {rec.exc_text or ''}" for rec in caplog.records)
    assert_clean(log_text, needles, "the site's logs")

    # 4. The site's /metrics endpoint.
    server = start_site_exporter(site, port=0, site_name="site-1")
    try:
        status, metrics = get(server.url + "/metrics")
    finally:
        server.shutdown()
    assert status == 200
    validate_exposition(metrics)
    assert_clean(metrics, needles | {str(site)}, "/metrics")
    label_names = {
        lbl.split("=")[0]
        for line in metrics.splitlines()
        if "{" in line and not line.startswith("#")
        for lbl in line[line.index("{") + 1 : line.index("}")].split(",")
    }
    assert label_names <= {"site", "split", "type", "status", "run", "le"}, label_names
