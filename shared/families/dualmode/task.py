"""Seed 003's dual-mode network on a box around the lesion:
the site Task of the ``dualmode`` family (its data, training and scoring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import LesionBoxDataset
from fedbreast.shared.data.schema import Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.training.local import autocast
from fedbreast.shared.training.tasks import (
    SPLITS,
    FamilySite,
    Task,
    bce,
    cached_images,
    masked_bce,
    preprocess_config,
    read_records,
)


class DualModeTask(Task):
    family, unit, count_unit = "dualmode", "lesion", "lesion"
    units_per_patient = None  # lesions: a patient may have any number
    augment_preset = "roi_box"  # CC and MLO are two projections: each box gets its own warp

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = read_records(site_dir)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not {"LE", "DES"} <= {r.energy.value for r in mammo}:
            raise SiteUnavailable(f"{name} has no CEM images (LE and DES); the dualmode family needs both modes")
        cem = [r for r in mammo if r.energy.value in ("LE", "DES")]
        # Only a breast with an outlined lesion has a box: the others' images are never read, so
        # they are not preprocessed either (half a CEM site's images, half its cache build).
        lesion_breasts = {r.breast_key for r in cem if r.lesions}
        cem = [r for r in cem if r.breast_key in lesion_breasts]
        cache = cached_images(site_dir, cem, preprocess_config("roi_box", cfg), cfg)
        site = FamilySite(site_dir, name, self.family, {}, {})
        for split in SPLITS:
            # Jitter is training augmentation; validation and test boxes sit on the lesion centre.
            jitter = cfg.box_jitter if split == "train" else 0.0
            ds = LesionBoxDataset(
                cem, cache, split=split, box=cfg.box_size, jitter=jitter, seed=cfg.seed, energies=("LE", "DES")
            )
            site.datasets[split], site.units[split] = ds, len(ds)
        if len(site.datasets["train"]) == 0:
            reasons = sorted(set(site.datasets["train"].skipped.values()))[:3]
            raise SiteUnavailable(
                f"{name}: no CEM lesion breast with LE and DES boxes in the train split ({'; '.join(reasons) or 'no outlined lesion'})"
            )
        return site

    def train(self, model, site, cfg, server_round, device, **local):
        site.datasets["train"].set_epoch(server_round)
        warp = self.augmenter(cfg, server_round)

        def loss_fn(m, batch):
            n = int(batch["y_mask"].sum())
            if n == 0:
                return torch.zeros((), device=device), 0
            logits = m(warp(batch["x"].to(device, non_blocking=True)))
            return masked_bce(logits, batch["y"].to(device), batch["y_mask"].to(device)), n

        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        return self._train_with(model, loader, cfg, server_round, device, loss_fn, **local)

    @torch.no_grad()
    def predict(self, model, site, split, cfg, device, server_round=None):
        model.to(device).eval()
        ys, ps = [], []
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers):
            keep = batch["y_mask"].bool()
            if not keep.any():
                continue
            with autocast(device, cfg.amp):
                logits = model(batch["x"][keep].to(device))
            ps.append(torch.sigmoid(logits.float()).cpu().numpy())
            ys.append(batch["y"][keep].numpy())
        if not ys:
            return np.zeros(0, np.int64), np.zeros(0), float("nan")
        y, p = np.concatenate(ys).astype(np.int64), np.concatenate(ps).astype(np.float64)
        return y, p, bce(p, y)
