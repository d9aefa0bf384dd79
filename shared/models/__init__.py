"""fedbreast: shared/models: backbone registry and the multi-view fusion network."""

from .backbones import (
    DEFAULT_BACKBONE,
    FeatureExtractor,
    SmallCNN,
    WeightsFileError,
    available_backbones,
    build_backbone,
    replace_inplace_relu,
)
from .multiview import (
    BREAST_ORDER,
    VGG_FC_DIMS,
    VIEW_ORDER,
    MultiViewFusionNet,
    count_parameters,
    faithful_vgg_report,
    float_state_keys,
    mean_probability_logit,
    model_nbytes,
    nonfloat_state_keys,
)

__all__ = [
    "BREAST_ORDER",
    "DEFAULT_BACKBONE",
    "VGG_FC_DIMS",
    "VIEW_ORDER",
    "FeatureExtractor",
    "MultiViewFusionNet",
    "SmallCNN",
    "WeightsFileError",
    "available_backbones",
    "build_backbone",
    "count_parameters",
    "faithful_vgg_report",
    "float_state_keys",
    "mean_probability_logit",
    "model_nbytes",
    "nonfloat_state_keys",
    "replace_inplace_relu",
]
