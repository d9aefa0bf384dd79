"""Pooled ROC / AUC across sites from score histograms (no per-patient score leaves a site).

Each site bins its malignancy probabilities, per class, over the *same* fixed bin
edges and sends only the two count vectors. The server sums them and computes
the Mann-Whitney AUC over binned scores (pairs within one bin count 1/2).

Binning error: pairs in different bins are ordered exactly as the raw scores;
only within-bin pairs change (raw wins in [0, P_k*Q_k], binned P_k*Q_k/2), so

    |AUC_binned - AUC_raw| <= sum_k P_k * Q_k / (2 * n_pos * n_neg)

which :func:`auc_binning_bound` reports from the histograms alone. Trained models
pile their scores up near 0 and 1 (float32 sigmoid saturates around logit ±16),
so the default edges are spaced by a mix of probability and logit: ~uniform
(width ≈ 0.0035) in the middle, geometrically finer towards 0 and 1. With
``DEFAULT_BINS = 512`` the bound stayed below 0.003 (observed error < 0.0003) over
300 simulated 3-site federations of beta- and logit-normal-distributed scores.
A model whose scores all sit in a narrow band (say 0.49-0.51) falls in only a few
bins; the bound then says so, and the server should log it next to the AUC.

The histogram dict uses MetricRecord-ready keys (``hist_edges``: list of float,
``hist_pos`` / ``hist_neg``: list of int) so a client can ``metrics.update(hist)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .classification import check_binary_inputs

__all__ = [
    "DEFAULT_BINS",
    "add_laplace_noise",
    "auc_binning_bound",
    "coarsen",
    "default_bin_edges",
    "pool_histograms",
    "pooled_auc_from_histograms",
    "pooled_roc_from_histograms",
    "score_histogram",
    "sum_histograms",
]

DEFAULT_BINS = 512
_LOGIT_RANGE = 16.0  # beyond this float32 probabilities are (nearly) all 0 or 1
_LINEAR_WEIGHT = 0.5  # share of edge density spent uniformly in probability
_EDGE_ATOL = 1e-12  # edges are recomputed per site; tolerate last-ulp platform drift
KEY_EDGES, KEY_POS, KEY_NEG = "hist_edges", "hist_pos", "hist_neg"


@lru_cache(maxsize=8)
def _default_edges_cached(n_bins: int) -> tuple[float, ...]:
    # Place edges uniformly in T(z) = w*sigmoid(z) + (1-w)*(z+L)/(2L): edge density
    # is the sum of a uniform-in-probability and a uniform-in-logit grid.
    z = np.linspace(-_LOGIT_RANGE, _LOGIT_RANGE, 200_001)
    p = 1.0 / (1.0 + np.exp(-z))
    t = _LINEAR_WEIGHT * p + (1.0 - _LINEAR_WEIGHT) * (z + _LOGIT_RANGE) / (2 * _LOGIT_RANGE)
    t = (t - t[0]) / (t[-1] - t[0])
    zi = np.interp(np.linspace(0.0, 1.0, n_bins + 1), t, z)
    edges = 1.0 / (1.0 + np.exp(-zi))
    edges[0], edges[-1] = 0.0, 1.0
    return tuple(float(e) for e in edges)


def default_bin_edges(n_bins: int = DEFAULT_BINS) -> NDArray[np.float64]:
    """``n_bins + 1`` increasing edges from 0 to 1, dense near 0 and 1 (mixed prob/logit)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    return np.array(_default_edges_cached(int(n_bins)))


