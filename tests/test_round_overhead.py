"""The round's overhead figure: wall time less the slowest site's train and the slowest site's
evaluate, per round in metrics.jsonl, the progress line and summary.md's round-time table."""

from __future__ import annotations

import time

from flwr.app import MetricRecord
from test_federation_loop import StubGrid, initial, task_identity  # noqa: F401 - its autouse fixture

from fedbreast.server.exchange import RoundOutcome
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.report import round_time_section
from fedbreast.shared.config import RunConfig

# Each site's own times (train, evaluate): the slowest train and the slowest evaluate are
# different sites, so the least a synchronous round can take is 0.30 + 0.20 s, more than any
# one site's 0.35 s.
SITE_SECONDS = {"a": (0.30, 0.05), "b": (0.10, 0.20), "c": (0.05, 0.05)}


class TimedGrid(StubGrid):
    """Sites that work at once: a wave's replies come after its slowest site's time, and each
    reply carries the site's own train_seconds / eval_seconds as a ClientApp's does."""

    def push_messages(self, messages):
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        index = 0 if "train" in kinds else 1 if "evaluate" in kinds else None
        if index is not None:
            time.sleep(max(SITE_SECONDS[self.nodes[m.metadata.dst_node_id]][index] for m in messages))
        return super().push_messages(messages)

    def _send(self, m, content: dict) -> str:
        site = self.nodes[m.metadata.dst_node_id]
        kind = m.metadata.message_type
        if kind in ("train", "evaluate"):
            key, value = (
                ("train_seconds", SITE_SECONDS[site][0]) if kind == "train" else ("eval_seconds", SITE_SECONDS[site][1])
            )
            content["metrics"] = MetricRecord({**dict(content["metrics"]), key: value})
        return super()._send(m, content)


def test_each_round_records_its_overhead_over_the_slowest_train_and_evaluate(tmp_path):
    cfg = RunConfig(backbone="smallcnn", rounds=2, round_timeout=5, wait_for_sites=1)
    lines: list[str] = []
    FederatedRun(TimedGrid(dict.fromkeys(SITE_SECONDS, "ok")), cfg, tmp_path, initial(), echo=lines.append).run()
    rows = MetricStore(tmp_path).rows("round")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["slowest_train_seconds"] == 0.30 and r["slowest_evaluate_seconds"] == 0.20
        assert r["slowest_site_seconds"] == 0.35  # one site's train + evaluate (a's), less than the two waves
        assert abs(r["overhead_seconds"] - (r["seconds"] - 0.50)) < 1e-9
        assert abs(r["overhead_fraction"] - r["overhead_seconds"] / r["seconds"]) < 1e-9
        # The stub's waves take their slowest site's time; the rest is the loop's own: polling
        # (0.1 s a wave at most), aggregation, the checkpoint hand-off. Far below a site's time.
        assert 0 <= r["overhead_seconds"] < 0.4, r
        assert r["cpus"] >= 1 and r["load_1m"] >= 0  # the machine's load as the round ended (Linux has one)
    progress = [line for line in lines if line.startswith("round ")]
    assert len(progress) == 2 and all("overhead " in line and "%" in line for line in progress)

    section = round_time_section(MetricStore(tmp_path))
    assert section[0] == "## Round time"
    table = [line for line in section if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(table) == 2
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[2:4] == ["0.30", "0.20"] and cells[5].endswith("%") and cells[6].endswith(f" / {rows[0]['cpus']}")
    assert any(line.startswith("All rounds:") for line in section)


def test_the_overhead_is_the_wall_time_less_the_critical_path():
    outcome = RoundOutcome(1, seconds=10.0)
    outcome.add_site_seconds("a", "train", 6.0)
    outcome.add_site_seconds("b", "train", 4.0)
    outcome.add_site_seconds("a", "evaluate", 1.0)
    outcome.add_site_seconds("b", "evaluate", 3.0)
    outcome.add_site_seconds("c", "train", float("nan"))  # a value that is no time counts 0
    outcome.add_site_seconds("c", "evaluate", None)
    timing = outcome.timing()
    assert timing["slowest_train_seconds"] == 6.0 and timing["slowest_evaluate_seconds"] == 3.0
    assert timing["slowest_site_seconds"] == 7.0  # b: 4 + 3 and a: 6 + 1
    assert timing["overhead_seconds"] == 1.0 and timing["overhead_fraction"] == 0.1
    assert outcome.site_seconds == {"a": 7.0, "b": 7.0, "c": 0.0}
    # An empty round (no usable reply, no time) has no overhead fraction to divide by.
    assert RoundOutcome(2).timing()["overhead_fraction"] == 0.0


def test_runs_recorded_before_the_figure_leave_the_table_out(tmp_path):
    store = MetricStore(tmp_path)
    store.append(1, "round", "ALL", {"seconds": 3.0, "slowest_site_seconds": 2.0})
    assert round_time_section(store) == []
