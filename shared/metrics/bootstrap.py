"""Confidence intervals (stratified percentile bootstrap) and DeLong's paired AUC test.

The bootstrap runs on every site at every evaluation, so it never loops over
replicates in Python. Each replicate is represented by how many times it draws
each distinct score value, per class (a ``(replicates, distinct values)`` count
matrix); AUC, confusion counts, Brier score and specificity at 100% sensitivity
all follow from cumulative sums of those counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .classification import (
    BINARY_METRIC_KEYS,
    _confusion_metrics_array,
    binary_metrics,
    check_binary_inputs,
    midranks,
)

__all__ = ["BOOTSTRAP_METRICS", "bootstrap_ci", "delong_test", "delong_variance"]

# n / n_pos / n_neg are fixed under stratified resampling, so they have no CI.
BOOTSTRAP_METRICS: tuple[str, ...] = tuple(k for k in BINARY_METRIC_KEYS if k not in ("n", "n_pos", "n_neg"))

# Upper bound on replicates x distinct values held in memory at once (~16 MB per
# int64 matrix), so large validation sets are processed in replicate chunks.
_MAX_CELLS = 2_000_000


def _class_counts(rng: np.random.Generator, codes: NDArray[np.intp], n_rep: int, n_codes: int) -> NDArray[np.float64]:
    """Per-replicate multiplicity of each distinct score, resampling ``codes`` with replacement."""
    m = codes.shape[0]
    if m == 0:
        return np.zeros((n_rep, n_codes))
    draws = codes[rng.integers(0, m, size=(n_rep, m))]
    flat = (np.arange(n_rep)[:, None] * n_codes + draws).ravel()
    return np.bincount(flat, minlength=n_rep * n_codes).reshape(n_rep, n_codes).astype(np.float64)


def _replicate_metrics(
    w_pos: NDArray[np.float64],
    w_neg: NDArray[np.float64],
    values: NDArray[np.float64],
    k_thr: int,
    wanted: Sequence[str],
) -> dict[str, NDArray[np.float64]]:
    """Metrics for each row of the count matrices (rows = replicates)."""
    n_rep = w_pos.shape[0]
    m = w_pos[0].sum() if n_rep else 0.0
    n = w_neg[0].sum() if n_rep else 0.0
    out: dict[str, NDArray[np.float64]] = {}
    neg_below = np.cumsum(w_neg, axis=1) - w_neg  # negatives strictly below each value
    if "auc" in wanted:
        if m > 0 and n > 0:
            out["auc"] = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1) / (m * n)
        else:
            out["auc"] = np.full(n_rep, np.nan)
    if "spec_at_sens100" in wanted:
        if m > 0 and n > 0:
            k_min = np.argmax(w_pos > 0, axis=1)  # lowest positive score per replicate
            out["spec_at_sens100"] = neg_below[np.arange(n_rep), k_min] / n
        else:
            out["spec_at_sens100"] = np.full(n_rep, np.nan)
    if "brier" in wanted:
        sq = (w_pos * (1.0 - values) ** 2 + w_neg * values**2).sum(axis=1)
        out["brier"] = sq / (m + n)
    conf_keys = [k for k in wanted if k not in out]
    if conf_keys:
        tp = w_pos[:, k_thr:].sum(axis=1)
        fp = w_neg[:, k_thr:].sum(axis=1)
        conf = _confusion_metrics_array(tp, fp, n - fp, m - tp)
        out.update({k: conf[k] for k in conf_keys})
    return out


def bootstrap_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    metrics: Sequence[str] = ("auc", "sensitivity", "specificity", "spec_at_sens100"),
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float, float]]:
    """Stratified percentile-bootstrap CIs: ``{metric: (point, lo, hi)}``.

    Positives and negatives are resampled separately (each replicate keeps the
    observed class sizes), so AUC is defined in every replicate. ``point`` is the
    metric on the original data. Replicates where a metric is undefined (e.g. PPV
    with no predicted positives) are dropped from its percentiles; if all are,
    ``lo``/``hi`` are NaN. With a single class the threshold metrics of that class
    still get CIs, class-pair metrics (AUC, MCC, ...) are NaN.
    """
    y, s = check_binary_inputs(y_true, scores)
    if isinstance(metrics, str):
        metrics = (metrics,)
    wanted = list(dict.fromkeys(metrics))
    if not wanted:
        raise ValueError("metrics is empty: name at least one metric")
    unknown = [k for k in wanted if k not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown bootstrap metric(s) {unknown}; choose from {BOOTSTRAP_METRICS}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    point = binary_metrics(y, s, threshold=threshold)  # also validates threshold

    values, codes = np.unique(s, return_inverse=True)
    codes = codes.ravel()
    n_codes = values.shape[0]
    k_thr = int(np.searchsorted(values, float(threshold), side="left"))  # first value >= t
    pos_codes, neg_codes = codes[y == 1], codes[y == 0]

    rng = np.random.default_rng(seed)
    chunk = max(1, min(int(n_boot), _MAX_CELLS // max(n_codes, y.shape[0])))
    parts: dict[str, list[NDArray[np.float64]]] = {k: [] for k in wanted}
    done = 0
    while done < n_boot:
        b = min(chunk, int(n_boot) - done)
        w_pos = _class_counts(rng, pos_codes, b, n_codes)
        w_neg = _class_counts(rng, neg_codes, b, n_codes)
        for k, v in _replicate_metrics(w_pos, w_neg, values, k_thr, wanted).items():
            parts[k].append(v)
        done += b

    q = [alpha / 2.0, 1.0 - alpha / 2.0]
    result: dict[str, tuple[float, float, float]] = {}
    for k in wanted:
        reps = np.concatenate(parts[k])
        reps = reps[~np.isnan(reps)]
        if reps.size == 0:
            lo = hi = math.nan
        else:
            lo, hi = (float(v) for v in np.quantile(reps, q))
        result[k] = (float(point[k]), lo, hi)
    return result


def _delong_components(
    y: NDArray[np.int8], s: NDArray[np.float64]
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """AUC and the structural components V10 (per positive), V01 (per negative).

    Fast DeLong (Sun & Xu 2014): all placements come from three midrank passes
    instead of the O(m*n) Heaviside kernel.
    """
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.shape[0], neg.shape[0]
    tz = midranks(np.concatenate([pos, neg]))
    tx, ty = midranks(pos), midranks(neg)
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:m] - tx) / n  # fraction of negatives each positive beats
    v01 = 1.0 - (tz[m:] - ty) / m  # fraction of positives that beat each negative
    return float(auc), v10, v01


def _check_delong_classes(y: NDArray[np.int8]) -> None:
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives; got {n_pos} and {n_neg}")


def delong_variance(y_true: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """``(auc, variance)`` of one AUC by DeLong's method. Scores may be any real values."""
    y, s = check_binary_inputs(y_true, scores, probabilities=False)
    _check_delong_classes(y)
    auc, v10, v01 = _delong_components(y, s)
    var = np.var(v10, ddof=1) / v10.shape[0] + np.var(v01, ddof=1) / v01.shape[0]
    return auc, float(var)


def delong_test(y_true: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> tuple[float, float, float, float]:
    """DeLong's test for two correlated AUCs on the same cases: ``(auc_a, auc_b, z, p)``.

    ``z = (auc_a - auc_b) / sd`` using the paired covariance; ``p`` is two-sided.
    When the difference has zero variance (e.g. identical scores) ``p`` is 1 if
    the AUCs are equal, else 0 with ``z = ±inf``.
    """
    y, sa = check_binary_inputs(y_true, scores_a, probabilities=False)
    _, sb = check_binary_inputs(y_true, scores_b, probabilities=False)
    _check_delong_classes(y)
    auc_a, v10_a, v01_a = _delong_components(y, sa)
    auc_b, v10_b, v01_b = _delong_components(y, sb)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / v10_a.shape[0] + s01 / v01_a.shape[0]
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = auc_a - auc_b
    if var <= 0.0:
        if diff == 0.0:
            return auc_a, auc_b, 0.0, 1.0
        return auc_a, auc_b, math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(var)
    return auc_a, auc_b, float(z), math.erfc(abs(z) / math.sqrt(2.0))
