"""Batched geometric augmentation on (B, K, C, H, W) tensors, one affine warp per sample.

K is the number of images a sample holds (4 views of an exam, 2 views of a lesion box,
4 modality-view slots); C the channels of each (LE and DES). Channels of one image always
share the transform. With ``shared_across_views=True`` the K images of a sample share it
too: the model sees the same flip of LCC, LMLO, RCC and RMLO, so a horizontally flipped
exam still has both breasts facing the same way (chest wall on the right for all four
instead of the left for all four) and the CC/MLO and left/right correspondences the fusion
layers rely on are kept. With ``shared_across_views=False`` each image gets its own draw
(for independent single-view models).

All randomness comes from one ``torch.Generator``, so a seed reproduces a batch exactly.
Flips are exact pixel flips (grid_sample samples pixel centres with align_corners=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0  # uniform in [-r, r]
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    zoom: float = 0.05  # scale uniform in [1 - z, 1 + z]
    shift: float = 0.05  # translation uniform in [-s, s] of the image size, per axis
    rot90: bool = False  # also rotate by a random multiple of 90 degrees (square patches, seed 000)
    mode: str = "bilinear"
    padding_mode: str = "zeros"  # background is 0 after preprocessing

    def __post_init__(self) -> None:
        for name in ("hflip_p", "vflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name}: expected a probability in [0, 1], got {getattr(self, name)!r}")
        for name in ("rotation_deg", "zoom", "shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name}: expected >= 0, got {getattr(self, name)!r}")
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom: expected < 1, got {self.zoom!r}")
        if self.mode not in ("bilinear", "nearest"):
            raise ValueError(f"AugmentConfig.mode: expected 'bilinear' or 'nearest', got {self.mode!r}")
        if self.padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"AugmentConfig.padding_mode: expected zeros|border|reflection, got {self.padding_mode!r}")

    @property
    def is_identity(self) -> bool:
        return not (self.rotation_deg or self.hflip_p or self.vflip_p or self.zoom or self.shift or self.rot90)


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    # seed 001: h/v flips p=0.5, rotation +-10 degrees
    "multiview": AugmentConfig(rotation_deg=10.0, zoom=0.0, shift=0.0),
    # seed 000: rotations by multiples of 90 degrees and flips; translations come from patch sampling
    "patches": AugmentConfig(rotation_deg=0.0, zoom=0.0, shift=0.0, rot90=True),
    # seed 003: shift and zoom +-5 %, rotation +-3 degrees, flips
    "roi_box": AugmentConfig(rotation_deg=3.0, zoom=0.05, shift=0.05),
    # seed 004 names no augmentation; a horizontal flip would undo its chest-wall-left
    # standardisation, so only vertical flips with the default small warps.
    "modality_view": AugmentConfig(rotation_deg=10.0, hflip_p=0.0, zoom=0.05, shift=0.05),
    # seed 002: translation, rotation, flipping of lesion crops
    "us": AugmentConfig(rotation_deg=10.0, zoom=0.05, shift=0.05),
}


def sample_theta(
    n: int, height: int, width: int, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 2, 3) affine matrices for ``F.affine_grid`` (output -> input, normalised coordinates).

    Built in pixel units about the image centre and converted to normalised coordinates, so a
    rotation stays a rotation (not a shear) on non-square images. Always draws the same
    number of random values, so changing one range does not reshuffle the others.
    """
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * math.radians(cfg.rotation_deg)
    if cfg.rot90:
        angle = angle + torch.floor(u[:, 5] * 4).clamp_(max=3) * (math.pi / 2)
    fx = torch.where(u[:, 1] < cfg.hflip_p, -1.0, 1.0).to(torch.float64)
    fy = torch.where(u[:, 2] < cfg.vflip_p, -1.0, 1.0).to(torch.float64)
    scale = 1.0 + (2 * u[:, 3] - 1) * cfg.zoom  # > 1 magnifies
    shift = (2 * u[:, 4] - 1) * cfg.shift
    shift_y = (2 * u[:, 6] - 1) * cfg.shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    # A = R(angle) @ diag(fx, fy) / scale, in pixel units.
    a00, a01 = cos * fx / scale, -sin * fy / scale
    a10, a11 = sin * fx / scale, cos * fy / scale
    theta = torch.empty(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = a00
    theta[:, 0, 1] = a01 * (height / width)
    theta[:, 0, 2] = 2 * shift
    theta[:, 1, 0] = a10 * (width / height)
    theta[:, 1, 1] = a11
    theta[:, 1, 2] = 2 * shift_y
    return theta.to(torch.float32)


def augment(
    x: torch.Tensor,
    cfg: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
    shared_across_views: bool = True,
) -> torch.Tensor:
    """Warp a (B, K, C, H, W) or (B, C, H, W) batch; returns a new tensor of the same shape and dtype.

    The random parameters are drawn on the CPU from ``generator`` and the warp runs on
    ``x.device``; half-precision input is warped in float32.
    """
    if x.ndim == 4:
        return augment(x[:, None], cfg, generator, shared_across_views)[:, 0]
    if x.ndim != 5:
        raise ValueError(f"augment: expected (B, K, C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    if cfg.is_identity or x.shape[0] == 0:  # grid_sample refuses an empty batch
        return x.clone()
    B, K, C, H, W = x.shape
    theta = sample_theta(B if shared_across_views else B * K, H, W, cfg, generator)
    if shared_across_views:
        theta = theta.repeat_interleave(K, dim=0)
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) or x.is_cuda else torch.float32
    flat = x.reshape(B * K, C, H, W).to(work_dtype)
    grid = F.affine_grid(theta.to(device=x.device, dtype=work_dtype), [B * K, C, H, W], align_corners=False)
    out = F.grid_sample(flat, grid, mode=cfg.mode, padding_mode=cfg.padding_mode, align_corners=False)
    return out.reshape(B, K, C, H, W).to(x.dtype)


__all__ = ["AUGMENT_PRESETS", "AugmentConfig", "augment", "sample_theta"]
