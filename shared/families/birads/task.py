"""Seed 000's BI-RADS + lesion patches:
the site Task of the ``birads`` family (its data, training and scoring)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import LesionPatchDataset
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
    read_meta,
    read_records,
    unit_index,
    unit_predictions,
)

log = logging.getLogger("fedbreast.families.birads")


class BiradsTask(Task):
    """Unit: the lesion (one lesion breast: the mean over the patches of its images)."""

    family, unit, count_unit = "birads", "lesion", "lesion"
    units_per_patient = None  # lesions: a patient may have any number
    augment_preset = "patches"

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        from fedbreast.shared.models.birads import BiradsEncoder

        records, name = read_records(site_dir)
        energies = cfg.patch_energy_list
        mammo = [r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies]
        if not mammo:
            present = sorted({r.energy.value for r in records if r.modality is Modality.MG})
            raise SiteUnavailable(
                f"{name} has no {'/'.join(energies)} mammography images (it has {', '.join(present) or 'none'}); "
                f"the birads family draws patches from patch-energies={cfg.patch_energies}"
            )
        cache = cached_images(site_dir, mammo, preprocess_config("patches", cfg), cfg)
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
            unit_of_image, keys = unit_index([r.breast_key for r in ds.images])
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
            int(v) for v in (read_meta(site_dir).get("annotations") or {}).get("unknown_descriptors", {}).values()
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
        ids, y, p_cnn = unit_predictions(units, probs, labels, masks, site.units[split])
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
        return y, p, bce(p, y)

    def extra_metrics(self, model, site, cfg, device, server_round=None):
        return {"birads_unknown_values": int(site.info["unknown_values"])}
