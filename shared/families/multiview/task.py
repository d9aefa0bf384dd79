"""Seed 001's multi-view dual-energy exams:
the site Task of the ``multiview`` family (its data, training and scoring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import ExamDataset, make_loader
from fedbreast.shared.data.manifest import group_exams
from fedbreast.shared.data.site_data import channels_for, preprocess_for, site_for, site_records
from fedbreast.shared.training.local import _in_channels, autocast, match_channels, train_local
from fedbreast.shared.training.local import predict as predict_multiview
from fedbreast.shared.training.tasks import (
    ScoreRow,
    Task,
    cached_images,
    train_settings,
)


class MultiviewTask(Task):
    family, unit, count_unit = "multiview", "breast", "exam"
    dp_unit = "exam"  # one exam per sample: DP-SGD's epsilon is per exam
    augment_preset, augment_shared_views = "multiview", True  # keep the four views' correspondences

    def open(self, site_dir: str | Path, cfg: RunConfig) -> Any:
        return site_for(site_dir, cfg)

    def train(self, model, site, cfg, server_round, device, **local):
        kwargs = dict(
            train_settings(cfg, server_round, device),
            augment=self.augmenter(cfg, server_round) if cfg.augment else None,
        )
        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        return train_local(model.to(device), loader, **{**kwargs, **local})

    def predict(self, model, site, split, cfg, device, server_round=None):
        loader = site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers)
        return predict_multiview(model.to(device), loader, device, cfg.amp)

    def score(self, model, site_dir, cfg, device):
        """Both breasts of every exam, all splits and unlabelled exams included. A missing view is
        a blank (zero) slot, named in the row; training skips such exams (ExamDataset)."""
        site_dir = Path(site_dir)
        records = site_records(site_dir)
        mammo = [r for r in records if r.view.is_mammo]
        cache = cached_images(site_dir, mammo, preprocess_for(cfg), cfg)
        ds = ExamDataset(mammo, cache, split=None, channels=channels_for(mammo, cfg.in_channels), fill_missing=True)
        loader = make_loader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
        model = model.to(device).eval()
        in_channels = _in_channels(model)
        probs = []
        with torch.no_grad():
            for batch in loader:
                x = match_channels(batch["x"].to(device, non_blocking=True), in_channels)
                with autocast(device, cfg.amp):
                    probs.append(torch.sigmoid(model(x).float()).cpu().numpy())
        p = np.concatenate(probs).astype(np.float64) if probs else np.zeros((0, 2))
        scored = {key: i for i, key in enumerate(ds.exams)}
        rows = []
        for key, ex in sorted(group_exams(records).items()):
            for j, side in enumerate("LR"):
                if key in scored:
                    i = scored[key]
                    # the exam's blank views, in both breasts' rows: a fused network sees all four
                    rows.append(ScoreRow(ex.patient, key, side, float(p[i, j]), list(ds.missing[i])))
                else:
                    note = ds.skipped.get(key, "not a mammography exam")
                    rows.append(ScoreRow(ex.patient, key, side, None, note=note))
        return rows
