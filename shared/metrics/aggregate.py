"""Server-side aggregation of per-site metric dicts (e.g. Flower MetricRecords as mappings).

Sites report NaN for metrics that are undefined on their split (one class only,
no predicted positives); those sites are left out of that metric's mean rather
than poisoning it. Privacy budgets compose by the worst site, so they are
aggregated by max, never averaged: averaging would under-report privacy loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_MAX_KEYS", "DEFAULT_SUM_KEYS", "max_aggregate", "weighted_mean"]

DEFAULT_SUM_KEYS: tuple[str, ...] = ("n", "n_pos", "n_neg")
DEFAULT_MAX_KEYS: tuple[str, ...] = ("dp_epsilon", "dp_delta", "epsilon", "delta")


def _scalar(v: Any) -> float | None:
    """Float value of a real scalar, None for anything else (lists, strings, bools)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


def max_aggregate(metric_dicts: Sequence[Mapping[str, Any]], key: str) -> float:
    """Max of ``key`` over the sites that report it (NaN ignored, +inf kept).

    +inf is kept because a site with an unbounded epsilon makes the federation's
    guarantee unbounded too. NaN if no site reports a number for ``key``.
    """
    if len(metric_dicts) == 0:
        raise ValueError("metric_dicts is empty: need at least one site's metrics")
    vals: list[float] = []
    for i, d in enumerate(metric_dicts):
        if key not in d:
            continue
        v = _scalar(d[key])
        if v is None:
            raise ValueError(f"metric_dicts[{i}][{key!r}] must be a real number, got {d[key]!r}")
        if not math.isnan(v):
            vals.append(v)
    return max(vals) if vals else math.nan


def weighted_mean(
    metric_dicts: Sequence[Mapping[str, Any]],
    weight_key: str = "n",
    sum_keys: Collection[str] = DEFAULT_SUM_KEYS,
    max_keys: Collection[str] = DEFAULT_MAX_KEYS,
) -> dict[str, float]:
    """Per-key mean of site metrics weighted by ``weight_key``, ignoring NaN.

    Keys in ``sum_keys`` and ``weight_key`` itself are summed (counts), keys in
    ``max_keys`` are max-aggregated (privacy budgets). Non-scalar values (e.g.
    histogram lists) are skipped; combine those with
    :func:`fedbreast.shared.metrics.histogram.sum_histograms`. A metric that is
    NaN at every site (or has zero total weight) comes out NaN.
    """
    if len(metric_dicts) == 0:
        raise ValueError("metric_dicts is empty: need at least one site's metrics")
    weights: list[float] = []
    for i, d in enumerate(metric_dicts):
        if weight_key not in d:
            raise ValueError(f"metric_dicts[{i}] has no weight key {weight_key!r}")
        w = _scalar(d[weight_key])
        if w is None or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"metric_dicts[{i}][{weight_key!r}] must be a finite non-negative number, got {d[weight_key]!r}"
            )
        weights.append(w)

    keys = list(dict.fromkeys(k for d in metric_dicts for k in d))
    out: dict[str, float] = {}
    for key in keys:
        if key in max_keys:
            out[key] = max_aggregate(metric_dicts, key)
            continue
        num = den = 0.0
        total = 0.0
        seen = False
        for d, w in zip(metric_dicts, weights):
            v = _scalar(d.get(key))
            if v is None or math.isnan(v):
                continue
            seen = True
            total += v
            num += w * v
            den += w
        if not seen:
            # Skip list-valued keys entirely; an all-NaN scalar key stays visible as NaN.
            if any(_scalar(d.get(key)) is not None for d in metric_dicts):
                out[key] = math.nan
            continue
        if key == weight_key or key in sum_keys:
            out[key] = int(total) if total.is_integer() else total  # counts stay ints
        else:
            out[key] = num / den if den > 0 else math.nan
    return out
