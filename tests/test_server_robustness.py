"""The coordinator against a hostile or broken site (server/reply_checks.py, server/exchange.py,
server/phases.py): every malformed reply costs that site its place in the round, with a reason
naming the site and the key, and the run goes on.

The replies are real Flower messages from a stub grid (no SuperLink, no ClientApp): three
sites answer as the ClientApp would, and ``tamper`` rewrites one site's reply the way no
honest ClientApp does.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.task_identity import TaskIdentity
from test_federation_loop import StubGrid as LoopGrid
from test_federation_loop import initial

from fedbreast.server.exchange import to_record
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.reply_checks import (
    MalformedReply,
    ReplyLimits,
    check_hist_total,
    check_histograms,
    check_metrics,
    roll_call_caps,
    shown,
    train_examples_bound,
    unknown_site_cap,
)
from fedbreast.server.validation import clip_to_norm, delta_norm
from fedbreast.shared.config import AUTO_NORM_BOUND, RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.metrics import (
    auc_binning_bound,
    coarsen,
    default_bin_edges,
    pool_histograms,
    pooled_auc_from_histograms,
    score_histogram,
)

BINS = 16  # the run's hist-bins (the smallest a run accepts: the limits stay small)
SITES = ("site-a", "site-b", "site-c")
TRAIN_SAMPLES, TEST_EXAMS = 10, 6
# The most a site with 10 training samples may claim (1 epoch, batch 8): 1.5 x 10 + 8.
TRAIN_BOUND = 23

Content = dict[str, Any]  # {"metrics": dict, "arrays": dict of arrays or None, "site": dict}
Tamper = Callable[[str, Content], Content]  # (message type, honest content) -> content sent


@pytest.fixture(autouse=True)
def task_identity():
    # Flower stamps messages with the running task's identity; a test is no task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def site_histogram(site: str, bins: int = BINS) -> dict[str, list[Any]]:
    """A site's honest full-resolution test histogram (scores that separate the classes)."""
    rng = np.random.default_rng(sum(map(ord, site)))
    y = np.array([0, 1] * 20)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return score_histogram(y, p, bins=bins)


class StubGrid(LoopGrid):
    """Answers query/train/evaluate per site as the ClientApp would; ``tamper[site]`` rewrites
    that site's reply before it is sent."""

    def __init__(self, tamper: dict[str, Tamper] | None = None):
        super().__init__(dict.fromkeys(SITES, "ok"))
        self.tamper = tamper or {}

    def _answer(self, m: Message) -> str:
        site = self._stamp(m)
        kind = m.metadata.message_type
        content: Content = {"site": {"name": site, "status": "ok", "reason": ""}, "arrays": None}
        if kind == "query":
            content["metrics"] = {
                "num-examples": TRAIN_SAMPLES,
                "train_exams": TRAIN_SAMPLES,
                "test_exams": TEST_EXAMS,
                "train_samples": TRAIN_SAMPLES,
            }
        elif kind == "train":
            sent = {k: v.numpy() for k, v in m.content["arrays"].items()}
            content["arrays"] = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in sent.items()}
            content["metrics"] = {"num-examples": TRAIN_SAMPLES, "train_seconds": 0.1, "train_loss": 0.5}
        else:
            hist = site_histogram(site)
            content["metrics"] = {
                "num-examples": TEST_EXAMS,
                "val_auc": 0.7,
                "test_auc": 0.6,
                "test_hist_pos": hist["hist_pos"],
                "test_hist_neg": hist["hist_neg"],
            }
        if site in self.tamper:
            content = self.tamper[site](kind, content)
        records: dict[str, Any] = {"metrics": MetricRecord(content["metrics"]), "site": ConfigRecord(content["site"])}
        if content["arrays"] is not None:
            records["arrays"] = to_record(content["arrays"])
        records.update(content.get("extra", {}))
        return self._send(m, records)


def run_with(tamper: dict[str, Tamper], tmp_path, **cfg_changes) -> tuple[FederatedRun, MetricStore, list[str]]:
    settings = {"backbone": "smallcnn", "rounds": 2, "round_timeout": 1, "wait_for_sites": 1, "hist_bins": BINS}
    cfg = RunConfig(**{**settings, **cfg_changes})
    lines: list[str] = []
    fed = FederatedRun(StubGrid(tamper), cfg, tmp_path, initial(), echo=lines.append)
    fed.run()
    return fed, MetricStore(tmp_path), lines


def on(kind: str, **metrics: Any) -> Tamper:
    """A tamper that sets ``metrics`` in the reply to a ``kind`` message."""

    def tamper(k: str, content: Content) -> Content:
        if k == kind:
            content["metrics"] = {**content["metrics"], **metrics}
        return content

    return tamper


def failures_of(store: MetricStore) -> list[dict[str, Any]]:
    return store.rows("failure")


