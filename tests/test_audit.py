"""The site audit log: one fsync'd JSONL line per message the ClientApp sends, readable by
``fedbreast site audit``; local paths and exception texts never leave the site."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from clientapp_messages import as_task, reply, request, site_context
from flwr.app import Array

from fedbreast.cli import main as cli_main
from fedbreast.client import audit
from fedbreast.client.audit import (
    GENESIS,
    SITE_DATA,
    AuditUnavailable,
    append_line,
    audit_path,
    egress_mod,
    read_audit,
)
from fedbreast.client.observability import site_registry

WEIGHTS = {"conv.weight": np.ones((4, 2, 3, 3), np.float32), "bn.num_batches_tracked": np.array(5, np.int64)}


@pytest.fixture(autouse=True)
def task_identity():
    as_task()


def _train_reply(msg, context):
    metrics = {
        "num-examples": 12,
        "train_loss": 0.5,
        "train_seconds": 3.25,
        "train_images_per_s": 14.0,
        "dp_epsilon": 1.5,
        "lr": 0.01,
    }
    return reply(msg, metrics, arrays=WEIGHTS)


def test_every_reply_gets_one_line_with_arrays_metrics_and_epsilon(tmp_path):
    ctx = site_context(tmp_path)
    sent = []
    for rnd in (1, 2, 3):
        msg = request("train", rnd, arrays=WEIGHTS)
        sent.append(egress_mod(msg, ctx, _train_reply))
    raw = audit_path(tmp_path).read_text()
    assert raw.endswith("\n") and raw.count("\n") == 3
    lines = read_audit(tmp_path)
    assert [line["round"] for line in lines] == [1, 2, 3]
    line = lines[-1]
    assert line["run_id"] == 42 and line["type"] == "train" and line["status"] == "ok" and line["site"] == "hospital-a"
    assert len(line["app_hash"]) == 64 and line["node_id"] == 7
    expected = {k: len(Array(np.require(v, requirements="C")).data) for k, v in WEIGHTS.items()}
    assert {a["name"]: a["bytes"] for a in line["arrays"]} == expected
    assert {a["name"]: a["shape"] for a in line["arrays"]} == {
        "conv.weight": [4, 2, 3, 3],
        "bn.num_batches_tracked": [],
    }
    assert {a["name"]: a["dtype"] for a in line["arrays"]} == {
        "conv.weight": "float32",
        "bn.num_batches_tracked": "int64",
    }
    assert line["array_bytes"] == sum(expected.values()) and line["array_count"] == 2
    assert line["metrics"]["train_seconds"] == 3.25 and line["dp_epsilon"] == 1.5
    # What was logged is what was sent: the reply itself is unchanged.
    assert sent[-1].content["metrics"]["dp_epsilon"] == 1.5


def test_local_paths_in_an_unable_reason_stay_in_the_site(tmp_path):
    ctx = site_context(tmp_path)
    reason = f"{tmp_path}/manifest.jsonl:1: not valid JSON; source /data/dicom/1.2.840.113619.2.55/IM0001.dcm"

    def unable(msg, context):
        return reply(msg, {"num-examples": 0}, status="unable", reason=reason)

    out = egress_mod(request("query", 0), ctx, unable)
    sent_reason = out.content["site"]["reason"]
    assert sent_reason == f"{SITE_DATA}/manifest.jsonl:1: not valid JSON; source <path>"
    line = read_audit(tmp_path)[0]
    assert line["status"] == "unable" and line["reason"] == sent_reason and line["type"] == "query"
    text = audit_path(tmp_path).read_text()
    assert str(tmp_path) not in text and "1.2.840.113619" not in text


def test_a_failing_handler_sends_only_the_exception_type(tmp_path):
    ctx = site_context(tmp_path)

    def broken(msg, context):
        raise FileNotFoundError(f"{tmp_path}/cache/patient-7f3a.npy")

    with pytest.raises(RuntimeError) as info:
        egress_mod(request("evaluate", 2, arrays=WEIGHTS), ctx, broken)
    # Flower sends str(exc) to the coordinator: it must name no file.
    assert (
        "FileNotFoundError" in str(info.value)
        and str(tmp_path) not in str(info.value)
        and "patient" not in str(info.value)
    )
    line = read_audit(tmp_path)[0]
    assert line["status"] == "error" and line["type"] == "evaluate" and line["round"] == 2 and line["arrays"] == []


def test_no_audit_line_no_reply(tmp_path):
    audit_path(tmp_path).mkdir(parents=True)  # the log path is unwritable (a directory)
    with pytest.raises(AuditUnavailable, match="reply withheld"):
        egress_mod(request("train", 1, arrays=WEIGHTS), site_context(tmp_path), _train_reply)


def test_the_clientapp_audits_every_handler():
    from fedbreast.client.app import app

    assert app._mods and app._mods[0] is egress_mod  # outermost: sees the final reply of every handler


def test_site_audit_command_prints_what_left(tmp_path, capsys):
    ctx = site_context(tmp_path)
    egress_mod(request("train", 1, arrays=WEIGHTS), ctx, _train_reply)
    egress_mod(
        request("query", 0),
        ctx,
        lambda m, c: reply(m, {"num-examples": 0}, status="unable", reason="dp ceiling 8 reached"),
    )
    assert cli_main(["site", "audit", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["time", "(UTC)", "run", "round", "type"]
    train_row = next(r for r in table if " train " in r)
    assert " 42 " in train_row and " 1.5 " in train_row and "train_seconds=3.25" in train_row and " 2 " in train_row
    assert any("unable: dp ceiling 8 reached" in r for r in table)
    assert table[-1].startswith("2 message(s) sent")
    assert cli_main(["site", "audit", str(tmp_path), "--json"]) == 0
    dumped = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert dumped == read_audit(tmp_path)
    assert cli_main(["site", "audit", str(tmp_path / "missing")]) == 2


# ---- the hash chain --------------------------------------------------------------------------


def _write_log(site_dir, n: int) -> list[bytes]:
    ctx = site_context(site_dir)
    for rnd in range(1, n + 1):
        egress_mod(request("train", rnd, arrays=WEIGHTS), ctx, _train_reply)
    return audit_path(site_dir).read_bytes().splitlines(keepends=True)


def _verify(site_dir, capsys, *extra: str) -> tuple[int, str]:
    code = cli_main(["site", "audit", str(site_dir), "--verify", *extra])
    return code, capsys.readouterr().out


def test_the_chain_verifies(tmp_path, capsys):
    lines = _write_log(tmp_path, 4)
    records = read_audit(tmp_path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    for before, record in zip(lines, records[1:]):
        assert record["prev"] == hashlib.sha256(before.rstrip(b"\n")).hexdigest()
    code, out = _verify(tmp_path, capsys)
    head = hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()
    assert code == 0 and out.strip() == f"audit log OK: 4 records, chain head {head}"
    # A head printed earlier is still in the log; one that never was is not.
    assert _verify(tmp_path, capsys, "--head", head)[0] == 0
    code, out = _verify(tmp_path, capsys, "--head", "0" * 64)
    assert code == 1 and "last records were removed or rewritten" in out
    # No log yet: an empty chain.
    assert _verify(tmp_path / "empty", capsys)[0] == 2  # no such site directory
    (tmp_path / "empty").mkdir()
    assert _verify(tmp_path / "empty", capsys) == (0, f"audit log OK: 0 records, chain head {GENESIS}\n")


def _edit(lines: list[bytes], i: int, new: bytes) -> None:
    assert b'"type": "train"' in lines[i]
    lines[i] = lines[i].replace(b'"type": "train"', new)


def _swap(lines: list[bytes], i: int, j: int) -> None:
    lines[i], lines[j] = lines[j], lines[i]


TAMPERING = {
    # one byte, still valid JSON: the next record's prev gives it away
    "edited": (
        lambda lines: _edit(lines, 2, b'"type": "trbin"'),
        "line 3: record edited: its hash no longer matches the prev of line 4",
    ),
    "edited-not-json": (
        lambda lines: _edit(lines, 1, b'"type": train"'),
        "line 2: record edited (no longer valid JSON): the chain breaks after it",
    ),
    "deleted": (lambda lines: lines.pop(2), "line 3: record deleted: line 3 holds record 4, record 3 was removed"),
    "swapped": (
        lambda lines: _swap(lines, 2, 3),
        "line 3: records reordered: line 3 holds record 4, record 3 is at line 4",
    ),
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_named_by_line(tmp_path, capsys, kind):
    tamper, first_bad = TAMPERING[kind]
    lines = _write_log(tmp_path, 5)
    tamper(lines)
    audit_path(tmp_path).write_bytes(b"".join(lines))
    code, out = _verify(tmp_path, capsys)
    assert code == 1 and out.startswith(f"audit log NOT OK: {first_bad} (")
    good = int(first_bad.split(":")[0].split()[1]) - 1
    assert f"{good} records verify up to line {good}," in out


def test_a_torn_write_loses_no_later_record(tmp_path, capsys):
    lines = _write_log(tmp_path, 2)
    with open(audit_path(tmp_path), "ab") as fh:  # a ClientApp killed mid-write
        fh.write(lines[-1][: len(lines[-1]) // 2])
    code, out = _verify(tmp_path, capsys)
    assert code == 1 and out.startswith("audit log NOT OK: line 3: torn/partial write: the last line is unfinished")
    ctx = site_context(tmp_path)
    egress_mod(request("evaluate", 3, arrays=WEIGHTS), ctx, _train_reply)
    egress_mod(request("train", 4, arrays=WEIGHTS), ctx, _train_reply)
    records = read_audit(tmp_path)
    assert [(r["type"], r["round"], r["seq"]) for r in records] == [
        ("train", 1, 1),
        ("train", 2, 2),
        ("evaluate", 3, 4),
        ("train", 4, 5),
    ]
    assert records[2]["prev"] == hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()  # the last good record
    code, out = _verify(tmp_path, capsys)
    assert code == 1
    assert out.startswith("audit log NOT OK: line 3: torn/partial write: an unfinished record")
    assert "4 records verify up to line 5" in out
    # The table still shows every record and warns about the torn line; the exporter counts it.
    assert cli_main(["site", "audit", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "4 message(s) sent" in captured.out and "line 3 skipped: torn/partial write" in captured.err
    registry, _ = site_registry(tmp_path, "hospital-a")
    assert registry.get_sample_value("fedbreast_site_audit_unreadable_lines_total", {"site": "hospital-a"}) == 1
    assert (
        registry.get_sample_value(
            "fedbreast_site_messages_sent_total", {"site": "hospital-a", "type": "train", "status": "ok"}
        )
        == 3
    )


def test_a_log_from_before_the_chain_is_reported_and_then_chained(tmp_path, capsys):
    path = audit_path(tmp_path)
    path.parent.mkdir(parents=True)
    old = [{"type": "train", "status": "ok", "round": r, "array_bytes": 8} for r in (1, 2)]
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in old))
    code, out = _verify(tmp_path, capsys)
    assert code == 1 and out.startswith("audit log unchained (written before the audit log was hash-chained): 2")
    egress_mod(request("train", 3, arrays=WEIGHTS), site_context(tmp_path), _train_reply)
    assert [r["round"] for r in read_audit(tmp_path)] == [1, 2, 3] and read_audit(tmp_path)[2]["seq"] == 3
    code, out = _verify(tmp_path, capsys)
    assert code == 0 and out.startswith("audit log OK: 1 records") and "lines 1-2 are unchained" in out


def _append_many(site_dir: str, worker: int, n: int) -> None:
    for i in range(n):
        append_line(audit_path(Path(site_dir)), {"worker": worker, "i": i, "pad": "x" * (500 * (i % 7))})


def test_concurrent_appends_from_several_processes_keep_one_chain(tmp_path, capsys):
    ctx = multiprocessing.get_context("spawn")  # as separate ClientApp processes: no shared state
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    records = read_audit(tmp_path)
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(25)]
    assert [r["seq"] for r in records] == list(range(1, 101))
    assert _verify(tmp_path, capsys)[1].startswith("audit log OK: 100 records")


def test_the_head_is_found_past_a_long_tail(tmp_path, monkeypatch, capsys):
    # The appender reads back from the end in chunks: a chunk smaller than a line must still work.
    monkeypatch.setattr(audit, "_TAIL_CHUNK", 64)
    _append_many(str(tmp_path), 0, 6)
    with open(audit_path(tmp_path), "ab") as fh:
        fh.write(b'{"torn": ')
    _append_many(str(tmp_path), 1, 2)
    assert [r["seq"] for r in read_audit(tmp_path)] == [1, 2, 3, 4, 5, 6, 8, 9]
    code, out = _verify(tmp_path, capsys)
    assert code == 1 and out.startswith("audit log NOT OK: line 7: torn/partial write") and "8 records verify" in out
