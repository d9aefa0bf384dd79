"""Seed 002's mammography + ultrasound:
the site Task of the ``mgus`` family (its data, training and scoring)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import MammoUSPairDataset, _largest_lesion, _square_crop, make_loader
from fedbreast.shared.data.manifest import group_exams
from fedbreast.shared.data.preprocess import lesion_mask, mapped_bbox
from fedbreast.shared.data.schema import ImageRecord, Modality, Split
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.explain import ViewHeatmap
from fedbreast.shared.metrics.classification import auc_mann_whitney
from fedbreast.shared.training.local import autocast
from fedbreast.shared.training.tasks import (
    SPLITS,
    FamilySite,
    ScoreRow,
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
        records, name = read_records(site_dir, cfg)
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

    @torch.no_grad()
    def extra_metrics(
        self, model: nn.Module, site: FamilySite, cfg: RunConfig, device: torch.device, server_round: int | None = None
    ) -> dict[str, Any]:
        """Seed 002's three scores on the test split, per lesion (the mean over its samples, as
        :meth:`predict`): ``test_auc_mg`` the mammography branch on every lesion,
        ``test_auc_us`` the ultrasound branch and ``test_auc_fused`` the fusion network, each on
        the lesions with an ultrasound image (in two-step step 1 the fusion network is still
        untrained). NaN where undefined (one class, or a site without ultrasound): every site's
        reply has the same keys, and the server's weighted mean skips the NaNs. Aggregates only."""
        return branch_aucs(self._branch_columns(model, site, "test", cfg, device), site.units["test"])

    @torch.no_grad()
    def branch_predictions(
        self, model: nn.Module, site: FamilySite, split: str, cfg: RunConfig, device: torch.device
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Seed 002's three scores of one model, per lesion, on the lesions with both modalities
        (the same lesions, in the same order, for each): {"mg" | "us" | "fused": (labels, scores)},
        each lesion's score the mean over its samples (as :meth:`predict`). The fused score is
        the fusion network's whatever the training step (:meth:`predict`'s after training)."""
        cols = self._branch_columns(model, site, split, cfg, device)
        out = {}
        for branch in BRANCHES:
            _, y, p = branch_units(cols, site.units[split], branch, only_us=True)
            out[branch] = (y.astype(np.int64), p.astype(np.float64))
        return out

    @torch.no_grad()
    def _branch_columns(
        self, model: nn.Module, site: FamilySite, split: str, cfg: RunConfig, device: torch.device
    ) -> dict[str, list[np.ndarray]]:
        """Per-sample columns of ``split``: unit, the three branches' probabilities, has_us, y, mask."""
        model.to(device).eval()
        unit_of_sample = site.info["unit_of_sample"][split]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("unit", *BRANCHES, "has_us", "y", "mask")}
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers):
            with autocast(device, cfg.amp):
                out = model(batch["mg"].to(device), batch["us"].to(device))
            for k in BRANCHES:
                cols[k].append(torch.sigmoid(out[k].float()).cpu().numpy())
            cols["unit"].append(unit_of_sample[batch["index"].numpy()])
            cols["has_us"].append(batch["has_us"].numpy().astype(bool))
            cols["y"].append(batch["y"].numpy())
            cols["mask"].append(batch["y_mask"].numpy().astype(bool))
        return cols

    # ---- site predict: every breast of every exam, any split, labelled or not -------------------

    def _scoring_set(self, site_dir: Path, cfg: RunConfig) -> tuple[list[ImageRecord], list[MammoUSPairDataset]]:
        """The site's records and one dataset per split (and one for records without a split),
        as :meth:`build` makes them: a sample's ultrasound partner is drawn among its split's
        images from (seed, epoch 0, index in the split), so the scores are :meth:`predict`'s."""
        records, _ = read_records(site_dir, cfg)
        mg = _mg(records, self.MG_ENERGIES)
        if not mg:
            return records, []
        us = [r for r in records if r.modality is Modality.US]
        cache_mg = cached_images(site_dir, mg, preprocess_config("patches", cfg), cfg)
        cache_us = cached_images(site_dir, us, preprocess_config("us", cfg), cfg) if us else None
        groups = [Split(s) for s in SPLITS] + [None]
        datasets = []
        for g in groups:
            part = [r for r in mg + us if r.split == g]  # _filter_split's selection (None: no split)
            ds = MammoUSPairDataset(
                part, cache_mg, cache_us, split=None, crop=cfg.crop_size, mg_energies=self.MG_ENERGIES, seed=cfg.seed
            )
            datasets.append(ds)
        return records, datasets

    @torch.no_grad()
    def _sample_probs(self, model, ds: MammoUSPairDataset, cfg: RunConfig, device) -> np.ndarray:
        """:meth:`predict`'s probability of every sample of ``ds`` (labelled or not)."""
        model.to(device).eval()
        fused_ready = self.fusion_phase(cfg, None)
        probs = []
        for batch in make_loader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers):
            with autocast(device, cfg.amp):
                out = model(batch["mg"].to(device), batch["us"].to(device))
            p_mg, p_us, p_f = (torch.sigmoid(out[k].float()).cpu() for k in ("mg", "us", "fused"))
            has_us = batch["has_us"].bool()
            probs.append(torch.where(has_us, p_f if fused_ready else (p_mg + p_us) / 2, p_mg).numpy())
        return np.concatenate(probs).astype(np.float64) if probs else np.zeros(0)

    def _scored(self, model, site_dir, cfg, device):
        """(records, datasets, rows, {breast: [(dataset, sample index), ...]}) for score and explain."""
        records, datasets = self._scoring_set(Path(site_dir), cfg)
        samples: dict[tuple[str, str, str], list[tuple[int, int]]] = defaultdict(list)
        probs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for d, ds in enumerate(datasets):
            p = self._sample_probs(model, ds, cfg, device)
            for i, (r, _) in enumerate(ds.samples):
                samples[r.breast_key].append((d, i))
                probs[r.breast_key].append(float(p[i]))
        # the unit's score: the mean over its appearances (as unit_predictions averages them)
        scores = {key: float(np.mean(ps)) for key, ps in probs.items()}
        rows = _rows(records, datasets, samples, scores, self.MG_ENERGIES)
        return records, datasets, rows, samples

    def score(self, model, site_dir, cfg, device):
        """One row per breast of every exam (``unit="lesion"``): the mean probability over the
        breast's outlined mammography appearances, each fused with an ultrasound crop of the
        breast where it has one (``missing_views`` "US" where it has none: the mammography
        branch alone scores it, as in training). No outline, no mammography: no score, a note."""
        return self._scored(model, site_dir, cfg, device)[2]

    def explain(self, model, site_dir, cfg, device) -> Iterator[ViewHeatmap]:
        """Grad-CAM of the logit that makes the unit's score (the fusion network's where the
        sample has ultrasound and the fusion phase is on, else the branch's own), on the mg
        branch for the mammography crop and on the us branch for the ultrasound crop: for each
        appearance of a scored breast, in :meth:`score`'s order, a heatmap of its MG crop
        (view "CC", "MLO"; "CC-LE" for a CEM low-energy image) and, where it has one, of the
        ultrasound crop it was paired with (view "US-CC": the US partner of the CC appearance).
        ``unit`` names the outline ("lesion-1", ...) of an image with several."""
        from fedbreast.shared.explain.cam import cam_layer, class_activation_maps, logit

        records, datasets, rows, samples = self._scored(model, site_dir, cfg, device)
        fused_ready = self.fusion_phase(cfg, None)
        model = model.to(device).eval()
        mg_layer, us_layer = cam_layer(model.mg.net), cam_layer(model.us.net)

        def logits(m, t):  # (B, 2 crops [mg, us], 1, S, S) -> (B, 3) logits [mg, us, fused]
            out = m(t[:, 0], t[:, 1])
            return torch.stack([out["mg"], out["us"], out["fused"]], dim=1)

        order = [
            (key, d, i)
            for row in rows
            if row.score is not None
            for key in [(row.patient, row.exam, row.laterality)]
            for d, i in samples[key]
        ]
        score_of = {(r.patient, r.exam, r.laterality): r.score for r in rows}
        step = max(1, cfg.batch_size)
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            parts = []
            for d in sorted({d for _, d, _ in chunk}):
                idx = [i for _, dd, i in chunk if dd == d]
                batch = datasets[d].__getitems__(idx)
                parts.append((d, idx, batch))
            mg = torch.cat([b["mg"] for _, _, b in parts])
            us = torch.cat([b["us"] for _, _, b in parts])
            has_us = torch.cat([b["has_us"] for _, _, b in parts]).bool()
            where = [(d, i) for d, idx, _ in parts for i in idx]
            x = torch.stack([mg, us], dim=1).to(device)
            fused = has_us & fused_ready
            col_mg = [2 if f else 0 for f in fused.tolist()]
            mg_maps, _ = class_activation_maps(model, [mg_layer], x, [logit(c) for c in col_mg], "Grad-CAM", fn=logits)
            sel = torch.nonzero(has_us).flatten()
            us_maps = np.zeros((0, *x.shape[-2:]), np.float32)
            if len(sel):
                col_us = [2 if fused_ready else 1] * len(sel)
                us_maps, _ = class_activation_maps(
                    model, [us_layer], x[sel.to(device)], [logit(c) for c in col_us], "Grad-CAM", fn=logits
                )
            us_row = {int(s): k for k, s in enumerate(sel.tolist())}
            maps_at = {w: k for k, w in enumerate(where)}
            for key, d, i in chunk:
                k = maps_at[(d, i)]
                ds = datasets[d]
                rec, li = ds.samples[i]
                view = rec.view.value + ("-LE" if rec.energy.value == "LE" else "")
                unit = f"lesion-{li + 1}" if len(rec.lesions) > 1 else ""
                score = score_of[key]
                mask = _crop_mask(
                    rec.lesions, ds.cache_mg, rec, mapped_bbox(rec.lesions[li], ds.cache_mg.geometry(rec.sha256)), ds
                )
                yield ViewHeatmap(
                    key[0], key[1], key[2], view, mg[k, 0].float().numpy(), mg_maps[k], "Grad-CAM",
                    score=score, unit=unit, lesion=mask, record=rec,
                )  # fmt: skip
                if k in us_row:
                    u = _us_partner(ds, i)
                    assert ds.cache_us is not None and u is not None  # has_us
                    umask = None  # an ultrasound image without an outline: the whole image, nothing to mark
                    if u.lesions:  # the crop around its largest outline, as the dataset cuts it
                        bbox = mapped_bbox(_largest_lesion(u.lesions), ds.cache_us.geometry(u.sha256))
                        umask = _crop_mask(u.lesions, ds.cache_us, u, bbox, ds)
                    yield ViewHeatmap(
                        key[0], key[1], key[2], f"US-{view}", us[k, 0].float().numpy(), us_maps[us_row[k]],
                        "Grad-CAM", score=score, unit=unit, lesion=umask, record=u,
                    )  # fmt: skip


