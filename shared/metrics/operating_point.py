"""Operating points from score histograms: a federated cut-off, and thresholded metrics at it.

A site's own cut-off (:func:`~fedbreast.shared.metrics.classification.operating_threshold`,
Youden's J on its validation split) is as good as that split is large: six validation exams
can put it anywhere. The coordinator can do better without seeing a score: every site sends
per-class validation-score histograms over the shared default edges (as it sends its test
histograms, client/app.py), the coordinator sums them, and picks the bin edge that maximises
Youden's J on the pooled counts. That edge is also an edge of every site's test histogram
(both are pooled at a common resolution, :func:`common_bins`), so each site's confusion counts
at it are exact: a test unit is called malignant when its score is at or above the edge, which
is exactly "its bin index is at or above the edge's index" (bins are ``[e_k, e_k+1)``).

Edges only from ``0`` to ``e_{k-1}``: the top edge 1.0 is not a cut-off a histogram can
resolve (a score of exactly 1 falls in the last, closed bin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .classification import CONFUSION_METRIC_KEYS, metrics_from_confusion
from .histogram import KEY_NEG, KEY_POS, coarsen, default_bin_edges

__all__ = [
    "common_bins",
    "federated_operating_point",
    "metrics_at_edge",
    "youden_edge",
]


def _pair(hist_pos: ArrayLike, hist_neg: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    pos = np.asarray(hist_pos, dtype=np.float64)
    neg = np.asarray(hist_neg, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.shape[0] < 2:
        raise ValueError(f"need two count vectors of one length >= 2, got shapes {pos.shape} and {neg.shape}")
    for name, c in (("hist_pos", pos), ("hist_neg", neg)):
        if not np.isfinite(c).all() or (c < 0).any() or (c != np.round(c)).any():
            raise ValueError(f"{name} must hold non-negative integer counts")
    return pos.astype(np.int64), neg.astype(np.int64)


def youden_edge(hist_pos: ArrayLike, hist_neg: ArrayLike) -> tuple[int, float] | None:
    """The edge index ``i`` (cut-off ``default_bin_edges(k)[i]``, k bins) that maximises Youden's J
    = sensitivity + specificity - 1 on these counts, and that J; None when a class is absent.

    Ties go to the highest edge, as a site's own rule does (sklearn's first maximum over falling
    thresholds, snapped down to the grid): the cut-off sits just below the lowest positive it
    still catches.
    """
    pos, neg = _pair(hist_pos, hist_neg)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    k = pos.shape[0]
    # Edge i (0 .. k-1) calls bins i .. k-1 malignant.
    tp = np.cumsum(pos[::-1])[::-1]  # positives in bins >= i
    fp = np.cumsum(neg[::-1])[::-1]
    j = tp / n_pos - fp / n_neg
    best = int(np.flatnonzero(j >= j.max() - 1e-12)[-1])
    assert 0 <= best < k
    return best, float(j[best])


def metrics_at_edge(hist_pos: ArrayLike, hist_neg: ArrayLike, index: int) -> dict[str, float]:
    """Thresholded metrics (keys CONFUSION_METRIC_KEYS, plus tp, fp, tn, fn) of one histogram pair at
    edge ``index``: exact for the raw scores, since a score is at or above edge i iff its bin is."""
    pos, neg = _pair(hist_pos, hist_neg)
    if isinstance(index, bool) or not 0 <= int(index) < pos.shape[0]:
        raise ValueError(f"edge index {index!r} is not in [0, {pos.shape[0] - 1}]")
    i = int(index)
    tp, fn = int(pos[i:].sum()), int(pos[:i].sum())
    fp, tn = int(neg[i:].sum()), int(neg[:i].sum())
    out: dict[str, float] = dict(metrics_from_confusion(tp, fp, tn, fn))
    out.update(tp=tp, fp=fp, tn=tn, fn=fn)
    return out


def common_bins(lengths: Sequence[int]) -> int:
    """The finest resolution every histogram can be coarsened to exactly (their gcd); ValueError
    below 2 bins (no cut-off but 0 could be chosen)."""
    g = math.gcd(*(int(n) for n in lengths)) if lengths else 0
    if g < 2:
        raise ValueError(f"histograms of {sorted(set(lengths))} bins share no resolution finer than one bin")
    return g


def federated_operating_point(
    val: Mapping[str, Mapping[str, Any]], test: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The federated cut-off from the sites' validation histograms (site -> {hist_pos, hist_neg}),
    and each site's test metrics at it from its own test histogram.

    Returns ``(pooled, per_site)``: ``pooled`` has ``threshold`` (a default bin edge), ``youden_j``,
    ``bins`` (the common resolution), ``val_n_pos``, ``val_n_neg``, ``val_sites``; ``per_site``
    maps a site with a test histogram to :func:`metrics_at_edge` plus ``threshold``. Histograms
    with no count are left out of the resolution (a site with an empty split sends one of few bins).
    ValueError when no pooled validation histogram has both classes, or the resolutions share none.
    """
    nonempty_val = {s: h for s, h in val.items() if sum(h[KEY_POS]) + sum(h[KEY_NEG]) > 0}
    nonempty_test = {s: h for s, h in test.items() if sum(h[KEY_POS]) + sum(h[KEY_NEG]) > 0}
    if not nonempty_val:
        raise ValueError("no site sent a validation histogram with any count")
    g = common_bins([len(h[KEY_POS]) for h in (*nonempty_val.values(), *nonempty_test.values())])
    pos = sum((coarsen(h[KEY_POS], g) for h in nonempty_val.values()), np.zeros(g, dtype=np.int64))
    neg = sum((coarsen(h[KEY_NEG], g) for h in nonempty_val.values()), np.zeros(g, dtype=np.int64))
    chosen = youden_edge(pos, neg)
    if chosen is None:
        raise ValueError(
            f"the pooled validation histograms hold {int(pos.sum())} malignant and {int(neg.sum())} benign "
            "units: Youden's J needs both"
        )
    index, j = chosen
    threshold = float(default_bin_edges(g)[index])
    pooled = {
        "threshold": threshold,
        "youden_j": j,
        "bins": g,
        "val_n_pos": int(pos.sum()),
        "val_n_neg": int(neg.sum()),
        "val_sites": len(nonempty_val),
    }
    per_site = {}
    for site, h in test.items():
        if site in nonempty_test:
            m = metrics_at_edge(coarsen(h[KEY_POS], g), coarsen(h[KEY_NEG], g), index)
        else:  # an empty test split: every metric undefined
            m = {k: math.nan for k in CONFUSION_METRIC_KEYS} | {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        per_site[site] = {**m, "threshold": threshold}
    return pooled, per_site
