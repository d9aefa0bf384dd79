"""Seed 004's missing-modality experiments with the federated virtual CESM (issue 18 item 4).

Per data seed, on one generated federation of four hospitals (site-1 and site-4 CEM, site-2
FFDM only, site-3 FFDM + ultrasound):

1. the translator: `fedbreast simulate --model cyclegan` (in-process engine) over all four
   sites; the two CEM sites train it, the others answer "unable";
2. synthesis at every site (`site synthesize --all-views`): virtual DES for every view;
3. the late-fusion classifier (seed 004, claims' in-process FedAvg, the family preset) in arms:
   FFDM + real CESM (no virtual image anywhere), and with virtual DES where a site has none
   while the CEM sites' real DES is replaced for 0, 10, 25, 50, 75 and 100 % of their patients
   (`virtual-des-replace`); FFDM alone, CESM alone and synthetic CESM alone are branches of
   those models (`branch_predictions`). All scored on the CEM sites' test breasts with both
   modalities;
4. the federated question: the multiview family's test AUC at the FFDM-only site with a zero
   DES channel against virtual DES (`virtual-des = true`).

    .venv/bin/python benchmarks/virtual_cesm.py --seeds 0,1,2 --patients 40 --data /tmp/vcesm \\
        --json benchmarks/results/virtual_cesm.json --out docs/virtual-cesm-table.md

Arms are kept under DATA/seed-N/arms (claims.py's cache), so a rerun adds what is missing.
Not here yet: results by breast-density group (the seed's last analysis).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import claims
import numpy as np

from fedbreast.client.synthesize import synthesize_site
from fedbreast.server.checkpoints import load_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.data.generate import default_profiles
from fedbreast.simulation.simulate import prepare_sites, simulate

REPLACE = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
CEM_SITES = ("site-1", "site-4")
FFDM_SITE = "site-2"


def _arms(replace: tuple[float, ...] = REPLACE) -> dict[str, tuple[str, dict[str, Any], str]]:
    arms: dict[str, tuple[str, dict[str, Any], str]] = {
        "FFDM + real CESM": ("latefusion", {}, "branch:fused"),
        "FFDM alone": ("latefusion", {}, "branch:ffdm"),
        "CESM alone (real)": ("latefusion", {}, "branch:cesm"),
        "synthetic CESM alone": ("latefusion", {"virtual_des": True, "virtual_des_replace": 1.0}, "branch:cesm"),
        "FFDM + synthetic CESM": ("latefusion", {"virtual_des": True, "virtual_des_replace": 1.0}, "branch:fused"),
        "multiview, FFDM site: zero DES": ("multiview", {}, "federated"),
        "multiview, FFDM site: virtual DES": ("multiview", {"virtual_des": True}, "federated"),
    }
    for p in replace:
        arms[f"replaced {p:.0%}"] = ("latefusion", {"virtual_des": True, "virtual_des_replace": p}, "branch:fused")
    return arms


def _auc_at(result: Any, sites: tuple[str, ...]) -> float:
    keep = np.isin(result.site, sites)
    return claims._auc(result.y[keep], result.p[keep])


def one_seed(
    data: Path, seed: int, patients: int, gan_rounds: int, echo, replace: tuple[float, ...] = REPLACE
) -> dict[str, Any]:
    root = data / f"seed-{seed}"
    profiles = default_profiles(4, patients)
    site_dirs = prepare_sites(root / "data", profiles, seed, echo)
    t = time.perf_counter()
    gan_dir = root / "cyclegan"
    if not (gan_dir / "checkpoints" / "best.pt").exists():
        simulate(
            gan_dir,
            sites_dir=site_dirs[0].parent,
            overrides={"model": "cyclegan", "rounds": gan_rounds, "seed": seed},
            engine="inprocess",
            echo=echo,
        )
    ckpt = load_checkpoint(gan_dir, "best")
    if ckpt is None:
        raise SystemExit(f"{gan_dir}: the cyclegan run left no best checkpoint")
    best = json.loads((gan_dir / "checkpoints" / "best.json").read_text())["round"]
    aggregate = next(r for r in MetricStore(gan_dir).rows("aggregate") if r["round"] == best)
    quality = {k: v for k, v in aggregate.items() if k.startswith("test_pooled_synth")}
    for d in site_dirs:
        echo(synthesize_site(d, ckpt, all_views=True).summary())
    gan_seconds = time.perf_counter() - t
    arms = _arms(replace)
    claims.ARMS.update(arms)
    ex = claims.Experiment(site_dirs, seed, echo, cache=root / "arms")
    out: dict[str, Any] = {"seed": seed, "gan_seconds": gan_seconds, "quality": quality, "auc": {}}
    for name in arms:
        r = ex.arm(name)
        out["auc"][name] = _auc_at(r, (FFDM_SITE,) if name.startswith("multiview") else CEM_SITES)
    return out


def _cell(values: list[float]) -> str:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "n/a"
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(runs: list[dict[str, Any]], command: str) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [
        f"Test AUC, mean ± SD over data seeds {seeds} (`{command}`); latefusion arms on the CEM sites' "
        "test breasts with both modalities, multiview arms at the FFDM-only site.",
        "",
        "| arm | test AUC |",
        "|---|---|",
    ]
    lines += [f"| {name} | {_cell([r['auc'][name] for r in runs])} |" for name in runs[0]["auc"]]
    q = [r["quality"] for r in runs]
    lines += [
        "",
        "Translator quality (pooled over the CEM sites' test views): PSNR "
        + _cell([x.get("test_pooled_synth_psnr", float("nan")) for x in q])
        + " dB, SSIM "
        + _cell([x.get("test_pooled_synth_ssim", float("nan")) for x in q])
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--gan-rounds", type=int, default=8)
    ap.add_argument("--data", type=Path, default=Path("runs/virtual-cesm"))
    ap.add_argument("--replace", default=",".join(f"{p:g}" for p in REPLACE), help="replacement fractions")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        fractions = tuple(float(p) for p in args.replace.split(","))
        runs.append(one_seed(args.data, seed, args.patients, args.gan_rounds, print, fractions))
        if args.json:  # after every seed: a long measurement keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(runs, indent=1, default=float))
    command = (
        f"benchmarks/virtual_cesm.py --seeds {args.seeds} --patients {args.patients} --gan-rounds {args.gan_rounds}"
    )
    text = table(runs, command)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
