"""Virtual DES synthesis speed on this machine (issue 18): the cyclegan generator's images/s,
with the multiview classifier's per-image forward (resnet18 on one view image of the same
side) measured in the same run as the baseline, so the figure reads as a ratio too.

    .venv/bin/python benchmarks/bench_synthesis.py [--sizes 64,128,256] [--batch 8] [--json FILE]

Sizes: the simulate preset's 64 px, 128 px, and seed 004's 256 px. Threads: torch's default
(all cores). Each figure is the median of ``--repeats`` timed batches after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedbreast.shared.families.cyclegan.model import CycleGANNet
from fedbreast.shared.models import build_backbone


def images_per_s(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    gan = CycleGANNet().eval()  # the preset's generator: 16 filters, 3 residual blocks
    classifier, _ = build_backbone("resnet18", 1, None)
    classifier.eval()
    rows = []
    print(f"threads {torch.get_num_threads()}, batch {args.batch}")
    print("| side (px) | generator images/s | resnet18 view images/s (baseline) | generator / baseline |")
    print("|---|---|---|---|")
    for side in (int(s) for s in args.sizes.split(",")):
        x = torch.rand(args.batch, 1, side, side)
        g = images_per_s(lambda t: gan(t, "cc"), x, args.repeats)
        b = images_per_s(classifier, x, args.repeats)
        rows.append({"side": side, "generator_images_per_s": g, "baseline_images_per_s": b, "ratio": g / b})
        print(f"| {side} | {g:.1f} | {b:.1f} | {g / b:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
