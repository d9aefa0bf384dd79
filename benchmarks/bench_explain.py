"""Do the heatmaps of ``site predict --explain`` point at lesions? Per family, on generated data.

    .venv/bin/python benchmarks/bench_explain.py --data /tmp/explain-data --out benchmarks/results/explain.json

Each family is trained by in-process FedAvg (benchmarks/bench_families.py: the same Task,
server hooks and weighting as a federated run, without Flower's start-up) on a generated
federation (``--sites`` hospitals cycling CEM, FFDM, FFDM+US, ``--patients`` each), with its
``simulate`` preset. Its explanations are then made, exactly as ``site predict --explain``
makes them (``Task.explain``), on a second generated federation of new hospitals with another
seed, never seen in training, whose annotations outline every lesion. Per family:

* pointing game: the share of outlined-lesion images whose heatmap maximum lies inside the lesion;
* energy inside: the mean share of the heatmap's mass inside the lesion;
* the random-heatmap baseline of both: the lesion's mean area fraction (exact, see
  shared/explain/pointing.py), and the same family's untrained (random-init) network, which
  shows what the architecture alone (e.g. a patch map's window) puts on the lesion;
* the trained model's AUC on the new hospitals (pooled), so a poor map can be told from a poor model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.explain.pointing import pointing_score
from fedbreast.shared.metrics import binary_metrics
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.tasks import task_for
from fedbreast.simulation.simulate import PRESET, PRESETS, prepare_federation

sys.path.insert(0, str(Path(__file__).parent))
from bench_families import federate, open_sites  # noqa: E402  (a sibling script)

FAMILIES = ("multiview", "birads", "dualmode", "mgus", "latefusion")


def pointing(task: Any, model: torch.nn.Module, site_dirs: list[Path], cfg: RunConfig) -> dict[str, Any]:
    dev = torch.device("cpu")
    heatmaps = (hm for d in site_dirs for hm in _explain(task, model, d, cfg, dev))
    return pointing_score(heatmaps).as_dict()


def _explain(task: Any, model: torch.nn.Module, site_dir: Path, cfg: RunConfig, dev: torch.device):
    from fedbreast.shared.data.site_data import SiteUnavailable

    try:
        yield from task.explain(model, site_dir, cfg, dev)
    except SiteUnavailable as exc:
        print(f"  {site_dir.name}: {exc}", flush=True)


def external_auc(task: Any, model: torch.nn.Module, opened: list, cfg: RunConfig) -> float:
    dev = torch.device("cpu")
    ys, ps = [], []
    for site in opened:
        for split in ("train", "val", "test"):  # a new hospital: all of it is external
            y, p, _ = task.predict(model, site, split, cfg, dev)
            ys.append(y)
            ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    return float(binary_metrics(y, p)["auc"]) if len(set(y.tolist())) == 2 else float("nan")


def run(family: str, train_dirs: list[Path], new_dirs: list[Path], rounds: int, seed: int) -> dict[str, Any]:
    cfg = RunConfig(**{**PRESET, **PRESETS[family], "workers": 0, "bootstrap": 0, "rounds": rounds, "seed": seed})
    task = task_for(cfg)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    untrained = build_model(cfg)
    model = federate(task, cfg, open_sites(task, train_dirs, cfg))
    trained_s = time.perf_counter() - t0
    row: dict[str, Any] = {"family": family, "rounds": rounds, "train_s": round(trained_s, 1)}
    row["trained"] = pointing(task, model, new_dirs, cfg)
    row["untrained"] = pointing(task, untrained, new_dirs, cfg)
    row["external_auc"] = external_auc(task, model, open_sites(task, new_dirs, cfg), cfg)
    print(json.dumps(row), flush=True)
    return row


def beats_random(score: dict[str, Any]) -> float:
    """One-sided binomial p-value of at least this many hits if each image were a random heatmap
    (hit probability: the mean lesion area fraction; a slight simplification of the exact
    Poisson-binomial, whose per-image fractions the score does not keep)."""
    from scipy.stats import binomtest

    n, rate, p0 = score["images"], score["hit_rate"], score["random_hit_rate"]
    if not n or rate is None or p0 is None:
        return float("nan")
    return float(binomtest(round(rate * n), n, p0, alternative="greater").pvalue)


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"

    def pval(v: float) -> str:
        return "n/a" if np.isnan(v) else ("< 0.001" if v < 0.001 else f"{v:.2f}")

    out = [
        "| family (method) | images | hit rate | random | p (hits > random) | untrained | energy inside | random "
        "| untrained | external AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    method = {"multiview": "Grad-CAM++", "birads": "patch score map"}
    for r in rows:
        t, u = r["trained"], r["untrained"]
        out.append(
            f"| {r['family']} ({method.get(r['family'], 'Grad-CAM')}) | {t['images']} | {f(t['hit_rate'])} | "
            f"{f(t['random_hit_rate'])} | {pval(beats_random(t))} | {f(u['hit_rate'])} | {f(t['energy_inside'])} | "
            f"{f(t['random_energy_inside'])} | {f(u['energy_inside'])} | {f(r['external_auc'])} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="where both generated federations live (made if missing)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--new-patients", type=int, default=16, help="patients per new (external) hospital")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet = lambda *_: None  # noqa: E731
    data = Path(args.data)
    train_dirs = prepare_federation(data / "train", args.sites, args.patients, args.seed, echo=quiet)
    new_dirs = prepare_federation(data / "new", 3, args.new_patients, args.seed + 1000, echo=quiet)
    t0 = time.perf_counter()
    rows = [run(f, train_dirs, new_dirs, args.rounds, args.seed) for f in args.families.split(",") if f]
    print(table(rows))
    if args.out:
        meta = {
            "command": " ".join(["benchmarks/bench_explain.py", *sys.argv[1:]]),
            "wall_s": round(time.perf_counter() - t0, 1),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
