"""The multi-view network from the run config."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.multiview import MultiViewFusionNet, use_channels_last


def build(cfg: RunConfig) -> nn.Module:
    return use_channels_last(
        MultiViewFusionNet(
            backbone=cfg.backbone,
            in_channels=cfg.in_channels,
            view_fusion=cfg.view_fusion,
            head=cfg.head,
            weights_path=cfg.weights_path or None,
            dropout=cfg.head_dropout,
            image_hw=(cfg.image_h, cfg.image_w),
            cnn_head=cfg.multiview_cnn_rounds > 0,  # two-stage training's per-image head
        )
    )
