"""Seed 002's mammography + ultrasound:
the site Task of the ``mgus`` family (its data, training and scoring)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import MammoUSPairDataset
from fedbreast.shared.data.schema import Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.training.local import autocast
from fedbreast.shared.training.tasks import (
    SPLITS,
    FamilySite,
    Task,
    bce,
    cached_images,
    preprocess_config,
    read_records,
    unit_index,
    unit_predictions,
)

log = logging.getLogger("fedbreast.families.mgus")


class MgusTask(Task):
    """Unit: the lesion breast (the mean over its mammography appearances, as the seed's
    "average malignancy probability of all its appearances"). A sample without ultrasound
    is scored by the mammography branch alone."""

    family, unit, count_unit = "mgus", "lesion", "lesion"
    units_per_patient = None  # lesions: a patient may have any number
    augment_preset = "us"  # seed 002: translation, rotation and flips of both lesion crops
    MG_ENERGIES = ("FFDM", "LE")

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = read_records(site_dir)
        mg = [
            r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in self.MG_ENERGIES
        ]
        if not mg:
            raise SiteUnavailable(
                f"{name} has no FFDM or LE mammography; the mgus family needs a mammography branch input"
            )
        us = [r for r in records if r.modality is Modality.US]
        cache_mg = cached_images(site_dir, mg, preprocess_config("patches", cfg), cfg)
        cache_us = cached_images(site_dir, us, preprocess_config("us", cfg), cfg) if us else None
        site = FamilySite(site_dir, name, self.family, {}, {}, {"unit_of_sample": {}, "has_us": bool(us)})
        for split in SPLITS:
            ds = MammoUSPairDataset(
                mg + us,
                cache_mg,
                cache_us,
                split=split,
                crop=cfg.crop_size,
                mg_energies=self.MG_ENERGIES,
                seed=cfg.seed,
            )
            unit_of_sample, keys = unit_index([r.breast_key for r, _ in ds.samples])
            site.datasets[split], site.units[split] = ds, len(keys)
            site.info["unit_of_sample"][split] = unit_of_sample
        if len(site.datasets["train"]) == 0:
            reasons = sorted(set(site.datasets["train"].skipped.values()))[:3]
            raise SiteUnavailable(
                f"{name}: no outlined mammography lesion in the train split ({'; '.join(reasons) or 'no outlines'})"
            )
        if not us:
            log.info("%s has no ultrasound: it trains the mammography branch only", name)
        return site

    @staticmethod
    def fusion_phase(cfg: RunConfig, server_round: int | None) -> bool:
        """Two-step training: the fusion network trains (and scores) after the modality rounds."""
        if cfg.mgus_training == "end-to-end":
            return True
        return server_round is None or server_round > cfg.mgus_modality_rounds

    def train(self, model, site, cfg, server_round, device, **local):
        fusion_only = cfg.mgus_training == "two-step" and self.fusion_phase(cfg, server_round)
        if fusion_only and not site.info["has_us"]:
            raise SiteUnavailable(
                f"{site.name} has no ultrasound: nothing to train in the fusion step (round {server_round})"
            )
        site.datasets["train"].set_epoch(server_round)
        for branch in (model.mg, model.us):
            branch.requires_grad_(not fusion_only)
        warp = self.augmenter(cfg, server_round)

        def loss_fn(m, batch):
            ym = batch["y_mask"].bool()
            n = int(ym.sum())
            if n == 0:
                return torch.zeros((), device=device), 0
            y, mask = batch["y"].to(device), ym.to(device)
            # The ultrasound branch and the fusion network only ever see samples that have an
            # ultrasound image: a batch without one leaves their weights and BN statistics untouched.
            sel = batch["has_us"].bool().to(device)
            n_us = int((sel & mask).sum())
            mg_x = warp(batch["mg"].to(device, non_blocking=True))
            us_x = warp(batch["us"].to(device, non_blocking=True)[sel])
            if fusion_only:  # step 2: frozen modality networks (eval mode: BN statistics stay as trained)
                if n_us == 0:
                    return torch.zeros((), device=device), 0
                m.mg.eval()
                m.us.eval()
                with torch.no_grad():
                    d_mg, d_us = m.mg(mg_x[sel]), m.us(us_x)
                fused, h = m.fusion_logit_and_features(d_mg, d_us)
                return m.head_loss(m.fusion_head, h, fused, y[sel], mask[sel]), n_us
            d_mg = m.mg(mg_x)
            loss = m.head_loss(m.mg.head, d_mg, m.mg.logit(d_mg), y, mask)
            if n_us:
                d_us = m.us(us_x)
                loss = loss + m.head_loss(m.us.head, d_us, m.us.logit(d_us), y[sel], mask[sel])
                if cfg.mgus_training == "end-to-end":
                    fused, h = m.fusion_logit_and_features(d_mg[sel], d_us)
                    loss = loss + m.head_loss(m.fusion_head, h, fused, y[sel], mask[sel])
            return loss, n

        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        try:
            return self._train_with(model, loader, cfg, server_round, device, loss_fn, **local)
        finally:
            for branch in (model.mg, model.us):
                branch.requires_grad_(True)

    @torch.no_grad()
    def predict(self, model, site, split, cfg, device, server_round=None):
        model.to(device).eval()
        fused_ready = self.fusion_phase(cfg, server_round)
        unit_of_sample = site.info["unit_of_sample"][split]
        units, probs, labels, masks = [], [], [], []
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers):
            with autocast(device, cfg.amp):
                out = model(batch["mg"].to(device), batch["us"].to(device))
            p_mg, p_us, p_f = (torch.sigmoid(out[k].float()).cpu() for k in ("mg", "us", "fused"))
            has_us = batch["has_us"].bool()
            # Before the fusion network has trained (two-step, step 1) both modalities vote equally.
            p = torch.where(has_us, p_f if fused_ready else (p_mg + p_us) / 2, p_mg)
            probs.append(p.numpy())
            units.append(unit_of_sample[batch["index"].numpy()])
            labels.append(batch["y"].numpy())
            masks.append(batch["y_mask"].numpy().astype(bool))
        ids, y, p = unit_predictions(units, probs, labels, masks, site.units[split])
        return y, p.astype(np.float64), bce(p, y)
