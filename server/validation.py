"""Checking a site's model update before it is aggregated.

One NaN or one mis-shaped tensor would poison the global model for every site, so each
update is compared with the global model it was trained from: same keys, same shapes,
same dtypes, finite values, and (optionally) an update norm within a bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class UpdateProblem:
    site: str
    reason: str

    def __str__(self) -> str:
        return f"update from site {self.site} dropped: {self.reason}"


def check_update(
    site: str,
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_update_norm: float | None = None,
) -> UpdateProblem | None:
    """Return why ``update`` must be dropped, or None if it is sound."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s) e.g. {extra[:3]}")
        return UpdateProblem(site, "; ".join(parts))
    sq_norm = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return UpdateProblem(site, f"tensor {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if arr.dtype != ref.dtype:
            return UpdateProblem(site, f"tensor {key!r} has dtype {arr.dtype}, expected {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                return UpdateProblem(site, f"tensor {key!r} has {bad} non-finite value(s) (NaN or inf)")
            diff = arr.astype(np.float64) - ref
            sq_norm += float(np.vdot(diff, diff))
    if max_update_norm is not None and sq_norm**0.5 > max_update_norm:
        return UpdateProblem(site, f"update norm {sq_norm ** 0.5:.3g} exceeds the bound {max_update_norm:.3g}")
    return None
