"""Quick in-process FedAvg of one model family on generated sites, without Flower.

The same Task interface, server hooks (per-branch averaging, late fusion's MCC weights) and
FedAvg weighting as a federated run, minus the Flower start-up (1-2 minutes on a loaded
2-core machine), so settings can be compared in seconds. Prints the pooled AUC over all
sites' train / val / test units after each round (pooled from the predictions themselves,
which a real federation never sees: a measurement tool, not a product path).

    .venv/bin/python benchmarks/bench_families.py birads --data DIR --sites 4 --patients 24 \\
        --set '{"patch_size": 32, "n_patches": 12, "batch_size": 64, "rounds": 3, "lr": 0.02}'
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.metrics import binary_metrics
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.tasks import Task, task_for
from fedbreast.simulation.simulate import PRESET, PRESETS, prepare_federation

TINY = dict(backbone="smallcnn", bootstrap=0, hist_bins=64, workers=0, local_epochs=1)


def _load(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in arrays.items()})
    return model


def open_sites(task: Task, site_dirs: list[Path], cfg: RunConfig) -> list:
    """The family's inputs at every site that can use it (the others print why not)."""
    opened = []
    for d in site_dirs:
        try:
            opened.append(task.open(d, cfg))
        except SiteUnavailable as exc:
            print(f"unable: {exc}")
    return opened


def _train_round(
    task: Task, cfg: RunConfig, opened: list, arrays: dict[str, np.ndarray], rnd: int, dev: torch.device
) -> dict[str, np.ndarray]:
    """One FedAvg round: every site trains from ``arrays``; examples-weighted mean, then the family's hook."""
    updates = []
    for site in opened:
        model = _load(build_model(cfg), arrays)
        torch.manual_seed(cfg.seed * 1000 + rnd)
        try:
            stats = task.train(model, site, cfg, rnd, dev)
        except SiteUnavailable:
            continue
        updates.append(
            ({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, {"num-examples": stats.examples})
        )
    w = np.array([u[1]["num-examples"] for u in updates], float)
    agg = {
        k: np.asarray(sum(u[0][k].astype(np.float64) * wi for u, wi in zip(updates, w)) / w.sum()).astype(
            arrays[k].dtype
        )
        for k in arrays
    }
    return task.after_train(cfg, arrays, agg, updates)


def federate(
    task: Task,
    cfg: RunConfig,
    opened: list,
    on_round: Callable[[int, torch.nn.Module, dict], None] | None = None,
    init: dict[str, np.ndarray] | None = None,
) -> torch.nn.Module:
    """``cfg.rounds`` of in-process FedAvg over ``opened`` sites; returns the final global model.

    ``on_round(round, global model, server metrics)`` sees the model each round, before the
    family's after_evaluate hook updates it (as a federated evaluation would). ``init``: the
    initial model's arrays (a run checkpoint's, e.g. the public pretraining's); a fresh build without."""
    dev = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    if init is not None:
        if set(init) != set(arrays):
            raise ValueError(f"federate: the initial model's tensors do not match model {cfg.model!r}'s")
        arrays = {k: np.asarray(init[k], dtype=arrays[k].dtype).copy() for k in arrays}
    for rnd in range(1, cfg.rounds + 1):
        arrays = _train_round(task, cfg, opened, arrays, rnd, dev)
        model = _load(build_model(cfg), arrays)
        arrays, extra = task.after_evaluate(
            arrays, [task.extra_metrics(model, s, cfg, dev, server_round=rnd) for s in opened]
        )
        if on_round is not None:
            on_round(rnd, model, extra)
    return _load(build_model(cfg), arrays)


def run(family: str, data: Path, sites: int, patients: int, seed: int, overrides: dict) -> list[dict]:
    torch.set_num_threads(1)
    site_dirs = prepare_federation(data, sites, patients, seed, echo=lambda *_: None)
    cfg = RunConfig(**{**PRESET, **PRESETS[family], **TINY, "seed": seed, **overrides})
    task, dev = task_for(cfg), torch.device("cpu")
    opened = open_sites(task, site_dirs, cfg)
    history: list[dict] = []
    t0 = time.perf_counter()

    def evaluate(rnd: int, model: torch.nn.Module, extra: dict) -> None:
        nonlocal t0
        row: dict = {"round": rnd}
        for split in ("train", "val", "test"):
            pairs = [task.predict(model, s, split, cfg, dev, server_round=rnd)[:2] for s in opened]
            y = np.concatenate([p[0] for p in pairs])
            p = np.concatenate([p[1] for p in pairs])
            row[f"{split}_auc"] = binary_metrics(y, p)["auc"] if len(set(y.tolist())) == 2 else float("nan")
            row[f"{split}_n"] = int(len(y))
        row.update(extra)
        row["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        history.append(row)

    federate(task, cfg, opened, evaluate)
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=sorted(PRESETS))
    ap.add_argument("--data", required=True, help="where the generated federation lives (made if missing)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="{}", help="JSON of RunConfig overrides (python field names)")
    args = ap.parse_args()
    run(args.family, Path(args.data), args.sites, args.patients, args.seed, json.loads(args.set))


if __name__ == "__main__":
    main()
