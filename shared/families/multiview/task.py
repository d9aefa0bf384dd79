"""Seed 001's multi-view dual-energy exams:
the site Task of the ``multiview`` family (its data, training and scoring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import ExamDataset, make_loader
from fedbreast.shared.data.manifest import group_exams
from fedbreast.shared.data.preprocess import lesion_mask
from fedbreast.shared.data.site_data import channels_for, preprocess_for, site_for
from fedbreast.shared.explain import ViewHeatmap
from fedbreast.shared.models.multiview import VIEW_ORDER
from fedbreast.shared.training.dp import per_exam_bce
from fedbreast.shared.training.freeze import held
from fedbreast.shared.training.local import _in_channels, autocast, masked_bce, match_channels, train_local
from fedbreast.shared.training.local import predict as predict_multiview
from fedbreast.shared.training.tasks import (
    ScoreRow,
    Task,
    cached_images,
    read_records,
    train_settings,
)


class MultiviewTask(Task):
    family, unit, count_unit = "multiview", "breast", "exam"
    dp_unit = "exam"  # one exam per sample: DP-SGD's epsilon is per exam
    augment_preset, augment_shared_views = "multiview", True  # keep the four views' correspondences

    def open(self, site_dir: str | Path, cfg: RunConfig) -> Any:
        return site_for(site_dir, cfg)

    @staticmethod
    def cnn_stage(cfg: RunConfig, server_round: int | None) -> bool:
        """Two-stage training (``multiview-cnn-rounds``): the rounds in which the CNN trains alone."""
        return server_round is not None and server_round <= cfg.multiview_cnn_rounds

    def train(self, model, site, cfg, server_round, device, **local):
        augment = self.augmenter(cfg, server_round) if cfg.augment else None
        kwargs = dict(train_settings(cfg, server_round, device), augment=augment)
        cnn_stage = self.cnn_stage(cfg, server_round)
        if cnn_stage:  # each view image on its own, on its breast's label (the loss applies the warp)
            loss_fn = per_image_loss(augment, _in_channels(model), device, dp=local.get("dp") is not None)
            kwargs.update(augment=None, loss_fn=loss_fn)
        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        # Two-stage training holds what the stage does not use as it is: it leaves the round
        # bit-identical at every site, so FedAvg keeps it. Nothing is held end to end.
        with held(model, [sub for m in model.two_stage_held(cnn_stage) for sub in m.modules()]):
            return train_local(model.to(device), loader, **{**kwargs, **local})

    def predict(self, model, site, split, cfg, device, server_round=None):
        loader = site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers)
        return predict_multiview(model.to(device), loader, device, cfg.amp)

    def _scoring_set(self, site_dir: Path, cfg: RunConfig):
        records, _ = read_records(site_dir, cfg)  # with virtual-des, the virtual DES it trained with
        mammo = [r for r in records if r.view.is_mammo]
        cache = cached_images(site_dir, mammo, preprocess_for(cfg), cfg)
        ds = ExamDataset(
            mammo,
            cache,
            split=None,
            channels=channels_for(mammo, cfg.in_channels, cfg.single_channel),
            fill_missing=True,
        )
        return records, cache, ds

    def score(self, model, site_dir, cfg, device):
        """Both breasts of every exam, all splits and unlabelled exams included. A missing view is
        a blank (zero) slot, named in the row; training skips such exams (ExamDataset)."""
        site_dir = Path(site_dir)
        records, _, ds = self._scoring_set(site_dir, cfg)
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

    def explain(self, model, site_dir, cfg, device) -> Iterator[ViewHeatmap]:
        """Grad-CAM++ (seed 001's method) on the shared backbone's last spatial map, one map per
        view image, for each breast's malignancy logit: a breast's heatmaps are its own CC and
        MLO (the network also reads the other breast, whose maps for this target are not shown).
        One forward pass per batch serves both breasts' targets and the scores. A blank view has
        no heatmap. The overlay shows the first channel (LE, or the FFDM image)."""
        from fedbreast.shared.explain.cam import cam_layer, class_activation_maps_for, logit

        site_dir = Path(site_dir)
        records, cache, ds = self._scoring_set(site_dir, cfg)
        exams = group_exams(records)
        model = model.to(device).eval()
        in_channels = _in_channels(model)
        layer = cam_layer(model.backbone)
        # the image under the first channel, the one a heatmap is drawn on
        first = {"cem": "LE", "le_only": "LE", "des_only": "DES"}.get(ds.channels)
        for start in range(0, len(ds), cfg.batch_size):
            idx = list(range(start, min(len(ds), start + cfg.batch_size)))
            x = match_channels(ds.__getitems__(idx)["x"].to(device), in_channels)
            b = x.shape[0]
            (left, right), out = class_activation_maps_for(
                [[logit(0)] * b, [logit(1)] * b], model, [layer], x, "Grad-CAM++"
            )
            maps = np.stack([left, right]).reshape(2, b, len(VIEW_ORDER), *left.shape[-2:])
            p = torch.sigmoid(out.float()).cpu().numpy()
            for i, ds_index in enumerate(idx):
                key = ds.exams[ds_index]
                ex = exams[key]
                for j, side in enumerate("LR"):
                    for k, v in enumerate(VIEW_ORDER):
                        if v[0] != side:
                            continue
                        rec = _view_record(ex, side, v[1:], first)
                        if rec is None or not cache.has(rec.sha256):
                            continue  # a blank slot: nothing the network saw
                        mask = lesion_mask(rec.lesions, cache.geometry(rec.sha256)) if rec.lesions else None
                        image = x[i, k, 0].detach().float().cpu().numpy()
                        yield ViewHeatmap(
                            ex.patient, key, side, v[1:], image, maps[j, i, k], "Grad-CAM++",
                            score=float(p[i, j]), lesion=mask, record=rec,
                        )  # fmt: skip


def per_image_loss(
    augment: Callable[[torch.Tensor], torch.Tensor] | None, in_channels: int, device: torch.device, dp: bool
) -> Callable[[Any, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]]:
    """Two-stage training's first stage: BCE of every view image's own logit (the network's
    per-image head) on its breast's label. Under DP-SGD the mean over exams of each exam's loss
    (each sample's loss its own), else over the batch's labelled images, as the fused loss."""

    def loss_fn(m: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if not bool(batch["y_mask"].any()):
            return torch.zeros((), device=device), 0
        x = match_channels(batch["x"].to(device, non_blocking=True), in_channels)
        if augment is not None:
            x = augment(x)
        # (B, 2) breasts -> (B, 4) view images in VIEW_ORDER (LCC, LMLO: left; RCC, RMLO: right)
        y, mask = (batch[k].to(device, non_blocking=True).repeat_interleave(2, 1) for k in ("y", "y_mask"))
        z = m.view_logits(x)
        return (per_exam_bce(z, y, mask).mean() if dp else masked_bce(z, y, mask)), x.shape[0]

    return loss_fn


def _view_record(ex: Any, side: str, view: str, energy: str | None) -> Any:
    """The image shown under a view's heatmap: the LE image of a CEM view, else the FFDM (or LE) one."""
    for e in (energy,) if energy else ("FFDM", "LE"):
        r = ex.images.get((side, view, e))
        if r is not None:
            return r
    return None
