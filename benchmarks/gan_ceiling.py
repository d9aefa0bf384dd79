"""The best PSNR any FFDM-to-DES translator can reach on the generated CEM data (issue 18 item 2).

The generator renders a DES image from hidden variables, some of which leave no trace in the
low-energy image: the background enhancement's amplitude (BI-RADS BPE, drawn per patient,
10x from minimal to marked), the lesion's contrast uptake (``enh_strength``), and the detector
noise. Whatever a translator does, it sees only the LE image, so for fixed everything else
the DES still varies with those three, and no prediction from LE can come closer to the real
DES than their conditional mean. This script measures that floor on the mean squared error:

for each view of each patient of the cyclegan preset's CEM sites, the anatomy, the lesion and
every other latent are fixed (the generator's own random streams, replayed), and the view is rendered K times with the
invisible variables drawn again from the generator's priors; each rendering is stored (vendor
curve, noise, bit depth) and preprocessed as the cyclegan family does (seed 004's pipeline: the
DES uses the LE image's crop and flip, stretched to [0, 1], resized), and the per-pixel variance
across the K images inside the breast (the LE image above air, as the quality metric) is the
least error a translator can leave there. PSNR = 10 log10(1 / mean variance) is thus an upper
bound for the family's pooled PSNR at that image size (a bound for a predictor that also knew
every other latent exactly: a real one does worse).

    .venv/bin/python benchmarks/gan_ceiling.py --sites 3 --patients 16 --draws 8 --sizes 64,128,256 \\
        --json benchmarks/results/gan_ceiling.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data import generate as gen
from fedbreast.shared.data import phantom
from fedbreast.shared.data.preprocess import preprocess_image
from fedbreast.shared.families.cyclegan.task import BREAST_LEVEL
from fedbreast.shared.training.tasks import preprocess_config


def _invisible(rng: np.random.Generator, d: gen._Drawn) -> gen._Drawn:
    """``d`` with what LE does not show drawn again from the generator's priors: the BPE
    category and amplitude, and the lesion's uptake strength."""
    bpe = gen._choice(rng, gen.P_BPE)
    out = replace(d, bpe=bpe, bpe_amp=gen.BPE_AMP[bpe] * rng.uniform(0.8, 1.2))
    if d.spec is not None:
        z = float(np.clip(rng.normal(), -2.2, 2.2))
        out = replace(out, spec=replace(d.spec, enh_strength=float(gen.ENH_MEDIAN * math.exp(gen.ENH_LOGSD * z))))
    return out


def view_variances(
    prof: gen.SiteProfile, seed: int, index: int, draws: int, sizes: tuple[int, ...]
) -> dict[int, list[tuple[float, int, float]]]:
    """Per size: (summed per-pixel variance inside the breast, breast pixels, the oracle's SSIM)
    of each view of one patient, over ``draws`` renderings of what LE does not show."""
    ss = np.random.SeedSequence([seed, zlib.crc32(prof.name.encode()), index])
    r_patient, r_render, r_store, *_ = (np.random.default_rng(s) for s in ss.spawn(6))
    d = gen._draw_patient(r_patient, gen.site_intercept(prof.prevalence))
    r_alt = np.random.default_rng([seed, index, 7])  # the redraws' own stream
    hw, sp = prof.image_hw, prof.pixel_spacing_mm
    cfgs = {n: preprocess_config("modality_view", RunConfig(image_h=n, image_w=n), size=(n, n)) for n in sizes}
    out: dict[int, list[tuple[float, int, float]]] = {n: [] for n in sizes}
    for lat in ("L", "R"):
        cc_depth_mm = None
        for view in ("CC", "MLO"):  # the generator's order of draws from r_render
            g = phantom.sample_geometry(r_render, view, hw, sp, d.size, float(r_render.normal(0.0, 0.025)))
            if view == "CC":
                cc_depth_mm = g.depth * sp
            pl = None
            if d.spec is not None and lat == d.lesion_lat:
                assert cc_depth_mm is not None
                scale = 1.0 if view == "CC" else d.mlo_scale
                pl = phantom.place_lesion(r_render, g, d.spec, d.dist_frac * cc_depth_mm, sp, scale)
            state = copy.deepcopy(r_render)  # every redraw renders the same anatomy
            stacks: dict[int, list[np.ndarray]] = {n: [] for n in sizes}
            le_pre: dict[int, tuple[np.ndarray, object]] = {}
            for k in range(draws):
                dk = _invisible(r_alt, d)
                rk = copy.deepcopy(state)
                les = (dk.spec, pl) if pl is not None and dk.spec is not None else None
                img = phantom.render_mammogram(g, hw, sp, dk.density, rk, lat, les, dk.bpe_amp)
                assert img.des is not None
                if k == 0:  # the stored LE as the generator wrote it: its noise, then the DES's, from r_store
                    le_stored = gen._to_stored(img.le, prof, r_store, 1.0)
                    r_store.standard_normal(img.des.shape, dtype=np.float32)
                    for n, c in cfgs.items():
                        le_pre[n] = preprocess_image(le_stored, None, c)
                des_stored = gen._to_stored(img.des, prof, r_alt, 1.8)  # fresh detector noise each time
                for n, c in cfgs.items():
                    stacks[n].append(preprocess_image(des_stored, None, c, reference=le_pre[n][1])[0])
            r_render = rk  # rendering drew from the stream (the same draws each time): go on from there
            for n in sizes:
                breast = le_pre[n][0] > BREAST_LEVEL
                stack = np.stack(stacks[n]).astype(np.float64)
                var = stack.var(axis=0, ddof=1)
                out[n].append((float(var[breast].sum()), int(breast.sum()), _oracle_ssim(stack, breast)))
    return out


