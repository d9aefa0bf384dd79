"""Tests for fedbreast.shared.metrics, checked against scikit-learn on real numbers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from fedbreast.shared.metrics import (
    BINARY_METRIC_KEYS,
    BOOTSTRAP_METRICS,
    add_laplace_noise,
    auc_binning_bound,
    binary_metrics,
    bootstrap_ci,
    confusion_counts,
    default_bin_edges,
    delong_test,
    delong_variance,
    max_aggregate,
    metrics_from_confusion,
    pooled_auc_from_histograms,
    pooled_roc_from_histograms,
    score_histogram,
    sum_histograms,
    weighted_mean,
)
from fedbreast.shared.metrics.bootstrap import _class_counts, _replicate_metrics


def _expit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _site(rng: np.random.Generator, n: int, prev: float, pos_ab, neg_ab):
    y = (rng.random(n) < prev).astype(int)
    s = np.where(y == 1, rng.beta(*pos_ab, size=n), rng.beta(*neg_ab, size=n))
    return y, s


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return _site(rng, 500, 0.3, (4, 2), (2, 4))


@pytest.fixture(scope="module")
def federation() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three sites with different score distributions and prevalences.

    Site 0: confident model, scores piled against 0 and 1; site 1: float32 sigmoid
    outputs of wide logits (many saturated values); site 2: poorly separated.
    """
    rng = np.random.default_rng(7)
    s0 = _site(rng, 450, 0.12, (4, 0.4), (0.4, 4))
    y1 = (rng.random(700) < 0.35).astype(int)
    z1 = rng.normal(np.where(y1 == 1, 3.0, -4.0), 3.5)
    s1 = (y1, _expit(z1).astype(np.float32).astype(np.float64))
    s2 = _site(rng, 350, 0.5, (2, 2.5), (1.5, 2.5))
    return [s0, s1, s2]


# --------------------------------------------------------------- classification


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_binary_metrics_match_sklearn(data, threshold):
    y, s = data
    m = binary_metrics(y, s, threshold=threshold)
    pred = (s >= threshold).astype(int)
    assert tuple(m) == BINARY_METRIC_KEYS
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)
    assert m["ppv"] == pytest.approx(precision_score(y, pred), abs=1e-12)
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    assert (m["sensitivity"] + m["specificity"]) / 2 == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["gmean"] == pytest.approx(math.sqrt(m["sensitivity"] * m["specificity"]), abs=1e-12)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (500, int(y.sum()), int((y == 0).sum()))
    assert all(isinstance(m[k], int) for k in ("n", "n_pos", "n_neg"))


def test_auc_with_heavy_ties_matches_sklearn(data):
    y, s = data
    coarse = np.round(s, 1)  # ~11 distinct values: ties across classes everywhere
    assert binary_metrics(y, coarse)["auc"] == pytest.approx(roc_auc_score(y, coarse), abs=1e-12)


def test_spec_at_sens100_matches_roc_curve(data):
    y, s = data
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    first_full = np.flatnonzero(tpr >= 1.0)[0]  # highest threshold with sensitivity 1
    assert binary_metrics(y, s)["spec_at_sens100"] == pytest.approx(1 - fpr[first_full])
    # Hand-checked: lowest positive 0.4; negatives 0.1, 0.3 below it, 0.5 and 0.4 not.
    y2 = [0, 0, 0, 0, 1, 1]
    s2 = [0.1, 0.3, 0.5, 0.4, 0.4, 0.9]
    assert binary_metrics(y2, s2)["spec_at_sens100"] == pytest.approx(0.5)


def test_confusion_counts_match_sklearn(data):
    y, s = data
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.5).astype(int)).ravel()
    assert confusion_counts(y, s, 0.5) == (tp, fp, tn, fn)
    # Threshold is inclusive: a score equal to it is predicted malignant.
    assert confusion_counts([1, 0], [0.5, 0.5], 0.5) == (1, 1, 0, 0)


def test_summed_confusion_equals_pooled_metrics(federation):
    """Federated MCC weighting: metrics from summed site counts = metrics on pooled data."""
    counts = np.array([confusion_counts(y, s, 0.5) for y, s in federation]).sum(axis=0)
    pooled = metrics_from_confusion(*(int(c) for c in counts))
    y = np.concatenate([f[0] for f in federation])
    s = np.concatenate([f[1] for f in federation])
    direct = binary_metrics(y, s)
    for k, v in pooled.items():
        assert v == pytest.approx(direct[k], abs=1e-12), k
    assert pooled["mcc"] == pytest.approx(matthews_corrcoef(y, (s >= 0.5).astype(int)))


