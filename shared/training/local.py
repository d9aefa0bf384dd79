"""Local training and prediction on one site's data: the work a ClientApp does each round.

Speed matters because every site's slowest round sets the federation's pace, so the loop
uses bf16 autocast where the hardware runs it fast (CUDA with bf16, AMX CPUs: about 2.4x fp32),
channels_last memory format, and batched GPU-side augmentation. ``amp = auto`` keeps fp32 on a
CPU with AVX512-BF16 but no AMX: there bf16 autocast measured 1.4-1.46x slower than fp32
(docs/performance.md "Faster steps").
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedbreast.shared.config import OPTIMIZERS

if TYPE_CHECKING:
    from fedbreast.shared.training.dp import LocalDP

# A batch is a mapping with "x" (B, 4, C, H, W), "y" (B, 2) per-breast labels and "y_mask"
# (B, 2) marking labelled breasts, as the datasets in shared/data/datasets.py collate it.
Batch = Mapping[str, torch.Tensor]
# A model family's step: (model, batch) -> (mean loss over the batch, samples in it).
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-fill a missing DES channel so FFDM-only sites train the 2-channel CEM model."""
    have = x.shape[-3]
    if have == channels:
        return x
    if have == 1 and channels == 2:
        return torch.cat([x, torch.zeros_like(x)], dim=-3)
    if have == 2 and channels == 1:
        return x[..., :1, :, :]  # LE only
    raise ValueError(f"cannot feed {have}-channel images to a {channels}-channel model")


def pick_device(prefer: str = "auto") -> torch.device:
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if prefer == "cuda":
        raise RuntimeError("a GPU was requested but CUDA is not available on this machine")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # a private probe, absent on some builds. AVX512-BF16 alone is not enough: without AMX's
        # tile units bf16 autocast ran a resnet18 step 1.4-1.46x slower than fp32 (docs/performance.md).
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``amp`` is "bf16", or "auto" on hardware that runs it fast."""
    if amp == "bf16" or (amp == "auto" and bf16_supported(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainStats:
    loss: float
    examples: int  # exams seen (the FedAvg weight)
    steps: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return 4 * self.examples / self.seconds if self.seconds > 0 else 0.0


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over labelled breasts only (an unlabelled breast contributes nothing)."""
    per = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    mask = mask.float()
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def _in_channels(model: nn.Module) -> int:
    return int(getattr(model, "in_channels", 2))


def _batches(loader: Iterable[Batch], epochs: int, steps: int) -> Iterator[Batch]:
    if steps > 0:
        done = 0
        while done < steps:
            empty = True
            for batch in loader:
                empty = False
                yield batch
                done += 1
                if done >= steps:
                    return
            if empty:
                return
    else:
        for _ in range(epochs):
            yield from loader


def train_local(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    epochs: int = 1,
    steps: int = 0,
    device: torch.device | None = None,
    amp: str = "auto",
    proximal_mu: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
    dp: LocalDP | None = None,
    optimizer: str = "sgd",
    freeze: str = "none",
) -> TrainStats:
    """SGD with momentum and weight decay (seed 001) for ``epochs`` or ``steps`` batches;
    ``optimizer = "adam"``: Adam with the same lr and (L2) weight decay instead (seed 000;
    ``momentum`` unused, fresh moments every round).

    ``proximal_mu`` > 0 adds FedProx's (mu/2)·||w - w_global||² with w_global the weights
    the round started from. ``loss_fn(model, batch) -> (loss, examples)`` replaces the
    multi-view x / y / y_mask step for the other model families (run under autocast; 0
    examples skips the batch). ``dp`` (from :func:`fedbreast.shared.training.dp.local_dp_for`):
    DP-SGD instead, on Poisson batches for the steps its plan fixes (``epochs``/``steps`` unused;
    with Adam: DP-Adam, the same clipped and noised gradients). ``freeze``: the scope of
    parameters kept fixed (shared/training/freeze.py), plain and DP training alike.
    """
    from fedbreast.shared.training.freeze import frozen_scope

    if dp is not None:
        with frozen_scope(model, freeze):
            return dp.train(
                model,
                loader,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                device=device,
                amp=amp,
                proximal_mu=proximal_mu,
                augment=augment,
                loss_fn=loss_fn,
                optimizer=optimizer,
            )
    device = device or next(model.parameters()).device
    model.to(device).train()
    # Convolutions run in channels-last layout while training: oneDNN's CPU kernels (and cuDNN's
    # under mixed precision) are faster on it. Measured on the 2-core machine with one torch
    # thread (2026-12-03, tests/test_family_learning.py's runs): dualmode 54.1 s -> 43.4 s,
    # latefusion 49.1 s -> 42.2 s. The weights go back to the standard layout afterwards, so
    # what the site sends and saves is laid out as before.
    layout = _training_layout(model)
    model.to(memory_format=layout)
    try:
        with frozen_scope(model, freeze):  # after train(): the frozen norm layers run in eval mode
            rule = SGDSteps(
                model,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                proximal_mu=proximal_mu,
                optimizer=optimizer,
            )
            return run_steps(
                rule,
                loader,
                epochs=epochs,
                steps=steps,
                device=device,
                amp=amp,
                augment=augment,
                loss_fn=loss_fn,
                in_channels=_in_channels(model),
            )
    finally:
        model.to(memory_format=torch.contiguous_format)


