"""Binary classification metrics for malignancy scores.

Every site computes these at every evaluation round, often on small or lopsided
validation splits, so degenerate cases (one class only, no predicted positives)
must yield NaN rather than raise or spam warnings: a NaN is aggregated away by
:func:`fedbreast.shared.metrics.aggregate.weighted_mean`, an exception kills the
round. Only malformed input (empty, wrong shape, labels other than 0/1, scores
outside [0, 1]) raises ``ValueError``.

Convention: a sample is predicted malignant when ``score >= threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BINARY_METRIC_KEYS",
    "CONFUSION_METRIC_KEYS",
    "auc_mann_whitney",
    "binary_metrics",
    "check_binary_inputs",
    "confusion_counts",
    "metrics_from_confusion",
    "midranks",
    "spec_at_sens100",
]

BINARY_METRIC_KEYS: tuple[str, ...] = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "mcc",
    "gmean",
    "spec_at_sens100",
    "brier",
    "n",
    "n_pos",
    "n_neg",
)

CONFUSION_METRIC_KEYS: tuple[str, ...] = (
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "f1",
    "mcc",
    "gmean",
)


def check_binary_inputs(
    y_true: ArrayLike, scores: ArrayLike, *, probabilities: bool = True
) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    """Validate and convert labels/scores to 1-D arrays (labels int8 0/1, scores float64).

    Raises ``ValueError`` naming the problem: empty input, non-1-D arrays, length
    mismatch, labels other than 0/1, non-finite scores, or (when ``probabilities``)
    scores outside [0, 1].
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"y_true and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("y_true and scores are empty: need at least one sample")
    if y.dtype == bool:
        y = y.astype(np.int8)
    elif not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true must be numeric 0/1 labels, got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(
            f"y_true must contain only 0 (benign/normal) and 1 (malignant); found {np.unique(y[bad])[:5].tolist()}"
        )
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if probabilities and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"scores must be malignancy probabilities in [0, 1]; got range [{s.min():.6g}, {s.max():.6g}]")
    return y.astype(np.int8), s


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return t


THRESHOLD_GRID = 64  # bins of the histogram grid a site's operating point is snapped to


def operating_threshold(
    y_true: ArrayLike, scores: ArrayLike, default: float = 0.5, grid: int | None = THRESHOLD_GRID
) -> float:
    """The score cut-off that maximises Youden's J (sensitivity + specificity - 1).

    Chosen on a site's validation split and applied to its test split, as a clinical
    operating point is: 0.5 on an uncalibrated model trained on imbalanced data can call
    every breast benign. ``default`` when the split lacks one of the classes.

    Youden's cut-off is one patient's exact score, and the site reports its threshold; so
    it is moved to the nearest edge of the ``grid``-bin histogram grid (the edges the pooled
    ROC uses), at or below the chosen score so the positives it caught stay caught.
    ``grid=None`` keeps the exact score (for analysis that never leaves the site).
    """
    from sklearn.metrics import roc_curve

    y, s = check_binary_inputs(y_true, scores)
    if y.min() == y.max():
        return default
    fpr, tpr, thresholds = roc_curve(y, s)
    best = int(np.argmax(tpr - fpr))
    exact = float(np.clip(thresholds[best], 0.0, 1.0))
    if grid is None:
        return exact
    from .histogram import default_bin_edges

    edges = default_bin_edges(grid)
    return float(edges[max(0, int(np.searchsorted(edges, exact, side="right")) - 1)])


def midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``x`` with ties given their average rank."""
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    # Ranks starts+1 .. ends share their mean.
    avg = (starts + ends + 1) / 2.0
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat(avg, ends - starts)
    return out


def auc_mann_whitney(y: NDArray[np.int8], s: NDArray[np.float64]) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count 1/2); NaN with one class."""
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = midranks(s)
    u = r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spec_at_sens100(y: NDArray[np.int8], s: NDArray[np.float64]) -> float:
    """Specificity at the highest threshold that still flags every malignancy.

    That threshold is the lowest positive score; negatives strictly below it are
    correctly cleared. NaN when either class is absent.
    """
    pos = s[y == 1]
    neg = s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    return float(np.count_nonzero(neg < pos.min()) / neg.size)


def confusion_counts(y_true: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """Return ``(tp, fp, tn, fn)`` with ``score >= threshold`` predicted malignant."""
    y, s = check_binary_inputs(y_true, scores)
    t = _check_threshold(threshold)
    pred = s >= t
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(np.count_nonzero(~pred & ~pos))
    return tp, fp, tn, fn


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    # Explicit NaN for a zero denominator; dividing by 1 there keeps numpy quiet.
    zero = den == 0
    return np.where(zero, np.nan, num / np.where(zero, 1.0, den))


def _confusion_metrics_array(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, NDArray[np.float64]]:
    """Vectorised :func:`metrics_from_confusion` (shared with the bootstrap)."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    # Products of four marginals overflow int64 on pooled counts; float64 is fine.
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "f1": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "mcc": _ratio(tp * tn - fp * fn, mcc_den),
        # NaN propagates from sens/spec without a warning (sqrt of NaN is silent).
        "gmean": np.sqrt(sens * spec),
    }


def metrics_from_confusion(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    """Threshold metrics from (possibly cross-site summed) confusion counts.

    Returns keys ``sensitivity, specificity, ppv, npv, accuracy, f1, mcc, gmean``;
    a metric whose denominator is zero is NaN (scikit-learn would return 0 for MCC,
    which is indistinguishable from a chance-level model).
    """
    counts = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {type(v).__name__}")
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{name} must be a finite non-negative count, got {v!r}")
    out = _confusion_metrics_array(tp, fp, tn, fn)
    return {k: float(out[k]) for k in CONFUSION_METRIC_KEYS}


def binary_metrics(y_true: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """All per-site evaluation metrics for malignancy probabilities.

    Keys (exactly :data:`BINARY_METRIC_KEYS`): ``auc, accuracy, sensitivity,
    specificity, ppv, npv, f1, mcc, gmean, spec_at_sens100, brier, n, n_pos,
    n_neg``. ``n``, ``n_pos``, ``n_neg`` are ints so they can serve as weights.
    """
    y, s = check_binary_inputs(y_true, scores)
    t = _check_threshold(threshold)
    pred = s >= t
    pos = y == 1
    tp = np.count_nonzero(pred & pos)
    fp = np.count_nonzero(pred & ~pos)
    fn = np.count_nonzero(~pred & pos)
    tn = np.count_nonzero(~pred & ~pos)
    conf = _confusion_metrics_array(tp, fp, tn, fn)
    n_pos = int(pos.sum())
    out: dict[str, float] = {
        "auc": auc_mann_whitney(y, s),
        **{k: float(v) for k, v in conf.items()},
        "spec_at_sens100": spec_at_sens100(y, s),
        "brier": float(np.mean((s - y) ** 2)),
        "n": int(y.shape[0]),
        "n_pos": n_pos,
        "n_neg": int(y.shape[0] - n_pos),
    }
    return {k: out[k] for k in BINARY_METRIC_KEYS}
