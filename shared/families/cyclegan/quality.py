"""Image quality of virtual DES against the real DES of the same view, inside the breast.

Per image: the squared error summed over the breast mask (and the mask's pixel count, so a
federation pools MSE and PSNR exactly: PSNR = 10 log10(1 / (sum of errors / pixels)) over
every site's breasts, images in [0, 1]); SSIM (torchmetrics' Gaussian-window SSIM map,
data range 1) averaged over the breast mask; and the lesion-to-background enhancement ratio,
mean intensity inside the lesion over the mean in the rest of the breast, of the synthetic
and of the real image (seed 004's "contrast uptake" must survive the translation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

# Fewer images than this in a split (or lesion images, for the enhancement ratios): only the
# count leaves the site, not a figure that would be one or two images' own.
MIN_IMAGES = 5
MAX_PSNR_DB = 100.0
COUNTS = ("pixels", "lesion_images")
# The per-split keys a cyclegan evaluate reply carries (fixed, so every site's reply has them).
QUALITY_KEYS = (
    "images",
    "sse",
    "pixels",
    "mse",
    "psnr",
    "ssim",
    "lesion_images",
    "enhancement_real",
    "enhancement_synthetic",
)


@dataclass
class QualitySums:
    """Running sums over a split's images (only sums and counts leave a site)."""

    images: int = 0
    sse: float = 0.0
    pixels: int = 0
    ssim_sum: float = 0.0
    lesion_images: int = 0
    enh_real_sum: float = 0.0
    enh_synth_sum: float = 0.0
    by_view: dict[str, QualitySums] = field(default_factory=dict)

    def add(self, fake: torch.Tensor, real: torch.Tensor, breast: torch.Tensor, lesion: torch.Tensor) -> None:
        """One batch (B, 1, H, W) each; masks are bool."""
        fake, real = fake.float().clamp(0, 1), real.float()
        m = breast.float()
        err = ((fake - real) ** 2 * m).flatten(1).sum(1)
        count = m.flatten(1).sum(1)
        _, ssim_map = structural_similarity_index_measure(
            fake, real, data_range=1.0, return_full_image=True, reduction="none"
        )
        ssim = (ssim_map * m).flatten(1).sum(1) / count.clamp_min(1)
        keep = count > 0
        self.images += int(keep.sum())
        self.sse += float(err[keep].sum())
        self.pixels += int(count[keep].sum())
        self.ssim_sum += float(ssim[keep].sum())
        les = lesion & breast
        back = breast & ~lesion
        n_les, n_back = les.flatten(1).sum(1), back.flatten(1).sum(1)
        has = keep & (n_les > 0) & (n_back > 0)
        if has.any():

            def ratio(img: torch.Tensor) -> torch.Tensor:
                inside = (img * les).flatten(1).sum(1) / n_les.clamp_min(1)
                outside = (img * back).flatten(1).sum(1) / n_back.clamp_min(1)
                return inside / outside.clamp_min(1e-3)

            self.lesion_images += int(has.sum())
            self.enh_real_sum += float(ratio(real)[has].sum())
            self.enh_synth_sum += float(ratio(fake)[has].sum())

    def metrics(self, prefix: str) -> dict[str, float | int]:
        """``{prefix}_{key}`` for :data:`QUALITY_KEYS` (NaN where undefined). Below
        :data:`MIN_IMAGES` images (or lesion images, for the enhancement ratios) only the count
        leaves: a sum over one or two images would be those images' own figure."""
        if self.images < MIN_IMAGES:
            return {
                f"{prefix}_{k}": (self.images if k == "images" else 0 if k in COUNTS else float("nan"))
                for k in QUALITY_KEYS
            }
        mse = self.sse / self.pixels if self.pixels else float("nan")
        return {
            f"{prefix}_images": self.images,
            f"{prefix}_sse": self.sse,
            f"{prefix}_pixels": self.pixels,
            f"{prefix}_mse": mse,
            f"{prefix}_psnr": psnr(mse),
            f"{prefix}_ssim": self.ssim_sum / self.images if self.images else float("nan"),
            f"{prefix}_lesion_images": self.lesion_images if self.lesion_images >= MIN_IMAGES else 0,
            f"{prefix}_enhancement_real": self.enh_real_sum / self.lesion_images
            if self.lesion_images
            else float("nan"),
            f"{prefix}_enhancement_synthetic": (
                self.enh_synth_sum / self.lesion_images if self.lesion_images else float("nan")
            ),
        }


def psnr(mse: float) -> float:
    """PSNR in dB of images in [0, 1] (peak 1) from their mean squared error, at most
    :data:`MAX_PSNR_DB` (a perfect copy would be infinite, which no reply may carry)."""
    if not np.isfinite(mse):
        return float("nan")
    return MAX_PSNR_DB if mse <= 10 ** (-MAX_PSNR_DB / 10) else float(10.0 * np.log10(1.0 / mse))