def _training_layout(model: nn.Module) -> torch.memory_format:
    """channels_last for a model with 2-D convolutions and no 5-D weights (which it cannot hold)."""
    dims = {p.dim() for p in model.parameters()}
    return torch.channels_last if 4 in dims and 5 not in dims else torch.contiguous_format


class StepRule(Protocol):
    """How the one training loop (:func:`run_steps`) draws batches and turns a loss into a step.

    Plain SGD is :class:`SGDSteps`; DP-SGD (``shared/training/dp.py``) draws Poisson batches,
    clips per exam and adds noise, and its empty draws are still steps of the mechanism.
    """

    model: nn.Module  # what the loop calls for logits (DP: Opacus' wrapper around the model)
    plain_model: nn.Module  # the model itself: a family's loss_fn gets it (Opacus' hooks watch it under DP)
    # A multi-view batch with no labelled breast: plain SGD skips it; DP-SGD runs it through the
    # mechanism (clipped, noised, accounted) like any other draw.
    skips_unlabelled: bool

    def batches(self, loader: Iterable[Batch], epochs: int, steps: int) -> Iterable[Batch]: ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def nothing_to_learn(self) -> bool:
        """Called for an empty draw, or a family's batch with no labelled sample; True: it was
        still a step (DP-SGD's noise-only step), counted as one."""
        ...

    def regularise(self, loss: torch.Tensor) -> torch.Tensor: ...

    def step(self, loss: torch.Tensor, batch_size: int) -> None: ...


def make_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The run config's ``optimizer``: "sgd" (momentum, weight decay: seed 001) or "adam" (seed
    000; torch's L2 weight decay, default betas, ``momentum`` unused)."""
    if not params:
        raise ValueError("nothing to train: every parameter is frozen (see the run config's freeze)")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class SGDSteps:
    """The plain (non-DP) step: SGD with momentum and weight decay (seed 001), or Adam
    (``optimizer = "adam"``, seed 000); FedProx's proximal term in the loss."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        proximal_mu: float,
        optimizer: str = "sgd",
    ) -> None:
        self.model = self.plain_model = model
        self.skips_unlabelled = True
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params] if proximal_mu > 0 else None
        self.mu = proximal_mu
        self.opt = make_optimizer(optimizer, self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def batches(self, loader: Iterable[Batch], epochs: int, steps: int) -> Iterable[Batch]:
        return _batches(loader, epochs, steps)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_bce(logits, labels, mask)

    def nothing_to_learn(self) -> bool:
        return False  # skipped, not a step

    def regularise(self, loss: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            return loss
        return loss + 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor))

    def step(self, loss: torch.Tensor, batch_size: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_steps(
    rule: StepRule,
    loader: Iterable[Batch],
    *,
    epochs: int,
    steps: int,
    device: torch.device,
    amp: str,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    loss_fn: LossFn | None,
    in_channels: int,
) -> TrainStats:
    """The local training loop, plain or DP-SGD alike: draw a batch, compute the loss (the
    multi-view x / y / y_mask step, or a family's ``loss_fn``), step; returns the mean loss."""
    total, n_examples, n_steps = 0.0, 0, 0
    t0 = time.perf_counter()
    for batch in rule.batches(loader, epochs, steps):
        if not batch:  # an empty draw (DP's Poisson sampling)
            n_steps += rule.nothing_to_learn()
            continue
        if loss_fn is not None:
            with autocast(device, amp):
                loss, count = loss_fn(rule.plain_model, batch)
            if count == 0:
                n_steps += rule.nothing_to_learn()
                continue
        else:
            images, labels, mask = batch["x"], batch["y"], batch["y_mask"]
            if rule.skips_unlabelled and mask.sum() == 0:
                continue
            images = match_channels(images.to(device, non_blocking=True), in_channels)
            labels, mask = labels.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            if augment is not None:
                images = augment(images)
            with autocast(device, amp):
                logits = rule.model(images)
            loss = rule.loss(logits, labels, mask)
            count = images.shape[0]
        loss = rule.regularise(loss)
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {n_steps}; lower the learning rate")
        rule.step(loss, int(count))
        total += value * count
        n_examples += int(count)
        n_steps += 1
    seconds = time.perf_counter() - t0
    return TrainStats(loss=total / max(n_examples, 1), examples=n_examples, steps=n_steps, seconds=seconds)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[Batch], device: torch.device | None = None, amp: str = "auto"
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-breast (labels, malignancy probabilities, mean BCE) over labelled breasts only."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    ys, ps, loss_sum, n = [], [], 0.0, 0
    in_channels = _in_channels(model)
    for batch in loader:
        images, labels, mask = batch["x"], batch["y"], batch["y_mask"]
        images = match_channels(images.to(device, non_blocking=True), in_channels)
        with autocast(device, amp):
            logits = model(images).float().cpu()
        keep = mask.bool()
        if keep.any():
            loss_sum += float(masked_bce(logits, labels, mask) * keep.sum())
            n += int(keep.sum())
            ys.append(labels[keep].numpy())
            ps.append(torch.sigmoid(logits[keep]).numpy())
    if not ys:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), float("nan")
    y = np.concatenate(ys).astype(np.int64)
    p = np.concatenate(ps).astype(np.float64)
    return y, p, loss_sum / max(n, 1)
