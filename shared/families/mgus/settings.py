"""The mgus family's run settings (seed 002): mammography + ultrasound lesion crops."""

from __future__ import annotations

from dataclasses import dataclass

from fedbreast.shared.families.base import Bad, Settings

MGUS_TRAININGS = ("two-step", "end-to-end")
MGUS_LOSSES = ("bce", "cosface")  # cosface: the large-margin cosine loss
MGUS_FUSION_LAYERS = (3, 7)  # FC layers of the fusion network, its output layer included


def fusion_hidden(layers: int, descriptor_dim: int) -> tuple[int, ...]:
    """The fusion network's hidden widths (the input is the 2 x ``descriptor_dim`` concatenation).

    3 layers (the default, the earlier runs'): 1024 -> 256 -> 64 -> 1. 7 layers (seed 002's
    "multimodal fully connected network, consisting of 7 layers"; the text gives no widths, its
    Fig. 4 is not in it): six hidden layers halving from the descriptor width,
    1024 -> 512 -> 256 -> 128 -> 64 -> 32 -> 16 -> 1 for 512-d descriptors."""
    if layers == 3:
        return (256, 64)
    if layers == 7:
        return tuple(max(1, descriptor_dim >> k) for k in range(6))
    raise ValueError(f"mgus fusion layers must be one of {MGUS_FUSION_LAYERS}, got {layers}")


@dataclass(frozen=True)
class MgusSettings(Settings):
    crop_size: int = 224
    descriptor_dim: int = 512
    mgus_training: str = "two-step"  # two-step | end-to-end
    mgus_modality_rounds: int = 2  # two-step: rounds of modality networks before the fusion network
    mgus_loss: str = "bce"  # bce | cosface (large-margin cosine)
    cosface_scale: float = 16.0
    cosface_margin: float = 0.2
    mgus_fusion_layers: int = 3  # 3 (1024-256-64-1) | 7 (seed 002's depth): fusion_hidden

    def check(self, bad: Bad) -> None:
        for name, choices in (("mgus_training", MGUS_TRAININGS), ("mgus_loss", MGUS_LOSSES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        for name in ("crop_size", "descriptor_dim"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.mgus_fusion_layers not in MGUS_FUSION_LAYERS:
            raise bad("mgus_fusion_layers", f"must be one of {', '.join(map(str, MGUS_FUSION_LAYERS))}")
        if self.mgus_modality_rounds < 0:
            raise bad("mgus_modality_rounds", "must not be negative")
        if self.cosface_scale <= 0 or not 0 <= self.cosface_margin < 1:
            raise bad("cosface_margin", "needs cosface-scale > 0 and a margin in [0, 1)")
