"""DP-SGD's per-exam clipping in one backward pass (``dp-grad-sample-mode = fused``).

Opacus' hooks engine materialises every exam's gradient of every trained layer (batch x
parameters), clips, and sums; autograd also computes the plain gradient, which is thrown
away. Ghost clipping avoids the per-exam gradients but needs a second backward pass. Here
("book-keeping" clipping, Bu et al. 2023):

1. The trained parameters stop requiring grad for the round, so autograd computes no weight
   gradient at all: only the activations' gradients flow (a trained layer whose input needs no
   gradient, e.g. the first one after frozen blocks, gets an input that does, so the graph
   reaches it). Each trained layer keeps its input (which autograd keeps anyway) and the
   gradient of its output.
2. After backward, each exam's squared gradient norm per layer comes from those two tensors
   without the per-exam gradient where that is cheaper: for a Conv2d or Linear with P
   positions per exam (views x output pixels) and D_in x D_out weights, ``||B^T A||^2 =
   <A A^T, B B^T>`` costs P^2 (D_in + D_out) against P D_in D_out for the per-exam gradient;
   the cheaper one is used per layer (ghost norm for resnet18's layer4, per-exam gradients
   for layer3 at 256x128). GroupNorm and biases are per-exam sums (cheap).
3. Clip factors as Opacus computes them (``min(1, C / (norm + 1e-6))``), and the clipped sum
   per layer in one weight-gradient computation on exam-scaled output gradients (a conv's own
   backward kernel), or from the per-exam gradients where those were formed; in fp32 under bf16
   autocast too, so each exam's contribution stays within about 2e-4 of the clip bound.

Noise, scaling by the expected batch and the accountant's step are Opacus' own
(``DPOptimizerFastGradientClipping.pre_step``, as in ghost mode), so the mechanism and its
accounting are those of every other mode; ``tests/test_fast_steps.py`` checks the clipped sum
against the hooks engine. The privacy unit is the exam: a multi-view model calls its backbone
once on exam-major views, and each exam's positions are all its views' positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (input, output gradient) of one call of a trained layer, both detached
Record = tuple[torch.Tensor, torch.Tensor]


class FusedClipper:
    """Hooks on a model's trained layers; :meth:`clipped_grads` after ``loss.backward()``."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], views: int) -> None:
        self.views = max(1, views)
        self.params = list(params)
        wanted = {id(p) for p in self.params}
        self.layers: list[nn.Module] = []
        owned: set[int] = set()
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            if not _supported(m):
                raise ValueError(
                    f"dp-grad-sample-mode = 'fused' has no per-sample rule for {type(m).__name__}; "
                    "use hooks for this model"
                )
            if any(id(p) in owned for p in own):
                # Tied across layers: each layer's per-exam part would be normed and written alone,
                # without the cross term of the exam's summed gradient, the last layer's sum kept.
                raise ValueError("dp-grad-sample-mode = 'fused': a trained parameter is shared by two layers")
            self.layers.append(m)
            owned.update(id(p) for p in own)
        if owned != wanted:
            raise ValueError("dp-grad-sample-mode = 'fused': a trained parameter is not owned by a hooked layer")
        self.records: dict[nn.Module, list[Record]] = {m: [] for m in self.layers}
        self.handles: list[Any] = []
        for m in self.layers:
            self.handles.append(m.register_forward_pre_hook(_input_needs_grad))
            self.handles.append(m.register_forward_hook(self._capture))
        self._off()

    # ---- parameters: no weight gradient from autograd while the engine runs ----

    def _off(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def _on(self) -> None:
        for p in self.params:
            p.requires_grad_(True)

    def optimizer_step(self, step: Callable[[], None]) -> None:
        """Run ``step`` (Opacus' noise, scaling, accounting, the optimizer) with the parameters
        marked trainable again, as Opacus' optimizer only sees those."""
        self._on()
        try:
            step()
        finally:
            self._off()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.clear()
        self._on()

    def clear(self) -> None:
        for recs in self.records.values():
            recs.clear()

    # ---- capture ----

    def _capture(self, module: nn.Module, inputs: tuple, out: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or not isinstance(out, torch.Tensor):
            return
        if not out.requires_grad:
            return
        x = inputs[0].detach()
        recs = self.records[module]

        def keep(grad: torch.Tensor) -> None:
            recs.append((x, grad.detach()))

        out.register_hook(keep)

    # ---- clipping ----

    def clipped_grads(self, batch: int, max_grad_norm: float) -> torch.Tensor:
        """Sets each trained parameter's ``.grad`` to the sum over exams of its clipped gradient
        (each exam's whole gradient scaled to norm <= ``max_grad_norm``); returns the per-exam
        norms before clipping. ``batch``: the exams in the batch; the loss was their mean."""
        parts: list[_LayerPart] = []
        trained = {id(p) for p in self.params}
        for m in self.layers:
            own = [p for p in m.parameters(recurse=False) if id(p) in trained]
            if not self.records[m]:  # a layer the forward pass did not use: every exam's gradient is 0
                for p in own:
                    p.grad = torch.zeros_like(p)
                continue
            parts.append(_LayerPart(m, own, self.records[m], batch, self.views))
        sq = torch.zeros(batch, dtype=torch.float32, device=self.params[0].device)
        for part in parts:
            sq += part.norm_sq()
        # The loss is a mean over exams: each exam's own gradient is batch x what backward gave.
        norms = sq.sqrt() * batch
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
        coef = factor * batch
        for part in parts:
            part.write_clipped(coef)
        self.clear()
        return norms


def _supported(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return True
    if type(m) in (nn.Linear, nn.GroupNorm):
        return True
    from opacus.grad_sample import GradSampleModule

    return type(m) in GradSampleModule.GRAD_SAMPLERS


def _input_needs_grad(module: nn.Module, inputs: tuple) -> tuple | None:
    """A trained layer whose input carries no gradient (the first after frozen layers) gets one
    that does, so the backward pass reaches it although its own weights need none."""
    if not (module.training and torch.is_grad_enabled()) or not inputs:
        return None
    x = inputs[0]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True), *inputs[1:])
    return None


class _LayerPart:
    """One trained layer's records: its per-exam squared norm and, given the coefficients, its
    clipped gradient sum."""

    def __init__(self, layer: nn.Module, trained: list[nn.Parameter], recs: list[Record], batch: int, views: int):
        self.layer, self.batch = layer, batch
        self.trained = trained
        self.recs = recs
        rows = recs[0][0].shape[0]
        if rows == batch * views and views > 1:
            self.views = views
        elif rows == batch:
            self.views = 1
        else:
            raise RuntimeError(
                f"{type(layer).__name__} saw {rows} rows, neither {batch} exams nor {batch} x {views} views"
            )
        self.per_exam: dict[torch.Tensor, torch.Tensor] = {}  # per-exam gradients, where formed
        self.ghost = False  # the weight's norm came from the ghost identity: its sum is formed in write_clipped

    def _trains(self, p: Any) -> bool:
        return p is not None and any(p is q for q in self.trained)

    def norm_sq(self) -> torch.Tensor:
        layer = self.layer
        if (
            type(layer) is nn.Conv2d
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        ):
            return self._conv()
        if type(layer) is nn.Linear:
            return self._linear()
        if type(layer) is nn.GroupNorm:
            return self._group_norm()
        return self._opacus()

    def _add(self, p: torch.Tensor, g: torch.Tensor) -> None:
        self.per_exam[p] = self.per_exam[p] + g if p in self.per_exam else g

    def _sq(self) -> torch.Tensor:
        sq = torch.zeros(self.batch, device=self.recs[0][1].device)
        for g in self.per_exam.values():
            sq = sq + torch.linalg.vector_norm(g.reshape(self.batch, -1), dim=1, dtype=torch.float32).pow(2)
        return sq

    def _conv(self) -> torch.Tensor:
        layer = self.layer
        assert isinstance(layer, nn.Conv2d)
        n, v = self.batch, self.views
        ghost_sq: torch.Tensor | None = None
        for x, g in self.recs:
            padding = layer.padding
            assert not isinstance(padding, str)  # norm_sq sends string paddings to Opacus' sampler
            a = F.unfold(x.to(g.dtype), layer.kernel_size, layer.dilation, padding, layer.stride)  # (R, D, L)
            b = g.flatten(2)  # (R, O, L); a strided view of a channels_last gradient
            d, o, positions = a.shape[1], b.shape[1], a.shape[2]
            if self._trains(layer.bias):
                self._add(layer.bias, self._fold(b.float().sum(2)))  # type: ignore[arg-type]
            if not self._trains(layer.weight):
                continue
            p = v * positions  # one exam's positions: all its views'
            if len(self.recs) == 1 and p * (d + o) < d * o:
                # Ghost norm, ||b_i^T a_i||^2 = <a_i a_i^T, b_i b_i^T>, over the exam's positions.
                a_pe = a.view(n, v, d, positions).transpose(2, 3).reshape(n, p, d)
                b_pe = b.reshape(n, v, o, positions).transpose(2, 3).reshape(n, p, o)
                ga = torch.bmm(a_pe, a_pe.transpose(1, 2)).float()
                gb = torch.bmm(b_pe, b_pe.transpose(1, 2)).float()
                ghost_sq = (ga * gb).sum((1, 2))
                self.ghost = True
                continue
            # The per-exam gradient, summed over views inside the batched matmuls.
            av, bv = a.view(n, v, d, positions), b.reshape(n, v, o, positions)
            w = torch.bmm(bv[:, 0], av[:, 0].transpose(1, 2))
            for k in range(1, v):
                w.baddbmm_(bv[:, k], av[:, k].transpose(1, 2))
            self._add(layer.weight, w.view(n, *layer.weight.shape))
        sq = self._sq()
        return sq if ghost_sq is None else sq + ghost_sq

    def _linear(self) -> torch.Tensor:
        layer = self.layer
        assert isinstance(layer, nn.Linear)
        for x, g in self.recs:
            a = x.to(g.dtype).reshape(self.batch, -1, x.shape[-1])  # (N, views x positions, D_in)
            b = g.reshape(self.batch, -1, g.shape[-1])
            if self._trains(layer.weight):
                self._add(layer.weight, torch.bmm(b.transpose(1, 2), a))
            if self._trains(layer.bias):
                self._add(layer.bias, b.float().sum(1))  # type: ignore[arg-type]
        return self._sq()

    def _group_norm(self) -> torch.Tensor:
        layer = self.layer
        assert isinstance(layer, nn.GroupNorm)
        for x, g in self.recs:
            g32 = g.float()
            if self._trains(layer.weight):
                xhat = F.group_norm(x.float(), layer.num_groups, eps=layer.eps)
                self._add(layer.weight, self._fold((xhat * g32).flatten(2).sum(2)))
            if self._trains(layer.bias):
                self._add(layer.bias, self._fold(g32.flatten(2).sum(2)))
        return self._sq()

    def _opacus(self) -> torch.Tensor:
        from opacus.grad_sample import GradSampleModule

        sampler = GradSampleModule.GRAD_SAMPLERS[type(self.layer)]
        for p in self.trained:  # Opacus' samplers skip parameters that need no gradient
            p.requires_grad_(True)
        try:
            for x, g in self.recs:
                # NCHW: Opacus' unfold2d (its Conv2d sampler: grouped / depthwise convs) assumes NCHW
                # strides and silently gives wrong per-exam gradients (zeros) for channels_last inputs.
                for p, gs in sampler(self.layer, [x.contiguous()], g).items():
                    self._add(p, self._fold(gs))
        finally:
            for p in self.trained:
                p.requires_grad_(False)
        return self._sq()

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.batch, self.views, *t.shape[1:]).sum(1) if self.views > 1 else t

    def write_clipped(self, coef: torch.Tensor) -> None:
        # fp32 throughout, whatever the records' dtype: under bf16 autocast, a bf16 clip
        # coefficient (relative rounding up to 2^-9) or a bf16 weight-gradient computation let
        # an exam's clipped contribution reach about 1.002 C, over the bound the privacy
        # accounting assumes; in fp32 it stays within about 2e-4 of C (tests/test_fast_steps.py).
        coef = coef.float()
        with torch.autocast(coef.device.type, enabled=False):
            for p, g in self.per_exam.items():
                p.grad = torch.einsum("i,i...->...", coef, g.float()).reshape(p.shape).to(p.dtype)
            if self.ghost:
                # One weight gradient of the exam-scaled output gradients: the conv's own backward kernel.
                layer = self.layer
                assert isinstance(layer, nn.Conv2d)
                x, g = self.recs[0]
                rows = coef.repeat_interleave(self.views)
                scaled = g.float() * rows.view(-1, 1, 1, 1)
                _, gw, _ = torch.ops.aten.convolution_backward(
                    scaled,
                    x.float(),
                    layer.weight.detach().float(),
                    None,
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    False,
                    [0, 0],
                    layer.groups,
                    [False, True, False],
                )
                layer.weight.grad = gw.to(layer.weight.dtype).reshape(layer.weight.shape)
        self.per_exam.clear()