def _check_edges(edges: ArrayLike) -> NDArray[np.float64]:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.shape[0] < 3:
        raise ValueError(f"bin edges must be a 1-D array of at least 3 values, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("bin edges contain NaN or infinite values")
    if e[0] != 0.0 or e[-1] != 1.0:
        raise ValueError(f"bin edges must start at 0 and end at 1, got {e[0]!r} .. {e[-1]!r}")
    if not (np.diff(e) > 0).all():
        raise ValueError("bin edges must be strictly increasing")
    return e


def score_histogram(y_true: ArrayLike, scores: ArrayLike, bins: int | ArrayLike = DEFAULT_BINS) -> dict[str, list[Any]]:
    """Per-class counts of malignancy probabilities over fixed bin edges.

    ``bins`` is a bin count (default edges from :func:`default_bin_edges`) or an
    explicit edge array from 0 to 1; every site must use the same. Bins are
    ``[e_k, e_k+1)``, the last one closed so a score of exactly 1 is counted.
    Returns ``{"hist_edges": [float], "hist_pos": [int], "hist_neg": [int]}``.
    """
    y, s = check_binary_inputs(y_true, scores)
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        edges = default_bin_edges(int(bins))
    else:
        edges = _check_edges(bins)
    k = edges.shape[0] - 1
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, k - 1)
    pos = np.bincount(idx[y == 1], minlength=k)
    neg = np.bincount(idx[y == 0], minlength=k)
    return {
        KEY_EDGES: edges.tolist(),
        KEY_POS: [int(c) for c in pos],
        KEY_NEG: [int(c) for c in neg],
    }


