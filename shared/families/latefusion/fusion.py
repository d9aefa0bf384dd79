"""Late fusion's weights from the sites' validation confusion counts (numpy only: the
coordinator runs this; the network that uses the weights is shared/models/latefusion.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SLOTS = ("ffdm_cc", "ffdm_mlo", "cesm_cc", "cesm_mlo")
MODALITIES = ("ffdm", "cesm")
# Rows of the confusion table the sites send: the four slots, then the two view-fused modalities.
FUSION_UNITS = SLOTS + MODALITIES


def mcc_from_counts(tp: float, fp: float, tn: float, fn: float) -> float:
    """Matthews correlation coefficient; 0 when undefined (a row or column of the table is empty)."""
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return float((tp * tn - fp * fn) / np.sqrt(den)) if den > 0 else 0.0


def mcc_weights(counts: Sequence[Sequence[float]]) -> np.ndarray:
    """Fusion weights from summed confusion counts, one row (tp, fp, tn, fn) per :data:`FUSION_UNITS`.

    The weight of a unit is its validation MCC, floored at 0 (a sub-model no better than
    chance gets no say). The fusion falls back to a plain mean where a group's weights are all 0.
    """
    rows = np.asarray(counts, dtype=np.float64).reshape(len(FUSION_UNITS), 4)
    return np.array([max(mcc_from_counts(*r), 0.0) for r in rows], dtype=np.float32)


def after_evaluate(
    arrays: dict[str, np.ndarray], metrics: list[Mapping[str, Any]]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The global model's ``fusion_mcc`` buffer from the sum of the sites' ``val_confusion``
    counts (sites send counts, never scores), and the weights as aggregate metrics."""
    tables = [np.asarray(mt["val_confusion"], dtype=np.float64) for mt in metrics if "val_confusion" in mt]
    if not tables:
        return arrays, {}
    weights = mcc_weights(np.sum(tables, axis=0))
    out = dict(arrays)
    out["fusion_mcc"] = weights.astype(arrays["fusion_mcc"].dtype).reshape(arrays["fusion_mcc"].shape)
    return out, {f"fusion_mcc_{u}": float(w) for u, w in zip(FUSION_UNITS, weights)}
