"""Seed 004's FFDM -> CESM CycleGAN: the site Task of the ``cyclegan`` family.

Only a site with CEM trains it: each view image with both a low-energy (LE, an FFDM-like
image: domain A) and a recombined image (DES: domain B) is one training sample, one CycleGAN
per view. A site without such pairs answers "unable" (it can still run the trained generator
on its own FFDM: ``fedbreast site synthesize``). What leaves the site is the networks'
weights and sums over its images (squared error, SSIM, enhancement ratios, counts): no image,
no per-image number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import Batch, _CachedDataset
from fedbreast.shared.data.preprocess import lesion_mask
from fedbreast.shared.data.schema import Energy, ImageRecord, Modality
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.durable import atomic_write
from fedbreast.shared.families.cyclegan.model import VIEWS, CycleGANNet
from fedbreast.shared.families.cyclegan.quality import QualitySums
from fedbreast.shared.training.local import TrainStats
from fedbreast.shared.training.tasks import SPLITS, FamilySite, Task, cached_images, preprocess_config, read_records

log = logging.getLogger("fedbreast.cyclegan")

# A preprocessed LE pixel above this is breast (the percentile window puts air at 0).
BREAST_LEVEL = 0.02
PREFIX = "synth"  # evaluate reply keys: {split}_synth_{quality key}


def breast_mask(le: torch.Tensor) -> torch.Tensor:
    """The breast in a preprocessed LE / FFDM image: brighter than air (bool, same shape)."""
    return le > BREAST_LEVEL


def preprocessing(cfg: RunConfig):
    """Seed 004's: pad square, contrast stretch to [0, 1], resize to image-h (= image-w)."""
    return preprocess_config("modality_view", cfg, size=(cfg.image_h, cfg.image_w))


class DesPairDataset(_CachedDataset):
    """The view images of one split with both LE and DES: ``a`` (LE), ``b`` (DES), ``breast``
    and ``lesion`` masks (B, 1, H, W), ``view`` (index into VIEWS). Held in memory: a CEM site's
    pairs at 128 px are a few tens of MB."""

    def __init__(self, pairs: list[tuple[ImageRecord, ImageRecord]], cache) -> None:
        super().__init__()
        self.keys = [(le.patient, le.exam, le.laterality.value, le.view.value) for le, _ in pairs]
        n = len(pairs)
        H, W = cache.fixed_shape
        self.a = torch.zeros(n, 1, H, W)
        self.b = torch.zeros(n, 1, H, W)
        self.lesion = torch.zeros(n, 1, H, W, dtype=torch.bool)
        for i, (le, des) in enumerate(pairs):
            self.a[i, 0] = torch.from_numpy(np.array(cache.get(le.sha256), dtype=np.float32))
            self.b[i, 0] = torch.from_numpy(np.array(cache.get(des.sha256), dtype=np.float32))
            if des.lesions:
                self.lesion[i, 0] = torch.from_numpy(np.array(lesion_mask(des.lesions, cache.geometry(des.sha256))))
        self.breast = breast_mask(self.a)
        self.view = torch.tensor([VIEWS.index(le.view.value.lower()) for le, _ in pairs], dtype=torch.long)
        self._y = np.zeros(n, dtype=np.float32)  # unlabelled: a translator has no class

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Batch(
            a=self.a[idx], b=self.b[idx], breast=self.breast[idx], lesion=self.lesion[idx], view=self.view[idx]
        )


def cem_pairs(records: list[ImageRecord]) -> dict[str, list[tuple[ImageRecord, ImageRecord]]]:
    """split -> (LE, DES) records of the same breast and view (mammography views only)."""
    by_view: dict[tuple[str, str, str, str], dict[Energy, ImageRecord]] = defaultdict(dict)
    for r in records:
        if r.modality is Modality.MG and r.view.is_mammo and r.energy in (Energy.LE, Energy.DES):
            by_view[(*r.breast_key, r.view.value)].setdefault(r.energy, r)
    out: dict[str, list[tuple[ImageRecord, ImageRecord]]] = {s: [] for s in SPLITS}
    for key in sorted(by_view):
        imgs = by_view[key]
        le, des = imgs.get(Energy.LE), imgs.get(Energy.DES)
        if le is not None and des is not None and le.split is not None and le.split.value in out:
            out[le.split.value].append((le, des))
    return out


