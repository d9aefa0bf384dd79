"""Seed 004's modality x view late fusion:
the site Task of the ``latefusion`` family (its data, training and scoring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import MODALITY_VIEW_SLOTS, ModalityViewDataset, make_loader
from fedbreast.shared.data.manifest import group_exams
from fedbreast.shared.data.preprocess import lesion_mask
from fedbreast.shared.data.schema import ImageRecord, Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.explain import ViewHeatmap
from fedbreast.shared.families.latefusion.fusion import SLOTS
from fedbreast.shared.training.local import autocast
from fedbreast.shared.training.tasks import (
    SPLITS,
    FamilySite,
    ScoreRow,
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
        records, name = read_records(site_dir, cfg)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not mammo:
            raise SiteUnavailable(f"{name} has no mammography images")
        cache = cached_images(
            site_dir, mammo, preprocess_config("modality_view", cfg, size=cfg.slot_size(cfg.image_h, cfg.image_w)), cfg
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
        if cfg.latefusion_weights == "mean":  # no counts, no MCC: the fusion weights stay equal
            return {}
        p_slots, avail, y, m = self._slot_probs(model, site, "val", cfg, device)
        return {"val_confusion": confusion_table(model.cpu(), p_slots, avail, y, m)}  # fusion maths on the CPU copy

    def branch_predictions(self, model, site, split, cfg, device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Four scores of one model on the labelled breasts with both modalities (the same
        breasts, in the same order, for each): {"fused": :meth:`predict`'s MCC-weighted fusion,
        "mean": the plain mean of the two modalities' plain view means, "ffdm" | "cesm": one
        modality's MCC-weighted view fusion alone}: (labels, scores) each."""
        p_slots, avail, y, m = self._slot_probs(model, site, split, cfg, device)
        model = model.cpu()
        pm, am = model.modality_probs(p_slots, avail)
        keep = (m & am.all(dim=1)).numpy()
        a = avail.float()
        view_mean = torch.stack(
            [(p_slots * a)[:, k : k + 2].sum(1) / a[:, k : k + 2].sum(1).clamp_min(1) for k in (0, 2)], 1
        )
        scores = {
            "fused": model.fuse(p_slots, avail),
            "mean": view_mean.mean(dim=1),
            "ffdm": pm[:, 0],
            "cesm": pm[:, 1],
        }
        yk = y.numpy()[keep].astype(np.int64)
        return {k: (yk, v.numpy()[keep].astype(np.float64)) for k, v in scores.items()}

    # ---- site predict: every breast of every exam, any split, labelled or not -------------------

    def _scoring_set(self, site_dir: Path, cfg: RunConfig) -> tuple[list[ImageRecord], Any, ModalityViewDataset | None]:
        records, _ = read_records(site_dir, cfg)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not mammo:
            return records, None, None
        cache = cached_images(
            site_dir, mammo, preprocess_config("modality_view", cfg, size=cfg.slot_size(cfg.image_h, cfg.image_w)), cfg
        )
        return records, cache, ModalityViewDataset(mammo, cache, split=None)

    def _fused(self, model, ds: ModalityViewDataset, cfg: RunConfig, device) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict`'s fused probability of every breast of ``ds`` and its (N, 4) availability."""
        p_slots, avail = [], []
        with torch.no_grad():
            model.to(device).eval()
            for batch in make_loader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers):
                a = batch["available"]
                with autocast(device, cfg.amp):
                    logits = model(batch["x"].to(device), a.to(device))
                p_slots.append(torch.sigmoid(logits.float()).cpu())
                avail.append(a)
            if not p_slots:
                return np.zeros(0), np.zeros((0, 4), bool)
            ps, av = torch.cat(p_slots), torch.cat(avail)
            p = model.fuse(ps.to(device), av.to(device)).cpu()
        return p.numpy().astype(np.float64), av.numpy()

    def score(self, model, site_dir, cfg, device):
        """One row per breast of every exam: the MCC-weighted fusion of its available slots'
        probabilities (:meth:`predict`'s), the empty slots named ("CC-DES": no DES image of the
        CC view, as at an FFDM site; the network skips them, as in training)."""
        records, _, ds = self._scoring_set(Path(site_dir), cfg)
        p, avail = self._fused(model, ds, cfg, device) if ds is not None else (np.zeros(0), np.zeros((0, 4), bool))
        return _rows(records, ds, p, avail)

    def explain(self, model, site_dir, cfg, device) -> Iterator[ViewHeatmap]:
        """Grad-CAM of each available slot's own logit on that slot's network: one heatmap per
        slot image of each scored breast ("CC-FFDM" / "CC-LE" for the FFDM slot, "CC-DES" for the
        CESM slot), in :meth:`score`'s order. The breast's score is not one network's logit but
        an MCC-weighted mean of the slot probabilities (:meth:`LateFusionNet.fuse`), so no single
        logit stands for it: each map explains its slot's vote, weighted in the score by its MCC."""
        from fedbreast.shared.explain.cam import cam_layer, class_activation_maps, logit

        records, cache, ds = self._scoring_set(Path(site_dir), cfg)
        if ds is None or not len(ds):
            return
        p, avail = self._fused(model, ds, cfg, device)
        index = {key: i for i, key in enumerate(ds.breasts)}
        order = [index[(r.patient, r.exam, r.laterality)] for r in _rows(records, ds, p, avail) if r.score is not None]
        by_image: dict[tuple, ImageRecord] = {}
        for r in records:  # the dataset's choice: the first of an (energy, view)
            if r.modality is Modality.MG and r.view.is_mammo:
                by_image.setdefault((r.breast_key, r.energy.value, r.view.value), r)
        model = model.to(device).eval()
        step = max(1, cfg.batch_size)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            x = ds.__getitems__(idx)["x"]  # (B, 4 slots, 1, H, W)
            maps: dict[tuple[int, int], np.ndarray] = {}
            for k, slot in enumerate(SLOTS):
                rows = [j for j, i in enumerate(idx) if avail[i, k]]
                if not rows:
                    continue
                # only this slot's network runs: its images in, its logit out
                m, _ = class_activation_maps(
                    model, [cam_layer(model.nets[slot][0])], x[rows, k].to(device), [logit()] * len(rows),
                    "Grad-CAM", fn=_slot_forward(slot),
                )  # fmt: skip
                maps.update({(j, k): m[n] for n, j in enumerate(rows)})
            for j, i in enumerate(idx):
                key = ds.breasts[i]
                for k, (modality, view) in enumerate(MODALITY_VIEW_SLOTS):
                    if (j, k) not in maps:
                        continue  # an empty slot: nothing the network saw
                    rec = _slot_record(by_image, key, modality, view)
                    mask = lesion_mask(rec.lesions, cache.geometry(rec.sha256)) if rec and rec.lesions else None
                    yield ViewHeatmap(
                        key[0], key[1], key[2], f"{view}-{rec.energy.value if rec else modality}",
                        x[j, k, 0].float().numpy(), maps[(j, k)], "Grad-CAM",
                        score=float(p[i]), lesion=mask, record=rec,
                    )  # fmt: skip


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


def _slot_forward(slot: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nets = model.get_submodule("nets")
        return nets.get_submodule(slot)(x).squeeze(1)

    return forward


def _slot_name(modality: str, view: str) -> str:
    return f"{view}-{'FFDM' if modality == 'FFDM' else 'DES'}"


def _slot_record(by_image: dict, key: tuple[str, str, str], modality: str, view: str) -> ImageRecord | None:
    """The image a slot holds: FFDM, else LE, for the FFDM slot; DES for the CESM slot (the dataset's choice)."""
    sources = ("FFDM", "LE") if modality == "FFDM" else ("DES",)
    return next((by_image[(key, e, view)] for e in sources if (key, e, view) in by_image), None)


def _rows(
    records: list[ImageRecord], ds: ModalityViewDataset | None, p: np.ndarray, avail: np.ndarray
) -> list[ScoreRow]:
    index = {key: i for i, key in enumerate(ds.breasts)} if ds is not None else {}
    mammo_breasts = {r.breast_key for r in records if r.modality is Modality.MG and r.view.is_mammo}
    rows = []
    for exam, ex in sorted(group_exams(records).items()):
        for side in "LR":
            key = (ex.patient, exam, side)
            if key in index:
                i = index[key]
                missing = [_slot_name(m, v) for k, (m, v) in enumerate(MODALITY_VIEW_SLOTS) if not avail[i, k]]
                rows.append(ScoreRow(ex.patient, exam, side, float(p[i]), missing))
            elif key not in mammo_breasts:
                rows.append(ScoreRow(ex.patient, exam, side, None, note="no mammography of this breast"))
            else:
                note = ds.skipped.get("/".join(key), "not scored") if ds is not None else "not scored"
                rows.append(ScoreRow(ex.patient, exam, side, None, note=note))
    return rows
