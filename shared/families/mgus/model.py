"""The mammography + ultrasound network from the run config."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.families.mgus.settings import fusion_hidden
from fedbreast.shared.models.mgus import MammoUSNet


def build(cfg: RunConfig) -> nn.Module:
    return MammoUSNet(
        backbone=cfg.backbone,
        descriptor_dim=cfg.descriptor_dim,
        loss=cfg.mgus_loss,
        cosface_scale=cfg.cosface_scale,
        cosface_margin=cfg.cosface_margin,
        fusion_hidden=fusion_hidden(cfg.mgus_fusion_layers, cfg.descriptor_dim),
        weights_path=cfg.weights_path or None,
    )
