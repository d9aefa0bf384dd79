"""The site audit log: one fsync'd JSONL line per message the ClientApp sends, readable by
``fedbreast site audit``; local paths and exception texts never leave the site."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clientapp_messages import as_task, reply, request, site_context
from flwr.app import Array

from fedbreast.cli import main as cli_main
from fedbreast.client.audit import SITE_DATA, AuditUnavailable, audit_path, egress_mod, read_audit

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