def test_metrics_from_confusion_degenerate_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = metrics_from_confusion(0, 0, 10, 0)  # no positives at all, none predicted
        z = metrics_from_confusion(0, 0, 0, 0)
    assert math.isnan(m["sensitivity"]) and math.isnan(m["ppv"]) and math.isnan(m["mcc"])
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0 and m["npv"] == 1.0
    assert all(math.isnan(v) for v in z.values())
    # Large pooled counts must not overflow the MCC denominator.
    big = metrics_from_confusion(10**6, 10**5, 10**7, 10**5)
    assert 0.0 < big["mcc"] < 1.0


@pytest.mark.parametrize("bad", [(-1, 0, 0, 0), (1.0, math.nan, 0, 0), ("3", 0, 0, 0), (True, 0, 0, 0)])
def test_metrics_from_confusion_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="tp|fp"):
        metrics_from_confusion(*bad)


def test_single_class_gives_nan_not_exception():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.4])
    assert math.isnan(m["auc"]) and math.isnan(m["sensitivity"]) and math.isnan(m["mcc"])
    assert math.isnan(m["spec_at_sens100"]) and math.isnan(m["gmean"])
    assert m["specificity"] == 0.75 and m["n_pos"] == 0 and m["n_neg"] == 4


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([], [], "empty"),
        ([0, 1], [0.5], "differ in length"),
        ([0, 2], [0.5, 0.5], "only 0"),
        ([0, 1], [0.5, math.nan], "NaN"),
        ([0, 1], [0.5, 1.5], r"\[0, 1\]"),
        ([[0, 1]], [[0.5, 0.5]], "1-D"),
        (["a", "b"], [0.5, 0.5], "numeric"),
    ],
)
def test_bad_inputs_raise_clear_value_error(y, s, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, s)


def test_operating_threshold_maximises_youden_j(data):
    from fedbreast.shared.metrics import operating_threshold
    from fedbreast.shared.metrics.histogram import default_bin_edges

    y, s = data
    t = operating_threshold(y, s, grid=None)

    def j(cut: float) -> float:
        m = binary_metrics(y, s, threshold=cut)
        return m["sensitivity"] + m["specificity"] - 1

    assert all(j(t) >= j(c) - 1e-12 for c in np.unique(s))
    assert operating_threshold(np.zeros(5, int), np.linspace(0, 1, 5)) == 0.5  # one class: the default
    # What a site reports is never a patient's exact score: the grid edge at or below it.
    snapped = operating_threshold(y, s)
    edges = default_bin_edges(64)
    assert snapped in set(edges.tolist()) and snapped <= t and snapped not in set(np.asarray(s).tolist())
    assert not ((edges > snapped) & (edges <= t)).any()


def test_threshold_out_of_range_raises(data):
    with pytest.raises(ValueError, match="threshold"):
        binary_metrics(*data, threshold=1.2)


# --------------------------------------------------------------- bootstrap


def test_vectorised_replicates_match_explicit_resamples(data):
    """Rebuild the count matrices from explicit index draws and compare per replicate."""
    y, s = data
    values, codes = np.unique(s, return_inverse=True)
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_rep = 15
    w_pos = _class_counts(np.random.default_rng(3), codes[pos_idx], n_rep, values.size)
    w_neg = _class_counts(np.random.default_rng(4), codes[neg_idx], n_rep, values.size)
    # Replay the same draws: _class_counts takes rng.integers(0, m, (n_rep, m)).
    draws_p = pos_idx[np.random.default_rng(3).integers(0, pos_idx.size, (n_rep, pos_idx.size))]
    draws_n = neg_idx[np.random.default_rng(4).integers(0, neg_idx.size, (n_rep, neg_idx.size))]
    k_thr = int(np.searchsorted(values, 0.5))
    reps = _replicate_metrics(w_pos, w_neg, values, k_thr, BOOTSTRAP_METRICS)
    for b in range(n_rep):
        idx = np.concatenate([draws_p[b], draws_n[b]])
        expect = binary_metrics(y[idx], s[idx])
        for k in BOOTSTRAP_METRICS:
            assert reps[k][b] == pytest.approx(expect[k], abs=1e-12), (k, b)


