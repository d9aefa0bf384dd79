"""Seed 004: modality-view late fusion (Rofena et al.).

One CNN per (modality, view) slot: FFDM-CC, FFDM-MLO, CESM-CC, CESM-MLO. Their malignancy
probabilities are fused by MCC-weighted averages, first across the views of a modality,
then across modalities. The six weights (four slots, two modalities) are a buffer of the
model, ``fusion_mcc``: the server sets them from validation confusion counts summed over
sites (sites send counts, never scores), so the global model carries its own fusion.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedbreast.shared.families.latefusion.fusion import FUSION_UNITS, MODALITIES, SLOTS, mcc_from_counts, mcc_weights

from .backbones import build_backbone

__all__ = ["FUSION_UNITS", "MODALITIES", "SLOTS", "LateFusionNet", "mcc_from_counts", "mcc_weights"]


def _weighted(p: Tensor, w: Tensor, avail: Tensor) -> tuple[Tensor, Tensor]:
    """MCC-weighted mean over the last dim among available entries; equal weights if all are 0."""
    a = avail.float()
    ww = w.float().expand_as(p) * a
    zero = ww.sum(-1, keepdim=True) <= 0
    ww = torch.where(zero, a, ww)
    den = ww.sum(-1)
    out = (p * ww).sum(-1) / den.clamp_min(1e-12)
    return out, den > 0


class LateFusionNet(nn.Module):
    """(B, 4 slots, 1, H, W) + available (B, 4) -> slot logits (B, 4); :meth:`fuse` -> (B,) probability."""

    fusion_mcc: Tensor  # a buffer (register_buffer below)

    def __init__(self, backbone: str = "resnet18", weights_path: str | None = None) -> None:
        super().__init__()
        self.in_channels = 1
        self.nets = nn.ModuleDict()
        for slot in SLOTS:
            body, feat = build_backbone(backbone, 1, weights_path)
            self.nets[slot] = nn.Sequential(body, nn.Linear(feat, 1))
        self.register_buffer("fusion_mcc", torch.ones(len(FUSION_UNITS)))

    def forward(self, x: Tensor, available: Tensor | None = None) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 4:
            raise ValueError(f"LateFusionNet expects (B, 4 slots, 1, H, W), got {tuple(x.shape)}")
        outs = []
        for k, slot in enumerate(SLOTS):
            xs = x[:, k]
            if available is not None and not bool(available[:, k].any()):
                outs.append(torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))  # nothing to score
                continue
            outs.append(self.nets[slot](xs).squeeze(1))
        return torch.stack(outs, dim=1)

    def modality_probs(self, p_slots: Tensor, available: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 2) view-fused probabilities per modality and (B, 2) whether each has an image."""
        w = self.fusion_mcc
        pm, am = [], []
        for m in range(2):
            p, a = _weighted(p_slots[:, 2 * m : 2 * m + 2], w[2 * m : 2 * m + 2], available[:, 2 * m : 2 * m + 2])
            pm.append(p)
            am.append(a)
        return torch.stack(pm, 1), torch.stack(am, 1)

    def fuse(self, p_slots: Tensor, available: Tensor) -> Tensor:
        """Views first (per modality), then modalities, both MCC-weighted."""
        pm, am = self.modality_probs(p_slots, available)
        p, _ = _weighted(pm, self.fusion_mcc[4:6], am)
        return p
