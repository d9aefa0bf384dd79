"""Seed 000's patient-specific fine-tuning (PSFT) for the birads family, on the site.

Two users, one mechanism (shared/training/patient_finetune.py):

* the evaluate reply's ``*_psft`` metrics (``client/personal.py: psft_metrics``) score one
  split's labelled lesions through :func:`psft_split` (``evaluate_patient_finetune``);
* ``site predict`` scores every lesion of every patient, labelled or not, through
  :class:`PatientTuning`, which hands out each patient's fine-tuned working model so the
  same weights can score the patient's lesions and draw their patch score maps.

Normal tissue (patches outside every lesion outline, labelled benign) comes from
:class:`~fedbreast.shared.data.datasets.NormalPatchDataset`, drawn as the lesion patches are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.schema import ImageRecord

log = logging.getLogger("fedbreast.families.birads.psft")

NO_NORMAL_TISSUE = "no normal tissue: no normal patch for this patient"


def normal_patch_dataset(records: Sequence[ImageRecord], cache: Any, cfg: RunConfig, split: str | None):
    """The normal-tissue patches of ``records`` (``split`` None: every split, labelled or not),
    with the run's patch size, count, seed and patch energies."""
    from fedbreast.shared.data.datasets import NormalPatchDataset
    from fedbreast.shared.families.birads.task import patch_images

    energies = cfg.patch_energy_list
    return NormalPatchDataset(
        patch_images(list(records), energies),
        cache,
        split=split,
        patch=cfg.patch_size,
        n_patches=cfg.n_patches,
        seed=cfg.seed,
        energies=energies,
    )


@lru_cache(maxsize=4)
def _normal_patches(site_dir: str, cfg: RunConfig, split: str):
    """The split's normal-tissue patches, drawn as the lesion patches are (memoised: the
    lesion-free regions need a pass over every image)."""
    from fedbreast.shared.data.manifest import load_manifest
    from fedbreast.shared.training.tasks import task_for

    site = task_for(cfg).open(site_dir, cfg)
    return normal_patch_dataset(load_manifest(Path(site_dir)), site.datasets[split].cache, cfg, split)


