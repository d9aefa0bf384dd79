"""The coordinator's side of the cyclegan family (numpy only): the federation's synthesis
quality pooled from the sites' sums, as if every site's test images were one set.

MSE and PSNR pool exactly (summed squared error over summed breast pixels); SSIM and the
enhancement ratios are means over images, pooled by image count. A site's values are used
only when they are finite and non-negative counts and sums: a malformed reply is left out of
the pool, never the reason a round fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PREFIX = "test_synth"
POOLED_KEYS = tuple(
    f"test_pooled_synth_{k}" for k in ("images", "mse", "psnr", "ssim", "enhancement_real", "enhancement_synthetic")
)


def _num(m: Mapping[str, Any], key: str, low: float = 0.0) -> float | None:
    """The site's value if it is a finite number >= ``low`` (SSIM: >= -1), else None."""
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) and v >= low else None


def pooled_quality(metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """``test_pooled_synth_{mse,psnr,ssim,enhancement_real,enhancement_synthetic,images}``."""
    images = sse = pixels = ssim = les = enh_r = enh_s = 0.0
    for m in metrics:
        vals = {k: _num(m, f"{PREFIX}_{k}", -1.0 if k == "ssim" else 0.0) for k in ("images", "sse", "pixels", "ssim")}
        if any(v is None for v in vals.values()) or not vals["images"] or not vals["pixels"]:
            continue
        claimed = _num(m, "num-examples")  # the reply's test count, which the coordinator checks
        if (
            (claimed is not None and vals["images"] > claimed)  # type: ignore[operator]
            or vals["sse"] > vals["pixels"]  # type: ignore[operator]  # images in [0, 1]: each error <= 1
            or vals["ssim"] > 1  # type: ignore[operator]
        ):
            continue  # impossible sums: a site outweighing the others is left out
        images += vals["images"]  # type: ignore[operator]
        sse += vals["sse"]  # type: ignore[operator]
        pixels += vals["pixels"]  # type: ignore[operator]
        ssim += vals["ssim"] * vals["images"]  # type: ignore[operator]
        n_les, r, s = (_num(m, f"{PREFIX}_{k}") for k in ("lesion_images", "enhancement_real", "enhancement_synthetic"))
        if n_les and n_les <= vals["images"] and r is not None and s is not None and r < 1000 and s < 1000:  # type: ignore[operator]
            les += n_les
            enh_r += r * n_les
            enh_s += s * n_les
    nan = float("nan")
    # Every key, NaN when nothing pooled: a site's own "test_pooled_*" values (averaged into the
    # round's aggregate like any metric) never stand in for the coordinator's.
    out = dict.fromkeys(POOLED_KEYS, nan)
    if not images:
        return out
    mse = sse / pixels
    out |= {
        "test_pooled_synth_images": images,
        "test_pooled_synth_mse": mse,
        "test_pooled_synth_psnr": 100.0 if mse <= 1e-10 else float(10 * np.log10(1.0 / mse)),
        "test_pooled_synth_ssim": ssim / images,
    }
    if les:
        out["test_pooled_synth_enhancement_real"] = enh_r / les
        out["test_pooled_synth_enhancement_synthetic"] = enh_s / les
    return out


def after_evaluate(arrays: dict[str, np.ndarray], metrics: list[Mapping[str, Any]]) -> tuple[dict, dict[str, float]]:
    """The Family hook: the global model unchanged, the pooled quality as aggregate metrics."""
    return arrays, pooled_quality(metrics)
