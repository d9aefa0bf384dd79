"""Building the configured model: the one place that maps a RunConfig to a network."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig

from .multiview import MultiViewFusionNet, use_channels_last


def build_model(cfg: RunConfig) -> nn.Module:
    """The configured network; with DP on (``cfg.dp``), its Opacus-compatible form (GroupNorm for
    BatchNorm, no in-place ops), built the same way by the coordinator and every site."""
    model = _build(cfg)
    if cfg.dp != "off":
        from fedbreast.shared.training.dp import prepare_dp_model

        model = prepare_dp_model(model)
    return model


def _build(cfg: RunConfig) -> nn.Module:
    if cfg.model == "multiview":
        return use_channels_last(MultiViewFusionNet(
            backbone=cfg.backbone,
            in_channels=cfg.in_channels,
            view_fusion=cfg.view_fusion,
            head=cfg.head,
            weights_path=cfg.weights_path or None,
            image_hw=(cfg.image_h, cfg.image_w),
        ))
    weights = cfg.weights_path or None
    if cfg.model == "birads":
        from .birads import BiradsEncoder, BiradsNet

        return BiradsNet(
            backbone=cfg.backbone,
            birads_dim=BiradsEncoder(cfg.birads_group_list).dim,
            birads_fusion=cfg.birads_fusion,
            decision_fusion=cfg.decision_fusion,
            alpha=cfg.fusion_alpha,
            weights_path=weights,
        )
    if cfg.model == "dualmode":
        from .dualmode import DualModeNet

        return DualModeNet(backbone=cfg.backbone, weights_path=weights)
    if cfg.model == "mgus":
        from .mgus import MammoUSNet

        return MammoUSNet(backbone=cfg.backbone, descriptor_dim=cfg.descriptor_dim, loss=cfg.mgus_loss,
                          cosface_scale=cfg.cosface_scale, cosface_margin=cfg.cosface_margin, weights_path=weights)
    if cfg.model == "latefusion":
        from .latefusion import LateFusionNet

        return LateFusionNet(backbone=cfg.backbone, weights_path=weights)
    raise ValueError(f"model {cfg.model!r} is not built by this version")
