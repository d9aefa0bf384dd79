"""The mgus family's run settings (seed 002): mammography + ultrasound lesion crops."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

MGUS_TRAININGS = ("two-step", "end-to-end")
MGUS_LOSSES = ("bce", "cosface")  # cosface: the large-margin cosine loss


@dataclass(frozen=True)
class MgusSettings(Settings):
    crop_size: int = 224
    descriptor_dim: int = 512
    mgus_training: str = "two-step"  # two-step | end-to-end
    mgus_modality_rounds: int = 2  # two-step: rounds of modality networks before the fusion network
    mgus_loss: str = "bce"  # bce | cosface (large-margin cosine)
    cosface_scale: float = 16.0
    cosface_margin: float = 0.2

    def check(self, bad: Bad) -> None:
        for name, choices in (("mgus_training", MGUS_TRAININGS), ("mgus_loss", MGUS_LOSSES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        for name in ("crop_size", "descriptor_dim"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.mgus_modality_rounds < 0:
            raise bad("mgus_modality_rounds", "must not be negative")
        if self.cosface_scale <= 0 or not 0 <= self.cosface_margin < 1:
            raise bad("cosface_margin", "needs cosface-scale > 0 and a margin in [0, 1)")