def _counts(hist: Mapping[str, Any], key: str, k: int, where: str) -> NDArray[np.int64]:
    if key not in hist:
        raise ValueError(f"{where} has no {key!r}: expected keys {KEY_EDGES}, {KEY_POS}, {KEY_NEG}")
    c = np.asarray(hist[key], dtype=np.float64)
    if c.ndim != 1 or c.shape[0] != k:
        raise ValueError(f"{where} {key!r} must hold {k} counts (one per bin), got shape {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any() or (c != np.round(c)).any():
        raise ValueError(f"{where} {key!r} must contain non-negative integer counts")
    return c.astype(np.int64)


def _parse(hist: Mapping[str, Any], where: str) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    if not isinstance(hist, Mapping):
        raise ValueError(f"{where} must be a mapping from score_histogram, got {type(hist).__name__}")
    if KEY_EDGES not in hist:
        raise ValueError(f"{where} has no {KEY_EDGES!r}")
    edges = _check_edges(hist[KEY_EDGES])
    k = edges.shape[0] - 1
    return edges, _counts(hist, KEY_POS, k, where), _counts(hist, KEY_NEG, k, where)


def sum_histograms(hists: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Sum site histograms (same edges required) into one of the same layout."""
    if isinstance(hists, Mapping):
        hists = [hists]
    if len(hists) == 0:
        raise ValueError("hists is empty: need at least one site histogram")
    edges, pos, neg = _parse(hists[0], "hists[0]")
    pos, neg = pos.copy(), neg.copy()
    for i, h in enumerate(hists[1:], start=1):
        e, p, n = _parse(h, f"hists[{i}]")
        if e.shape != edges.shape or not np.allclose(e, edges, rtol=0.0, atol=_EDGE_ATOL):
            raise ValueError(
                f"hists[{i}] uses different bin edges than hists[0] "
                f"({e.shape[0] - 1} vs {edges.shape[0] - 1} bins); all sites must bin identically"
            )
        pos += p
        neg += n
    return {KEY_EDGES: edges.tolist(), KEY_POS: pos.tolist(), KEY_NEG: neg.tolist()}


def coarsen(hist_counts: ArrayLike, k: int) -> NDArray[np.int64]:
    """Sum adjacent bins of an n-bin count vector into ``k`` bins (``k`` must divide n).

    With the default edges this is exact: for k | n, ``default_bin_edges(k)`` are every
    (n/k)-th edge of ``default_bin_edges(n)`` (both are the same uniform grid in the
    transformed space, see ``_default_edges_cached``), so merging each run of n/k bins gives
    the histogram the site would have sent with k bins.
    """
    c = np.asarray(hist_counts, dtype=np.float64)
    if c.ndim != 1 or c.shape[0] == 0 or not np.isfinite(c).all() or (c < 0).any() or (c != np.round(c)).any():
        raise ValueError(
            f"hist_counts must be a non-empty 1-D vector of non-negative integer counts, got shape {c.shape}"
        )
    n = c.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or n % int(k):
        raise ValueError(f"cannot coarsen {n} bins into {k!r}: k must be a positive divisor of {n}")
    return c.astype(np.int64).reshape(int(k), n // int(k)).sum(axis=1)


def pool_histograms(hists: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Sum site histograms over the default edges whose resolutions may differ.

    A site may send fewer bins than the run's ``hist-bins`` (its privacy policy caps them;
    the count divides the run's). Every histogram is coarsened to the greatest common
    divisor g of the bin counts (:func:`coarsen`) and the sum is returned in the layout of
    :func:`score_histogram` with ``default_bin_edges(g)``, ready for
    :func:`pooled_auc_from_histograms` / :func:`auc_binning_bound`. Each histogram needs
    ``hist_pos`` and ``hist_neg`` of one length; ``hist_edges``, if given, must be the
    default edges of that length (explicit edges cannot be merged this way). Raises
    ValueError when the histograms share no resolution finer than one bin (g = 1).
    """
    if isinstance(hists, Mapping):
        hists = [hists]
    if len(hists) == 0:
        raise ValueError("hists is empty: need at least one site histogram")
    counts: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
    for i, h in enumerate(hists):
        where = f"hists[{i}]"
        if not isinstance(h, Mapping) or KEY_POS not in h or KEY_NEG not in h:
            raise ValueError(f"{where} must be a mapping with {KEY_POS!r} and {KEY_NEG!r}")
        k = len(h[KEY_POS])
        pos, neg = _counts(h, KEY_POS, k, where), _counts(h, KEY_NEG, k, where)
        if KEY_EDGES in h:
            e = _check_edges(h[KEY_EDGES])
            if e.shape[0] != k + 1 or not np.allclose(e, default_bin_edges(k), rtol=0.0, atol=_EDGE_ATOL):
                raise ValueError(f"{where} uses other edges than default_bin_edges({k}); only those can be pooled")
        counts.append((pos, neg))
    g = math.gcd(*(p.shape[0] for p, _ in counts))
    if g < 2:
        lengths = sorted({p.shape[0] for p, _ in counts})
        raise ValueError(f"histograms of {lengths} bins share no resolution finer than one bin")
    pos_sum = sum(coarsen(p, g) for p, _ in counts)
    neg_sum = sum(coarsen(n, g) for _, n in counts)
    return {
        KEY_EDGES: default_bin_edges(g).tolist(),
        KEY_POS: np.asarray(pos_sum).tolist(),
        KEY_NEG: np.asarray(neg_sum).tolist(),
    }


def _pooled_counts(
    hists: Sequence[Mapping[str, Any]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    total = sum_histograms(hists)
    pos = np.asarray(total[KEY_POS], dtype=np.float64)
    return pos, np.asarray(total[KEY_NEG], dtype=np.float64)


def pooled_auc_from_histograms(hists: Sequence[Mapping[str, Any]]) -> float:
    """Mann-Whitney AUC of the summed histograms; NaN if a class is absent overall."""
    pos, neg = _pooled_counts(hists)
    m, n = pos.sum(), neg.sum()
    if m == 0 or n == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (m * n))


def pooled_roc_from_histograms(
    hists: Sequence[Mapping[str, Any]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC points ``(fpr, tpr)`` of the summed histograms, from (0, 0) to (1, 1).

    One point per bin edge as the threshold falls from 1 to 0; the trapezoidal
    area under these points equals :func:`pooled_auc_from_histograms`.
    Both arrays are NaN-filled if a class is absent overall.
    """
    pos, neg = _pooled_counts(hists)
    m, n = pos.sum(), neg.sum()
    if m == 0 or n == 0:
        nan = np.full(pos.shape[0] + 1, np.nan)
        return nan, nan.copy()
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1])]) / m
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1])]) / n
    return fpr, tpr


def auc_binning_bound(hists: Sequence[Mapping[str, Any]]) -> float:
    """Worst-case |binned - raw| AUC: ``sum_k P_k Q_k / (2 n_pos n_neg)`` (module doc)."""
    pos, neg = _pooled_counts(hists)
    m, n = pos.sum(), neg.sum()
    if m == 0 or n == 0:
        return math.nan
    return float((pos * neg).sum() / (2.0 * m * n))


def _project_nonneg(c: NDArray[np.float64]) -> NDArray[np.float64]:
    """Closest non-negative vector with the same total (Norm-Sub, Wang et al. NDSS 2020).

    Plain clipping at 0 inflates every empty bin (~0.5 spurious count per bin at
    epsilon=1), which drags a pooled AUC towards 0.5; shifting all bins down by a
    common amount until the noisy total is restored removes most of that bias.
    """
    total = c.sum()
    if total <= 0:
        return np.zeros_like(c)
    u = np.sort(c)[::-1]
    css = np.cumsum(u)
    j = np.arange(1, c.shape[0] + 1)
    rho = int(np.flatnonzero(u - (css - total) / j > 0)[-1]) + 1
    return np.maximum(c - (css[rho - 1] - total) / rho, 0.0)


def _spread(counts: NDArray[np.int64], sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """Spread each group count as evenly as possible over its ``size`` fine bins."""
    out: list[NDArray[np.int64]] = []
    for c, g in zip(counts.tolist(), sizes.tolist()):
        part = np.full(g, c // g, dtype=np.int64)
        r = c % g
        if r:
            # Evenly spaced leftovers, so no end of the group is systematically favoured.
            part[((np.arange(r) + 0.5) * g / r).astype(np.int64)] += 1
        out.append(part)
    return np.concatenate(out)


def add_laplace_noise(
    hist: Mapping[str, Any],
    epsilon: float,
    rng: np.random.Generator,
    n_groups: int | None = 16,
) -> dict[str, list[Any]]:
    """Return an epsilon-DP copy of a site histogram (Laplace mechanism).

    Privacy unit: one sample, added or removed. It changes exactly one count in
    exactly one of the two class histograms by 1, so the L1 sensitivity of the
    joint ``(hist_pos, hist_neg)`` release is 1 and Laplace noise of scale
    ``1/epsilon`` per released count gives epsilon-DP. (If the neighbouring
    relation is *replacing* a sample, sensitivity is 2: pass half the budget.)

    Noise on each of 512 fine bins would swamp a few hundred samples (measured
    pooled-AUC bias about -0.25 at epsilon=1), so by default the fine bins are
    first merged into ``n_groups`` contiguous groups (sensitivity still 1), noised,
    made non-negative with the total preserved (:func:`_project_nonneg`), rounded,
    and spread back evenly over the fine bins so the result still sums with other
    sites' histograms. Everything after the noise is post-processing and costs no
    privacy. ``n_groups=None`` noises every bin. Edges are public and unchanged.
    """
    eps = float(epsilon)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"epsilon must be a finite positive number, got {epsilon!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    edges, pos, neg = _parse(hist, "hist")
    k = pos.shape[0]
    if n_groups is None:
        n_groups = k
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or not (1 <= n_groups <= k):
        raise ValueError(f"n_groups must be an integer in [1, {k}] or None, got {n_groups!r}")
    sizes = np.array([len(a) for a in np.array_split(np.arange(k), int(n_groups))], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def noisy(c: NDArray[np.int64]) -> list[int]:
        grouped = np.add.reduceat(c, starts).astype(np.float64)
        released = grouped + rng.laplace(0.0, 1.0 / eps, size=grouped.shape[0])
        rounded = np.rint(_project_nonneg(released)).astype(np.int64)
        return [int(v) for v in _spread(rounded, sizes)]

    return {KEY_EDGES: edges.tolist(), KEY_POS: noisy(pos), KEY_NEG: noisy(neg)}
