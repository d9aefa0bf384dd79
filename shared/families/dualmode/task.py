"""Seed 003's dual-mode network on a box around the lesion:
the site Task of the ``dualmode`` family (its data, training and scoring)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import LesionBoxDataset, _window, make_loader
from fedbreast.shared.data.manifest import group_exams
from fedbreast.shared.data.preprocess import lesion_mask
from fedbreast.shared.data.schema import ImageRecord, Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.explain import ViewHeatmap
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


class DualModeTask(Task):
    family, unit, count_unit = "dualmode", "lesion", "lesion"
    units_per_patient = None  # lesions: a patient may have any number
    augment_preset = "roi_box"  # CC and MLO are two projections: each box gets its own warp

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = read_records(site_dir, cfg)
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
            # Jitter is training augmentation; validation and test boxes sit on the lesion centre,
            # or test-box-shift px off it (seed 003's robustness test; fixed per lesion).
            jitter = cfg.box_jitter if split == "train" else 0.0
            shift = cfg.test_box_shift if split != "train" else 0.0
            ds = LesionBoxDataset(
                cem,
                cache,
                split=split,
                box=cfg.box_size,
                jitter=jitter,
                seed=cfg.seed,
                energies=("LE", "DES"),
                shift=shift,
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

    # ---- site predict: every breast of every exam, any split, labelled or not -------------------

    def _scoring_set(self, site_dir: Path, cfg: RunConfig) -> tuple[list[ImageRecord], Any, LesionBoxDataset | None]:
        """The site's records and every CEM lesion breast's centred boxes (test-time: no jitter),
        all splits, unlabelled breasts included (``y_mask`` false)."""
        records, _ = read_records(site_dir, cfg)
        cem = [r for r in _mammo(records) if r.energy.value in ENERGIES]
        lesion_breasts = {r.breast_key for r in cem if r.lesions}
        cem = [r for r in cem if r.breast_key in lesion_breasts]
        if not cem:
            return records, None, None
        cache = cached_images(site_dir, cem, preprocess_config("roi_box", cfg), cfg)
        ds = LesionBoxDataset(cem, cache, split=None, box=cfg.box_size, jitter=0.0, seed=cfg.seed, energies=ENERGIES)
        return records, cache, ds

    @torch.no_grad()
    def _probs(self, model, ds: LesionBoxDataset, cfg: RunConfig, device) -> np.ndarray:
        """predict()'s forward pass on every sample of ``ds`` (labelled or not)."""
        model.to(device).eval()
        ps = []
        for batch in make_loader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers):
            with autocast(device, cfg.amp):
                logits = model(batch["x"].to(device))
            ps.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(ps).astype(np.float64) if ps else np.zeros(0)

    def score(self, model, site_dir, cfg, device):
        """One row per breast of every exam (``unit="lesion"``: the breast's largest outlined
        lesion, as in training): the centred LE and DES boxes of CC and MLO, the same forward
        pass as :meth:`predict`. A breast without an outline, without CEM or with a view
        missing has no score and a note (training skips it too; a missing view is also named)."""
        site_dir = Path(site_dir)
        records, _, ds = self._scoring_set(site_dir, cfg)
        p = self._probs(model, ds, cfg, device) if ds is not None else np.zeros(0)
        index = {key: i for i, key in enumerate(ds.breasts)} if ds is not None else {}
        return _rows(records, ds, index, p)

    def explain(self, model, site_dir, cfg, device) -> Iterator[ViewHeatmap]:
        """Grad-CAM of the lesion logit on the LE network (its CC and MLO boxes) and on the DES
        network, from one forward pass: four heatmaps per scored breast ("CC-LE", "CC-DES", "MLO-LE",
        "MLO-DES"; two, of its mode, for a single-mode network), in :meth:`score`'s order, each on the box the network saw, with the breast's
        score (the scoring pass) and its outline cut by the same window."""
        from fedbreast.shared.explain.cam import cam_layer, class_activation_maps, logit

        site_dir = Path(site_dir)
        records, cache, ds = self._scoring_set(site_dir, cfg)
        if ds is None or not len(ds):
            return
        p = self._probs(model, ds, cfg, device)
        index = {key: i for i, key in enumerate(ds.breasts)}
        order = [index[(r.patient, r.exam, r.laterality)] for r in _rows(records, ds, index, p) if r.score is not None]
        by_image: dict[tuple, ImageRecord] = {}
        for r in _mammo(records):  # the dataset's choice: the first of a (view, energy)
            by_image.setdefault((r.breast_key, r.view.value, r.energy.value), r)
        model = model.to(device).eval()
        modes = getattr(model, "modes", ENERGIES)  # a single-mode network (dualmode_modes) reads one
        layers = [cam_layer(model.get_submodule(e.lower())) for e in modes]  # one network per energy
        step = max(1, cfg.batch_size)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            x = ds.__getitems__(idx)["x"].to(device)  # (B, 2 views, 2 energies, S, S)
            b = x.shape[0]
            # one forward pass; each network sees the B samples' CC and MLO boxes (B x 2 maps, sample-major)
            per_net, _ = class_activation_maps(model, layers, x, [logit()] * b, "Grad-CAM", per_layer=True)
            maps = per_net.reshape(len(layers), b, 2, *x.shape[-2:])
            for j, i in enumerate(idx):
                key = ds.breasts[i]
                corners = ds.boxes(i)
                for v, view in enumerate(ds.VIEWS):
                    for e, energy in enumerate(modes):
                        rec = by_image[(key, view, energy)]
                        k = ENERGIES.index(energy)  # the box's mode axis
                        image = x[j, v, k].detach().float().cpu().numpy()
                        mask = _box_mask(rec, by_image, cache, corners[v, k], ds.box)
                        yield ViewHeatmap(
                            key[0], key[1], key[2], f"{view}-{energy}", image, maps[e][j, v], "Grad-CAM",
                            score=float(p[i]), unit="lesion", lesion=mask, record=rec,
                        )  # fmt: skip


