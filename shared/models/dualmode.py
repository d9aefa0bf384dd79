"""Seed 003: the dual-mode network (D2TL) for CEM lesions.

Two backbones, one per mode: low energy (LE) and recombined / dual-energy subtracted
(DES). The CC and MLO boxes of a mode go through that mode's backbone; their features
are concatenated (the seed's 2 x 2048 = 4096-d vector), passed through an abstraction
layer (dropout + FC to ``abstract_dim``, 512 in the seed), the two modes' outputs are
concatenated and a dropout + FC layer gives the malignancy logit. The seed's InceptionV3
is any registry backbone here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones import build_backbone


class DualModeNet(nn.Module):
    """(B, 2 views [CC, MLO], 2 modes [LE, DES], S, S) -> (B,) logits."""

    def __init__(
        self, backbone: str = "resnet18", abstract_dim: int = 512, dropout: float = 0.5, weights_path: str | None = None
    ) -> None:
        super().__init__()
        self.in_channels = 1
        self.le, feat = build_backbone(backbone, 1, weights_path)
        self.des, _ = build_backbone(backbone, 1, weights_path)
        self.abstract_le = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * feat, abstract_dim), nn.ReLU())
        self.abstract_des = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * feat, abstract_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * abstract_dim, 1))

    def _mode(self, net: nn.Module, abstract: nn.Module, views: Tensor) -> Tensor:
        b = views.shape[0]
        f = net(views.reshape(b * 2, 1, *views.shape[-2:]))  # CC and MLO in one pass
        return abstract(f.reshape(b, -1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 2 or x.shape[2] != 2:
            raise ValueError(f"DualModeNet expects (B, 2 views, 2 modes LE/DES, S, S), got {tuple(x.shape)}")
        le = self._mode(self.le, self.abstract_le, x[:, :, 0])
        des = self._mode(self.des, self.abstract_des, x[:, :, 1])
        return self.head(torch.cat([le, des], dim=1)).squeeze(1)
