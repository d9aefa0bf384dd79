"""Multi-view, bilateral fusion network for CEM / FFDM exams (Qian et al. 2023, seed 001).

One CNN with shared weights encodes the four views of an exam. For each breast and
view, its own features are concatenated with the contralateral breast's features of
the same view (own first), then CC and MLO are fused either by averaging the per-view
predicted probabilities ("average", the paper's decision fusion, Fig. 2b) or by
concatenating the features into one classifier ("concat", Fig. 2c). "single" is the
paper's no-fusion baseline: the same CNN and one linear head score every view image on
its own, and a breast's probability is the mean of its CC and MLO probabilities (no
left-right and no CC-MLO feature fusion). "left-right" is the paper's left-right fusion
model: one linear head scores every view image from [its features, the contralateral
breast's features of the same view] (no CC-MLO fusion), and a breast's probability is
again the mean of its CC and MLO probabilities.

Seed 001 trains in two stages: first the CNN alone on every LE/DES image pair, then the
whole fusion network from that CNN. ``cnn_head=True`` adds the first stage's per-image
classifier (``cnn_head``, one linear layer on a view image's own features; under "single"
its ``view_head`` is that classifier already) and :meth:`~MultiViewFusionNet.view_logits`
scores each view image with it; the forward pass never uses it, so it only adds tensors.

The paper's 2-way softmax over (benign, malignant) is re-parametrised as a single
logit per breast: softmax([a, b])[1] == sigmoid(b - a), so a 1-output FC is exactly as
expressive and pairs with ``BCEWithLogitsLoss``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbreast.shared.config import HEADS, VIEW_FUSIONS  # one list each, also the run config's choices

from .backbones import DEFAULT_BACKBONE, build_backbone

VIEW_ORDER: tuple[str, str, str, str] = ("LCC", "LMLO", "RCC", "RMLO")
BREAST_ORDER: tuple[str, str] = ("L", "R")

# Widths of the FC stack after the flattened VGG16 map in the authors' released code
# (github.com/anne226/MF_MODEL, models/vgg.py); the first layer is the ~268M-param one.
VGG_FC_DIMS: tuple[int, ...] = (4096, 1024, 512)
_VGG_POOLS = 5  # stride-2 max-pools in VGG16: the map is (H // 32, W // 32)


def _vgg_feature_hw(image_hw: tuple[int, ...]) -> tuple[int, int]:
    h, w = image_hw
    fh, fw = h >> _VGG_POOLS, w >> _VGG_POOLS
    if fh < 1 or fw < 1:
        raise ValueError(f"image {image_hw} is too small for VGG16 (needs >= 32 x 32)")
    return fh, fw


class MultiViewFusionNet(nn.Module):
    """(B, 4, C, H, W) exam in :data:`VIEW_ORDER` -> (B, 2) malignancy logits (left, right).

    ``head="pooled"``: backbone features are globally pooled (small model, any backbone).
    ``head="vgg_fc"``: paper-faithful: the VGG16-BN map is flattened into FC layers of
    widths :data:`VGG_FC_DIMS`; needs ``backbone="vgg16_bn"`` and a fixed ``image_hw``.
    ``dropout`` acts on the per-view embeddings (pooled) or after every hidden FC
    (vgg_fc; the authors' code uses 0.5 there).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        in_channels: int = 2,
        view_fusion: str = "average",
        head: str = "pooled",
        weights_path: str | os.PathLike[str] | None = None,
        dropout: float = 0.0,
        image_hw: tuple[int, int] = (512, 256),
        cnn_head: bool = False,
    ) -> None:
        super().__init__()
        if view_fusion not in VIEW_FUSIONS:
            raise ValueError(f"view_fusion must be one of {VIEW_FUSIONS}, got {view_fusion!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if head == "vgg_fc" and backbone != "vgg16_bn":
            raise ValueError(f"head='vgg_fc' is the paper's VGG16 variant; needs backbone='vgg16_bn', got {backbone!r}")
        self.backbone_name = backbone
        self.in_channels = in_channels
        self.channels_last = False  # set by use_channels_last(); NHWC convs are faster on oneDNN and tensor cores
        self.split_views = False  # set by DP-SGD: one backbone call per view, so the batch axis is always exams
        self.view_fusion = view_fusion
        self.head_kind = head
        self.image_hw = tuple(image_hw) if head == "vgg_fc" else None

        extractor, feat_dim = build_backbone(backbone, in_channels, weights_path)
        if head == "pooled":
            self.backbone: nn.Module = extractor
            self.embed: nn.Module = nn.Dropout(dropout)
            self.embed_dim = feat_dim
        else:
            assert self.image_hw is not None  # set for head="vgg_fc"
            fh, fw = _vgg_feature_hw(self.image_hw)
            self.backbone = extractor.body  # spatial map, no global pooling
            layers: list[nn.Module] = [nn.Flatten(1)]
            d_in = feat_dim * fh * fw
            for d_out in VGG_FC_DIMS:
                layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
                d_in = d_out
            self.embed = nn.Sequential(*layers)
            self.embed_dim = VGG_FC_DIMS[-1]

        pair_dim = 2 * self.embed_dim  # [own breast, contralateral breast] of one view
        if view_fusion == "single":
            # One FC for every view image: a view never sees another view's features.
            self.view_head = nn.Linear(self.embed_dim, 1)
        elif view_fusion == "left-right":
            # One FC for every view image on [own, contralateral] of its view: no CC-MLO fusion.
            self.pair_head = nn.Linear(pair_dim, 1)
        elif view_fusion == "average":
            # One FC per view, shared by both breasts so that the model is left/right symmetric.
            self.cc_head = nn.Linear(pair_dim, 1)
            self.mlo_head = nn.Linear(pair_dim, 1)
        else:
            self.head = nn.Linear(2 * pair_dim, 1)
        if cnn_head and view_fusion != "single":
            self.cnn_head = nn.Linear(self.embed_dim, 1)  # two-stage training's per-image classifier

    def image_head(self) -> nn.Module | None:
        """The per-image classifier of two-stage training's first stage (:meth:`view_logits`)."""
        if self.view_fusion == "single":
            return self.view_head
        head = getattr(self, "cnn_head", None)
        return head if isinstance(head, nn.Module) else None

    def fusion_modules(self) -> list[nn.Module]:
        """The layers over the per-view embeddings that only the fusion network uses (none under
        "single"): two-stage training holds them as initialised while the CNN trains alone."""
        names = {"single": (), "left-right": ("pair_head",), "average": ("cc_head", "mlo_head"), "concat": ("head",)}
        return [getattr(self, n) for n in names[self.view_fusion]]

    def two_stage_held(self, cnn_stage: bool) -> list[nn.Module]:
        """What a round of two-stage training holds as it is: the fusion layers while the CNN
        trains alone (``cnn_stage``), then the per-image head, which the fusion network does not
        use (none under "single", whose ``view_head`` is both; none without ``cnn_head``)."""
        if cnn_stage:
            return self.fusion_modules()
        head = self.image_head()
        return [head] if head is not None and self.view_fusion != "single" else []

    def view_logits(self, x: Tensor) -> Tensor:
        """(B, 4, C, H, W) -> (B, 4) logits of each view image on its own (:data:`VIEW_ORDER`),
        by the per-image classifier (:meth:`image_head`): two-stage training's first stage."""
        head = self.image_head()
        if head is None:
            raise ValueError(f"view_logits needs cnn_head=True (view_fusion={self.view_fusion!r})")
        z: Tensor = head(self.embeddings(x)).squeeze(-1)
        return z

    def embeddings(self, x: Tensor) -> Tensor:
        """(B, 4, C, H, W) -> (B, 4, E): the shared CNN's features of each view image."""
        if x.dim() != 5 or x.shape[1] != len(VIEW_ORDER) or x.shape[2] != self.in_channels:
            raise ValueError(
                f"expected (B, 4, {self.in_channels}, H, W) in view order {VIEW_ORDER}, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if self.image_hw is not None and tuple(x.shape[-2:]) != self.image_hw:
            raise ValueError(f"vgg_fc head was built for {self.image_hw} images, got {tuple(x.shape[-2:])}")
        # One backbone call over all views: better batching than four calls, and BN
        # statistics see the whole exam batch exactly as with four weight-shared CNNs.
        if self.split_views:
            # Opacus' per-sample gradients follow the batch axis of each layer call; with the
            # views folded into it they would be per image, and DP's unit is the exam.
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            emb = torch.stack([self.embed(self.backbone(v.contiguous(memory_format=fmt))) for v in x.unbind(1)], 1)
        else:
            views = x.flatten(0, 1)
            if self.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            emb = self.embed(self.backbone(views)).view(b, len(VIEW_ORDER), -1)
        return emb

    def forward(self, x: Tensor) -> Tensor:
        emb = self.embeddings(x)
        if self.view_fusion == "single":
            z = self.view_head(emb).squeeze(-1)  # (B, 4) per-view logits in VIEW_ORDER
            return torch.stack((mean_probability_logit(z[:, 0], z[:, 1]), mean_probability_logit(z[:, 2], z[:, 3])), 1)
        lcc, lmlo, rcc, rmlo = emb.unbind(1)
        # (B, 2 breasts, 2E): own breast first, contralateral second.
        cc = torch.stack((torch.cat((lcc, rcc), 1), torch.cat((rcc, lcc), 1)), 1)
        mlo = torch.stack((torch.cat((lmlo, rmlo), 1), torch.cat((rmlo, lmlo), 1)), 1)
        if self.view_fusion == "concat":
            return self.head(torch.cat((cc, mlo), -1)).squeeze(-1)
        if self.view_fusion == "left-right":
            return mean_probability_logit(self.pair_head(cc).squeeze(-1), self.pair_head(mlo).squeeze(-1))
        return mean_probability_logit(self.cc_head(cc).squeeze(-1), self.mlo_head(mlo).squeeze(-1))


def mean_probability_logit(z1: Tensor, z2: Tensor) -> Tensor:
    """Logit of (sigmoid(z1) + sigmoid(z2)) / 2, computed in log space.

    The paper averages the per-view probabilities; returning their logit keeps a single
    ``BCEWithLogitsLoss``/``sigmoid`` interface without overflow at large |z|.
    """
    log_p = torch.logaddexp(F.logsigmoid(z1), F.logsigmoid(z2))
    log_q = torch.logaddexp(F.logsigmoid(-z1), F.logsigmoid(-z2))
    return log_p - log_q


def _state(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def float_state_keys(model_or_state: nn.Module | Mapping[str, Tensor]) -> list[str]:
    """State keys to average in FedAvg: floating tensors (weights, BN running stats).

    The rest (:func:`nonfloat_state_keys`, i.e. BatchNorm ``num_batches_tracked``,
    int64) must not be averaged as floats; take them as-is (or sum them).
    """
    return [k for k, v in _state(model_or_state).items() if v.is_floating_point()]


def nonfloat_state_keys(model_or_state: nn.Module | Mapping[str, Tensor]) -> list[str]:
    """State keys holding integer/bool tensors, to be carried over rather than averaged."""
    return [k for k, v in _state(model_or_state).items() if not v.is_floating_point()]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the full state_dict with floats as fp32: one FedAvg transfer in one direction.

    Includes BN buffers, which FedAvg ships too; integer buffers count at their own size.
    """
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in model.state_dict().values())


def _head_params(embed_dim: int, view_fusion: str) -> int:
    pair = 2 * embed_dim
    if view_fusion == "single":
        return embed_dim + 1
    if view_fusion == "left-right":
        return pair + 1
    return 2 * (pair + 1) if view_fusion == "average" else 2 * pair + 1


def _summary(params: int, nbytes: int) -> dict[str, Any]:
    return {"params": params, "bytes_per_round": nbytes, "mib_per_round": nbytes / 2**20}


def faithful_vgg_report(
    image_hw: tuple[int, int] = (512, 256), in_channels: int = 2, view_fusion: str = "average"
) -> dict[str, Any]:
    """Size of the paper-faithful ``vgg_fc`` model vs pooled variants, without allocating it.

    The faithful count is computed from layer shapes (VGG16-BN config "D"); the pooled
    variants are instantiated on the meta device (shapes only, no memory).
    ``bytes_per_round`` is the fp32 state_dict a FedAvg round ships in each direction.
    """
    if view_fusion not in VIEW_FUSIONS:
        raise ValueError(f"view_fusion must be one of {VIEW_FUSIONS}, got {view_fusion!r}")
    from torchvision.models import vgg as tv_vgg

    fh, fw = _vgg_feature_hw(image_hw)
    conv = bn = bn_buffers = n_bn = 0
    c = in_channels
    for v in tv_vgg.cfgs["D"]:
        if v == "M":
            continue
        conv += c * v * 9 + v  # 3x3 kernel + bias
        bn += 2 * v  # affine weight and bias
        bn_buffers += 2 * v  # running mean and var
        n_bn += 1  # one int64 num_batches_tracked each
        c = int(v)
    flat = c * fh * fw
    dims = (flat, *VGG_FC_DIMS)
    fc = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    head = _head_params(VGG_FC_DIMS[-1], view_fusion)
    params = conv + bn + fc + head
    faithful = _summary(params, 4 * (params + bn_buffers) + 8 * n_bn)
    faithful.update(
        flat_dim=flat,
        feature_hw=(fh, fw),
        conv_bn_params=conv + bn,
        fc1_params=flat * VGG_FC_DIMS[0] + VGG_FC_DIMS[0],
        fc_params=fc,
        head_params=head,
    )

    def pooled(backbone: str) -> dict[str, Any]:
        with torch.device("meta"):
            m = MultiViewFusionNet(backbone, in_channels, view_fusion=view_fusion)
        return {"backbone": backbone, **_summary(count_parameters(m), model_nbytes(m))}

    return {
        "image_hw": tuple(image_hw),
        "in_channels": in_channels,
        "view_fusion": view_fusion,
        "faithful_vgg_fc": faithful,
        "pooled_vgg16_bn": pooled("vgg16_bn"),
        "pooled_default": pooled(DEFAULT_BACKBONE),
    }


def use_channels_last(model: nn.Module) -> nn.Module:
    """Switch weights and the per-view input to NHWC (channels_last) memory format."""
    model.to(memory_format=torch.channels_last)
    if isinstance(model, MultiViewFusionNet):
        model.channels_last = True
    return model