BRANCHES = ("mg", "us", "fused")
BRANCH_AUC_KEYS = ("test_auc_mg", "test_auc_us", "test_auc_fused")


def branch_units(
    cols: dict[str, list[np.ndarray]], n_units: int, branch: str, only_us: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit ids, labels, mean probabilities) of one branch from per-sample columns, over the
    samples with ultrasound (``only_us``) or all of them."""
    if not cols["unit"]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    unit, has_us, y, mask = (np.concatenate(cols[k]) for k in ("unit", "has_us", "y", "mask"))
    sel = has_us if only_us else np.ones_like(has_us)
    p = np.concatenate(cols[branch])
    return unit_predictions([unit[sel]], [p[sel]], [y[sel]], [mask[sel]], n_units)


def branch_aucs(cols: dict[str, list[np.ndarray]], n_units: int) -> dict[str, float]:
    """:meth:`MgusTask.extra_metrics`' AUCs from per-sample columns (unit, mg, us, fused
    probabilities, has_us, y, mask): the mammography branch over every sample, the others over
    the samples with ultrasound, each averaged per unit; NaN where a score has one class or none."""
    out = dict.fromkeys(BRANCH_AUC_KEYS, float("nan"))
    for key, branch in zip(BRANCH_AUC_KEYS, BRANCHES):
        _, yu, pu = branch_units(cols, n_units, branch, only_us=branch != "mg")
        if len(yu):
            out[key] = float(auc_mann_whitney(yu.astype(np.int8), pu.astype(np.float64)))
    return out


def _mg(records: list[ImageRecord], energies: tuple[str, ...]) -> list[ImageRecord]:
    return [r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies]


def _us_partner(ds: MammoUSPairDataset, i: int) -> ImageRecord | None:
    """The ultrasound image sample ``i`` is paired with in the dataset's epoch (its own draw)."""
    candidates = ds._us[i]
    if not candidates or ds.cache_us is None:
        return None
    rng = np.random.default_rng([ds.seed, ds.epoch, int(i)])
    return candidates[int(rng.integers(len(candidates)))]


