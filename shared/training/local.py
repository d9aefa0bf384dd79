"""Local training and prediction on one site's data: the work a ClientApp does each round.

Speed matters because every site's slowest round sets the federation's pace, so the loop
uses bf16 autocast where the hardware has it (about 2.4x fp32 on AMX / AVX512-BF16 CPUs),
channels_last memory format, and batched GPU-side augmentation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fedbreast.shared.training.dp import LocalDP

# A batch is a mapping with "x" (B, 4, C, H, W), "y" (B, 2) per-breast labels and "y_mask"
# (B, 2) marking labelled breasts, as the datasets in shared/data/datasets.py collate it.
Batch = Mapping[str, torch.Tensor]


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
    try:  # private probes; absent on some builds
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
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
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]] | None = None,
    dp: LocalDP | None = None,
) -> TrainStats:
    """SGD with momentum and weight decay (seed 001) for ``epochs`` or ``steps`` batches.

    ``proximal_mu`` > 0 adds FedProx's (mu/2)·||w - w_global||² with w_global the weights
    the round started from. ``loss_fn(model, batch) -> (loss, examples)`` replaces the
    multi-view x / y / y_mask step for the other model families (run under autocast; 0
    examples skips the batch). ``dp`` (from :func:`fedbreast.shared.training.dp.local_dp_for`):
    DP-SGD instead, on Poisson batches for the steps its plan fixes (``epochs``/``steps`` unused).
    """
    if dp is not None:
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
        return _sgd(
            model,
            loader,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            epochs=epochs,
            steps=steps,
            device=device,
            amp=amp,
            proximal_mu=proximal_mu,
            augment=augment,
            loss_fn=loss_fn,
        )
    finally:
        model.to(memory_format=torch.contiguous_format)


def _training_layout(model: nn.Module) -> torch.memory_format:
    """channels_last for a model with 2-D convolutions and no 5-D weights (which it cannot hold)."""
    dims = {p.dim() for p in model.parameters()}
    return torch.channels_last if 4 in dims and 5 not in dims else torch.contiguous_format


def _sgd(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    epochs: int,
    steps: int,
    device: torch.device,
    amp: str,
    proximal_mu: float,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]] | None,
) -> TrainStats:
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, n_examples, n_steps = 0.0, 0, 0
    t0 = time.perf_counter()
    in_channels = _in_channels(model)
    for batch in _batches(loader, epochs, steps):
        if loss_fn is not None:
            with autocast(device, amp):
                loss, count = loss_fn(model, batch)
            if count == 0:
                continue
        else:
            images, labels, mask = batch["x"], batch["y"], batch["y_mask"]
            if mask.sum() == 0:
                continue
            images = match_channels(images.to(device, non_blocking=True), in_channels)
            labels, mask = labels.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            if augment is not None:
                images = augment(images)
            with autocast(device, amp):
                logits = model(images)
            loss = masked_bce(logits, labels, mask)
            count = images.shape[0]
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            loss = loss + 0.5 * proximal_mu * prox
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {n_steps}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * count
        n_examples += count
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
