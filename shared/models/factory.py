"""Building the configured model: the family's builder, plus DP's form when DP is on."""

from __future__ import annotations

from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import family_of


def build_model(cfg: RunConfig) -> nn.Module:
    """The configured network; with DP on (``cfg.dp``) or ``norm = group``, its Opacus-compatible
    form (GroupNorm for BatchNorm, no in-place ops), built the same way by the coordinator and every site."""
    if not cfg.group_norm and cfg.weights_path:
        from fedbreast.shared.models.backbones import weights_file_norm

        if weights_file_norm(cfg.weights_path) == "group":
            # The sites build the BatchNorm model and receive the coordinator's weights: the keys would differ.
            raise ConfigError(
                f"weights-path = {cfg.weights_path!r} was pretrained for DP (GroupNorm, fedbreast pretrain "
                "--norm group); use it with dp = local or central or norm = group, or pretrain with --norm batch"
            )
    model = family_of(cfg.model).build_model(cfg)
    if cfg.group_norm:
        from fedbreast.shared.training.dp import prepare_dp_model

        model = prepare_dp_model(model)
    return model
