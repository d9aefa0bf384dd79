"""Which parameters local training leaves fixed: the run config's ``freeze`` scope.

Scopes (the seeds' transfer-learning recipes):

* ``none``: every parameter trains (full-tune; seed 003's D2TL and its random-init arm).
* ``backbone``: the CNN feature extractors from the backbone registry (every
  :class:`~fedbreast.shared.models.backbones.FeatureExtractor`, and the multi-view network's
  spatial VGG body under the ``vgg_fc`` head) stay as initialised, usually from a pretrained
  ``weights-path``; the layers a family adds on top train. Seed 003's semi-tune (only the dense
  layers over the frozen InceptionV3s) and seed 000's FT-AlexNet (the birads network's two FC
  layers, fc1 and fc2, over the frozen AlexNet convolutions: "fine-tune the last two layers").
* ``all-but-head``: only the output layers train: every layer that produces a logit (a
  ``Linear`` with one output, or mgus' cosine classifier), e.g. the multi-view per-view heads,
  birads' fc2 and its BI-RADS classifiers, a late-fusion slot's last layer. A linear probe.

Frozen parameters get ``requires_grad_(False)`` before the optimiser is built (so neither the
optimiser, its weight decay, FedProx's term nor DP-SGD's clipping sees them), and the
BatchNorm layers inside the frozen part run in eval mode, so their running statistics stay
too: a frozen tensor leaves local training bit-identical, and FedAvg keeps it equal at every
site. :func:`frozen_scope` undoes both afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from fedbreast.shared.config import FREEZE_SCOPES


def _backbones(model: nn.Module) -> list[nn.Module]:
    from fedbreast.shared.models.backbones import FeatureExtractor

    found: list[nn.Module] = [m for m in model.modules() if isinstance(m, FeatureExtractor)]
    body = getattr(model, "backbone", None)  # the multi-view vgg_fc head keeps the bare body
    if isinstance(body, nn.Module) and not any(body is m for m in found):
        found.append(body)
    return found


def _is_head(module: nn.Module) -> bool:
    from fedbreast.shared.models.mgus import CosineHead

    return (isinstance(module, nn.Linear) and module.out_features == 1) or isinstance(module, CosineHead)


def frozen_modules(model: nn.Module, scope: str) -> list[nn.Module]:
    """The modules whose parameters (and norm statistics) ``scope`` keeps fixed."""
    if scope not in FREEZE_SCOPES:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE_SCOPES)}, got {scope!r}")
    if scope == "none":
        return []
    if scope == "backbone":
        roots = _backbones(model)
        if not roots:
            raise ValueError(f"freeze = 'backbone': {type(model).__name__} has no registry backbone to freeze")
        return [m for root in roots for m in root.modules()]
    heads = {id(sub) for m in model.modules() if _is_head(m) for sub in m.modules()}
    if not heads:
        raise ValueError(f"freeze = 'all-but-head': {type(model).__name__} has no output layer to train")
    return [m for m in model.modules() if id(m) not in heads]  # each module's own parameters are frozen


@contextlib.contextmanager
def frozen_scope(model: nn.Module, scope: str) -> Iterator[list[str]]:
    """Freeze ``scope`` of ``model`` (after ``model.train()``) for the block; yields the names of
    the frozen parameters. Their ``requires_grad`` flags and the norm layers' modes come back after."""
    with held(model, frozen_modules(model, scope)) as names:
        yield names


@contextlib.contextmanager
def held(model: nn.Module, modules: list[nn.Module]) -> Iterator[list[str]]:
    """Hold ``modules`` of ``model`` as they are for the block: each one's own parameters
    (not its children's: list those too) ``requires_grad`` off, the BatchNorm layers among them
    in eval mode; yields the held parameters' names, and restores the flags and modes after. The
    mechanism of every freeze scope, and of two-stage training's held part (multiview/task.py)."""
    ids = {id(m) for m in modules}
    params = {id(p) for m in modules for p in m.parameters(recurse=False)}
    names = [n for n, p in model.named_parameters() if id(p) in params]
    flags = [(p, p.requires_grad) for p in model.parameters() if id(p) in params]
    norms = [
        (m, m.training)
        for m in model.modules()
        if id(m) in ids and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m, _ in norms:
            m.eval()
        yield names
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in norms:
            m.train(mode)
