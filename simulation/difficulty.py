"""How hard is the generated federation? Train a pooled multi-view model and test it on held-out patients.

    .venv/bin/python -m fedbreast.simulation.difficulty --out runs/difficulty --patients 100 --epochs 24

The generator is calibrated so that a good pooled multi-view model lands at a test AUC of
roughly 0.85-0.95 (breast level, malignant vs not). This script is that measurement:
generate 3 sites (seed 0), ingest them through the normal path, train the seed-001
network (SGD, momentum 0.9, weight decay 5e-4, flips and +-10 degree rotations) on all
sites' train splits pooled into one shuffled set, pick the epoch with the best validation
AUC, and report test AUC per site and pooled, with 95% bootstrap CIs. The result and the
table in docs/generated-data.md ("Measured difficulty") come from the command above:
about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.augment import AUGMENT_PRESETS, augment
from fedbreast.shared.data.generate import generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.site_data import site_for
from fedbreast.shared.metrics import binary_metrics, bootstrap_ci
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.local import match_channels, predict, train_local
from fedbreast.shared.training.pooled import InterleavedLoader


def prepare_sites(out: Path, patients: int, seed: int) -> list[Path]:
    """Generate (once) and ingest the federation; returns the site directories."""
    gen_dir = out / "generated"
    if not (gen_dir / "site-1" / "annotations.csv").exists():
        generate_federation(gen_dir, n_sites=3, patients_per_site=patients, seed=seed)
    sites = []
    for site in sorted(p for p in gen_dir.iterdir() if p.is_dir()):
        site_dir = out / "sites" / site.name
        ingest(site / "dicom", site_dir, annotations=site / "annotations.csv", site=site.name, workers=2)
        sites.append(site_dir)
    return sites


class PooledLoader:
    """Batches drawn from one shuffled pool of every site's train exams (pooling the data).

    FFDM exams get a zero DES channel so they batch with CEM exams. Every batch mixes
    sites, so BatchNorm's batch and running statistics describe the same mixture; with
    one-site batches (``InterleavedLoader``) the running statistics follow whichever
    sites the epoch happened to end on, and the validation AUC swings from epoch to epoch.
    """

    def __init__(self, datasets, batch_size: int, channels: int = 2, seed: int = 0):
        self.datasets, self.batch_size, self.channels = list(datasets), batch_size, channels
        self.rng = np.random.default_rng(seed)
        self.items = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self):
        order = self.rng.permutation(len(self.items))
        for start in range(0, len(order), self.batch_size):
            chosen = [self.items[k] for k in order[start : start + self.batch_size]]
            parts = []
            for d in sorted({d for d, _ in chosen}):
                b = self.datasets[d].__getitems__([i for dd, i in chosen if dd == d])
                parts.append((match_channels(b["x"], self.channels), b["y"], b["y_mask"]))
            yield {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(("x", "y", "y_mask"))}


def evaluate(model, sites, split: str, cfg: RunConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    per_site, ys, ps = {}, [], []
    for data in sites:
        y, p, _ = predict(model, data.loader(split, 16, shuffle=False, workers=0), amp=cfg.amp)
        per_site[data.name] = (y, p)
        ys.append(y)
        ps.append(p)
    return per_site, np.concatenate(ys), np.concatenate(ps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/difficulty")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-h", type=int, default=256)
    ap.add_argument("--image-w", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8, help="exams per batch (4 views each)")
    ap.add_argument(
        "--decay-at",
        default="",
        help="comma-separated epochs after which the lr halves (default: 50%% and 75%% of --epochs)",
    )
    ap.add_argument(
        "--batches",
        choices=("pooled", "per-site"),
        default="pooled",
        help="pooled: every batch mixes sites (default); per-site: one site per batch, interleaved",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    t0 = time.perf_counter()
    site_dirs = prepare_sites(out, args.patients, args.seed)
    cfg = RunConfig(
        backbone=args.backbone,
        image_h=args.image_h,
        image_w=args.image_w,
        workers=0,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    decay_at = [int(e) for e in args.decay_at.split(",") if e.strip()] or [
        round(0.5 * args.epochs),
        round(0.75 * args.epochs),
    ]
    sites = [site_for(d, cfg) for d in site_dirs]
    print(
        f"data ready in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{s.name} {s.exams('train')}/{s.exams('val')}/{s.exams('test')} exams" for s in sites)
    )

    torch.manual_seed(args.seed)
    model = build_model(cfg)
    train: PooledLoader | InterleavedLoader
    if args.batches == "pooled":
        train = PooledLoader([s.datasets["train"] for s in sites], cfg.batch_size, cfg.in_channels, seed=args.seed)
    else:
        train = InterleavedLoader(
            [s.loader("train", cfg.batch_size, shuffle=True, workers=0, seed=args.seed) for s in sites], seed=args.seed
        )
    gen = torch.Generator().manual_seed(args.seed)
    aug = AUGMENT_PRESETS["multiview"]
    best, best_auc, best_epoch, history = None, -1.0, 0, []
    for epoch in range(1, args.epochs + 1):
        lr = args.lr * 0.5 ** sum(epoch > e for e in decay_at)
        stats = train_local(model, train, lr=lr, amp=cfg.amp, augment=lambda x: augment(x, aug, gen))
        _, yv, pv = evaluate(model, sites, "val", cfg)
        val_auc = binary_metrics(yv, pv)["auc"] if len(set(yv)) > 1 else float("nan")
        history.append(
            {"epoch": epoch, "train_loss": stats.loss, "val_auc": val_auc, "images_per_s": stats.images_per_s}
        )
        print(f"epoch {epoch:2d}  loss {stats.loss:.3f}  val AUC {val_auc:.3f}  {stats.images_per_s:.0f} img/s")
        if val_auc > best_auc:
            best_auc, best_epoch, best = val_auc, epoch, copy.deepcopy(model.state_dict())
    assert best is not None, "no epoch improved on the starting AUC of -1: every validation AUC was NaN (or --epochs 0)"
    model.load_state_dict(best)
    per_site, yt, pt = evaluate(model, sites, "test", cfg)
    print(f"best validation AUC {best_auc:.3f} at epoch {best_epoch}")
    result: dict[str, Any] = {
        "config": vars(args),
        "history": history,
        "best_val_auc": best_auc,
        "best_epoch": best_epoch,
        "test": {},
    }
    for name, (y, p) in list(per_site.items()) + [("pooled", (yt, pt))]:
        ci = bootstrap_ci(y, p, metrics=("auc",), n_boot=2000) if len(set(y)) > 1 else {"auc": (float("nan"),) * 3}
        result["test"][name] = {
            "auc": ci["auc"][0],
            "ci": [ci["auc"][1], ci["auc"][2]],
            "breasts": int(len(y)),
            "malignant": int(y.sum()),
        }
        print(
            f"test {name:8s} AUC {ci['auc'][0]:.3f} (95% CI {ci['auc'][1]:.3f}-{ci['auc'][2]:.3f}), {len(y)} breasts, {int(y.sum())} malignant"
        )
    result["seconds"] = time.perf_counter() - t0
    (out / "difficulty.json").write_text(json.dumps(result, indent=2))
    print(f"written {out / 'difficulty.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
