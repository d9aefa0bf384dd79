"""Seed 001's multi-view dual-energy exams:
the site Task of the ``multiview`` family (its data, training and scoring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.site_data import site_for
from fedbreast.shared.training.local import predict as predict_multiview
from fedbreast.shared.training.local import train_local
from fedbreast.shared.training.tasks import (
    Task,
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
