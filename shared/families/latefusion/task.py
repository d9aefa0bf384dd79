"""Seed 004's modality x view late fusion:
the site Task of the ``latefusion`` family (its data, training and scoring)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import ModalityViewDataset
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

if TYPE_CHECKING:
    from fedbreast.shared.models.latefusion import LateFusionNet


class LateFusionTask(Task):
    """Unit: the breast. The evaluate reply carries ``val_confusion``: (tp, fp, tn, fn) at
    threshold 0.5 on the validation split for each slot and each view-fused modality
    (24 counts, :data:`FUSION_UNITS` order); the server turns the sums into MCC weights."""

    family, unit, count_unit = "latefusion", "breast", "breast"
    augment_preset = "modality_view"  # one CNN per slot: each slot image gets its own warp

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = read_records(site_dir)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not mammo:
            raise SiteUnavailable(f"{name} has no mammography images")
        cache = cached_images(
            site_dir, mammo, preprocess_config("modality_view", cfg, size=(cfg.image_h, cfg.image_w)), cfg
        )
        site = FamilySite(site_dir, name, self.family, {}, {})
        for split in SPLITS:
            ds = ModalityViewDataset(mammo, cache, split=split)
            site.datasets[split], site.units[split] = ds, len(ds)
        if len(site.datasets["train"]) == 0:
            raise SiteUnavailable(f"{name}: no breast with a cached FFDM/LE or DES view in the train split")
        return site

    def train(self, model, site, cfg, server_round, device, **local):
        warp = self.augmenter(cfg, server_round)

        def loss_fn(m, batch):
            avail = batch["available"].to(device)
            mask = avail & batch["y_mask"].bool().to(device)[:, None]
            n = int(mask.any(dim=1).sum())
            if n == 0:
                return torch.zeros((), device=device), 0
            logits = m(warp(batch["x"].to(device, non_blocking=True)), avail)
            y = batch["y"].to(device)[:, None].expand_as(logits)
            return masked_bce(logits, y, mask), n

        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        return self._train_with(model, loader, cfg, server_round, device, loss_fn, **local)

    @torch.no_grad()
    def _slot_probs(self, model, site, split, cfg, device):
        model.to(device).eval()
        ps, avs, ys, ms = [], [], [], []
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers):
            avail = batch["available"]
            with autocast(device, cfg.amp):
                logits = model(batch["x"].to(device), avail.to(device))
            ps.append(torch.sigmoid(logits.float()).cpu())
            avs.append(avail)
            ys.append(batch["y"])
            ms.append(batch["y_mask"].bool())
        if not ps:
            return (
                torch.zeros(0, 4),
                torch.zeros(0, 4, dtype=torch.bool),
                torch.zeros(0),
                torch.zeros(0, dtype=torch.bool),
            )
        return torch.cat(ps), torch.cat(avs), torch.cat(ys), torch.cat(ms)

    def predict(self, model, site, split, cfg, device, server_round=None):
        p_slots, avail, y, m = self._slot_probs(model, site, split, cfg, device)
        p = model.fuse(p_slots.to(device), avail.to(device)).cpu()
        keep = m & avail.any(dim=1)
        y_np, p_np = y[keep].numpy().astype(np.int64), p[keep].numpy().astype(np.float64)
        return y_np, p_np, bce(p_np, y_np)

    def extra_metrics(self, model, site, cfg, device, server_round=None):
        p_slots, avail, y, m = self._slot_probs(model, site, "val", cfg, device)
        return {"val_confusion": confusion_table(model.cpu(), p_slots, avail, y, m)}  # fusion maths on the CPU copy


def confusion_table(
    model: LateFusionNet, p_slots: torch.Tensor, avail: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor
) -> list[int]:
    """24 ints: (tp, fp, tn, fn) at 0.5 for the four slots, then the two view-fused modalities."""
    pm, am = (
        model.modality_probs(p_slots, avail)
        if len(p_slots)
        else (torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool))
    )
    cols = [(p_slots[:, k], avail[:, k]) for k in range(4)] + [(pm[:, k], am[:, k]) for k in range(2)]
    out: list[int] = []
    for p, a in cols:
        sel = a.bool() & labelled.bool()
        pred, pos = (p[sel] >= 0.5), (y[sel] >= 0.5)
        out += [int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & ~pos).sum()), int((~pred & pos).sum())]
    return out