def _crop_mask(lesions, cache, rec: ImageRecord, bbox, ds: MammoUSPairDataset) -> np.ndarray | None:
    """The image's outlines on its cached grid through the crop the dataset cut (same box,
    margin and resize, as a float mask thresholded at 0.5)."""
    if not lesions:
        return None
    full = lesion_mask(lesions, cache.geometry(rec.sha256)).astype(np.float32)
    return _square_crop(full, bbox, ds.margin, ds.crop)[0].numpy() >= 0.5


def _rows(
    records: list[ImageRecord],
    datasets: list[MammoUSPairDataset],
    samples: dict[tuple[str, str, str], list[tuple[int, int]]],
    scores: dict[tuple[str, str, str], float],
    energies: tuple[str, ...],
) -> list[ScoreRow]:
    by_breast: dict[tuple[str, str, str], list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_breast[r.breast_key].append(r)
    skipped = {path: why for ds in datasets for path, why in ds.skipped.items()}
    rows = []
    for exam, ex in sorted(group_exams(records).items()):
        for side in "LR":
            key = (ex.patient, exam, side)
            imgs = by_breast.get(key, [])
            mg = _mg(imgs, energies)
            if key in scores:
                missing = [v for v in ("CC", "MLO") if not any(r.view.value == v for r in mg)]
                if not any(datasets[d]._has_us[i] for d, i in samples[key]):
                    missing.append("US")  # the mammography branch alone scores it, as in training
                rows.append(ScoreRow(ex.patient, exam, side, scores[key], missing, unit="lesion"))
                continue
            if not imgs:
                note = "no image of this breast"
            elif not mg:
                us_only = all(r.modality is Modality.US for r in imgs)
                note = "no mammography (FFDM or LE)" + (": ultrasound only" if us_only else "")
            elif not any(r.lesions for r in mg):
                note = "no outlined lesion on its mammograms"
            else:
                note = "; ".join(sorted({skipped[r.path] for r in mg if r.path in skipped})) or "not scored"
            rows.append(ScoreRow(ex.patient, exam, side, None, note=note, unit="lesion"))
    return rows
