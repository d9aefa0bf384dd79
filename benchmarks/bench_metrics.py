"""Cost of the per-site evaluation statistics: bootstrap CIs and score histograms.

    .venv/bin/python benchmarks/bench_metrics.py --n 500 --boot 1000

Baseline in the same run: one call of binary_metrics (the point estimate alone), so the
bootstrap's cost is quoted as a multiple of it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedbreast.shared.metrics import BOOTSTRAP_METRICS, binary_metrics, bootstrap_ci, score_histogram


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y = (rng.random(args.n) < 0.3).astype(int)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    point = best_of(lambda: binary_metrics(y, s))
    boot = best_of(lambda: bootstrap_ci(y, s, metrics=BOOTSTRAP_METRICS, n_boot=args.boot))
    hist = best_of(lambda: score_histogram(y, s))
    print(f"binary_metrics (n={args.n})                 {point * 1e3:8.2f} ms")
    print(
        f"bootstrap_ci, all metrics, {args.boot} replicates  {boot * 1e3:8.2f} ms  ({boot / point:.0f}x the point estimate)"
    )
    print(f"score_histogram                             {hist * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
