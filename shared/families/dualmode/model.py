"""The dual-mode network from the run config."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.dualmode import DualModeNet


def build(cfg: RunConfig) -> nn.Module:
    return DualModeNet(backbone=cfg.backbone, weights_path=cfg.weights_path or None)
