"""The run report's section for a family that synthesises images instead of scoring them
(``cyclegan``: virtual DES from FFDM / low-energy images): quality per site and pooled."""

from __future__ import annotations

import math
from typing import Any

# Seed 004's reported range, which the generated federation is held to (docs/virtual-cesm.md).
PSNR_GOAL_DB = 24.0
SSIM_GOAL = 0.8
ENHANCEMENT_TOLERANCE = 0.20  # the synthetic lesion-to-background ratio within 20 % of the real one


# summary.csv's columns for it (per site)
SYNTHESIS_CSV = tuple(
    f"test_synth_{k}"
    for k in ("images", "mse", "psnr", "ssim", "psnr_cc", "psnr_mlo", "ssim_cc", "ssim_mlo")
    + ("enhancement_real", "enhancement_synthetic")
)


def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def enhancement_error(real: Any, synthetic: Any) -> float:
    """Relative error of the synthetic enhancement ratio against the real one (NaN if undefined)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (real, synthetic)) or not real:
        return float("nan")
    return abs(float(synthetic) / float(real) - 1.0)


def synthesis_section(sites: list[dict[str, Any]], aggregate: dict[str, Any]) -> list[str]:
    lines = [
        "## Virtual DES on each site's test split (inside the breast)",
        "",
        "| site | images | MSE | PSNR (dB) | SSIM | PSNR CC / MLO | SSIM CC / MLO | enhancement real | synthetic | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sites:
        if "test_synth_psnr" not in r:
            continue
        g = r.get
        err = enhancement_error(g("test_synth_enhancement_real"), g("test_synth_enhancement_synthetic"))
        lines.append(
            f"| {r['site']} | {g('test_synth_images')} | {_f(g('test_synth_mse'), 4)} | {_f(g('test_synth_psnr'), 2)} "
            f"| {_f(g('test_synth_ssim'))} | {_f(g('test_synth_psnr_cc'), 2)} / {_f(g('test_synth_psnr_mlo'), 2)} "
            f"| {_f(g('test_synth_ssim_cc'))} / {_f(g('test_synth_ssim_mlo'))} "
            f"| {_f(g('test_synth_enhancement_real'))} | {_f(g('test_synth_enhancement_synthetic'))} | {_f(err)} |"
        )
    a = aggregate.get
    err = enhancement_error(a("test_pooled_synth_enhancement_real"), a("test_pooled_synth_enhancement_synthetic"))
    lines.append(
        f"| **pooled** | {_f(a('test_pooled_synth_images'), 0)} | {_f(a('test_pooled_synth_mse'), 4)} "
        f"| {_f(a('test_pooled_synth_psnr'), 2)} | {_f(a('test_pooled_synth_ssim'))} | | "
        f"| {_f(a('test_pooled_synth_enhancement_real'))} | {_f(a('test_pooled_synth_enhancement_synthetic'))} "
        f"| {_f(err)} |"
    )
    psnr, ssim = a("test_pooled_synth_psnr"), a("test_pooled_synth_ssim")
    met = [
        f"PSNR > {PSNR_GOAL_DB:g} dB: {'yes' if isinstance(psnr, (int, float)) and psnr > PSNR_GOAL_DB else 'no'}",
        f"SSIM > {SSIM_GOAL:g}: {'yes' if isinstance(ssim, (int, float)) and ssim > SSIM_GOAL else 'no'}",
        f"enhancement within {ENHANCEMENT_TOLERANCE:.0%}: "
        + ("yes" if math.isfinite(err) and err <= ENHANCEMENT_TOLERANCE else "no"),
    ]
    lines += [
        "",
        "MSE and PSNR pool every site's breast pixels (summed squared error over summed pixels, images in "
        "[0, 1]); SSIM (Gaussian window) and the lesion-to-background enhancement ratios are means over images. "
        "Only these sums and counts left the sites. Seed 004's range, pooled: " + "; ".join(met) + ".",
        "",
    ]
    return lines