def assert_dropped_every_round(
    fed: FederatedRun, store: MetricStore, site: str, stage: str, *needles: str
) -> list[dict[str, Any]]:
    """The run finished every round; ``site`` failed ``stage`` in each, the reason holding every
    needle; the other sites were used."""
    assert len(fed.history) == fed.cfg.rounds  # the run went on
    failures = [f for f in failures_of(store) if f["site"] == site]
    assert [f["stage"] for f in failures] == [stage] * fed.cfg.rounds, failures
    for f in failures:
        assert f["reason"].startswith("malformed reply: "), f
        for needle in needles:
            assert needle in f["reason"], (needle, f["reason"])
    phase = "train" if stage == "train" else "evaluate"
    used = {r["site"] for r in store.rows(phase)}
    assert used == set(SITES) - {site}, used
    return failures


# ---- train replies -----------------------------------------------------------------------------


def test_a_huge_num_examples_is_dropped_naming_both_numbers(tmp_path):
    fed, store, _ = run_with({"site-b": on("train", **{"num-examples": 10**12})}, tmp_path)
    assert_dropped_every_round(fed, store, "site-b", "train", "'num-examples'", "1e+12", str(TRAIN_BOUND))
    # FedAvg of the two honest +1 updates only, both rounds: site-b took nothing over.
    np.testing.assert_allclose(fed.arrays["w"], 2 * np.ones((2, 3)))


def test_a_nan_num_examples_is_dropped(tmp_path):
    fed, store, _ = run_with({"site-b": on("train", **{"num-examples": math.nan})}, tmp_path)
    assert_dropped_every_round(fed, store, "site-b", "train", "'num-examples'", "nan")


def test_a_metric_of_the_wrong_type_or_an_infinite_one_is_dropped(tmp_path):
    fed, store, _ = run_with({"site-c": on("train", train_loss=[math.inf, 1.0])}, tmp_path)
    assert_dropped_every_round(fed, store, "site-c", "train", "'train_loss'", "finite")


def test_a_metric_list_of_a_million_values_is_dropped_before_it_is_read(tmp_path):
    fed, store, _ = run_with({"site-a": on("train", junk=[0.0] * 10**6)}, tmp_path)
    limit = ReplyLimits(hist_bins=BINS).max_values()
    assert limit == 8 * BINS + 256  # four histograms (test and validation) twice over
    assert_dropped_every_round(fed, store, "site-a", "train", "1000004 values", f"limit of {limit}")


def test_an_array_record_larger_than_the_model_is_dropped(tmp_path):
    def oversize(kind: str, content: Content) -> Content:
        if kind == "train":  # the model plus 1 MB of something else, in a second record
            content["extra"] = {"payload": ArrayRecord({"x": Array(np.zeros(250_000, np.float32))})}
        return content

    fed, store, _ = run_with({"site-c": oversize}, tmp_path)
    most = ReplyLimits.for_model(initial(), BINS).max_array_bytes
    assert_dropped_every_round(fed, store, "site-c", "train", "arrays of", f"at most {most} bytes")


def test_arrays_where_none_belong_are_dropped(tmp_path):
    def arrays_in_evaluate(kind: str, content: Content) -> Content:
        if kind == "evaluate":
            content["arrays"] = {"w": np.zeros(4, np.float32)}
        return content

    fed, store, _ = run_with({"site-b": arrays_in_evaluate}, tmp_path)
    assert_dropped_every_round(fed, store, "site-b", "evaluate", "arrays of", "expected none")


def test_an_unreadable_array_is_caught_for_that_reply_alone(tmp_path):
    def garbage(kind: str, content: Content) -> Content:
        if kind == "train":
            content["arrays"] = None
            bogus = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"not a numpy buffer")
            content["extra"] = {"arrays": ArrayRecord({"w": bogus})}
        return content

    fed, store, _ = run_with({"site-a": garbage}, tmp_path)
    assert_dropped_every_round(fed, store, "site-a", "train", "unreadable")


def test_the_default_bound_clips_a_scaled_update_to_three_medians(tmp_path):
    def scaled(kind: str, content: Content) -> Content:
        if kind == "train":
            content["arrays"] = {k: v * 100 if v.dtype.kind == "f" else v for k, v in content["arrays"].items()}
        return content

    assert RunConfig().update_norm_bound == AUTO_NORM_BOUND
    fed, store, lines = run_with({"site-c": scaled}, tmp_path, rounds=1)
    clipped = [ln for ln in lines if "site site-c: update norm" in ln]
    assert len(clipped) == 1 and "(3 x the median)" in clipped[0], lines
    # Honest changes have norm 3 (six +1 weights... of w and b: sqrt(9)); the 100x one is cut to 9:
    # the mean of +1, +1 and +3 is 5/3 per weight.
    np.testing.assert_allclose(fed.arrays["w"], np.full((2, 3), 5 / 3), rtol=1e-6)
    assert not failures_of(store)
    off, _, off_lines = run_with({"site-c": scaled}, tmp_path / "off", rounds=1, update_norm_bound=0.0)
    assert not [ln for ln in off_lines if "clipped" in ln]
    np.testing.assert_allclose(off.arrays["w"], np.full((2, 3), 34.0), rtol=1e-6)  # (1 + 1 + 100) / 3