def lsgan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (CycleGAN's): the discriminator's patch outputs toward 1 or 0."""
    return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))


def generator_loss(
    net, a: torch.Tensor, b: torch.Tensor, cfg: RunConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One view's generator objective: adversarial (both directions) + cycle + identity
    (+ the optional paired L1); returns (loss, fake B, fake A) for the discriminators' step."""
    fake_b, fake_a = net.g_ab(a), net.g_ba(b)
    loss = lsgan(net.d_b(fake_b), True) + lsgan(net.d_a(fake_a), True)
    lc = cfg.cyclegan_lambda_cycle
    loss = loss + lc * (F.l1_loss(net.g_ba(fake_b), a) + F.l1_loss(net.g_ab(fake_a), b))
    if cfg.cyclegan_lambda_identity > 0:
        li = cfg.cyclegan_lambda_identity * lc
        loss = loss + li * (F.l1_loss(net.g_ab(b), b) + F.l1_loss(net.g_ba(a), a))
    if cfg.cyclegan_lambda_paired > 0:
        loss = loss + cfg.cyclegan_lambda_paired * F.l1_loss(fake_b, b)
    return loss, fake_b, fake_a


def discriminator_loss(
    net, a: torch.Tensor, b: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor
) -> torch.Tensor:
    return 0.5 * (
        lsgan(net.d_b(b), True) + lsgan(net.d_b(fake_b.detach()), False)
        + lsgan(net.d_a(a), True) + lsgan(net.d_a(fake_a.detach()), False)
    )  # fmt: skip


class LocalDiscriminators:
    """``cyclegan-aggregate = generators``: the discriminators a site trained stay on its disk
    (``state/cyclegan/<run key>.pt``), used again next round; the reply carries the received
    ones unchanged, so every averaging rule leaves the global discriminators as they were
    (the FedBN scheme, shared/training/personalise.py). Round 1 starts from the received ones.
    The key is the run config's hash (the Task sees no run id): two runs with the same settings
    at one site share the file; a site first sampled after round 1 may start from another such
    run's discriminators (they only shape its training, never what it sends)."""

    def __init__(self, site_dir: Path, cfg: RunConfig) -> None:
        key = hashlib.sha256(json.dumps(cfg.to_flower(), sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = Path(site_dir) / "state" / "cyclegan" / f"{key}.pt"

    @staticmethod
    def keys(model: CycleGANNet) -> list[str]:
        return [k for k in model.state_dict() if CycleGANNet.is_discriminator(k)]

    def load_into(self, model: CycleGANNet, server_round: int) -> bool:
        if server_round <= 1 or not self.path.exists():
            return False
        try:
            own = torch.load(self.path, map_location="cpu", weights_only=True)
            model.load_state_dict({k: v for k, v in own.items() if CycleGANNet.is_discriminator(k)}, strict=False)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: train from the received ones
            log.warning("%s: not this run's discriminators (%s); starting from the received ones", self.path, exc)
            return False
        return True

    def save(self, model: CycleGANNet) -> None:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if CycleGANNet.is_discriminator(k)}
        atomic_write(self.path, lambda fh: torch.save(state, fh))  # never half a file


def _weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """torch's in-place version counter of every parameter and buffer: any optimiser step or
    load_state_dict changes it."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


class CycleGANTask(Task):
    family, unit, count_unit = "cyclegan", "view image", "view image"
    units_per_patient = None  # no score leaves a site from this family (no histograms to noise)

    def open(self, site_dir, cfg):
        return self._site(site_dir, cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        records, name = read_records(site_dir)
        pairs = cem_pairs(records)
        if not pairs["train"]:
            raise SiteUnavailable(
                f"{name} has no CEM view with both a low-energy and a recombined image in its train split: it cannot "
                "train the FFDM-to-CESM translator (it can still synthesise with one: fedbreast site synthesize)"
            )
        used = [r for split in pairs.values() for pair in split for r in pair]
        cache = cached_images(site_dir, used, preprocessing(cfg), cfg)
        site = FamilySite(site_dir, name, self.family, {}, {})
        for split in SPLITS:
            ok = [(le, des) for le, des in pairs[split] if cache.has(le.sha256) and cache.has(des.sha256)]
            site.datasets[split] = DesPairDataset(ok, cache)
            site.units[split] = len(ok)
        return site

    def train(self, model, site, cfg, server_round, device, **local):
        if local.get("dp") is not None:  # the config refuses dp for this family; a second line of defence
            raise SiteUnavailable("the cyclegan family trains without DP")
        t0 = time.perf_counter()
        model = model.to(device).train()
        keeper = LocalDiscriminators(site.site_dir, cfg) if cfg.cyclegan_aggregate == "generators" else None
        received = {k: v.detach().clone() for k, v in model.state_dict().items() if CycleGANNet.is_discriminator(k)}
        if keeper is not None:
            keeper.load_into(model, server_round)
        lr = cfg.lr_at(server_round)
        gens = [p for n, p in model.named_parameters() if ".g_" in n]
        discs = [p for n, p in model.named_parameters() if CycleGANNet.is_discriminator(n)]
        opt_g = torch.optim.Adam(gens, lr=lr, betas=(0.5, 0.999))  # CycleGAN's Adam (lr 2e-4, beta1 0.5)
        opt_d = torch.optim.Adam(discs, lr=lr, betas=(0.5, 0.999))
        steps, seen, total = 0, 0, 0.0
        epochs = max(cfg.local_epochs, 1) if cfg.local_steps <= 0 else 1_000_000
        for epoch in range(epochs):  # a reproducible shuffle per (seed, round, epoch)
            order = (cfg.seed * 1000 + server_round) * 1000 + epoch
            for batch in site.loader("train", cfg.batch_size, shuffle=True, workers=0, seed=order):
                for v, name in enumerate(VIEWS):
                    sel = batch["view"] == v
                    if not sel.any():
                        continue
                    net = model.views[name]
                    a, b = batch["a"][sel].to(device), batch["b"][sel].to(device)
                    opt_g.zero_grad(set_to_none=True)
                    for p in discs:
                        p.requires_grad_(False)
                    loss_g, fake_b, fake_a = generator_loss(net, a, b, cfg)
                    loss_g.backward()
                    opt_g.step()
                    for p in discs:
                        p.requires_grad_(True)
                    opt_d.zero_grad(set_to_none=True)
                    discriminator_loss(net, a, b, fake_a, fake_b).backward()
                    opt_d.step()
                    total += float(loss_g.detach()) * len(a)
                    seen += len(a)
                steps += 1
                if 0 < cfg.local_steps <= steps:
                    break
            if 0 < cfg.local_steps <= steps:
                break
        if keeper is not None:  # this site's discriminators stay here; the received ones go back
            keeper.save(model)
            model.load_state_dict(received, strict=False)
        # TrainStats counts exams x 4 images for images/s; here every sample is one image pair.
        return TrainStats(loss=total / max(seen, 1), examples=seen, steps=steps, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def quality(self, model, site, split: str, cfg: RunConfig, device) -> tuple[QualitySums, float]:
        """The split's quality sums, overall and per view, and the mean L1 inside the breast."""
        model = model.to(device).eval()
        sums = QualitySums(by_view={v: QualitySums() for v in VIEWS})
        l1, px = 0.0, 0.0
        for batch in site.loader(split, cfg.batch_size, shuffle=False, workers=0):
            for v, name in enumerate(VIEWS):
                sel = batch["view"] == v
                if not sel.any():
                    continue
                a, b = batch["a"][sel].to(device), batch["b"][sel].to(device)
                breast, lesion = batch["breast"][sel].to(device), batch["lesion"][sel].to(device)
                fake = model(a, name)
                sums.add(fake, b, breast, lesion)
                sums.by_view[name].add(fake, b, breast, lesion)
                l1 += float(((fake - b).abs() * breast).sum())
                px += float(breast.sum())
        return sums, (l1 / px if px else float("nan"))

    def predict(self, model, site, split, cfg, device, server_round=None):
        """No class scores (a translator): empty labels and scores; the loss is the mean L1
        between synthetic and real DES inside the breast, which selects the best round."""
        sums, loss = self.quality(model, site, split, cfg, device)
        if split == "test":  # the evaluate reply's extra_metrics scores the same split next
            site.info["test_quality"] = (model, _weights_version(model), sums)
        return np.zeros(0, np.int64), np.zeros(0), loss

    def extra_metrics(self, model, site, cfg, device, server_round=None) -> dict[str, Any]:
        # The test split was scored by predict a moment ago (client/app.py evaluates val, test,
        # then asks for these): reuse its sums when it was this model object with these weights.
        # The cached tuple holds the model, so its id cannot be reused by another while cached;
        # an in-place change of any parameter bumps its version and the split is scored again.
        cached = site.info.pop("test_quality", None)
        if cached is not None and cached[0] is model and cached[1] == _weights_version(model):
            sums = cached[2]
        else:
            sums, _ = self.quality(model, site, "test", cfg, device)
        out: dict[str, Any] = dict(sums.metrics(f"test_{PREFIX}"))
        for view, part in sums.by_view.items():
            m = part.metrics(f"test_{PREFIX}")
            out |= {f"test_{PREFIX}_{k}_{view}": m[f"test_{PREFIX}_{k}"] for k in ("images", "psnr", "ssim")}
        return out

    def score(self, model, site_dir, cfg, device):
        raise NotImplementedError(
            "the cyclegan family scores nothing: it synthesises DES images (fedbreast site synthesize SITE_DIR --checkpoint CKPT)"
        )
