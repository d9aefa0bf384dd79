"""The late-fusion network from the run config."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.latefusion import LateFusionNet


def build(cfg: RunConfig) -> nn.Module:
    return LateFusionNet(backbone=cfg.backbone, weights_path=cfg.weights_path or None)
