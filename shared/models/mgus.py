"""Seed 002: mammography + ultrasound lesion classification (Hadad et al.).

One backbone per modality ends in a ``descriptor_dim`` (512 in the seed) descriptor,
through a projection when the backbone's width differs; each modality has its own output
layer. A fully connected fusion network classifies the concatenated descriptors.
Training is two-step (modality networks, then the fusion network on frozen descriptors)
or end-to-end (the sum of the three losses). The loss is BCE or the large margin cosine
loss (CosFace, Wang et al. 2018), as in the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbreast.shared.families.mgus.settings import MGUS_LOSSES

from .backbones import build_backbone


class CosineHead(nn.Module):
    """Two-class cosine classifier: logits s * cos(theta_j) of L2-normalised features and weights."""

    def __init__(self, dim: int, scale: float = 16.0, margin: float = 0.2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, dim) * 0.01)
        self.scale, self.margin = float(scale), float(margin)

    def cosines(self, f: Tensor) -> Tensor:
        return F.linear(F.normalize(f.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def forward(self, f: Tensor) -> Tensor:
        """The malignancy log-odds at inference: s * (cos_malignant - cos_benign)."""
        c = self.cosines(f)
        return self.scale * (c[:, 1] - c[:, 0])


def cosface_loss(cos: Tensor, y: Tensor, scale: float, margin: float, reduction: str = "mean") -> Tensor:
    """Large margin cosine loss: CE over s * (cos_j - m [j = y]) (CosFace, eq. 4).

    ``cos`` (B, C) cosines between normalised features and class weights; ``y`` (B,) class ids.
    """
    y = y.long()
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(scale * (cos - margin * onehot), y, reduction=reduction)


class Branch(nn.Module):
    """Backbone -> descriptor (projection + ReLU when widths differ) -> per-modality head."""

    def __init__(
        self, backbone: str, dim: int, loss: str, scale: float, margin: float, weights_path: str | None
    ) -> None:
        super().__init__()
        self.net, feat = build_backbone(backbone, 1, weights_path)
        self.project = nn.Identity() if feat == dim else nn.Sequential(nn.Linear(feat, dim), nn.ReLU())
        self.head: nn.Module = CosineHead(dim, scale, margin) if loss == "cosface" else nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.net(x))

    def logit(self, d: Tensor) -> Tensor:
        out = self.head(d)
        return out if isinstance(self.head, CosineHead) else out.squeeze(1)


class MammoUSNet(nn.Module):
    """mg (B, 1, S, S), us (B, 1, S, S) -> descriptors and three logits (mg, us, fused)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        descriptor_dim: int = 512,
        loss: str = "bce",
        cosface_scale: float = 16.0,
        cosface_margin: float = 0.2,
        fusion_hidden: tuple[int, ...] = (256, 64),
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if loss not in MGUS_LOSSES:
            raise ValueError(f"loss must be one of {MGUS_LOSSES}, got {loss!r}")
        self.in_channels = 1
        self.loss_kind = loss
        self.mg = Branch(backbone, descriptor_dim, loss, cosface_scale, cosface_margin, weights_path)
        self.us = Branch(backbone, descriptor_dim, loss, cosface_scale, cosface_margin, weights_path)
        layers: list[nn.Module] = []
        width = 2 * descriptor_dim
        for h in fusion_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(0.3)]
            width = h
        self.fusion_body = nn.Sequential(*layers)
        self.fusion_head: nn.Module = (
            CosineHead(width, cosface_scale, cosface_margin) if loss == "cosface" else nn.Linear(width, 1)
        )

    def fusion_logit_and_features(self, d_mg: Tensor, d_us: Tensor) -> tuple[Tensor, Tensor]:
        h = self.fusion_body(torch.cat([d_mg, d_us], dim=1))
        out = self.fusion_head(h)
        return (out if isinstance(self.fusion_head, CosineHead) else out.squeeze(1)), h

    def forward(self, mg: Tensor, us: Tensor) -> dict[str, Tensor]:
        d_mg, d_us = self.mg(mg), self.us(us)
        fused, h = self.fusion_logit_and_features(d_mg, d_us)
        return {
            "d_mg": d_mg,
            "d_us": d_us,
            "h": h,
            "mg": self.mg.logit(d_mg),
            "us": self.us.logit(d_us),
            "fused": fused,
        }

    def head_loss(self, head: nn.Module, features: Tensor, logit: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Mean loss of one classifier over the masked samples (0 when none)."""
        mask = mask.float()
        if isinstance(head, CosineHead):
            per = cosface_loss(head.cosines(features), y, head.scale, head.margin, reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(logit.float(), y.float(), reduction="none")
        return (per * mask).sum() / mask.sum().clamp_min(1.0)