# ---- evaluate replies and histograms ------------------------------------------------------------


def test_a_negative_or_wrong_length_histogram_is_dropped(tmp_path):
    hist = site_histogram("site-a")
    negative = [-1] + hist["hist_pos"][1:]
    fed, store, _ = run_with({"site-a": on("evaluate", test_hist_pos=negative)}, tmp_path)
    assert_dropped_every_round(fed, store, "site-a", "evaluate", "'test_hist_pos'", "non-negative integer")
    fed, store, _ = run_with({"site-b": on("evaluate", test_hist_neg=[1] * (BINS + 1))}, tmp_path / "long")
    assert_dropped_every_round(fed, store, "site-b", "evaluate", "'test_hist_neg'", f"{BINS + 1} bins")


def test_a_histogram_whose_length_does_not_divide_hist_bins_is_dropped(tmp_path):
    fed, store, _ = run_with({"site-c": on("evaluate", test_hist_pos=[1] * 5, test_hist_neg=[1] * 5)}, tmp_path)
    assert_dropped_every_round(fed, store, "site-c", "evaluate", "'test_hist_pos'", "5 bins", "divisor")
    # The others' histograms are still pooled.
    assert all("test_pooled_auc" in r for r in store.rows("aggregate"))


def test_a_coarser_histogram_is_pooled_at_the_common_resolution(tmp_path):
    def coarse(kind: str, content: Content) -> Content:  # a site whose policy caps it at 4 bins
        if kind == "evaluate":
            m = content["metrics"]
            m["test_hist_pos"] = coarsen(m["test_hist_pos"], 4).tolist()
            m["test_hist_neg"] = coarsen(m["test_hist_neg"], 4).tolist()
        return content

    fed, store, _ = run_with({"site-b": coarse}, tmp_path)
    assert not failures_of(store)
    full = [site_histogram(s) for s in SITES]
    at_4 = {
        "hist_edges": default_bin_edges(4).tolist(),
        "hist_pos": sum(coarsen(h["hist_pos"], 4) for h in full).tolist(),
        "hist_neg": sum(coarsen(h["hist_neg"], 4) for h in full).tolist(),
    }
    for row in store.rows("aggregate"):
        assert row["test_pooled_hist_bins"] == 4
        assert row["test_pooled_auc"] == pytest.approx(pooled_auc_from_histograms([at_4]), abs=1e-12)
        assert row["test_pooled_auc_binning_bound"] == pytest.approx(auc_binning_bound([at_4]), abs=1e-12)
    # The coarser site's ROC curve is drawn at its own resolution in the report.
    from fedbreast.server.report import write_report

    paths = write_report(tmp_path, fed.cfg)
    assert paths["roc"].exists()


def test_an_evaluate_num_examples_above_the_roll_calls_test_exams_is_dropped(tmp_path):
    fed, store, _ = run_with({"site-a": on("evaluate", **{"num-examples": TEST_EXAMS + 1})}, tmp_path)
    assert_dropped_every_round(
        fed, store, "site-a", "evaluate", f"= {TEST_EXAMS + 1} exceeds {TEST_EXAMS}", "test_exams"
    )


# ---- site names and the roll call ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "=cmd|x", "a" * 65, "ok\nround 9 train: site site-a: fine", ""])
def test_a_bad_site_name_is_named_by_its_node_and_never_written(tmp_path, name):
    def rename(kind: str, content: Content) -> Content:
        content["site"]["name"] = name
        return content

    fed, store, lines = run_with({"site-b": rename}, tmp_path)
    assert len(fed.history) == fed.cfg.rounds
    if not name:  # no name at all is no lie: the site is named by its node and takes part
        assert not failures_of(store) and "node-101" in {r["site"] for r in store.rows("train")}
        return
    failures = failures_of(store)
    assert {f["site"] for f in failures} == {"node-101"}
    assert all("invalid site name" in f["reason"] for f in failures)
    assert {f["stage"] for f in failures} == {"roll-call", "train", "evaluate"}
    written = (tmp_path / "metrics.jsonl").read_text() + "\n".join(lines)
    assert name not in written and shown(name) in written


def test_a_site_the_roll_call_did_not_count_is_capped_not_trusted(tmp_path):
    def uncounted(kind: str, content: Content) -> Content:
        if kind == "query":
            content["metrics"].pop("train_samples")
        if kind == "train":
            content["metrics"]["num-examples"] = 10**6
        return content

    fed, store, lines = run_with({"site-c": uncounted}, tmp_path)
    assert not failures_of(store)
    rows = [r for r in store.rows("train") if r["site"] == "site-c"]
    assert [r["num-examples"] for r in rows] == [TRAIN_BOUND] * fed.cfg.rounds  # the largest counted site's bound
    assert sum(f"site site-c: num-examples 1e+06 capped at {TRAIN_BOUND}" in ln for ln in lines) == fed.cfg.rounds


