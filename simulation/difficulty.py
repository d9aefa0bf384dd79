"""How hard is the generated federation? Train a pooled multi-view model and test it on held-out patients.

    .venv/bin/python -m fedbreast.simulation.difficulty --out runs/difficulty --patients 100 --epochs 12

The generator is calibrated so that a good pooled multi-view model lands at a test AUC of
roughly 0.85-0.95 (breast level, malignant vs not). This script is that measurement:
generate 3 sites (seed 0), ingest them through the normal path, train the seed-001
network on all sites' train splits together, pick the epoch with the best validation AUC,
and report test AUC per site and pooled, with 95% bootstrap CIs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedbreast.client.site_data import site_for
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.augment import AUGMENT_PRESETS, augment
from fedbreast.shared.data.generate import generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.metrics import binary_metrics, bootstrap_ci
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.local import predict, train_local
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
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-h", type=int, default=256)
    ap.add_argument("--image-w", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    t0 = time.perf_counter()
    site_dirs = prepare_sites(out, args.patients, args.seed)
    cfg = RunConfig(backbone=args.backbone, image_h=args.image_h, image_w=args.image_w, workers=0, lr=args.lr, batch_size=8)
    sites = [site_for(d, cfg) for d in site_dirs]
    print(f"data ready in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{s.name} {s.exams('train')}/{s.exams('val')}/{s.exams('test')} exams" for s in sites))

    torch.manual_seed(args.seed)
    model = build_model(cfg)
    train = InterleavedLoader([s.loader("train", cfg.batch_size, shuffle=True, workers=0, seed=args.seed) for s in sites], seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    aug = AUGMENT_PRESETS["multiview"]
    best, best_auc, history = None, -1.0, []
    for epoch in range(1, args.epochs + 1):
        lr = args.lr * 0.5 ** sum(epoch > e for e in (6, 10))
        stats = train_local(model, train, lr=lr, amp=cfg.amp, augment=lambda x: augment(x, aug, gen))
        _, yv, pv = evaluate(model, sites, "val", cfg)
        val_auc = binary_metrics(yv, pv)["auc"] if len(set(yv)) > 1 else float("nan")
        history.append({"epoch": epoch, "train_loss": stats.loss, "val_auc": val_auc, "images_per_s": stats.images_per_s})
        print(f"epoch {epoch:2d}  loss {stats.loss:.3f}  val AUC {val_auc:.3f}  {stats.images_per_s:.0f} img/s")
        if val_auc > best_auc:
            best_auc, best = val_auc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    per_site, yt, pt = evaluate(model, sites, "test", cfg)
    result = {"config": vars(args), "history": history, "best_val_auc": best_auc, "test": {}}
    for name, (y, p) in list(per_site.items()) + [("pooled", (yt, pt))]:
        ci = bootstrap_ci(y, p, metrics=("auc",), n_boot=2000) if len(set(y)) > 1 else {"auc": (float("nan"),) * 3}
        result["test"][name] = {"auc": ci["auc"][0], "ci": [ci["auc"][1], ci["auc"][2]], "breasts": int(len(y)), "malignant": int(y.sum())}
        print(f"test {name:8s} AUC {ci['auc'][0]:.3f} (95% CI {ci['auc'][1]:.3f}-{ci['auc'][2]:.3f}), {len(y)} breasts, {int(y.sum())} malignant")
    result["seconds"] = time.perf_counter() - t0
    (out / "difficulty.json").write_text(json.dumps(result, indent=2))
    print(f"written {out / 'difficulty.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
