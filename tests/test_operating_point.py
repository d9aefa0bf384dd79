"""Operating points that hold on small sites (issue 17 item 6).

The federated cut-off: Youden's J on the sum of the sites' validation histograms (a bin edge),
each site's thresholded test metrics at it from its own test histogram (exact at an edge);
a site's own cut-off only above ``min-val-for-local-threshold``; the report says which.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score
from test_server_robustness import SITES, Content, failures_of, run_with, site_histogram

from fedbreast.server.phases import local_threshold_allowed
from fedbreast.server.reply_checks import MalformedReply, check_hist_total, check_histograms, check_metrics
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.metrics import (
    binary_metrics,
    coarsen,
    default_bin_edges,
    federated_operating_point,
    metrics_at_edge,
    score_histogram,
    youden_edge,
)

BINS = 64


def scores(seed: int, n: int = 120, shift: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    y[:2] = [0, 1]  # both classes
    p = 1.0 / (1.0 + np.exp(-rng.normal(4 * shift * (2 * y - 1), 1.0)))
    return y, p


def sklearn_j(y: np.ndarray, pred: np.ndarray) -> float:
    return float(recall_score(y, pred) + recall_score(1 - y, 1 - pred) - 1)


# ---- the pooled-histogram Youden cut-off and metrics at an edge, against sklearn ----------------


@pytest.mark.parametrize("seed", range(3))
def test_youden_edge_is_the_best_edge_by_sklearn(seed):
    y, p = scores(seed)
    h = score_histogram(y, p, bins=BINS)
    index, j = youden_edge(h["hist_pos"], h["hist_neg"])
    edges = default_bin_edges(BINS)
    by_sklearn = np.array([sklearn_j(y, (p >= e).astype(int)) for e in edges[:-1]])
    assert j == pytest.approx(by_sklearn.max(), abs=1e-12)
    assert by_sklearn[index] == pytest.approx(j, abs=1e-12)
    # Ties: the highest edge of the best (as the site's own rule: just below the lowest caught positive).
    assert index == int(np.flatnonzero(by_sklearn >= by_sklearn.max() - 1e-12)[-1])


def test_youden_edge_needs_both_classes():
    assert youden_edge([0, 0, 0, 0], [1, 2, 0, 0]) is None
    with pytest.raises(ValueError, match="non-negative integer"):
        youden_edge([1, -1], [0, 1])


@pytest.mark.parametrize("seed", range(2))
def test_metrics_at_an_edge_equal_sklearn_on_the_raw_scores(seed):
    y, p = scores(100 + seed, n=90)
    h = score_histogram(y, p, bins=BINS)
    edges = default_bin_edges(BINS)
    for i in (0, 5, 20, 32, 40, 60, BINS - 1):
        pred = (p >= edges[i]).astype(int)
        m = metrics_at_edge(h["hist_pos"], h["hist_neg"], i)
        assert m["tp"] + m["fn"] == y.sum() and m["fp"] + m["tn"] == (1 - y).sum()
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        if pred.any():
            assert m["ppv"] == pytest.approx(precision_score(y, pred))
            assert m["f1"] == pytest.approx(f1_score(y, pred))
        else:
            assert math.isnan(m["ppv"])
        if 0 < pred.sum() < len(pred):
            assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
        if (1 - pred).any():
            assert m["npv"] == pytest.approx(precision_score(1 - y, 1 - pred))
        # The site's own binary_metrics at that threshold on the raw scores agree too.
        raw = binary_metrics(y, p, threshold=float(edges[i]))
        for k in ("sensitivity", "specificity", "accuracy", "gmean"):
            assert m[k] == pytest.approx(raw[k], nan_ok=True)
    with pytest.raises(ValueError, match="edge index"):
        metrics_at_edge(h["hist_pos"], h["hist_neg"], BINS)


def test_federated_cut_off_pools_validation_and_scores_each_site_exactly():
    """Two sites, one at 64 bins and one whose policy capped it at 16: pooled at 16; the cut-off is
    Youden's on all validation scores together, and each site's test metrics at it are its raw ones."""
    (ya, pa), (yb, pb) = scores(1, n=10), scores(2, n=150)  # a tiny site and a larger one
    (ta, qa), (tb, qb) = scores(3, n=40), scores(4, n=200)
    val = {
        "site-a": score_histogram(ya, pa, bins=BINS),
        "site-b": score_histogram(yb, pb, bins=16),
        "site-c": {"hist_pos": [0] * 2, "hist_neg": [0] * 2},  # an empty split: left out of the resolution
    }
    test = {"site-a": score_histogram(ta, qa, bins=BINS), "site-b": score_histogram(tb, qb, bins=32)}
    pooled, per_site = federated_operating_point(val, test)
    assert pooled["bins"] == 16 and pooled["val_sites"] == 2
    everything = score_histogram(np.r_[ya, yb], np.r_[pa, pb], bins=16)
    index, j = youden_edge(everything["hist_pos"], everything["hist_neg"])
    assert pooled["threshold"] == default_bin_edges(16)[index] and pooled["youden_j"] == pytest.approx(j)
    assert (pooled["val_n_pos"], pooled["val_n_neg"]) == (
        int(ya.sum() + yb.sum()),
        int((1 - ya).sum() + (1 - yb).sum()),
    )
    for site, (y, p) in (("site-a", (ta, qa)), ("site-b", (tb, qb))):
        raw = binary_metrics(y, p, threshold=pooled["threshold"])
        got = per_site[site]
        assert got["threshold"] == pooled["threshold"]
        for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "mcc"):
            assert got[k] == pytest.approx(raw[k], nan_ok=True), (site, k)
    # The coarser test histogram coarsened to the common grid gives the same counts.
    c = metrics_at_edge(coarsen(test["site-b"]["hist_pos"], 16), coarsen(test["site-b"]["hist_neg"], 16), index)
    assert c["tp"] == per_site["site-b"]["tp"]


def test_no_federated_cut_off_without_both_classes_or_any_validation():
    with pytest.raises(ValueError, match="Youden's J needs both"):
        federated_operating_point({"a": {"hist_pos": [0, 0], "hist_neg": [3, 1]}}, {})
    with pytest.raises(ValueError, match="no site sent"):
        federated_operating_point({}, {"a": {"hist_pos": [1, 0], "hist_neg": [3, 1]}})


def test_local_cut_off_only_above_the_minimum_validation_size():
    big = {"val_n": 40, "val_n_pos": 12, "val_n_neg": 28}
    assert local_threshold_allowed(big, 20)[0]
    ok, why = local_threshold_allowed({"val_n": 6, "val_n_pos": 2, "val_n_neg": 4}, 20)
    assert not ok and "validation 6 units (2 malignant, 4 benign)" in why and "min-val-for-local-threshold" in why
    assert not local_threshold_allowed({"val_n": 40, "val_n_pos": 3, "val_n_neg": 37}, 20)[0]  # 3 < 5 a class
    assert local_threshold_allowed({"val_n": 0, "val_n_pos": 0, "val_n_neg": 0}, 0)[0]  # 0: always local
    assert RunConfig().min_val_for_local_threshold == 20
    assert RunConfig.from_flower({"min-val-for-local-threshold": 50}).min_val_for_local_threshold == 50
    with pytest.raises(ConfigError, match="min-val-for-local-threshold|min_val_for_local_threshold"):
        RunConfig(min_val_for_local_threshold=-1)


# ---- a hostile site's validation histogram is refused, naming the site and the key ----------------


def test_validation_histograms_are_checked_like_the_test_ones():
    h = site_histogram("site-a", bins=16)
    check_histograms({"val_hist_pos": h["hist_pos"], "val_hist_neg": h["hist_neg"]}, 16)
    for bad, needle in (
        ({"val_hist_pos": h["hist_pos"]}, "'val_hist_pos' without 'val_hist_neg'"),
        ({"val_hist_pos": [1] * 5, "val_hist_neg": [1] * 5}, "'val_hist_pos' has 5 bins"),
        ({"val_hist_pos": [-1] * 16, "val_hist_neg": [1] * 16}, "non-negative integer"),
        ({"val_hist_pos": [1] * 16, "val_hist_neg": [1] * 8}, "have 16 and 8 bins"),
        ({"val_hist_pos": [2**31] + [0] * 15, "val_hist_neg": [0] * 16}, "2**31"),
    ):
        with pytest.raises(MalformedReply, match="val_hist"):
            check_histograms(bad, 16)
        with pytest.raises(MalformedReply) as exc:
            check_histograms(bad, 16)
        assert needle in str(exc.value)
    big = {"val_hist_pos": [100] * 16, "val_hist_neg": [0] * 16}
    check_hist_total(big, 2)  # the test pair is absent: nothing to hold
    with pytest.raises(
        MalformedReply, match="val_hist_pos \\+ val_hist_neg total 1600 exceeds the roll call's val exams 10"
    ):
        check_hist_total(big, 10, ("val_hist_pos", "val_hist_neg"))
    with pytest.raises(MalformedReply, match="reserved for the coordinator"):
        check_metrics({"num-examples": 1, "fed_threshold": 0.0}, 16)


@pytest.fixture
def task_identity():
    # Flower stamps messages with the running task's identity; a test is no task.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def with_val(extra: dict[str, Any] | None = None, query: dict[str, Any] | None = None):
    """Every site's honest evaluate reply plus validation histograms (and validation counts);
    ``extra`` / ``query`` override the evaluate / roll-call metrics."""

    def tamper(kind: str, content: Content) -> Content:
        site = content["site"]["name"]
        if kind == "query":
            content["metrics"] = {**content["metrics"], "val_exams": 30, **(query or {})}
        if kind == "evaluate":
            h = site_histogram(site + "-val")
            content["metrics"] = {
                **content["metrics"],
                "val_hist_pos": h["hist_pos"],
                "val_hist_neg": h["hist_neg"],
                "val_n": 40,
                "val_n_pos": 20,
                "val_n_neg": 20,
                "test_threshold": 0.5,
                **(extra or {}),
            }
        return content

    return tamper


def test_a_malformed_or_oversized_validation_histogram_is_refused_naming_site_and_key(tmp_path, task_identity):
    honest = with_val()
    bins = len(site_histogram("x")["hist_pos"])
    cases = {
        "long": ("site-a", with_val({"val_hist_neg": [1] * (bins + 1)}), "'val_hist_neg'", f"{bins + 1} bins"),
        "nan": ("site-b", with_val({"val_hist_pos": [math.nan] * bins}), "'val_hist_pos'", "finite numbers"),
        # 40 honest units a site; 30 validation exams at the roll call allow 2 x 30 + 64: 10**4 does not fit.
        "huge": ("site-c", with_val({"val_hist_pos": [10**4] + [0] * (bins - 1)}), "val_hist_pos", "val exams 30"),
        "forged": ("site-a", with_val({"fed_threshold": 0.0}), "'fed_threshold'", "reserved"),
    }
    for name, (site, tamper, *needles) in cases.items():
        tampers = {s: (tamper if s == site else honest) for s in SITES}
        fed, store, _ = run_with(tampers, tmp_path / name, rounds=1)
        failures = [f for f in failures_of(store) if f["stage"] == "evaluate"]
        assert [f["site"] for f in failures] == [site], (name, failures)
        for needle in needles:
            assert needle in failures[0]["reason"], (name, failures[0]["reason"])
        # The run went on: the others' validation histograms still give the federated cut-off.
        agg = store.rows("aggregate")[-1]
        assert agg["fed_threshold_val_sites"] == len(SITES) - 1 and 0 <= agg["fed_threshold"] < 1, (name, agg)


def test_the_coordinator_writes_the_federated_cut_off_and_the_source_per_site(tmp_path, task_identity):
    small = {"val_n": 6, "val_n_pos": 2, "val_n_neg": 4}
    tampers = {s: with_val(small if s == "site-b" else None) for s in SITES}
    _, store, _ = run_with(tampers, tmp_path, rounds=1)
    assert not failures_of(store)
    agg = store.rows("aggregate")[-1]
    rows = {r["site"]: r for r in store.rows("evaluate")}
    hists = {s: site_histogram(s + "-val") for s in SITES}
    pooled, per_site = federated_operating_point(hists, {s: site_histogram(s) for s in SITES})
    assert agg["fed_threshold"] == pooled["threshold"]
    for s, r in rows.items():
        assert r["fed_threshold"] == pooled["threshold"]
        assert r["fed_test_sensitivity"] == pytest.approx(per_site[s]["sensitivity"])
        assert r["fed_threshold_source"] == ("federated" if s == "site-b" else "local")
    assert rows["site-b"]["fed_threshold_used"] == pooled["threshold"]
    assert rows["site-a"]["fed_threshold_used"] == 0.5


# ---- one real run: the report names each site's cut-off ------------------------------------------


def test_a_real_run_reports_the_cut_off_used_per_site(tmp_path):
    from fedbreast.simulation.simulate import simulate

    run = tmp_path / "run"
    # 12 patients a site: the smallest federation whose validation splits hold both classes pooled
    # (with 8 they are empty), so there is a federated cut-off; each split is far below 20 units.
    tiny = dict(rounds=1, backbone="smallcnn", image_h=64, image_w=32, bootstrap=20, workers=0, amp="off")
    simulate(run, sites=2, patients=12, overrides=tiny, engine="inprocess", echo=lambda *_: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    agg = [r for r in rows if r["phase"] == "aggregate"][-1]
    assert 0.0 <= agg["fed_threshold"] <= 1.0 and agg["fed_threshold_val_sites"] >= 1
    evaluated = [r for r in rows if r["phase"] == "evaluate"]
    assert evaluated and all("val_hist_pos" in r for r in evaluated if r.get("val_n"))
    for r in evaluated:
        assert r["fed_threshold_source"] == "federated"  # every validation split is below 20 units
        assert r["fed_threshold_used"] == agg["fed_threshold"]
    md = (run / "summary.md").read_text()
    assert "## Operating point per site (test split)" in md
    assert f"Federated cut-off {agg['fed_threshold']:.4f}" in md
    for r in evaluated:
        assert f"| {r['site']} | federated | {agg['fed_threshold']:.4f} |" in md
    with open(run / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {t["threshold_source"] for t in table} == {"federated"}
    assert all(float(t["federated_threshold"]) == pytest.approx(agg["fed_threshold"]) for t in table)
    assert "test_auc" in table[0] and "model" in table[0]  # the columns before are kept


def test_the_report_of_an_older_run_has_no_operating_point_section(tmp_path):
    from fedbreast.server.report import operating_point_section

    assert operating_point_section([{"site": "a", "test_threshold": 0.5}], {}, RunConfig()) == []


# ---- the site releases its validation histogram under the rules of its test histogram ------------


def test_the_validation_histogram_is_coarse_noised_and_charged_like_the_test_one(tmp_path):
    from clientapp_messages import site_context

    from fedbreast.client.app import score_histograms
    from fedbreast.shared.training.dp import RELEASES, lifetime_epsilon

    cfg = RunConfig(backbone="smallcnn", hist_bins=64)
    y, p = scores(7, n=20)
    node = {"policy": json.dumps({"max-hist-bins": 16, "min-scores-per-bin": 2})}
    # Policy only: coarse (at most max-hist-bins and n / min-scores-per-bin, a divisor of hist-bins), no noise.
    plain = score_histograms(site_context(tmp_path, cfg.to_flower(), policy=node), cfg, y, p, "val")
    assert set(plain) == {"val_hist_pos", "val_hist_neg"} and len(plain["val_hist_pos"]) == 8
    assert sum(plain["val_hist_pos"]) == y.sum() and sum(plain["val_hist_neg"]) == (1 - y).sum()
    assert lifetime_epsilon(tmp_path) == 0
    # Noise and a ceiling: charged to the site's ledger as a validation histogram, withheld once spent.
    strict = {**node, "hist-noise-epsilon": 0.5, "dp-max-epsilon": 0.75}
    ctx = site_context(tmp_path, cfg.to_flower(), policy=strict)
    noised = score_histograms(ctx, cfg, y, p, "val")
    assert len(noised["val_hist_pos"]) == 8 and lifetime_epsilon(tmp_path) == pytest.approx(0.5)
    ledger = [json.loads(line) for line in next(tmp_path.rglob(RELEASES)).read_text().splitlines()]
    assert [entry["what"] for entry in ledger] == ["validation histogram"]
    assert score_histograms(ctx, cfg, y, p, "val") == {}  # 0.5 more would pass 0.75
    assert lifetime_epsilon(tmp_path) == pytest.approx(0.5)
