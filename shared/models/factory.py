"""Building the configured model: the one place that maps a RunConfig to a network."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig

from .multiview import MultiViewFusionNet, use_channels_last


def build_model(cfg: RunConfig) -> nn.Module:
    if cfg.model == "multiview":
        return use_channels_last(MultiViewFusionNet(
            backbone=cfg.backbone,
            in_channels=cfg.in_channels,
            view_fusion=cfg.view_fusion,
            head=cfg.head,
            weights_path=cfg.weights_path or None,
            image_hw=(cfg.image_h, cfg.image_w),
        ))
    raise ValueError(f"model {cfg.model!r} is not built by this version")
