"""Grad-CAM and Grad-CAM++ for our networks, through pytorch-grad-cam (not re-implemented here).

Our networks take more than an image batch (the multi-view net a (B, 4, C, H, W) exam, BI-RADS
a descriptor vector, late fusion an availability mask) and a target layer may see more
images than there are samples (a shared backbone over four views sees 4B). So:

* :class:`Forward` wraps ``fn(x) -> logits`` as the ``nn.Module`` the library calls;
* the heatmap is sized to the last two axes of the input, whatever its rank (the library's
  own ``__call__`` would read a 5-D input as a volume);
* the target of sample i is a callable on its output row (``logit(j)``: output column j),
  and the result has one map per image the target layer saw, in its order;
* a CAM needs the gradient at the target layer only: no parameter records a gradient, and the
  target layer's output is cut from the graph below it (a fresh leaf), so the backward pass
  runs through the layers after it alone, not the backbone; several target sets (each breast
  of an exam) share one forward pass (:func:`class_activation_maps_for`). An explanation then
  costs about one forward pass, which also gives the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from torch import Tensor, nn

METHODS = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus}


class Forward(nn.Module):
    """``fn(model, x)`` as a module over ``model`` (its parameters give the library the device)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.model, x)


def logit(column: int | None = None) -> Callable[[Tensor], Tensor]:
    """The target "this sample's malignancy logit": output column ``column``, or a scalar output."""
    return lambda out: out if column is None else out[..., column]


def class_activation_maps(
    model: nn.Module,
    layers: Sequence[nn.Module],
    x: Tensor,
    targets: Sequence[Callable[[Tensor], Tensor]],
    method: str = "Grad-CAM",
    fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    per_layer: bool = False,
) -> tuple[np.ndarray, Tensor]:
    """(N, H, W) float32 heatmaps in [0, 1], one per image ``layers`` saw (N = B, or B x views),
    and the model's output for ``x`` (detached: the scores come from the same forward pass).

    ``fn(model, x)`` gives the logits (default ``model(x)``); ``targets[i]`` picks sample i's
    target from its output row. With several layers (one network per energy) the maps are
    averaged, as the library aggregates layers, or with ``per_layer`` returned as (L, N, H, W).
    BatchNorm and dropout stay in eval mode."""
    maps, out = class_activation_maps_for([targets], model, layers, x, method, fn, per_layer)
    return maps[0], out


def class_activation_maps_for(
    passes: Sequence[Sequence[Callable[[Tensor], Tensor]]],
    model: nn.Module,
    layers: Sequence[nn.Module],
    x: Tensor,
    method: str = "Grad-CAM",
    fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    per_layer: bool = False,
) -> tuple[list[np.ndarray], Tensor]:
    """:func:`class_activation_maps` for several target sets over ONE forward pass: ``passes[k]``
    is a list of per-sample targets, and map set k is theirs (the multi-view network explains
    each breast's logit over the same exam). The gradients come from ``torch.autograd.grad`` at
    the target layers; the CAM itself (channel weights, ReLU, scaling, layer aggregation) is the
    library's, as its own ``__call__`` computes it."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    if method not in METHODS:
        raise ValueError(f"explain method {method!r}: one of {', '.join(METHODS)}")
    module = Forward(model, fn or (lambda m, t: m(t)))
    was_training = model.training
    needs_grad = [p.requires_grad for p in model.parameters()]
    cam = METHODS[method](model=module, target_layers=list(layers))
    cam.activations_and_grads.release()  # its hooks: the leaves below stand in for them
    leaves: list[list[Tensor]] = [[] for _ in layers]

    def cut(k: int) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_(True)
            leaves[k].append(leaf)
            return leaf

        return hook

    cuts = [layer.register_forward_hook(cut(k)) for k, layer in enumerate(layers)]
    size = (x.size(-1), x.size(-2))
    results: list[np.ndarray] = []
    try:
        model.eval()
        model.requires_grad_(False)
        with torch.enable_grad():
            out = module(x)
            for k, layer_leaves in enumerate(leaves):
                if len(layer_leaves) != 1:
                    raise ValueError(f"target layer {k} ran {len(layer_leaves)} times in one forward pass; need once")
            acts = [lv[0] for lv in leaves]
            for n, targets in enumerate(passes):
                loss = sum(t(o) for t, o in zip(targets, out))
                grads = torch.autograd.grad(loss, acts, retain_graph=n < len(passes) - 1)  # type: ignore[arg-type]
                per = []
                for layer, a, g in zip(layers, acts, grads):
                    c = cam.get_cam_image(x, layer, list(targets), a.detach().cpu().numpy(), g.cpu().numpy())
                    per.append(scale_cam_image(np.maximum(c, 0), size)[:, None, :])
                if per_layer:
                    results.append(np.concatenate(per, axis=1).transpose(1, 0, 2, 3).astype(np.float32))
                else:
                    results.append(np.asarray(cam.aggregate_multi_layers(per), dtype=np.float32))
        return results, out.detach()
    finally:
        for c in cuts:
            c.remove()
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
        model.train(was_training)


def cam_layer(extractor: nn.Module) -> nn.Module:
    """The layer a CAM reads: a backbone's spatial body (before global pooling), or the module itself."""
    body = getattr(extractor, "body", None)
    return body if isinstance(body, nn.Module) else extractor


__all__ = ["METHODS", "Forward", "cam_layer", "class_activation_maps", "class_activation_maps_for", "logit"]