def _oracle_ssim(stack: np.ndarray, breast: np.ndarray) -> float:
    """Mean SSIM, inside the breast, of the conditional-mean prediction (the mean of the other
    renderings: the MSE-best a translator that knew every other latent could do) against each
    rendering, as the quality metric computes SSIM. SSIM is not a mean squared error, so this is
    that oracle's score, not a bound."""
    k = len(stack)
    others = (stack.sum(axis=0, keepdims=True) - stack) / (k - 1)
    fake = torch.from_numpy(others[:, None]).float().clamp(0, 1)
    real = torch.from_numpy(stack[:, None]).float()
    _, ssim_map = structural_similarity_index_measure(
        fake, real, data_range=1.0, return_full_image=True, reduction="none"
    )
    m = torch.from_numpy(breast)[None, None].float()
    return float(((ssim_map * m).flatten(1).sum(1) / m.sum()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3, help="the cyclegan preset's CEM sites (default_profiles)")
    ap.add_argument("--patients", type=int, default=16, help="per site")
    ap.add_argument("--draws", type=int, default=8, help="renderings per view (K, at least 2)")
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.draws < 2 or args.patients < 1 or args.sites < 1:
        ap.error("--draws must be at least 2 (a variance), --patients and --sites at least 1")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    # the cyclegan preset's federation: CEM hospitals with the default sites' vendor curves and noise
    profiles = gen.default_profiles(args.sites, args.patients, modalities="cem")
    t = time.perf_counter()
    cases = [(p, i) for p in profiles for i in range(args.patients)]
    per_patient = {n: np.zeros((len(cases), 2)) for n in sizes}  # (summed variance, pixels)
    ssim: dict[int, list[float]] = {n: [] for n in sizes}
    for row, (prof, i) in enumerate(cases):
        for n, views in view_variances(prof, args.seed, i, args.draws, sizes).items():
            per_patient[n][row] = np.sum([v[:2] for v in views], axis=0)
            ssim[n] += [v[2] for v in views]
    totals = {n: per_patient[n].sum(axis=0) for n in sizes}
    boot = np.random.default_rng(0).integers(0, len(cases), size=(2000, len(cases)))

    def ci(n: int) -> list[float]:
        """95 % percentile bootstrap over patients of the PSNR bound."""
        s = per_patient[n][boot].sum(axis=1)
        return [float(v) for v in np.percentile(10 * np.log10(s[:, 1] / s[:, 0]), (2.5, 97.5))]

    result = {
        "patients": len(cases),
        "views": 4 * len(cases),
        "draws": args.draws,
        "seed": args.seed,
        "sites": [p.name for p in profiles],
        "seconds": time.perf_counter() - t,
        "bound": {
            str(n): {
                "min_mse": sse / px,
                "max_psnr_db": 10 * math.log10(px / sse),
                "ci95": ci(n),
                "oracle_ssim": float(np.mean(ssim[n])),
            }
            for n, (sse, px) in totals.items()
        },
    }
    for n, b in result["bound"].items():
        lo, hi = b["ci95"]
        print(
            f"{n} x {n}: least MSE {b['min_mse']:.5f}, PSNR at most {b['max_psnr_db']:.2f} dB [{lo:.2f}, {hi:.2f}]; "
            f"the oracle's SSIM {b['oracle_ssim']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
