"""Seed 000's BI-RADS + lesion patches:
the site Task of the ``birads`` family (its data, training and scoring)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import LesionPatchDataset
from fedbreast.shared.data.manifest import group_exams, records_by_breast
from fedbreast.shared.data.schema import ImageRecord, Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.training.local import autocast
from fedbreast.shared.training.tasks import (
    SPLITS,
    FamilySite,
    ScoreRow,
    Task,
    bce,
    cached_images,
    preprocess_config,
    read_meta,
    read_records,
    unit_index,
    unit_predictions,
)

if TYPE_CHECKING:
    from fedbreast.shared.explain import ViewHeatmap

log = logging.getLogger("fedbreast.families.birads")

NO_LESION = "no outlined lesion: the birads family scores outlined lesions"
MAP_METHOD = "patch score map"


def patch_images(records: list[ImageRecord], energies: tuple[str, ...]) -> list[ImageRecord]:
    """The mammograms patches are drawn from: the run's ``patch-energies`` images, CC and MLO."""
    return [r for r in records if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies]


class BiradsTask(Task):
    """Unit: the lesion (one lesion breast: the mean over the patches of its images)."""

    family, unit, count_unit = "birads", "lesion", "lesion"
    units_per_patient = None  # lesions: a patient may have any number
    augment_preset = "patches"
    # The PatientTuning of the last score/explain (patients fine-tuned, seconds): logs and tests.
    last_tuning: Any = None

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        from fedbreast.shared.models.birads import BiradsEncoder

        records, name = read_records(site_dir, cfg)
        energies = cfg.patch_energy_list
        mammo = patch_images(records, energies)
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

    # ---- site predict: every lesion breast of every exam, and its patch score maps ------------------

    def _scoring_set(self, site_dir: Path, cfg: RunConfig) -> _Scoring:
        """Every lesion patch of the site, any split, labelled or not (LesionPatchDataset with
        split None; an unlabelled lesion's patches have y_mask False and are scored all the same),
        drawn as in training: the same patches as the split's dataset, image by image."""
        from fedbreast.shared.families.birads.psft import normal_patch_dataset
        from fedbreast.shared.models.birads import BiradsEncoder

        records, _ = read_records(site_dir, cfg)
        energies = cfg.patch_energy_list
        mammo = patch_images(records, energies)
        cache = cached_images(site_dir, mammo, preprocess_config("patches", cfg), cfg) if mammo else None
        ds = (
            LesionPatchDataset(
                mammo,
                cache,
                split=None,
                patch=cfg.patch_size,
                n_patches=cfg.n_patches,
                seed=cfg.seed,
                energies=energies,
            )
            if cache is not None
            else None
        )
        enc = BiradsEncoder(cfg.birads_group_list)
        images = ds.images if ds is not None else []
        vec = torch.from_numpy(enc.encode_many(r.birads for r in images))
        unit_of_image, keys = unit_index([r.breast_key for r in images])
        unit_vec = torch.zeros(len(keys), enc.dim)
        if len(keys):  # as in build: a breast's vector is its last lesion image's
            unit_vec[torch.from_numpy(unit_of_image)] = vec
        normal = (
            normal_patch_dataset(mammo, cache, cfg, None)
            if cfg.patient_finetune and cache is not None and len(keys)
            else None
        )
        return _Scoring(records, cache, ds, vec, unit_of_image, keys, unit_vec, normal)

    def _patients(self, model: nn.Module, s: _Scoring, cfg: RunConfig, device: torch.device):
        """Per patient with lesion patches: (patient, the model scoring it, note, its unit scores {unit: p}).

        Without patient-finetune the model is ``model``; with it, a working copy fine-tuned on the
        patient's normal patches (seed 000's patient-specific classification; ``model`` is not
        changed), or ``model`` with a note when the patient has no normal tissue. A unit's score
        is the mean patch probability over its lesion patches, then ``model.fuse`` with the
        breast's BI-RADS vector, as in :meth:`predict`."""
        from fedbreast.shared.families.birads.psft import PatientTuning
        from fedbreast.shared.models.birads import BiradsNet

        assert s.ds is not None and isinstance(model, BiradsNet)  # the family's network (model.py)
        tuning = PatientTuning(model, s.ds, s.vec, cfg, device, normal_ds=s.normal)
        for patient, m, note in tuning.models():
            idx = s.ds.indices_for_patient(patient)
            probs, images = _patch_probs(m, s, idx, cfg, device)
            units = s.unit_of_image[images]
            ids = np.unique(units)
            inv = np.searchsorted(ids, units)
            p_cnn = np.bincount(inv, weights=probs, minlength=len(ids)) / np.bincount(inv, minlength=len(ids))
            with torch.no_grad():
                p = (
                    model.fuse(
                        torch.as_tensor(p_cnn, dtype=torch.float32, device=device),
                        s.unit_vec[torch.from_numpy(ids)].to(device),
                    )
                    .cpu()
                    .numpy()
                    .astype(np.float64)
                )
            yield patient, m, note, dict(zip(ids.tolist(), p.tolist()))
        if tuning.patients or tuning.skipped:
            log.info(
                "predict with patient fine-tuning: %d patient(s) fine-tuned (%.3f s per patient), %d without normal tissue",
                tuning.patients,
                tuning.seconds_per_patient,
                tuning.skipped,
            )
        self.last_tuning = tuning

    def score(self, model, site_dir, cfg, device):
        """One row per breast of every exam (sorted by patient, then exam; L before R), any split,
        labelled or not. A lesion breast (a breast with an outlined lesion on a patch-energies
        image) is scored, ``unit = "lesion"``; any other breast has no score and a note saying why.
        With patient-finetune each patient is fine-tuned on its own normal tissue first."""
        site_dir = Path(site_dir)
        s = self._scoring_set(site_dir, cfg)
        model = model.to(device).eval()
        scores: dict[int, float] = {}
        notes: dict[int, str] = {}
        if s.ds is not None and len(s.keys):
            for _, _, note, unit_scores in self._patients(model, s, cfg, device):
                scores.update(unit_scores)
                notes.update(dict.fromkeys(unit_scores, note))
        unit_of_key = {k: i for i, k in enumerate(s.keys)}
        by_breast = records_by_breast(s.records)
        rows = []
        for key, ex in sorted(group_exams(s.records).items(), key=lambda kv: (kv[1].patient, kv[0])):
            for side in "LR":
                breast = (ex.patient, key, side)
                u = unit_of_key.get(breast)
                if u is not None and u in scores:
                    rows.append(ScoreRow(ex.patient, key, side, scores[u], note=notes.get(u, ""), unit="lesion"))
                else:
                    note = self._why_not_scored(by_breast.get(breast, []), s, cfg)
                    rows.append(ScoreRow(ex.patient, key, side, None, note=note, unit="lesion"))
        return rows

    @staticmethod
    def _why_not_scored(images: list[ImageRecord], s: _Scoring, cfg: RunConfig) -> str:
        energies = cfg.patch_energy_list
        mammo = [r for r in images if r.modality is Modality.MG and r.view.is_mammo]
        if not images:
            return "no image of this breast"
        if not mammo:
            return "no mammography image: the birads family draws patches from mammograms"
        outlined = [r for r in mammo if r.lesions]
        if not outlined:
            return NO_LESION
        usable = [r for r in outlined if r.energy.value in energies]
        if not usable:
            have = "/".join(sorted({r.energy.value for r in outlined}))
            return (
                f"lesion outlined only on {have} images: the birads family draws patches from "
                f"patch-energies={cfg.patch_energies}"
            )
        skipped = s.ds.skipped if s.ds is not None else {}
        reasons = sorted({skipped[r.path] for r in usable if r.path in skipped})
        return "; ".join(reasons) or "no lesion patch"

    def explain(self, model, site_dir, cfg, device) -> Iterator[ViewHeatmap]:
        """A patch score map per lesion image (view and energy) of every scored lesion breast, in
        :meth:`score`'s order: a patch-size window slides over the preprocessed (cached) image
        the lesion patches are drawn from, at a stride of half a patch (every pixel is covered by
        1 to 4 windows; a last window is aligned with the far edge), each window is scored by the
        patch network and a pixel's heat is the mean probability of the windows covering it.
        The probability is the network's per-patch output *with the image's BI-RADS vector*
        (feature fusion: the same per-patch probability a lesion score averages; with decision
        fusion the network sees pixels only, so the map is the CNN's alone). ``score`` is the
        unit's score, as in predictions.csv.

        With patient-finetune each patient's maps use its fine-tuned weights: explain fine-tunes
        each patient again (deterministically, so the weights, and the scores, equal score's), at
        the cost of one more fine-tuning per patient; keeping every patient's weights instead
        would cost a model's memory per patient."""
        from fedbreast.shared.data.preprocess import lesion_mask
        from fedbreast.shared.explain import ViewHeatmap

        site_dir = Path(site_dir)
        s = self._scoring_set(site_dir, cfg)
        if s.ds is None or not len(s.keys):
            return
        model = model.to(device).eval()
        images_of_unit: dict[int, list[int]] = {}
        for i, u in enumerate(s.unit_of_image.tolist()):
            images_of_unit.setdefault(u, []).append(i)
        for _, m, _, unit_scores in self._patients(model, s, cfg, device):
            for u in sorted(unit_scores):  # the units' order is the rows' (patient, exam, laterality)
                for i in images_of_unit[u]:
                    rec = s.ds.images[i]
                    image = np.asarray(s.cache.get(rec.sha256), dtype=np.float32)
                    heat = patch_score_map(m, image, s.vec[i], cfg, device)
                    yield ViewHeatmap(
                        rec.patient, rec.exam, rec.laterality.value, f"{rec.view.value}-{rec.energy.value}",
                        image, heat, MAP_METHOD, score=unit_scores[u], unit="lesion",
                        lesion=lesion_mask(rec.lesions, s.cache.geometry(rec.sha256), image.shape), record=rec,
                    )  # fmt: skip


