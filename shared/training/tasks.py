"""One task per model family: what a site opens, how it trains, how it scores.

The ClientApp is family-agnostic: it asks :func:`task_for` for the configured family's
:class:`Task` and calls

* ``open(site_dir, cfg)`` -> the site's inputs for the family (memoised per process;
  raises :class:`SiteUnavailable` saying why when the family cannot use the site at all,
  e.g. a dual-mode network at a site without CEM);
* ``train(model, site, cfg, server_round, device, **local)`` -> :class:`TrainStats`
  (``local`` is passed on to :func:`train_local`: FedProx, DP, ...);
* ``predict(model, site, split, cfg, device)`` -> (labels, probabilities, mean loss) at
  the family's reporting unit (``unit``: breast, lesion or exam);
* ``extra_metrics(...)`` -> family-specific aggregate metrics for the evaluate reply
  (fixed keys per family, so every site's reply has the same keys);
* ``after_evaluate(arrays, replies' metrics)`` on the server: a family may update the
  global model from aggregate evaluation metrics (late fusion's MCC weights).

Every returned site object has ``name``, ``loader(split, ...)`` and ``exams(split)`` (the
number of reporting units in the split; the reply keys keep the name ``{split}_exams``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.augment import AUGMENT_PRESETS, augment
from fedbreast.shared.data.cache import build_cache, open_cache
from fedbreast.shared.data.datasets import (
    LesionBoxDataset,
    LesionPatchDataset,
    MammoUSPairDataset,
    ModalityViewDataset,
    _CachedDataset,
    make_loader,
)
from fedbreast.shared.data.manifest import read_site_meta
from fedbreast.shared.data.preprocess import PRESETS, PreprocessConfig
from fedbreast.shared.data.schema import ImageRecord, Modality
from fedbreast.shared.data.site_data import SiteUnavailable, site_for, site_records
from fedbreast.shared.families import family_of
from fedbreast.shared.training.local import TrainStats, autocast, train_local
from fedbreast.shared.training.local import predict as predict_multiview

if TYPE_CHECKING:
    from fedbreast.shared.models.latefusion import LateFusionNet

log = logging.getLogger("fedbreast.tasks")

SPLITS = ("train", "val", "test")
Predictions = tuple[np.ndarray, np.ndarray, float]


# ---- the site's inputs for a family -------------------------------------------------------------


@dataclass
class FamilySite:
    """A site's datasets for one family, with the map from samples to reporting units."""

    site_dir: Path
    name: str
    family: str
    datasets: dict[str, _CachedDataset]  # split -> the family's dataset (each keeps what it skipped and why)
    units: dict[str, int]  # split -> number of reporting units
    info: dict[str, Any] = field(default_factory=dict)

    def loader(self, split: str, batch_size: int, shuffle: bool, workers: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return make_loader(
            self.datasets[split], batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen
        )

    def exams(self, split: str) -> int:
        return int(self.units.get(split, 0))


def _records(site_dir: Path) -> tuple[list[ImageRecord], str]:
    records = site_records(site_dir)
    return records, str(_meta(site_dir).get("site") or site_dir.name)


def _meta(site_dir: Path) -> dict[str, Any]:
    try:
        return dict(read_site_meta(site_dir))
    except ValueError:
        return {}


def _preprocess(preset: str, cfg: RunConfig, **changes: Any) -> PreprocessConfig:
    base = PRESETS[preset].to_dict()
    if preset != "us":  # the run's window choice; ultrasound keeps its own percentile window
        base["window"] = cfg.window
    return PreprocessConfig(**{**base, **changes})


def _cache(site_dir: Path, records: list[ImageRecord], pre: PreprocessConfig, cfg: RunConfig):
    build_cache(site_dir, records, pre, workers=max(1, cfg.workers))
    return open_cache(site_dir, pre)


def _unit_index(keys: list[tuple[str, ...]]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Sample -> unit id for units given as one key per sample (first-seen order)."""
    ids: dict[tuple[str, ...], int] = {}
    out = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    return out, list(ids)


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    if not len(y):
        return float("nan")
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def _unit_predictions(
    unit: list[np.ndarray], prob: list[np.ndarray], label: list[np.ndarray], mask: list[np.ndarray], n_units: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probability per unit over its samples; returns (unit ids with a label, labels, means)."""
    if not unit:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    u, p, y, m = (np.concatenate(a) for a in (unit, prob, label, mask))
    s = np.bincount(u, weights=p, minlength=n_units)
    c = np.bincount(u, minlength=n_units)
    lab = np.full(n_units, -1.0)
    lab[u[m]] = y[m]
    ids = np.flatnonzero((c > 0) & (lab >= 0))
    return ids, lab[ids].astype(np.int64), s[ids] / c[ids]


class Task:
    """The interface every family implements (see the module docstring)."""

    family = ""
    unit = "breast"  # what predict() scores
    count_unit = "breast"  # what exams(split) counts
    augment_preset = ""  # AUGMENT_PRESETS key for the family's training images
    augment_shared_views = False  # one warp for all images of a sample (multi-view exams), or one each

    def augmenter(self, cfg: RunConfig, server_round: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The training-time warp of one round (identity with ``augment = false``).

        Seeded by (seed, round), so a site's round is reproducible; the warp runs on the
        tensor's device, after the batch has been moved there."""
        if not cfg.augment:
            return lambda x: x
        aug_cfg, shared = AUGMENT_PRESETS[self.augment_preset], self.augment_shared_views
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + server_round)
        return lambda x: augment(x, aug_cfg, gen, shared_across_views=shared)

    def open(self, site_dir: str | Path, cfg: RunConfig) -> Any:
        raise NotImplementedError

    def train(
        self, model: nn.Module, site: Any, cfg: RunConfig, server_round: int, device: torch.device, **local: Any
    ) -> TrainStats:
        raise NotImplementedError

    def predict(
        self,
        model: nn.Module,
        site: Any,
        split: str,
        cfg: RunConfig,
        device: torch.device,
        server_round: int | None = None,
    ) -> Predictions:
        raise NotImplementedError

    def extra_metrics(
        self, model: nn.Module, site: Any, cfg: RunConfig, device: torch.device, server_round: int | None = None
    ) -> dict[str, Any]:
        return {}

    def after_evaluate(
        self, arrays: dict[str, np.ndarray], metrics: list[Mapping[str, Any]]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The coordinator's hook after an evaluate wave: the family's (shared/families), numpy only."""
        return family_of(self.family).after_evaluate(arrays, metrics)

    def after_train(
        self,
        cfg: RunConfig,
        before: dict[str, np.ndarray],
        aggregated: dict[str, np.ndarray],
        updates: list[tuple[dict[str, np.ndarray], Mapping[str, Any]]],
    ) -> dict[str, np.ndarray]:
        """The coordinator's hook after a train wave: the family's (shared/families), numpy only."""
        return family_of(self.family).after_train(cfg, before, aggregated, updates)

    # helpers shared by the families that use train_local with their own loss
    def _train_with(
        self,
        model: nn.Module,
        loader,
        cfg: RunConfig,
        server_round: int,
        device: torch.device,
        loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]],
        **local: Any,
    ) -> TrainStats:
        kwargs = dict(
            lr=cfg.lr_at(server_round),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
            device=device,
            amp=cfg.amp,
            proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        )
        return train_local(model.to(device), loader, loss_fn=loss_fn, **{**kwargs, **local})

    def _site(self, site_dir: str | Path, cfg: RunConfig) -> FamilySite:
        return _open_family(self.family, str(Path(site_dir).resolve()), cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        raise NotImplementedError


@lru_cache(maxsize=8)
def _open_family(family: str, site_dir: str, cfg: RunConfig) -> FamilySite:
    return _task(family).build(Path(site_dir), cfg)


def _masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
    m = mask.float()
    return (per * m).sum() / m.sum().clamp_min(1.0)


# ---- seed 001: multi-view exams (the spine's model, unchanged) -------------------------------------


class MultiviewTask(Task):
    family, unit, count_unit = "multiview", "breast", "exam"
    augment_preset, augment_shared_views = "multiview", True  # keep the four views' correspondences

    def open(self, site_dir: str | Path, cfg: RunConfig) -> Any:
        return site_for(site_dir, cfg)

    def train(self, model, site, cfg, server_round, device, **local):
        kwargs = dict(
            lr=cfg.lr_at(server_round),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
            device=device,
            amp=cfg.amp,
            proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
            augment=self.augmenter(cfg, server_round) if cfg.augment else None,
        )
        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        return train_local(model.to(device), loader, **{**kwargs, **local})

    def predict(self, model, site, split, cfg, device, server_round=None):
        loader = site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers)
        return predict_multiview(model.to(device), loader, device, cfg.amp)


# ---- seed 000: BI-RADS + lesion patches -------------------------------------------------------------


class BiradsTask(Task):
    """Unit: the lesion (one lesion breast: the mean over the patches of its images)."""

    family, unit, count_unit = "birads", "lesion", "lesion"
    augment_preset = "patches"

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        from fedbreast.shared.models.birads import BiradsEncoder

        records, name = _records(site_dir)
        energies = cfg.patch_energy_list
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies]
        if not mammo:
            present = sorted({r.energy.value for r in records if r.modality is Modality.MG})
            raise SiteUnavailable(
                f"{name} has no {'/'.join(energies)} mammography images (it has {', '.join(present) or 'none'}); "
                f"the birads family draws patches from patch-energies={cfg.patch_energies}"
            )
        cache = _cache(site_dir, mammo, _preprocess("patches", cfg), cfg)
        enc = BiradsEncoder(cfg.birads_group_list)
        site = FamilySite(site_dir, name, self.family, {}, {}, {"birads": {}, "unit_of_image": {}, "unit_birads": {}})
        for split in SPLITS:
            ds = LesionPatchDataset(
                mammo,
                cache,
                split=split,
                patch=cfg.patch_size,
                n_patches=cfg.n_patches,
                seed=cfg.seed,
                energies=energies,
            )
            vec = torch.from_numpy(enc.encode_many(r.birads for r in ds.images))
            unit_of_image, keys = _unit_index([r.breast_key for r in ds.images])
            unit_vec = torch.zeros(len(keys), enc.dim)
            if len(keys):
                unit_vec[torch.from_numpy(unit_of_image)] = vec
            site.datasets[split], site.units[split] = ds, len(keys)
            site.info["birads"][split] = vec
            site.info["unit_of_image"][split] = unit_of_image
            site.info["unit_birads"][split] = unit_vec
        # Values outside the lexicon: those ingest already mapped to unknown (site.json) plus any the
        # encoder met in the manifest; the site report shows the count, training goes on.
        at_ingest = sum(
            int(v) for v in (_meta(site_dir).get("annotations") or {}).get("unknown_descriptors", {}).values()
        )
        site.info["unknown_values"] = at_ingest + enc.unknown_values
        if site.info["unknown_values"]:
            log.warning(
                "%s: %d BI-RADS value(s) outside the lexicon encoded as unknown", name, site.info["unknown_values"]
            )
        if len(site.datasets["train"]) == 0:
            reasons = sorted(set(site.datasets["train"].skipped.values()))[:3]
            raise SiteUnavailable(
                f"{name}: no lesion patches in the train split ({'; '.join(reasons) or 'no outlined lesion'})"
            )
        return site

    @staticmethod
    def birads_of(site: FamilySite, split: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The BI-RADS vector of each patch's image in ``batch`` (for patient fine-tuning too)."""
        return site.info["birads"][split][batch["image"]]

    def train(self, model, site, cfg, server_round, device, **local):
        from fedbreast.shared.models.birads import BiradsNet

        vec = site.info["birads"]["train"]
        decision = getattr(model, "birads_fusion", "") == "decision"
        warp = self.augmenter(cfg, server_round)

        def loss_fn(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            keep = batch["y_mask"].bool()
            n = int(keep.sum())
            if n == 0:
                return torch.zeros((), device=device), 0
            x = warp(batch["x"][keep].to(device, non_blocking=True))
            y = batch["y"][keep].to(device)
            b = vec[batch["image"][keep]].to(device)
            logits = m(x, b)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            if decision:  # the BI-RADS-only classifier (and the stacked layer) learn in the same loop
                assert isinstance(m, BiradsNet)  # the only network with birads_fusion = "decision"
                bl = m.birads_logit(b)
                loss = loss + F.binary_cross_entropy_with_logits(bl, y)
                if m.decision_fusion == "stacked":
                    loss = loss + F.binary_cross_entropy_with_logits(m.stacked_logit(logits.detach(), bl.detach()), y)
            return loss, n

        loader = site.loader("train", cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed + server_round)
        return self._train_with(model, loader, cfg, server_round, device, loss_fn, **local)

    @torch.no_grad()
    def predict(self, model, site, split, cfg, device, server_round=None):
        model.to(device).eval()
        vec, unit_of_image = site.info["birads"][split], site.info["unit_of_image"][split]
        units, probs, labels, masks = [], [], [], []
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=cfg.workers):
            with autocast(device, cfg.amp):
                logits = model(batch["x"].to(device), vec[batch["image"]].to(device))
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            units.append(unit_of_image[batch["image"].numpy()])
            labels.append(batch["y"].numpy())
            masks.append(batch["y_mask"].numpy().astype(bool))
        ids, y, p_cnn = _unit_predictions(units, probs, labels, masks, site.units[split])
        if not len(ids):
            return np.zeros(0, np.int64), np.zeros(0), float("nan")
        p = (
            model.fuse(
                torch.as_tensor(p_cnn, dtype=torch.float32, device=device),
                site.info["unit_birads"][split][torch.from_numpy(ids)].to(device),
            )
            .cpu()
            .numpy()
            .astype(np.float64)
        )
        return y, p, _bce(p, y)

    def extra_metrics(self, model, site, cfg, device, server_round=None):
        return {"birads_unknown_values": int(site.info["unknown_values"])}


# ---- seed 003: dual-mode network on a box around the lesion --------------------------------------


class DualModeTask(Task):
    family, unit, count_unit = "dualmode", "lesion", "lesion"
    augment_preset = "roi_box"  # CC and MLO are two projections: each box gets its own warp

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = _records(site_dir)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not {"LE", "DES"} <= {r.energy.value for r in mammo}:
            raise SiteUnavailable(f"{name} has no CEM images (LE and DES); the dualmode family needs both modes")
        cem = [r for r in mammo if r.energy.value in ("LE", "DES")]
        cache = _cache(site_dir, cem, _preprocess("roi_box", cfg), cfg)
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
            return _masked_bce(logits, batch["y"].to(device), batch["y_mask"].to(device)), n

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
        return y, p, _bce(p, y)


# ---- seed 002: mammography + ultrasound -------------------------------------------------------------


class MgusTask(Task):
    """Unit: the lesion breast (the mean over its mammography appearances, as the seed's
    "average malignancy probability of all its appearances"). A sample without ultrasound
    is scored by the mammography branch alone."""

    family, unit, count_unit = "mgus", "lesion", "lesion"
    augment_preset = "us"  # seed 002: translation, rotation and flips of both lesion crops
    MG_ENERGIES = ("FFDM", "LE")

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = _records(site_dir)
        mg = [
            r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in self.MG_ENERGIES
        ]
        if not mg:
            raise SiteUnavailable(
                f"{name} has no FFDM or LE mammography; the mgus family needs a mammography branch input"
            )
        us = [r for r in records if r.modality is Modality.US]
        cache_mg = _cache(site_dir, mg, _preprocess("patches", cfg), cfg)
        cache_us = _cache(site_dir, us, _preprocess("us", cfg), cfg) if us else None
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
            unit_of_sample, keys = _unit_index([r.breast_key for r, _ in ds.samples])
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
        ids, y, p = _unit_predictions(units, probs, labels, masks, site.units[split])
        return y, p.astype(np.float64), _bce(p, y)


# ---- seed 004: modality x view late fusion ----------------------------------------------------------


class LateFusionTask(Task):
    """Unit: the breast. The evaluate reply carries ``val_confusion``: (tp, fp, tn, fn) at
    threshold 0.5 on the validation split for each slot and each view-fused modality
    (24 counts, :data:`FUSION_UNITS` order); the server turns the sums into MCC weights."""

    family, unit, count_unit = "latefusion", "breast", "breast"
    augment_preset = "modality_view"  # one CNN per slot: each slot image gets its own warp

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = _records(site_dir)
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo]
        if not mammo:
            raise SiteUnavailable(f"{name} has no mammography images")
        cache = _cache(site_dir, mammo, _preprocess("modality_view", cfg, size=(cfg.image_h, cfg.image_w)), cfg)
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
            return _masked_bce(logits, y, mask), n

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
        return y_np, p_np, _bce(p_np, y_np)

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


@cache
def _task(family: str) -> Task:
    return family_of(family).task()


def task_for(cfg: RunConfig) -> Task:
    """The site Task of the configured family (the registry in shared/families names it)."""
    return _task(cfg.model)
