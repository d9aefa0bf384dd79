"""Test AUC of the federated model with DP-SGD at several epsilons, against no DP (issue 5).

Every variant is a full `fedbreast simulate` run (Flower simulation, default multiview
preset) on one generated federation, so the sites and their splits are identical. The
control `eps=1000` is the DP architecture (GroupNorm, frozen early blocks, per-sample
clipping) with almost no noise: it separates the cost of the architecture from that of
the noise.

    .venv/bin/python benchmarks/dp_accuracy.py --out runs/dp-acc --json benchmarks/results/dp_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from fedbreast.server.metric_store import MetricStore
from fedbreast.simulation.simulate import simulate

# "no DP, again": the same run twice shows the run-to-run spread (thread timing, bf16) at this size.
VARIANTS = {"no DP": {}, "no DP, again": {}, "eps=1000 (DP architecture, ~no noise)": {"dp": "local", "dp_epsilon": 1000.0}}
VARIANTS |= {f"eps={e:g}": {"dp": "local", "dp_epsilon": float(e)} for e in (8, 3, 1)}
# Every layer trained under DP (dp-freeze-blocks = 0): 2.5x slower steps (benchmarks/bench_dp.py),
# but no random frozen features when no ImageNet weights are given.
VARIANTS |= {f"{name}+freeze0": {**VARIANTS[name], "dp_freeze_blocks": 0} for name in ("eps=1000 (DP architecture, ~no noise)", "eps=8")}
# A 5x learning rate: clipped per-exam gradients (norm <= 1) make much smaller steps than plain SGD's.
VARIANTS |= {f"{name}, lr 0.05": {**VARIANTS[name], "lr": 0.05} for name in ("eps=1000 (DP architecture, ~no noise)", "eps=8")}


def final_row(run_dir: Path) -> dict:
    store = MetricStore(run_dir)
    last = max(r["round"] for r in store.rows("aggregate"))
    agg = next(r for r in store.rows("aggregate") if r["round"] == last)
    train = [r for r in store.rows("aggregate-train") if r["round"] == last]
    sites = {r["site"]: r.get("test_auc") for r in store.rows("evaluate") if r["round"] == last}
    return {"rounds": last, "pooled_test_auc": agg.get("test_pooled_auc"), "site_test_auc": sites,
            "epsilon_max": train[0].get("dp_epsilon") if train else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/dp-acc"))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    for name, changes in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        t = time.perf_counter()
        simulate(run_dir, sites=args.sites, patients=args.patients, seed=args.seed, data_dir=args.out / "data",
                 overrides={"rounds": args.rounds, "dp_delta": 1e-5, **changes}, echo=lambda _line: None)
        results[name] = final_row(run_dir) | {"seconds": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
    if args.json:  # merged with earlier results, so variants can be run in several calls (--only)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = (json.loads(args.json.read_text()) if args.json.exists() else {}) | results
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    base = results.get("no DP", {}).get("pooled_test_auc")
    sites = sorted({s for r in results.values() for s in r["site_test_auc"]})
    print("\n| variant | ε spent (max over sites) | pooled test AUC | Δ vs no DP | " + " | ".join(sites) + " |")
    print("|---|---|---|---|" + "---|" * len(sites))
    for name, r in results.items():
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        delta = "" if base is None or r["pooled_test_auc"] is None else f"{r['pooled_test_auc'] - base:+.3f}"
        cells = " | ".join(f"{r['site_test_auc'].get(s, float('nan')):.3f}" for s in sites)
        print(f"| {name} | {eps} | {r['pooled_test_auc']:.3f} | {delta} | {cells} |")


if __name__ == "__main__":
    main()
