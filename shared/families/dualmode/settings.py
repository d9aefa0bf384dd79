"""The dualmode family's run settings (seed 003): a fixed box around the lesion."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings


@dataclass(frozen=True)
class DualModeSettings(Settings):
    box_size: int = 256
    box_jitter: float = 0.05  # max shift of the box per axis, as a fraction of its side

    def check(self, bad: Bad) -> None:
        if self.box_size < 1:
            raise bad("box_size", "must be at least 1")
        if not 0 <= self.box_jitter < 0.5:
            raise bad("box_jitter", "must be in [0, 0.5)")