def psft_split(site: Any, model: nn.Module, cfg: RunConfig, pcfg, device: torch.device, split: str):
    """One split's lesion scores without and with patient-specific fine-tuning (a :class:`PSFTResult`);
    per unit, so it stays on the site. Labelled lesions only (the evaluate reply's metrics)."""
    from fedbreast.shared.models.birads import BiradsNet
    from fedbreast.shared.training.patient_finetune import evaluate_patient_finetune

    lesion_ds = site.datasets[split]
    normal_ds = _normal_patches(str(Path(site.site_dir).resolve()), cfg, split)
    vec = site.info["birads"][split]  # per lesion image
    unit_of_image = site.info["unit_of_image"][split]
    unit_vec = site.info["unit_birads"][split]
    patient_vec = patient_vectors(lesion_ds.images, vec)

    def extras(patient: str, kind: str, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if kind == "lesion":
            return {"birads": vec[batch["image"]]}
        # Normal tissue has no descriptors of its own: it is paired with the patient's lesion
        # descriptors, so fine-tuning teaches "this patient's tissue, with these findings, is benign".
        return {"birads": patient_vec[patient].expand(batch["x"].shape[0], -1)}

    def fuse(ids: np.ndarray, p: np.ndarray) -> np.ndarray:
        assert isinstance(model, BiradsNet)  # patient fine-tuning is the patch family's (psft_metrics)
        with torch.no_grad():
            out = model.fuse(
                torch.as_tensor(p, dtype=torch.float32, device=device), unit_vec[torch.from_numpy(ids)].to(device)
            )
        return out.cpu().numpy().astype(np.float64)

    return evaluate_patient_finetune(
        model.to(device),
        lesion_ds,
        normal_ds,
        pcfg,
        device,
        forward=patch_forward,
        extras=extras,
        unit_of=lambda images: unit_of_image[images],
        fuse=fuse,
    )


def patch_forward(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The BI-RADS patch network's per-patch logit (its image's, or its patient's, BI-RADS vector)."""
    return m(batch["x"], batch["birads"])


def patient_vectors(images: Sequence[ImageRecord], vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each patient's BI-RADS vector for its normal patches: that of its first lesion image."""
    out: dict[str, torch.Tensor] = {}
    for i, r in enumerate(images):
        out.setdefault(r.patient, vec[i])
    return out


class PatientTuning:
    """Per patient, the model that scores its lesions: ``model`` itself, or with ``pcfg`` a working
    copy fine-tuned on the patient's normal patches (one :class:`PatientFinetuner`, reset to the
    base weights per patient, so ``model`` is never changed).

    Unlike :func:`evaluate_patient_finetune`, every patient with lesion patches is covered,
    labelled or not, and the fine-tuned weights are handed out (``site predict`` draws its
    patch score maps with them). Each patient's fine-tuning is reproducible: the shuffling
    generator and the global RNG (dropout) are seeded from (seed, patient) inside a forked
    RNG state, so scoring and explaining the same patient give the same weights on a CPU.
    ``scope = "head"`` fine-tunes the last layer with full forward passes (no feature cache).
    """

    def __init__(
        self,
        model: nn.Module,
        lesion_ds: Any,
        vec: torch.Tensor,
        cfg: RunConfig,
        device: torch.device,
        normal_ds: Any = None,
    ) -> None:
        self.model, self.lesion_ds, self.vec, self.device = model, lesion_ds, vec, device
        self.normal_ds = normal_ds
        self.pcfg = None
        if normal_ds is not None:
            from fedbreast.shared.training.patient_finetune import PSFTConfig

            self.pcfg = PSFTConfig.from_run(cfg)
        self.patient_vec = patient_vectors(lesion_ds.images, vec)
        self.patients = 0  # fine-tuned
        self.skipped = 0  # no normal tissue
        self.seconds = 0.0  # fetching the normal patches + fine-tuning, summed over fine-tuned patients
        self._tuner: Any = None

    @property
    def seconds_per_patient(self) -> float:
        return self.seconds / self.patients if self.patients else float("nan")

    def models(self) -> Iterator[tuple[str, nn.Module, str]]:
        """(patient, model, note) in ``lesion_ds.patients()`` order. A fine-tuned model is the
        working copy, valid until the next item; ``note`` says why a patient was not fine-tuned."""
        for patient in self.lesion_ds.patients():
            if self.normal_ds is None:
                yield patient, self.model, ""
                continue
            n_idx = self.normal_ds.indices_for_patient(patient)
            if len(n_idx) == 0:
                self.skipped += 1
                why = self.normal_ds.patient_skipped.get(patient, NO_NORMAL_TISSUE)
                yield patient, self.model, f"scored without patient-specific fine-tuning: {why}"
                continue
            yield patient, self._finetune(patient, n_idx), ""

    def _finetune(self, patient: str, n_idx: np.ndarray) -> nn.Module:
        from fedbreast.shared.training.patient_finetune import PatientFinetuner, _batches, _seed_for

        assert self.pcfg is not None
        if self._tuner is None:
            self._tuner = PatientFinetuner(self.model, self.pcfg, self.device, patch_forward)
        tuner, pvec = self._tuner, self.patient_vec[patient]
        t0 = time.perf_counter()
        seed = _seed_for(self.pcfg.seed, patient)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            tuner.reset()
            normal = _batches(
                self.normal_ds,
                n_idx,
                self.pcfg.batch_size,
                self.device,
                lambda b: {"birads": pvec.expand(b["x"].shape[0], -1)},
            )
            tuner.finetune(normal, torch.Generator().manual_seed(seed))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.patients += 1
        return tuner.work


__all__ = [
    "NO_NORMAL_TISSUE",
    "PatientTuning",
    "normal_patch_dataset",
    "patch_forward",
    "patient_vectors",
    "psft_split",
]