ENERGIES = ("LE", "DES")


def _mammo(records: list[ImageRecord]) -> list[ImageRecord]:
    return [r for r in records if r.modality is Modality.MG and r.view.is_mammo]


def _rows(records: list[ImageRecord], ds: LesionBoxDataset | None, index: dict, p: np.ndarray) -> list[ScoreRow]:
    by_breast: dict[tuple[str, str, str], list[ImageRecord]] = defaultdict(list)
    for r in _mammo(records):
        by_breast[r.breast_key].append(r)
    rows = []
    for exam, ex in sorted(group_exams(records).items()):
        for side in "LR":
            key = (ex.patient, exam, side)
            if key in index:
                rows.append(ScoreRow(ex.patient, exam, side, float(p[index[key]]), unit="lesion"))
                continue
            imgs = by_breast.get(key, [])
            cem = [r for r in imgs if r.energy.value in ENERGIES]
            missing: list[str] = []
            if not imgs:
                note = "no mammography of this breast"
            elif {r.energy.value for r in cem} != set(ENERGIES):
                note = "no CEM: the dualmode network reads a low-energy (LE) and a recombined (DES) image"
            elif not any(r.lesions for r in cem):
                note = "no outlined lesion: the dualmode network scores a box around one"
            else:
                note = ds.skipped.get("/".join(key), "not scored") if ds is not None else "not scored"
                if note.startswith("missing view: "):
                    missing = [note.removeprefix("missing view: ")]
            rows.append(ScoreRow(ex.patient, exam, side, None, missing, note=note, unit="lesion"))
    return rows


def _box_mask(rec: ImageRecord, by_image: dict, cache: Any, corner: np.ndarray, box: int) -> np.ndarray | None:
    """The image's outlines on its cached grid (the other energy's outline of the view where this
    image has none), cut by the window the dataset cut the box with (the same clipping)."""
    lesions = rec.lesions
    if not lesions:
        other = by_image.get((rec.breast_key, rec.view.value, "DES" if rec.energy.value == "LE" else "LE"))
        lesions = other.lesions if other is not None else []
    if not lesions:
        return None
    full = lesion_mask(lesions, cache.geometry(rec.sha256))
    H, W = full.shape
    top = int(np.clip(corner[0], 0, max(H - box, 0)))
    left = int(np.clip(corner[1], 0, max(W - box, 0)))
    return _window(full, top, left, box, box)
