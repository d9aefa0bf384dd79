"""Backbone registry: torchvision CNNs as globally pooled feature extractors.

Every backbone is rebuilt for an arbitrary number of input channels (1 for FFDM,
2 for CEM low-energy + dual-energy-subtracted). ImageNet weights are never
downloaded: they are read only from a local torchvision ``state_dict`` file that
the user names, and the 3-channel stem is folded into the new channel count.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedbreast.shared.errors import FedbreastError


def _tvm():
    """torchvision.models, imported on first use: importing it pulls in torch._dynamo (about
    1.7 s), paid by every deployment message's fresh ClientApp process even for small CNNs."""
    from torchvision import models

    return models


DEFAULT_BACKBONE = "resnet18"


class WeightsFileError(FedbreastError, ValueError):
    """A local weights file cannot be used; the message names the file and the reason."""


class FeatureExtractor(nn.Module):
    """``body`` (B, C, H, W) -> (B, feat_dim, h, w), then global average pooling -> (B, feat_dim).

    ``body`` stays reachable on its own for heads that need the spatial map
    (the paper-faithful VGG16 FC head flattens it instead of pooling).
    """

    def __init__(self, name: str, body: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.name = name
        self.feat_dim = feat_dim
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.min_px = MIN_INPUT_PX.get(name, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.min_px and not torch.jit.is_tracing():  # export traces a checked size
            check_input_size(self.name, x.shape[-2], x.shape[-1])
        return self.flatten(self.pool(self.body(x)))


class SmallCNN(nn.Module):
    """Four stride-2 conv+BN+ReLU blocks; for tests and CPU smoke runs, not for accuracy."""

    widths = (16, 32, 64, 64)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[tuple[str, nn.Module]] = []
        c_in = in_channels
        for i, c_out in enumerate(self.widths):
            blocks.append(
                (
                    f"block{i}",
                    nn.Sequential(
                        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                        nn.BatchNorm2d(c_out),
                        nn.ReLU(inplace=True),
                    ),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(OrderedDict(blocks))
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class RawNetBody(nn.Module):
    """Seed 000's RawNet convolutions: five conv+BN+ReLU layers and three max-pools.

    The seed gives the layer counts and about 240K parameters in all; the widths here are
    ours, chosen so that with its two FC layers (:class:`fedbreast.shared.models.birads.BiradsNet`,
    FC1 128 -> 256) the whole network has about 240K parameters.
    """

    widths = (24, 48, 64, 96, 128)

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(self.widths):
            k, stride = (5, 2) if i == 0 else (3, 1)
            layers += [
                nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i in (0, 2, 4):
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def _kaiming_init(module: nn.Module) -> None:
    # Same scheme torchvision uses for VGG/ResNet, so the fast paths below match it.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _vgg16_bn_features() -> tuple[nn.Module, int]:
    # Building torchvision's full VGG16 allocates and initialises a 120M-parameter
    # classifier that is thrown away; build only the conv stack (same layers and keys).
    from torchvision.models import vgg as tv_vgg

    features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=True)
    _kaiming_init(features)
    return features, 512


def _in_features(m: nn.Module, target: str) -> int:
    """``in_features`` of the classifier layer ``target`` (a dotted submodule path: "fc", "classifier.1")."""
    fc = m.get_submodule(target)
    assert isinstance(fc, nn.Linear)
    return fc.in_features


def _resnet_body(m: nn.Module) -> tuple[nn.Module, int]:
    keep = [(n, c) for n, c in m.named_children() if n not in ("avgpool", "fc")]
    return nn.Sequential(OrderedDict(keep)), _in_features(m, "fc")


def _children_body(*drop: str) -> Callable[[nn.Module], tuple[nn.Module, int]]:
    """The full model's children in order, less ``drop`` (pooling, dropout, classifier, aux
    heads): for inception_v3 and googlenet, whose registration order is their forward order."""

    def body(m: nn.Module) -> tuple[nn.Module, int]:
        keep = [(n, c) for n, c in m.named_children() if n not in (*drop, "avgpool", "dropout", "fc")]
        return nn.Sequential(OrderedDict(keep)), _in_features(m, "fc")

    return body


def _densenet_body(m: nn.Module) -> tuple[nn.Module, int]:
    # torchvision applies a functional ReLU after norm5; make it a module (no inplace).
    body = nn.Sequential(OrderedDict(features=m.get_submodule("features"), relu=nn.ReLU()))
    return body, _in_features(m, "classifier")


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]  # full 3-channel model, randomly initialised
    body: Callable[[nn.Module], tuple[nn.Module, int]]  # full model -> (spatial body, feat_dim)
    fast_body: Callable[[], tuple[nn.Module, int]] | None = None  # used when no weights file
    # Keys of a weights file that are dropped before loading: the auxiliary classifiers of
    # inception_v3 / googlenet (torchvision saves them; the backbone is built without them).
    ignore_prefixes: tuple[str, ...] = ()


_REGISTRY: dict[str, _Spec] = {
    "resnet18": _Spec(lambda: _tvm().resnet18(weights=None), _resnet_body),
    "resnet34": _Spec(lambda: _tvm().resnet34(weights=None), _resnet_body),
    "resnet50": _Spec(lambda: _tvm().resnet50(weights=None), _resnet_body),
    "vgg16_bn": _Spec(
        lambda: _tvm().vgg16_bn(weights=None), lambda m: (m.get_submodule("features"), 512), _vgg16_bn_features
    ),
    "efficientnet_b0": _Spec(
        lambda: _tvm().efficientnet_b0(weights=None),
        lambda m: (m.get_submodule("features"), _in_features(m, "classifier.1")),
    ),
    "densenet121": _Spec(lambda: _tvm().densenet121(weights=None), _densenet_body),
    "alexnet": _Spec(lambda: _tvm().alexnet(weights=None), lambda m: (m.get_submodule("features"), 256)),
    "mobilenet_v3_small": _Spec(
        lambda: _tvm().mobilenet_v3_small(weights=None),
        lambda m: (m.get_submodule("features"), _in_features(m, "classifier.0")),
    ),
    # Seed 003's InceptionV3 and seed 002's GoogLeNet, their auxiliary heads disabled (the
    # backbone is a feature extractor; no auxiliary loss). torchvision's input transform
    # (transform_input) is not part of the body: images arrive in this project's own scaling.
    "inception_v3": _Spec(
        lambda: _tvm().inception_v3(weights=None, aux_logits=False, init_weights=True),
        _children_body("AuxLogits"),
        ignore_prefixes=("AuxLogits.",),
    ),
    "googlenet": _Spec(
        lambda: _tvm().googlenet(weights=None, aux_logits=False, init_weights=True),
        _children_body("aux1", "aux2"),
        ignore_prefixes=("aux1.", "aux2."),
    ),
    "smallcnn": _Spec(lambda: SmallCNN(3), lambda m: (m.get_submodule("features"), SmallCNN.widths[-1])),
    "rawnet": _Spec(lambda: RawNetBody(3), lambda m: (m.get_submodule("features"), RawNetBody.widths[-1])),
}


# The smallest input side (px) each backbone can run on: below it a pooling or a valid
# convolution has no pixel left. The others run on any size the run config accepts (>= 16).
MIN_INPUT_PX = {"alexnet": 63, "inception_v3": 75, "googlenet": 15}


def check_input_size(name: str, h: int, w: int) -> None:
    """ValueError naming the size when ``h`` x ``w`` images are too small for backbone ``name``."""
    least = MIN_INPUT_PX.get(name, 0)
    if h < least or w < least:
        raise ValueError(
            f"backbone {name!r} needs images of at least {least} x {least} px; got {int(h)} x {int(w)} "
            "(raise the family's image / patch / box / crop size)"
        )


def available_backbones() -> list[str]:
    """Registered backbone names, the default first."""
    return list(_REGISTRY)


def build_backbone(
    name: str, in_channels: int, weights_path: str | os.PathLike[str] | None = None
) -> tuple[FeatureExtractor, int]:
    """Build ``name`` as a (B, in_channels, H, W) -> (B, feat_dim) extractor; return (it, feat_dim).

    alexnet needs images of at least 63 px per side (its stride-4 stem and three pools),
    inception_v3 75 px, googlenet 15 px (:data:`MIN_INPUT_PX`; the extractor refuses smaller).

    ``weights_path``: a local torchvision ``state_dict`` of the ordinary 3-channel model
    (classifier keys included, as torchvision saves it). Its stem filters are averaged
    over RGB and repeated over ``in_channels``, scaled by 3 / in_channels so a grey
    image replicated over the channels gives the same activations as before. Or a file
    written by ``fedbreast pretrain`` (:func:`backbone_file_state`): the trained body, its
    stem kept as trained when ``in_channels`` is the count it was trained with (else averaged
    and repeated as above), its norm layers GroupNorm when it was pretrained for DP.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(available_backbones())}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    spec = _REGISTRY[name]
    if weights_path is not None:
        obj = _read_weights(Path(weights_path))
        if FEDBREAST_MARKER in obj:  # written by `fedbreast pretrain`: our body, trained channels
            body, feat_dim = _load_fedbreast(name, spec, Path(weights_path), obj)
        else:
            body, feat_dim = spec.body(_load_pretrained(name, spec, Path(weights_path), obj))
    elif spec.fast_body is not None:
        body, feat_dim = spec.fast_body()
    else:
        body, feat_dim = spec.body(spec.build())
    _adapt_first_conv(body, in_channels, pretrained=weights_path is not None)
    return FeatureExtractor(name, body, feat_dim), feat_dim


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / pickled-code files
        raise WeightsFileError(f"{path}: cannot be read as a torch state_dict ({exc})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise WeightsFileError(f"{path}: expected a flat state_dict (str -> tensor), got {type(obj).__name__}")
    return obj


def _mismatch(model: nn.Module, state: dict[str, Tensor]) -> str:
    """How a weights file's tensors fail to fit ``model`` (keys missing, unexpected, shapes); "" when they fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = [f"{k}: file {got[k]} vs model {shape}" for k, shape in expected.items() if k in got and got[k] != shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    return "; ".join(parts)


def _load_pretrained(name: str, spec: _Spec, path: Path, obj: dict[str, Tensor] | None = None) -> nn.Module:
    obj = _read_weights(path) if obj is None else obj
    obj = {k: v for k, v in obj.items() if not k.startswith(spec.ignore_prefixes)} if spec.ignore_prefixes else obj
    # Build on the meta device and assign the file's tensors: no random init, no second copy.
    with torch.device("meta"):
        model = spec.build()
    if mismatch := _mismatch(model, obj):
        raise WeightsFileError(f"{path} is not a 3-channel torchvision {name} state_dict: {mismatch}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ---- backbone files written by `fedbreast pretrain` (simulation/pretrain.py) ------------------
#
# A torchvision file has a 3-channel stem, which _adapt_first_conv folds by averaging over RGB:
# a stem trained on LE + DES (2 channels) would lose the difference between its channels on
# the way back. So pretrain writes its own flat state_dict instead: the backbone body's keys
# (``spec.body``'s, e.g. resnet18 ``conv1.weight``, ``layer4.1.conv2.weight``), the stem at the
# channel count it was trained with, and three marker entries (uint8 / int64 tensors, so the
# file stays a plain ``weights_only`` state_dict). It loads through the same ``weights-path``.
FEDBREAST_MARKER = "fedbreast:format"  # int64 [1]: this layout's version
FEDBREAST_BACKBONE = "fedbreast:backbone"  # uint8: the backbone's registry name
FEDBREAST_NORM = "fedbreast:norm"  # uint8: "batch" (BatchNorm, as built) or "group" (the DP model's GroupNorm)
NORMS = ("batch", "group")


def _text(t: Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8", "replace")


def _tensor_of(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def backbone_file_state(extractor_body: nn.Module, name: str, norm: str) -> dict[str, Tensor]:
    """The state_dict ``fedbreast pretrain`` writes for a trained backbone ``body`` of registry
    backbone ``name`` (``FeatureExtractor.body``); ``norm``: its normalisation layers' kind."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(available_backbones())}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in extractor_body.state_dict().items()}
    state[FEDBREAST_MARKER] = torch.tensor([1], dtype=torch.int64)
    state[FEDBREAST_BACKBONE] = _tensor_of(name)
    state[FEDBREAST_NORM] = _tensor_of(norm)
    return state


def weights_file_norm(path: str | os.PathLike[str]) -> str:
    """ "group" for a ``fedbreast pretrain`` file of a DP (GroupNorm) backbone; "batch" otherwise."""
    obj = _read_weights(Path(path))
    return _text(obj[FEDBREAST_NORM]) if FEDBREAST_MARKER in obj and FEDBREAST_NORM in obj else "batch"


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` replaced, in place, by GroupNorm(min(32, C), C): the layer
    Opacus' ``ModuleValidator.fix`` puts there for a DP model (shared/training/dp.py)."""
    for qualname, m in list(module.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            parent_name, _, attr = qualname.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, nn.GroupNorm(min(32, c), c, device=m.weight.device))
    return module


def _load_fedbreast(name: str, spec: _Spec, path: Path, obj: dict[str, Tensor]) -> tuple[nn.Module, int]:
    """A ``fedbreast pretrain`` file: (body, feat_dim) with its stem at the trained channel count
    (``_adapt_first_conv`` then keeps it when the run has as many channels, and averages it when not)."""
    version = int(obj[FEDBREAST_MARKER].reshape(-1)[0]) if obj[FEDBREAST_MARKER].numel() else 0
    if version != 1:
        raise WeightsFileError(f"{path}: fedbreast backbone file of format {version}; this version reads format 1")
    written = _text(obj[FEDBREAST_BACKBONE]) if FEDBREAST_BACKBONE in obj else "?"
    if written != name:
        raise WeightsFileError(f"{path} holds a pretrained {written!r} backbone; the run's backbone is {name!r}")
    norm = _text(obj[FEDBREAST_NORM]) if FEDBREAST_NORM in obj else "batch"
    if norm not in NORMS:
        raise WeightsFileError(f"{path}: unknown norm {norm!r} (expected one of {', '.join(NORMS)})")
    state = {k: v for k, v in obj.items() if not k.startswith("fedbreast:")}
    with torch.device("meta"):
        body, feat_dim = spec.body(spec.build())
        if norm == "group":
            batchnorm_to_groupnorm(body)
    stem = next((n for n, m in body.named_modules() if isinstance(m, nn.Conv2d)), None)
    if stem is not None and f"{stem}.weight" in state and state[f"{stem}.weight"].dim() == 4:
        _adapt_first_conv(body, int(state[f"{stem}.weight"].shape[1]), pretrained=False)
    if mismatch := _mismatch(body, state):
        raise WeightsFileError(f"{path} does not fit a {norm}-norm {name} backbone: {mismatch}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    body.load_state_dict(state, strict=True, assign=True)
    return body, feat_dim


def _adapt_first_conv(body: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Replace the stem (first Conv2d in module order) so it takes ``in_channels``."""
    found = next(((n, m) for n, m in body.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise RuntimeError("backbone has no Conv2d stem to adapt")
    qualname, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise RuntimeError(f"cannot adapt grouped stem convolution {qualname}")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        _pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        dilation=_pair(conv.dilation),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        if pretrained:
            mean = conv.weight.mean(dim=1, keepdim=True)
            new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (conv.in_channels / in_channels))
            if conv.bias is not None:
                assert new.bias is not None  # built with bias=True just above
                new.bias.copy_(conv.bias)
        else:
            # fan_out init does not depend on the channel count, so the stem keeps
            # the distribution torchvision gives it.
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    parent_name, _, attr = qualname.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    setattr(parent, attr, new)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (h, w) setting: torch stores kernel_size, stride, padding and dilation as 2-tuples."""
    h, w = values
    return h, w


def replace_inplace_relu(module: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every submodule with the flag (ReLU, Hardswish, SiLU, Dropout...).

    Opacus' per-sample-gradient hooks fail on modules that overwrite their input;
    returns ``module`` for chaining.
    """
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
    return module