def test_a_count_that_is_no_count_at_the_roll_call_leaves_the_site_uncounted(tmp_path):
    fed, store, _ = run_with({"site-a": on("query", train_samples=-3.5)}, tmp_path)
    (failure,) = failures_of(store)
    assert failure["site"] == "site-a" and failure["stage"] == "roll-call" and "'train_samples'" in failure["reason"]
    assert 100 not in fed.state.train_samples and {r["site"] for r in store.rows("train")} == set(SITES)


def test_an_unable_reason_is_kept_on_one_line(tmp_path):
    def unable(kind: str, content: Content) -> Content:
        if kind == "train":
            content["site"].update(status="unable", reason="no data\nround 1 train: site site-a: all good | x")
            content["arrays"], content["metrics"] = None, {"num-examples": 0}
        return content

    _, store, lines = run_with({"site-b": unable}, tmp_path)
    reasons = {f["reason"] for f in failures_of(store)}
    assert reasons == {"unable: no data round 1 train: site site-a: all good | x"}
    assert not [ln for ln in lines if ln.startswith("round 1 train: site site-a")]


# ---- the pure checks ---------------------------------------------------------------------------


def test_coarser_default_edges_are_every_nth_edge_of_the_finer_grid():
    for n in (16, 96, 512, 4096):
        edges = default_bin_edges(n)
        for k in [d for d in range(2, n + 1) if n % d == 0]:
            np.testing.assert_allclose(default_bin_edges(k), edges[:: n // k], rtol=0, atol=1e-12)


def test_coarsen_and_pooling_of_mixed_resolutions():
    fine = site_histogram("site-x")
    assert coarsen(fine["hist_pos"], 4).tolist() == np.add.reduceat(fine["hist_pos"], range(0, BINS, 4)).tolist()
    assert coarsen(fine["hist_pos"], BINS).tolist() == fine["hist_pos"]
    with pytest.raises(ValueError, match="divisor"):
        coarsen(fine["hist_pos"], 5)
    with pytest.raises(ValueError, match="non-negative integer"):
        coarsen([1, -1], 1)
    # Pooling one full-resolution histogram changes nothing; mixed ones meet at the gcd.
    same = pool_histograms([fine])
    assert same["hist_pos"] == fine["hist_pos"] and np.allclose(same["hist_edges"], fine["hist_edges"])
    coarse = {"hist_pos": coarsen(fine["hist_pos"], 8).tolist(), "hist_neg": coarsen(fine["hist_neg"], 8).tolist()}
    pooled = pool_histograms([fine, coarse])
    assert len(pooled["hist_pos"]) == 8 and pooled["hist_pos"] == (2 * coarsen(fine["hist_pos"], 8)).tolist()
    with pytest.raises(ValueError, match="share no resolution"):
        pool_histograms([{"hist_pos": [1, 2, 3], "hist_neg": [1, 1, 1]}, {"hist_pos": [1, 2], "hist_neg": [1, 1]}])
    with pytest.raises(ValueError, match="other edges"):
        pool_histograms([{**fine, "hist_edges": np.linspace(0, 1, BINS + 1).tolist()}])


def test_check_metrics_names_the_key():
    good = {
        "num-examples": 3,
        "val_auc": math.nan,
        "dp_epsilon": math.inf,
        "test_hist_pos": [1, 0],
        "test_hist_neg": [0, 2],
    }
    check_metrics(good, hist_bins=16)  # NaN is "undefined"; an unbounded epsilon stays visible
    for bad, needle in [
        ({"num-examples": -1}, "'num-examples'"),
        ({"num-examples": [1, 2]}, "'num-examples'"),
        ({"val_auc": 0.5}, "no 'num-examples'"),
        ({"num-examples": 1, "val_loss": -math.inf}, "'val_loss'"),
        ({"num-examples": 1, "site": 3}, "'site' is reserved"),
        ({"num-examples": 1, "../x": 3}, "not a plain name"),
        ({"num-examples": 1, "flag": True}, "'flag' is a bool"),
        ({"num-examples": 1, "note": "hi"}, "'note' is a str"),
        ({"num-examples": 1, "test_hist_pos": [1, 2]}, "without 'test_hist_neg'"),
        ({"num-examples": 1, "test_hist_pos": [1, 2], "test_hist_neg": [1, 2, 3, 4]}, "2 and 4 bins"),
        ({"num-examples": 1, "test_hist_pos": [0.5, 1], "test_hist_neg": [1, 2]}, "'test_hist_pos'"),
    ]:
        with pytest.raises(MalformedReply, match=needle.replace("(", r"\(")):
            check_metrics(bad, hist_bins=16)
    with pytest.raises(MalformedReply, match="has 0 bins"):
        check_histograms({"test_hist_pos": [], "test_hist_neg": []}, 16)


def test_plausible_examples_from_the_roll_call_and_the_run():
    cfg = RunConfig(backbone="smallcnn", local_epochs=2, batch_size=8)
    assert train_examples_bound(cfg, 100) == 1.5 * 2 * 100 + 8
    assert train_examples_bound(cfg, None) is None
    assert train_examples_bound(cfg.replace(local_steps=5), None) == 1.5 * 5 * 8 + 8  # steps: no count needed
    assert unknown_site_cap([23.0, 50.0], [10.0, 1e12], 8) == 50.0
    assert unknown_site_cap([], [20.0, 30.0, 40.0], 8) == 1.5 * 30 + 8  # no counted site: the round's median


def test_update_norm_bound_auto_and_where_it_applies():
    assert RunConfig().median_norm_multiple == 3.0
    assert RunConfig(update_norm_bound=0.0).median_norm_multiple == 0.0
    assert RunConfig(update_norm_bound=1.5).median_norm_multiple == 1.5
    assert RunConfig(secure_aggregation=True).median_norm_multiple == 0.0  # auto is accepted, clips nothing
    assert RunConfig(dp="central").median_norm_multiple == 0.0
    assert RunConfig.from_flower({"update-norm-bound": "auto"}).update_norm_bound == AUTO_NORM_BOUND
    with pytest.raises(ConfigError, match="update-norm-bound = -2"):
        RunConfig(update_norm_bound=-2.0)
    with pytest.raises(ConfigError, match="update-norm-bound"):
        RunConfig(secure_aggregation=True, update_norm_bound=1.0)


def test_clip_to_norm_leaves_honest_float32_rounding_alone():
    ref = {"w": np.zeros(4, np.float32)}
    honest = {"w": np.full(4, 0.25 * (1 + 1e-5), np.float32)}  # norm 0.5 x (1 + 1e-5): a clip's rounding
    cheat = {"w": np.full(4, 5.0, np.float32)}
    out, clipped = clip_to_norm([honest, cheat], ref, 0.5)
    assert [i for i, _, _ in clipped] == [1] and out[0]["w"] is honest["w"]
    assert delta_norm(out[1], ref) == pytest.approx(0.5, rel=1e-6)


def test_a_secure_aggregation_result_is_checked_like_any_reply():
    from fedbreast.server.exchange import Exchange
    from fedbreast.server.phases import RunState
    from fedbreast.server.secure_aggregation import _checked_result
    from fedbreast.shared.secure_aggregation import SITE_NAME_KEY

    cfg = RunConfig(backbone="smallcnn", hist_bins=BINS, secure_aggregation=True)
    no_store: Any = None  # the checks write nothing
    exchange = Exchange(StubGrid(), no_store, lambda _line: None, 1, ReplyLimits(hist_bins=BINS))
    no_strategy: Any = None  # the checks read no strategy
    state = RunState(cfg=cfg, exchange=exchange, strategy=no_strategy, arrays=initial(), train_samples={7: 10})

    def result(name: str, n: Any, **metrics: Any) -> SimpleNamespace:
        return SimpleNamespace(metrics={SITE_NAME_KEY: name, "train_loss": 0.5, **metrics}, num_examples=n)

    site, metrics = _checked_result(state, 7, result("site-a", 10), cap=20)
    assert site == "site-a" and metrics["num-examples"] == 10 and SITE_NAME_KEY not in metrics
    for args, needle in [
        (("=cmd|x", 10), "invalid site name '\\?cmd\\?x'"),
        (("site-a", 10**12), "exceeds 23"),
        (("site-a", math.nan), "'num-examples'"),
        (("site-a", 10, {"junk": [0.0] * 10**4}), "values, more than the limit"),
    ]:
        extra = args[2] if len(args) > 2 else {}
        with pytest.raises(MalformedReply, match=needle):
            _checked_result(state, 7, result(args[0], args[1], **extra), cap=20)
    with pytest.raises(MalformedReply, match="without a roll call count"):  # node 8: not counted, over the cap
        _checked_result(state, 8, result("site-b", 21), cap=20)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # a report of a run with no site rows: empty plots
def test_the_failure_table_of_the_report_keeps_a_pipe_in_a_reason(tmp_path):
    from fedbreast.server.report import write_report

    store = MetricStore(tmp_path)
    store.append(1, "failure", "site-a", {"stage": "train", "reason": "unable: a | b"})
    write_report(tmp_path, RunConfig(backbone="smallcnn"))
    row = next(ln for ln in (tmp_path / "summary.md").read_text().splitlines() if ln.startswith("| 1 | site-a"))
    assert row == "| 1 | site-a | train | unable: a \\| b |"
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reason"] == "unable: a | b"


# ---- histogram counts against overflow and the roll call ---------------------------------------


def test_a_histogram_of_2_62_counts_is_dropped_and_the_pooled_auc_goes_on(tmp_path):
    # 64 bins of 2**62 beside the others' 32: pooled at 32 bins, two of them sum past int64 to a
    # negative count, and the pooled AUC's ValueError ended the run.
    huge = [2**62] * 64
    honest = {site: site_histogram(site, bins=32) for site in ("site-a", "site-c")}
    tamper = {s: on("evaluate", test_hist_pos=h["hist_pos"], test_hist_neg=h["hist_neg"]) for s, h in honest.items()}
    tamper["site-b"] = on("evaluate", test_hist_pos=huge, test_hist_neg=huge)
    fed, store, _ = run_with(tamper, tmp_path, hist_bins=64)
    assert_dropped_every_round(fed, store, "site-b", "evaluate", "'test_hist_pos'", "2**31 or more")
    pooled = pool_histograms(list(honest.values()))
    for row in store.rows("aggregate"):
        assert row["test_pooled_hist_bins"] == 32
        assert row["test_pooled_auc"] == pytest.approx(pooled_auc_from_histograms([pooled]), abs=1e-12)


def test_a_histogram_counting_more_than_the_roll_calls_test_exams_is_dropped(tmp_path):
    most = 2**31 - 1  # each count allowed; their total is not
    fed, store, _ = run_with(
        {"site-c": on("evaluate", test_hist_pos=[most] * BINS, test_hist_neg=[0] * BINS)}, tmp_path
    )
    assert_dropped_every_round(
        fed, store, "site-c", "evaluate", f"total {most * BINS} exceeds the roll call's test exams {TEST_EXAMS}"
    )
    assert all("test_pooled_auc" in r for r in store.rows("aggregate"))


def test_a_failing_pooled_auc_leaves_the_round_without_it_and_says_why(tmp_path, monkeypatch):
    import fedbreast.server.phases as phases

    def broken(hists):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(phases, "pool_histograms", broken)
    fed, store, lines = run_with({}, tmp_path)
    assert len(fed.history) == fed.cfg.rounds and not failures_of(store)
    rows = store.rows("aggregate")
    assert len(rows) == fed.cfg.rounds
    for row in rows:
        assert "test_pooled_auc" not in row and row["val_auc"] == pytest.approx(0.7)
        assert row["test_pooled_auc_unavailable"] == "OverflowError: Python int too large to convert to C long"
    assert sum("no pooled test AUC: OverflowError" in ln for ln in lines) == fed.cfg.rounds


def test_histogram_counts_and_totals():
    with pytest.raises(MalformedReply, match="'test_hist_neg' holds a count of 2\\*\\*31 or more"):
        check_histograms({"test_hist_pos": [1, 2], "test_hist_neg": [2**31, 0]}, 16)
    check_hist_total({"test_hist_pos": [10, 2], "test_hist_neg": [58, 0]}, test_exams=3)  # 70 = 2 x 3 + 64
    with pytest.raises(MalformedReply, match="total 71 exceeds the roll call's test exams 3"):
        check_hist_total({"test_hist_pos": [11, 2], "test_hist_neg": [58, 0]}, test_exams=3)
    check_hist_total({"num-examples": 1}, test_exams=0)  # no histogram: nothing to hold


# ---- the roll call's counts and the site names --------------------------------------------------


def test_a_site_claiming_a_billion_samples_at_the_roll_call_weighs_ten_medians(tmp_path):
    billion = 10**9

    def liar(kind: str, content: Content) -> Content:  # the same lie at the roll call and in every round
        if kind == "query":
            content["metrics"].update(train_samples=billion, test_exams=billion)
        if kind == "train":  # an update against the others' (of the same norm: the median clip leaves it)
            content["arrays"] = {k: v - 2.0 if v.dtype.kind == "f" else v for k, v in content["arrays"].items()}
            content["metrics"]["num-examples"] = billion
        return content

    fed, store, lines = run_with({"site-c": liar}, tmp_path)
    assert not failures_of(store)
    cap = 10 * TRAIN_SAMPLES
    assert (
        f"site site-c claims {billion} training samples at the roll call; weighted as at most {cap} (10 x the median)"
        in lines
    )
    assert (
        f"site site-c claims {billion} test exams at the roll call; weighted as at most {10 * TEST_EXAMS} (10 x the median)"
        in lines
    )
    assert [r["num-examples"] for r in store.rows("train") if r["site"] == "site-c"] == [cap] * fed.cfg.rounds
    # FedAvg of +1, +1 (weight 10 each) and -1 (weight 100, not 10**9): -80 / 120 per round.
    np.testing.assert_allclose(fed.arrays["w"], np.full((2, 3), 2 * -80 / 120), rtol=1e-6)


def test_roll_call_caps():
    assert roll_call_caps({1: 10, 2: 12, 3: 10**9, 4: 0}) == {3: (120, "10 x the median")}  # 0: no data, not counted
    assert roll_call_caps({1: 10, 2: 100, 3: 11}) == {}
    assert roll_call_caps({1: 10, 2: 10**9}) == {2: (100, "10 x the other site's")}  # a median of two is their mean
    assert roll_call_caps({1: 10, 2: 100}) == {}
    assert roll_call_caps({1: 10**9}) == {} and roll_call_caps({}) == {}


def test_a_site_taking_another_sites_name_is_refused_while_that_site_is_online(tmp_path):
    def impostor(kind: str, content: Content) -> Content:
        content["site"]["name"] = "site-a"
        return content

    fed, store, _ = run_with({"site-c": impostor}, tmp_path)
    assert len(fed.history) == fed.cfg.rounds
    failures = failures_of(store)
    assert {f["site"] for f in failures} == {"node-102"}
    assert [f["stage"] for f in failures] == ["roll-call"] + ["train", "evaluate"] * fed.cfg.rounds
    assert all(f["reason"] == "malformed reply: site name 'site-a' is already answered by node 100" for f in failures)
    assert {r["site"] for r in store.rows("train")} == {"site-a", "site-b"}
    assert fed.state.exchange.names == {100: "site-a", 101: "site-b"}


class RestartGrid(StubGrid):
    """site-a's SuperNode goes down after round 1 and comes back under a new node id (103), as
    one without authentication does (an authenticated SuperNode keeps its id)."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if any(m.metadata.message_type == "evaluate" for m in messages) and 100 in self.nodes:
            del self.nodes[100]
            self.nodes[103] = "site-a"
        return ids


def test_a_restarted_site_takes_its_name_to_its_new_node_once_the_old_one_is_gone(tmp_path):
    cfg = RunConfig(backbone="smallcnn", rounds=2, round_timeout=1, wait_for_sites=1, hist_bins=BINS)
    fed = FederatedRun(RestartGrid(), cfg, tmp_path, initial(), echo=lambda _line: None)
    fed.run()
    store = MetricStore(tmp_path)
    assert not failures_of(store)
    assert [(r["round"], r["site"]) for r in store.rows("train") if r["site"] == "site-a"] == [
        (1, "site-a"),
        (2, "site-a"),
    ]
    assert fed.state.exchange.owners["site-a"] == 103


# ---- SecAgg+ stage replies ----------------------------------------------------------------------

StageTamper = Callable[[str, ConfigRecord], None]  # (stage, the reply's secaggplus_configs) -> edits it


class SecAggGrid(LoopGrid):
    """Four sites that answer SecAgg+ as Flower's ``secaggplus_mod`` does, around a stand-in for
    the site's training (a change of +1 everywhere, 10 examples); ``tamper[site]`` edits that
    site's stage replies before they are sent."""

    def __init__(self, tamper: dict[str, StageTamper] | None = None):
        super().__init__(dict.fromkeys(("site-a", "site-b", "site-c", "site-d"), "ok"))
        self.tamper = tamper or {}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in self.nodes
        }
        self._ids = itertools.count(1)

    def _train(self, msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        change = [np.ones(a.size, np.float32) for a in parameters_to_ndarrays(fitins.parameters)]
        metrics = {"fedbreast-site-name": self.nodes[context.node_id], "train_seconds": 0.1}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(change), TRAIN_SAMPLES, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            node, stage = m.metadata.dst_node_id, m.content.config_records["secaggplus_configs"]["stage"]
            try:
                reply = secaggplus_mod(copy.deepcopy(m), self.contexts[node], self._train)
            except Exception as exc:  # noqa: BLE001 - as Flower's runtime: the site's exception is its error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            else:
                if self.nodes[node] in self.tamper:
                    self.tamper[self.nodes[node]](str(stage), reply.content.config_records["secaggplus_configs"])
            reply.metadata.__dict__["_src_node_id"] = node
            self._outbox.append(reply)
            ids.append(m.metadata.message_id)
        return ids


def secure_round(grid: SecAggGrid, tmp_path, rounds: int = 1):
    from fedbreast.server.exchange import Exchange, RoundOutcome
    from fedbreast.server.phases import RunState
    from fedbreast.server.secure_aggregation import secure_train_round

    cfg = RunConfig(backbone="smallcnn", hist_bins=BINS, secure_aggregation=True, round_timeout=1)
    lines: list[str] = []
    exchange = Exchange(grid, MetricStore(tmp_path), lines.append, 1, ReplyLimits(hist_bins=BINS))
    for node, site in grid.nodes.items():  # the roll call's names and counts
        exchange.bind_name(node, site)
    no_strategy: Any = None  # the secure round samples no sites itself
    state = RunState(cfg, exchange, no_strategy, initial(), train_samples=dict.fromkeys(grid.nodes, TRAIN_SAMPLES))
    for server_round in range(1, rounds + 1):
        secure_train_round(state, server_round, RoundOutcome(server_round), list(grid.nodes))
    return state, MetricStore(tmp_path), lines


def on_stage(stage: str, edit: Callable[[ConfigRecord], None]) -> StageTamper:
    def tamper(s: str, record: ConfigRecord) -> None:
        if s == stage:
            edit(record)

    return tamper


def test_honest_secure_aggregation_passes_the_stage_checks(tmp_path):
    state, store, _ = secure_round(SecAggGrid(), tmp_path)
    assert not failures_of(store)
    np.testing.assert_allclose(state.arrays["w"], np.ones((2, 3)), atol=2e-5)  # the mean of four +1 changes
    assert state.arrays["steps"] == 1 and state.arrays["steps"].dtype == np.int64


def _two_dsts_one_ciphertext(r: ConfigRecord) -> None:
    r["dsts"], r["ctxts"] = r["dsts"][:2], r["ctxts"][:1]


def _wrong_shape(r: ConfigRecord) -> None:
    r["masked_params"] = [r["masked_params"][0], ndarray_to_bytes(np.zeros(2, np.int64)), *r["masked_params"][2:]]


def _stranger(r: ConfigRecord) -> None:
    r["dsts"] = [999, *r["dsts"][1:]]


def _not_a_key(r: ConfigRecord) -> None:
    r["pk1"] = b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize(
    "stage, edit, needle, completes",
    [
        # Flower's workflow drops a site at setup or share_keys, but cannot unmask the others without it.
        ("setup", _not_a_key, "setup stage: 'pk1' is not a public key", False),
        ("share_keys", _two_dsts_one_ciphertext, "2 destinations ('dsts') and 1 ciphertexts ('ctxts')", False),
        ("share_keys", _stranger, "'dsts' names a node twice or one that is not its neighbour", False),
        # At the masking stage, the dropped site is unmasked away and the others' sum is released.
        ("collect_masked_vectors", lambda r: r.pop("masked_params"), "no 'masked_params'", True),
        (
            "collect_masked_vectors",
            _wrong_shape,
            "'masked_params'[1] is int64 of shape (2,), expected 6 integers",
            True,
        ),
    ],
)
def test_a_malformed_stage_reply_drops_that_site_named_and_never_the_run(tmp_path, stage, edit, needle, completes):
    state, store, lines = secure_round(SecAggGrid({"site-b": on_stage(stage, edit)}), tmp_path)
    (failure,) = [f for f in failures_of(store) if f["site"] == "site-b"]
    assert failure["reason"].startswith("left secure aggregation: malformed reply: ") and needle in failure["reason"]
    expected = np.ones((2, 3)) if completes else np.zeros((2, 3))  # the mean of the three others' +1, or unchanged
    np.testing.assert_allclose(state.arrays["w"], expected, atol=2e-5)
    if completes:
        assert sorted(r["site"] for r in store.rows("train")) == ["site-a", "site-c", "site-d"]
    else:
        assert any("the global model is unchanged this round" in ln for ln in lines)


def test_an_exception_inside_the_workflow_fails_that_round_alone(tmp_path):
    def short_shares(r: ConfigRecord) -> None:  # Flower's share layout, but 2 chunks where the others have 3
        r["shares"] = [s[:36] for s in r["shares"]]

    grid = SecAggGrid({"site-b": on_stage("unmask", short_shares)})
    state, store, lines = secure_round(grid, tmp_path)
    (failure,) = failures_of(store)
    assert failure["site"] == "ALL" and failure["stage"] == "train"
    assert failure["reason"].startswith("secure aggregation failed: ValueError: ")
    np.testing.assert_allclose(state.arrays["w"], np.zeros((2, 3)))
    assert any("secure aggregation failed" in ln and "unchanged this round" in ln for ln in lines)
    grid.tamper.clear()  # the next round, honest again, completes
    state, store, _ = secure_round(grid, tmp_path / "next")
    np.testing.assert_allclose(state.arrays["w"], np.ones((2, 3)), atol=2e-5)


def test_a_malformed_unmask_reply_is_named_and_the_others_shares_unmask_the_sum(tmp_path):
    def stranger(r: ConfigRecord) -> None:
        r["nids"] = [999, *r["nids"][1:]]

    state, store, lines = secure_round(SecAggGrid({"site-b": on_stage("unmask", stranger)}), tmp_path)
    assert not failures_of(store)  # its masked update is in the sum already: site-b trained this round
    np.testing.assert_allclose(state.arrays["w"], np.ones((2, 3)), atol=2e-5)
    (line,) = [ln for ln in lines if "site site-b at the unmask stage" in ln]
    assert "'nids' names a node twice or one the request did not name" in line