def test_bootstrap_ci_contains_point_and_is_deterministic(data):
    y, s = data
    ci = bootstrap_ci(y, s, metrics=BOOTSTRAP_METRICS, n_boot=500, seed=1)
    point = binary_metrics(y, s)
    assert set(ci) == set(BOOTSTRAP_METRICS)
    for k, (p, lo, hi) in ci.items():
        assert p == point[k]
        assert lo <= p <= hi and lo < hi, k
    assert bootstrap_ci(y, s, n_boot=200, seed=5) == bootstrap_ci(y, s, n_boot=200, seed=5)
    assert bootstrap_ci(y, s, n_boot=200, seed=5) != bootstrap_ci(y, s, n_boot=200, seed=6)


def test_bootstrap_ci_narrows_with_n():
    rng = np.random.default_rng(11)
    widths = []
    for n in (200, 3200):
        y, s = _site(rng, n, 0.3, (4, 2), (2, 4))
        _, lo, hi = bootstrap_ci(y, s, metrics=("auc",), n_boot=400)["auc"]
        widths.append(hi - lo)
    # Width scales ~1/sqrt(n): 16x the data should give ~1/4 the width.
    assert 0.15 < widths[1] / widths[0] < 0.4


def test_bootstrap_auc_ci_agrees_with_delong(data):
    y, s = data
    _, lo, hi = bootstrap_ci(y, s, metrics=("auc",), n_boot=2000)["auc"]
    _, var = delong_variance(y, s)
    assert (hi - lo) == pytest.approx(2 * 1.959964 * math.sqrt(var), rel=0.15)


def test_bootstrap_stratified_keeps_auc_defined_with_few_positives():
    rng = np.random.default_rng(5)
    y = np.zeros(200, dtype=int)
    y[:3] = 1
    s = np.clip(rng.beta(2, 5, 200) + 0.3 * y, 0, 1)
    p, lo, hi = bootstrap_ci(y, s, metrics=("auc",), n_boot=300)["auc"]
    assert np.isfinite([p, lo, hi]).all() and lo <= p <= hi


