"""Checking a site's model update before it is aggregated.

One NaN or one mis-shaped tensor would poison the global model for every site, so each
update is compared with the global model it was trained from: same keys, same shapes,
same dtypes, finite values, and (optionally) an update norm within a bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
        return UpdateProblem(site, f"update norm {sq_norm**0.5:.3g} exceeds the bound {max_update_norm:.3g}")
    return None


def delta_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the change of the floating-point tensors (integer buffers are counters)."""
    sq = 0.0
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = update[key].astype(np.float64) - ref
            sq += float(np.vdot(diff, diff))
    return sq**0.5


def clip_to_median_norm(
    updates: list[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], bound: float
) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, float, float]]]:
    """Scale every update whose change exceeds ``bound`` x the median change norm back to that limit.

    A site that scales its update (model replacement) cannot then outweigh the honest ones,
    and its direction still counts: with honest norms alike, the clipped update is about the
    honest one. The median needs a majority of honest sites. Returns the updates (clipped
    copies where needed) and (index, norm, limit) for each clipped one.
    """
    norms = [delta_norm(u, reference) for u in updates]
    limit = bound * float(np.median(norms)) if norms else 0.0
    return _clip(updates, reference, norms, limit, limit)


def clip_to_norm(
    updates: list[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], limit: float, rtol: float = 1e-3
) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, float, float]]]:
    """Scale every update whose change exceeds ``limit`` (an absolute norm) back to it.

    Central DP's noise assumes every site clipped its change to dp-max-grad-norm; the
    coordinator enforces it, so the guarantee does not rest on each site's honesty. ``rtol``
    leaves alone an honest site whose float32 clip landed a hair above the limit (a
    no-op clip would still change the model's last bits). Returns as clip_to_median_norm.
    """
    norms = [delta_norm(u, reference) for u in updates]
    return _clip(updates, reference, norms, limit * (1.0 + rtol), limit)


def _clip(
    updates: list[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    norms: list[float],
    allowed: float,
    limit: float,
) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, float, float]]]:
    """Scale each update whose change norm exceeds ``allowed`` to ``limit``."""
    out: list[dict[str, np.ndarray]] = []
    clipped: list[tuple[int, float, float]] = []
    for i, (u, n) in enumerate(zip(updates, norms)):
        if n <= allowed or n == 0.0:
            out.append(dict(u))
            continue
        f = limit / n
        out.append(
            {
                k: (ref + f * (u[k].astype(np.float64) - ref)).astype(u[k].dtype)
                if np.issubdtype(ref.dtype, np.floating)
                else u[k]
                for k, ref in reference.items()
            }
        )
        clipped.append((i, n, limit))
    return out, clipped
