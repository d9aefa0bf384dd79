"""Building the configured model: the family's builder, plus DP's form when DP is on."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.families import family_of


def build_model(cfg: RunConfig) -> nn.Module:
    """The configured network; with DP on (``cfg.dp``), its Opacus-compatible form (GroupNorm for
    BatchNorm, no in-place ops), built the same way by the coordinator and every site."""
    model = family_of(cfg.model).build_model(cfg)
    if cfg.dp != "off":
        from fedbreast.shared.training.dp import prepare_dp_model

        model = prepare_dp_model(model)
    return model