def test_bootstrap_single_class_yields_nan_for_pair_metrics():
    ci = bootstrap_ci([1, 1, 1, 1], [0.2, 0.6, 0.9, 0.7], metrics=("auc", "sensitivity"), n_boot=50)
    assert all(math.isnan(v) for v in ci["auc"])
    assert ci["sensitivity"][0] == 0.75 and ci["sensitivity"][1] <= 0.75 <= ci["sensitivity"][2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": ("auc", "nope")}, "unknown"),
        ({"metrics": ("n",)}, "unknown"),
        ({"metrics": ()}, "empty"),
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": 2.5}, "n_boot"),
        ({"alpha": 1.0}, "alpha"),
        ({"threshold": -0.1}, "threshold"),
    ],
)
def test_bootstrap_bad_arguments(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(*data, **kwargs)


# --------------------------------------------------------------- DeLong


def _delong_brute(y: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> tuple[float, float]:
    """DeLong et al. 1988 straight from the O(m*n) Heaviside kernel."""
    comps = []
    for s in (sa, sb):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(y.sum()), int((y == 0).sum())
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    cov = s10 / m + s01 / n
    z = (comps[0][0] - comps[1][0]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return z, math.erfc(abs(z) / math.sqrt(2))


def test_delong_matches_brute_force(data):
    y, s = data
    rng = np.random.default_rng(9)
    other = np.round(np.clip(s + rng.normal(0, 0.25, s.size), 0, 1), 2)  # ties too
    auc_a, auc_b, z, p = delong_test(y, s, other)
    z_ref, p_ref = _delong_brute(y, s, other)
    assert auc_a == pytest.approx(roc_auc_score(y, s))
    assert auc_b == pytest.approx(roc_auc_score(y, other))
    assert z == pytest.approx(z_ref, rel=1e-10) and p == pytest.approx(p_ref, rel=1e-8)
    assert p < 0.01  # noise-degraded scores are clearly worse on 500 cases
    # Antisymmetric in the order of the classifiers.
    _, _, z_swap, p_swap = delong_test(y, other, s)
    assert z_swap == pytest.approx(-z) and p_swap == pytest.approx(p)


def test_delong_identical_scores_p_is_one(data):
    y, s = data
    auc_a, auc_b, z, p = delong_test(y, s, s)
    assert auc_a == auc_b and z == 0.0 and p == 1.0


def test_delong_variance_matches_bootstrap_variance(data):
    y, s = data
    _, var = delong_variance(y, s)
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = []
    for _ in range(400):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        aucs.append(roc_auc_score(y[idx], s[idx]))
    assert var == pytest.approx(np.var(aucs), rel=0.25)


def test_delong_needs_two_per_class():
    with pytest.raises(ValueError, match="at least 2 positives"):
        delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="differ in length"):
        delong_test([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2])


# --------------------------------------------------------------- histograms


def test_pooled_histogram_auc_matches_raw_pooled_auc(federation):
    hists = [score_histogram(y, s) for y, s in federation]
    y = np.concatenate([f[0] for f in federation])
    s = np.concatenate([f[1] for f in federation])
    raw = roc_auc_score(y, s)
    pooled = pooled_auc_from_histograms(hists)
    bound = auc_binning_bound(hists)
    assert abs(pooled - raw) < 0.005
    assert abs(pooled - raw) <= bound + 1e-12 and bound < 0.005
    # Much of the mass sits within 1e-3 of 0 or 1, where uniform bins would lump it.
    assert np.mean((s < 1e-3) | (s > 1 - 1e-3)) > 0.1


def test_pooled_auc_is_exact_mann_whitney_over_bins(federation):
    edges = default_bin_edges()
    hists = [score_histogram(y, s) for y, s in federation]
    y = np.concatenate([f[0] for f in federation])
    s = np.concatenate([f[1] for f in federation])
    bin_index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
    expect = roc_auc_score(y, bin_index)
    assert pooled_auc_from_histograms(hists) == pytest.approx(expect, abs=1e-12)


def test_histogram_layout_fits_metric_record(federation):
    y, s = federation[1]
    h = score_histogram(y, s)
    assert set(h) == {"hist_edges", "hist_pos", "hist_neg"}
    assert all(type(c) is int for c in h["hist_pos"] + h["hist_neg"])
    assert all(type(e) is float for e in h["hist_edges"])
    assert len(h["hist_pos"]) == len(h["hist_neg"]) == len(h["hist_edges"]) - 1 <= 1000
    assert sum(h["hist_pos"]) == y.sum() and sum(h["hist_neg"]) == (y == 0).sum()
    # Scores of exactly 0 and 1 land in the first and last bin.
    e = score_histogram([1, 0], [1.0, 0.0])
    assert e["hist_pos"][-1] == 1 and e["hist_neg"][0] == 1


def test_pooled_roc_area_equals_pooled_auc(federation):
    hists = [score_histogram(y, s) for y, s in federation]
    fpr, tpr = pooled_roc_from_histograms(hists)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(pooled_auc_from_histograms(hists), abs=1e-12)


def test_sum_histograms_and_edge_mismatch(federation):
    hists = [score_histogram(y, s) for y, s in federation]
    total = sum_histograms(hists)
    assert sum(total["hist_pos"]) == sum(int(y.sum()) for y, _ in federation)
    other = score_histogram(*federation[0], bins=64)
    with pytest.raises(ValueError, match="different bin edges"):
        pooled_auc_from_histograms([hists[0], other])
    with pytest.raises(ValueError, match="empty"):
        pooled_auc_from_histograms([])
    broken = dict(hists[0], hist_pos=[1.5] + hists[0]["hist_pos"][1:])
    with pytest.raises(ValueError, match="non-negative integer"):
        pooled_auc_from_histograms([broken])
    with pytest.raises(ValueError, match="hist_neg"):
        pooled_auc_from_histograms([{k: v for k, v in hists[0].items() if k != "hist_neg"}])


def test_pooled_auc_single_class_is_nan():
    h = score_histogram([0, 0, 0], [0.1, 0.5, 0.9])
    assert math.isnan(pooled_auc_from_histograms([h]))
    fpr, tpr = pooled_roc_from_histograms([h])
    assert np.isnan(fpr).all() and np.isnan(tpr).all()


def test_custom_edges_validated():
    assert len(score_histogram([0, 1], [0.2, 0.8], bins=[0.0, 0.5, 1.0])["hist_pos"]) == 2
    with pytest.raises(ValueError, match="strictly increasing"):
        score_histogram([0, 1], [0.2, 0.8], bins=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError, match="start at 0"):
        score_histogram([0, 1], [0.2, 0.8], bins=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="n_bins"):
        score_histogram([0, 1], [0.2, 0.8], bins=1)


def test_default_edges_dense_near_extremes():
    e = default_bin_edges()
    assert e.size == 513 and e[0] == 0.0 and e[-1] == 1.0
    assert (np.diff(e) > 0).all()
    assert np.diff(e).max() < 0.004  # fine in the middle too
    assert np.sum(e < 1e-3) > 50 and np.sum(e > 1 - 1e-3) > 50  # logit-dense tails


# --------------------------------------------------------------- Laplace noise


def test_laplace_noise_counts_stay_nonnegative_ints(federation):
    h = score_histogram(*federation[0])
    for n_groups in (16, None):
        noisy = add_laplace_noise(h, 0.5, np.random.default_rng(0), n_groups=n_groups)
        assert noisy["hist_edges"] == h["hist_edges"]
        for key in ("hist_pos", "hist_neg"):
            assert len(noisy[key]) == len(h[key])
            assert all(type(c) is int and c >= 0 for c in noisy[key])
        assert noisy != h


def test_laplace_noise_scale_is_one_over_epsilon():
    # Large counts: no clipping, so released - true is the raw Laplace noise.
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    h = {"hist_edges": edges, "hist_pos": [10_000] * 4, "hist_neg": [10_000] * 4}
    rng = np.random.default_rng(1)
    diffs = np.array(
        [np.subtract(add_laplace_noise(h, 0.5, rng, n_groups=None)["hist_pos"], 10_000) for _ in range(2000)]
    ).ravel()
    assert np.std(diffs) == pytest.approx(math.sqrt(2) / 0.5, rel=0.1)
    assert abs(np.mean(diffs)) < 0.1


def test_laplace_noise_keeps_pooled_auc_usable(federation):
    hists = [score_histogram(y, s) for y, s in federation]
    clean = pooled_auc_from_histograms(hists)
    rng = np.random.default_rng(2)
    # Large epsilon: nearly noise-free, only the 16-group coarsening remains.
    near = pooled_auc_from_histograms([add_laplace_noise(h, 1e4, rng) for h in hists])
    assert abs(near - clean) < 0.01
    noisy = [pooled_auc_from_histograms([add_laplace_noise(h, 1.0, rng) for h in hists]) for _ in range(20)]
    assert abs(np.mean(noisy) - clean) < 0.03


@pytest.mark.parametrize(
    ("eps", "rng", "groups", "match"),
    [
        (0.0, np.random.default_rng(0), 16, "epsilon"),
        (math.inf, np.random.default_rng(0), 16, "epsilon"),
        (1.0, 0, 16, "rng"),
        (1.0, np.random.default_rng(0), 0, "n_groups"),
        (1.0, np.random.default_rng(0), 10_000, "n_groups"),
    ],
)
def test_laplace_noise_bad_arguments(eps, rng, groups, match):
    h = score_histogram([0, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match=match):
        add_laplace_noise(h, eps, rng, n_groups=groups)


# --------------------------------------------------------------- aggregation


def test_weighted_mean_ignores_nan_and_sums_counts():
    sites = [
        {"auc": 0.8, "mcc": 0.5, "n": 100, "n_pos": 20, "n_neg": 80, "dp_epsilon": 1.0},
        {"auc": math.nan, "mcc": 0.2, "n": 300, "n_pos": 0, "n_neg": 300, "dp_epsilon": 3.0},
        {"auc": 0.9, "mcc": math.nan, "n": 100, "n_pos": 50, "n_neg": 50, "hist_pos": [1, 2]},
    ]
    out = weighted_mean(sites)
    assert out["auc"] == pytest.approx((0.8 * 100 + 0.9 * 100) / 200)
    assert out["mcc"] == pytest.approx((0.5 * 100 + 0.2 * 300) / 400)
    assert (out["n"], out["n_pos"], out["n_neg"]) == (500, 70, 430)
    assert out["dp_epsilon"] == 3.0  # privacy budgets aggregate by max, never by mean
    assert "hist_pos" not in out
    assert math.isnan(weighted_mean([{"auc": math.nan, "n": 5}])["auc"])


def test_max_aggregate():
    sites = [{"dp_epsilon": 2.0}, {"dp_epsilon": math.nan}, {}, {"dp_epsilon": 8.0}]
    assert max_aggregate(sites, "dp_epsilon") == 8.0
    assert max_aggregate(sites + [{"dp_epsilon": math.inf}], "dp_epsilon") == math.inf
    assert math.isnan(max_aggregate([{}], "dp_epsilon"))
    with pytest.raises(ValueError, match="empty"):
        max_aggregate([], "dp_epsilon")
    with pytest.raises(ValueError, match="real number"):
        max_aggregate([{"dp_epsilon": [1.0]}], "dp_epsilon")


def test_weighted_mean_bad_weights():
    with pytest.raises(ValueError, match="weight key"):
        weighted_mean([{"auc": 0.5}])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean([{"auc": 0.5, "n": -3}])
    with pytest.raises(ValueError, match="empty"):
        weighted_mean([])
