"""Server-side aggregation hooks more than one family uses (numpy only: runs at the coordinator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedbreast.shared.config import RunConfig


def average_where_trained(
    cfg: RunConfig,
    before: dict[str, np.ndarray],
    aggregated: dict[str, np.ndarray],
    updates: list[tuple[dict[str, np.ndarray], Mapping[str, Any]]],
) -> dict[str, np.ndarray]:
    """Per-tensor FedAvg over only the sites that changed the tensor.

    A site that cannot train a branch (no ultrasound, no CESM) sends it back unchanged;
    plain FedAvg would then pull that branch's update towards zero by the share of such
    sites' examples. For FedAvg / FedProx, a tensor that some but not all sites changed is
    re-averaged (``num-examples`` weights) over those that changed it. Other strategies
    (robust or adaptive aggregation) keep their own result.
    """
    if cfg.strategy not in ("fedavg", "fedprox") or len(updates) < 2:
        return aggregated
    out = dict(aggregated)
    weights = [float(m.get("num-examples", 0)) for _, m in updates]
    for key, ref in before.items():
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        changed = [(a[key], w) for (a, _), w in zip(updates, weights) if key in a and not np.array_equal(a[key], ref)]
        total = sum(w for _, w in changed)
        if 0 < len(changed) < len(updates) and total > 0:
            mean = sum(a.astype(np.float64) * w for a, w in changed) / total
            assert isinstance(mean, (np.ndarray, np.generic))  # changed is not empty (0-d arrays give a scalar)
            out[key] = mean.astype(ref.dtype)
    return out
