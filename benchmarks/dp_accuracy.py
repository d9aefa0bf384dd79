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
import time
from pathlib import Path

from fedbreast.server.metric_store import MetricStore
from fedbreast.simulation.simulate import simulate

VARIANTS = {"no DP": {}, "eps=1000 (DP architecture, ~no noise)": {"dp": "local", "dp_epsilon": 1000.0}}
VARIANTS |= {f"eps={e:g}": {"dp": "local", "dp_epsilon": float(e)} for e in (8, 3, 1)}


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
        run_dir = args.out / name.split(" ")[0].replace("=", "")
        t = time.perf_counter()
        simulate(run_dir, sites=args.sites, patients=args.patients, seed=args.seed, data_dir=args.out / "data",
                 overrides={"rounds": args.rounds, "dp_delta": 1e-5, **changes}, echo=lambda _line: None)
        results[name] = final_row(run_dir) | {"seconds": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("no DP", {}).get("pooled_test_auc")
    sites = sorted({s for r in results.values() for s in r["site_test_auc"]})
    print("\n| variant | ε spent (max over sites) | pooled test AUC | Δ vs no DP | " + " | ".join(sites) + " |")
    print("|---|---|---|---|" + "---|" * len(sites))
    for name, r in results.items():
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        delta = "" if base is None or r["pooled_test_auc"] is None else f"{r['pooled_test_auc'] - base:+.3f}"
        cells = " | ".join(f"{r['site_test_auc'].get(s, float('nan')):.3f}" for s in sites)
        print(f"| {name} | {eps} | {r['pooled_test_auc']:.3f} | {delta} | {cells} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
