"""The coordinator's round loop on real Flower messages, with the transport replaced by a stub grid.

The stub answers each message the way a ClientApp would (train replies with arrays and
metrics), so we can make one site send NaN or mis-shaped weights, which no honest
ClientApp does, and check the loop drops exactly that update with the site named.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedbreast.server.exchange import to_record
from fedbreast.server.federation import FederatedRun, FederationStopped
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig


@pytest.fixture(autouse=True)
def task_identity():
    # Flower stamps messages with the running task's identity; a test is no task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class StubGrid:
    """Answers train/evaluate messages per site; ``behaviour[site]`` says how."""

    def __init__(self, behaviour: dict[str, str]):
        self.behaviour = behaviour
        self.nodes = {100 + i: site for i, site in enumerate(behaviour)}
        self._next_id = 0
        self._outbox: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(self._answer(m))
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        out = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r not in out]
        return out

    def _stamp(self, m) -> str:
        """Give the message an id, as pushing it to a SuperLink would; returns its site."""
        self._next_id += 1
        m.metadata.__dict__["_message_id"] = f"m{self._next_id}"
        return self.nodes[m.metadata.dst_node_id]

    def _send(self, m, content: dict) -> str:
        """Queue the site's reply to ``m`` for pull_messages; returns the message id."""
        reply = Message(RecordDict(content), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        self._outbox.append(reply)
        return m.metadata.message_id

    def _answer(self, m) -> str:
        site = self._stamp(m)
        how = self.behaviour[site]
        if how == "silent":
            return m.metadata.message_id
        if m.metadata.message_type == "query":
            content = {"metrics": MetricRecord({"num-examples": 10, "train_exams": 10})}
        elif m.metadata.message_type == "train":
            arrays = {k: v.numpy() for k, v in m.content["arrays"].items()}
            if how == "nan":
                arrays = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in arrays.items()}
            elif how == "shape":
                key = next(iter(arrays))
                arrays[key] = np.zeros((7, 7), arrays[key].dtype)
            else:
                arrays = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in arrays.items()}
            content = {"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 10, "train_seconds": 0.1})}
        else:
            content = {"metrics": MetricRecord({"num-examples": 5, "val_auc": 0.7, "test_auc": 0.6})}
        content["site"] = ConfigRecord({"name": site, "status": "ok", "reason": ""})
        return self._send(m, content)


def initial() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.array(0, np.int64)}


def run_with(behaviour: dict[str, str], tmp_path, **cfg_changes) -> tuple[FederatedRun, MetricStore]:
    cfg = RunConfig(backbone="smallcnn", rounds=1, round_timeout=1, wait_for_sites=1, **cfg_changes)
    lines: list[str] = []
    fed = FederatedRun(StubGrid(behaviour), cfg, tmp_path, initial(), echo=lines.append)
    fed.run()
    return fed, MetricStore(tmp_path)


def test_nan_and_misshaped_updates_are_dropped_and_named(tmp_path):
    fed, store = run_with({"good-a": "ok", "good-b": "ok", "poisoned": "nan", "broken": "shape"}, tmp_path)
    # Only the two honest updates (+1 each) were averaged.
    np.testing.assert_allclose(fed.arrays["w"], np.ones((2, 3)))
    assert fed.arrays["steps"].dtype == np.int64
    failures = {f["site"]: f["reason"] for f in store.rows("failure")}
    assert set(failures) == {"poisoned", "broken"}
    assert "non-finite" in failures["poisoned"] and "shape" in failures["broken"]
    assert {r["site"] for r in store.rows("train")} == {"good-a", "good-b"}


def test_a_silent_site_is_reported_after_the_timeout_and_the_round_closes(tmp_path):
    fed, store = run_with({"a": "ok", "b": "ok", "gone": "silent"}, tmp_path)
    failures = store.rows("failure")
    assert {f["site"] for f in failures} == {"node-102"}
    reasons = {f["stage"]: f["reason"] for f in failures if f["round"] == 1}
    assert "no reply within the round timeout" in reasons["train"]
    # Not sent an evaluate message to queue behind the lost one: the round does not wait a second timeout.
    assert reasons["evaluate"] == "skipped: no train reply within the round timeout"
    assert len(store.rows("evaluate")) == 2


def test_too_few_sites_stop_cleanly(tmp_path):
    with pytest.raises(FederationStopped, match="only 2 site\\(s\\) connected"):
        run_with({"a": "ok", "b": "ok"}, tmp_path, min_available_sites=3)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"])
def test_every_strategy_aggregates_through_the_loop(tmp_path, strategy):
    behaviour = {f"s{i}": "ok" for i in range(5)}
    fed, store = run_with(behaviour, tmp_path, strategy=strategy, trim_beta=0.2, krum_byzantine=1)
    assert np.isfinite(fed.arrays["w"]).all() and not np.allclose(fed.arrays["w"], 0)
    assert fed.arrays["steps"].dtype == np.int64 and fed.arrays["steps"].shape == ()
    assert len(store.rows("train")) == 5


class ShuffledGrid(StubGrid):
    """Replies come back in a seeded random order, with site-specific updates whose float32
    sum depends on the order it is taken in."""

    def __init__(self, behaviour: dict[str, str], seed: int):
        super().__init__(behaviour)
        self.rng = np.random.default_rng(seed)

    def _answer(self, m) -> str:
        mid = super()._answer(m)
        reply = self._outbox[-1]
        if m.metadata.message_type == "train":
            k = m.metadata.dst_node_id
            arrays = {n: v.numpy() for n, v in reply.content["arrays"].items()}
            arrays["w"] = (arrays["w"] + np.float32(1e-3) * np.float32(k) ** 3).astype(np.float32)
            reply.content["arrays"] = to_record(arrays)
        return mid

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        return [out[i] for i in self.rng.permutation(len(out))]


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path):
    sites = {f"site-{c}": "ok" for c in "abcdefg"}
    cfg = RunConfig(backbone="smallcnn", rounds=3, round_timeout=1, wait_for_sites=1)
    models = []
    for seed in range(4):
        fed = FederatedRun(ShuffledGrid(sites, seed), cfg, tmp_path / str(seed), initial(), echo=lambda _l: None)
        fed.run()
        models.append(fed.arrays["w"])
    assert all(np.array_equal(models[0], m) for m in models[1:])  # bit for bit
