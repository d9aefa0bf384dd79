"""Do the heatmaps point at the lesion? Two standard checks on images with outlined lesions.

* pointing game (Zhang et al., 2016): a hit when the heatmap's maximum lies inside the lesion
  (its peak: the centre of the maximal pixels, one pixel for a smooth map);
* energy inside: the fraction of the heatmap's total mass that falls inside the lesion.

The random-heatmap baseline is exact, not sampled: a heatmap of i.i.d. random values puts its
maximum on any pixel with equal probability and, in expectation, the same mass on every pixel,
so both its hit rate and its energy inside equal the lesion's area fraction of the image.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .heatmap import ViewHeatmap


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heatmap's maximum: the centre of the pixels at the maximum, so a map
    with a plateau (a patch score map's top window) points at its middle, not at a corner,
    and a plateau cannot "hit" by touching the lesion at one edge."""
    rows, cols = np.nonzero(heat >= heat.max())
    return int(round(float(rows.mean()))), int(round(float(cols.mean())))


def pointing_hit(heat: np.ndarray, lesion: np.ndarray) -> bool:
    """The heatmap's peak (:func:`peak`) inside the lesion."""
    return bool(lesion[peak(heat)])


def energy_inside(heat: np.ndarray, lesion: np.ndarray) -> float:
    total = float(heat.sum())
    return float(heat[lesion].sum()) / total if total > 0 else float(lesion.mean())


@dataclass
class PointingScore:
    images: int = 0
    hits: int = 0
    energy: float = 0.0  # sum over images
    area: float = 0.0  # sum of lesion area fractions: the random baseline's hit rate and energy

    def add(self, hm: ViewHeatmap) -> None:
        if hm.lesion is None or not hm.lesion.any():
            return
        self.images += 1
        self.hits += pointing_hit(hm.heat, hm.lesion)
        self.energy += energy_inside(hm.heat, hm.lesion)
        self.area += float(hm.lesion.mean())

    def as_dict(self) -> dict[str, float | int | None]:
        """Means over the images with an outlined lesion (None without any: JSON has no NaN)."""
        n = self.images

        def mean(total: float) -> float | None:
            return total / n if n else None

        return {
            "images": n,
            "hit_rate": mean(self.hits),
            "energy_inside": mean(self.energy),
            "random_hit_rate": mean(self.area),
            "random_energy_inside": mean(self.area),
        }


def pointing_score(heatmaps: Iterable[ViewHeatmap]) -> PointingScore:
    score = PointingScore()
    for hm in heatmaps:
        score.add(hm)
    return score


__all__ = ["PointingScore", "energy_inside", "peak", "pointing_hit", "pointing_score"]
