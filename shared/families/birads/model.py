"""The BI-RADS patch network from the run config."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.birads import BiradsEncoder, BiradsNet


def build(cfg: RunConfig) -> nn.Module:
    return BiradsNet(
        backbone=cfg.backbone,
        birads_dim=BiradsEncoder(cfg.birads_group_list).dim,
        birads_fusion=cfg.birads_fusion,
        decision_fusion=cfg.decision_fusion,
        alpha=cfg.fusion_alpha,
        weights_path=cfg.weights_path or None,
    )