@dataclass
class _Scoring:
    """A site's lesion patches for ``site predict`` (every split, labelled or not)."""

    records: list[ImageRecord]
    cache: Any
    ds: LesionPatchDataset | None  # None: no patch-energies mammogram at all
    vec: torch.Tensor  # per lesion image: its BI-RADS vector
    unit_of_image: np.ndarray  # lesion image -> unit (lesion breast)
    keys: list[tuple[str, ...]]  # unit -> breast key (patient, exam, laterality)
    unit_vec: torch.Tensor  # per unit: its BI-RADS vector
    normal: Any = None  # NormalPatchDataset with patient-finetune, else None


@torch.no_grad()
def _patch_probs(
    m: nn.Module, s: _Scoring, idx: np.ndarray, cfg: RunConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch malignancy probabilities of ``s.ds``'s patches ``idx`` (in order) and their image ids."""
    assert s.ds is not None
    m.eval()
    probs, images = [], []
    bs = max(1, cfg.batch_size)
    for start in range(0, len(idx), bs):
        batch = s.ds.__getitems__(idx[start : start + bs].tolist())
        with autocast(device, cfg.amp):
            logits = m(batch["x"].to(device), s.vec[batch["image"]].to(device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        images.append(batch["image"].numpy())
    if not probs:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(probs).astype(np.float64), np.concatenate(images)


def _starts(n: int, p: int, stride: int) -> list[int]:
    """Window starts covering [0, n): every ``stride``, plus one aligned with the far edge."""
    last = max(n - p, 0)
    out = list(range(0, last + 1, stride))
    if out[-1] != last:
        out.append(last)
    return out


@torch.no_grad()
def patch_score_map(
    m: nn.Module, image: np.ndarray, birads: torch.Tensor, cfg: RunConfig, device: torch.device
) -> np.ndarray:
    """(H, W) map in [0, 1]: the mean patch probability of the windows covering each pixel.

    Windows of ``cfg.patch_size`` px at a stride of half that (a small image is zero-padded
    once, as the patch dataset does); batched by ``max(batch_size, 128)``. A 3000x2000 image
    with 227-px patches is ~450 windows; a generated 600x400 one with 64-px patches ~220."""
    m.eval()
    H, W = image.shape
    P = int(cfg.patch_size)
    stride = max(1, P // 2)
    arr = np.pad(image, ((0, max(0, P - H)), (0, max(0, P - W)))) if H < P or W < P else image
    Hp, Wp = arr.shape
    windows = np.lib.stride_tricks.sliding_window_view(arr, (P, P))
    corners = np.array([(t, left) for t in _starts(Hp, P, stride) for left in _starts(Wp, P, stride)])
    acc = np.zeros((Hp, Wp), np.float64)
    cnt = np.zeros((Hp, Wp), np.float64)
    b = birads.float().to(device)
    bs = max(cfg.batch_size, 128)
    for start in range(0, len(corners), bs):
        c = corners[start : start + bs]
        x = torch.from_numpy(np.ascontiguousarray(windows[c[:, 0], c[:, 1]], dtype=np.float32))[:, None]
        with autocast(device, cfg.amp):
            logits = m(x.to(device), b.expand(len(c), -1))
        p = torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)
        for (t, left), pi in zip(c.tolist(), p.tolist()):
            acc[t : t + P, left : left + P] += pi
            cnt[t : t + P, left : left + P] += 1
    heat = (acc / np.maximum(cnt, 1))[:H, :W]
    return np.clip(heat, 0.0, 1.0).astype(np.float32)
