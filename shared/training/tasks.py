"""The site side of a model family: the :class:`Task` interface, the inputs a family opens at
a site (:class:`FamilySite`), and the helpers the families' tasks share. Each family's own
Task lives in its package (``shared/families/<name>/task.py``): what it opens, how it trains,
how it scores.

The ClientApp is family-agnostic: it asks :func:`task_for` for the configured family's
:class:`Task` and calls

* ``open(site_dir, cfg)`` -> the site's inputs for the family (memoised per process;
  raises :class:`SiteUnavailable` saying why when the family cannot use the site at all,
  e.g. a dual-mode network at a site without CEM);
* ``train(model, site, cfg, server_round, device, **local)`` -> :class:`TrainStats`
  (``local`` is passed on to :func:`train_local`: FedProx, DP, ...);
* ``predict(model, site, split, cfg, device)`` -> (labels, probabilities, mean loss) at
  the family's reporting unit (``unit``: breast, lesion or exam);
* ``score(model, site_dir, cfg, device)`` -> one :class:`ScoreRow` per unit of every exam,
  any split, labelled or not (``fedbreast site predict``);
* ``explain(model, site_dir, cfg, device)`` -> one :class:`~fedbreast.shared.explain.ViewHeatmap`
  per view of every scored unit (``site predict --explain``), lazily;
* ``extra_metrics(...)`` -> family-specific aggregate metrics for the evaluate reply
  (fixed keys per family, so every site's reply has the same keys);
* ``after_evaluate(arrays, replies' metrics)`` on the server: a family may update the
  global model from aggregate evaluation metrics (late fusion's MCC weights).

Every returned site object has ``name``, ``loader(split, ...)`` and ``exams(split)`` (the
number of reporting units in the split; the reply keys keep the name ``{split}_exams``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
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
    _CachedDataset,
    make_loader,
)
from fedbreast.shared.data.manifest import read_site_meta
from fedbreast.shared.data.preprocess import FIXED_CLIPS, PRESETS, PreprocessConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.schema import ImageRecord
from fedbreast.shared.data.site_data import site_records
from fedbreast.shared.families import family_of
from fedbreast.shared.training.local import TrainStats, train_local

if TYPE_CHECKING:
    from fedbreast.shared.explain import ViewHeatmap

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


def read_records(site_dir: Path, cfg: RunConfig | None = None) -> tuple[list[ImageRecord], str]:
    """The site's records (with its virtual DES images as ``cfg``'s ``virtual-des`` and
    ``virtual-des-replace`` say; none without ``cfg``) and its name."""
    if cfg is None or not cfg.virtual_des:
        records = site_records(site_dir)
    else:
        records = site_records(site_dir, True, cfg.virtual_des_replace, cfg.seed)
    return records, str(read_meta(site_dir).get("site") or site_dir.name)


def read_meta(site_dir: Path) -> dict[str, Any]:
    try:
        return dict(read_site_meta(site_dir))
    except ValueError:
        return {}


def preprocess_config(preset: str, cfg: RunConfig, **changes: Any) -> PreprocessConfig:
    """The ``preset``'s preprocessing with the run's window (ultrasound keeps its own percentile
    window). ``window = fixed`` clips at the preset's own raw values where its seed gives them
    (seed 001's, seed 000's), else at :data:`FIXED_CLIPS` (seed 001's 1500-3300)."""
    base = PRESETS[preset].to_dict()
    if preset != "us":  # the run's window choice; ultrasound keeps its own percentile window
        base["window"] = cfg.window
        if cfg.window == "fixed" and base.get("clip") is None:
            if preset not in FIXED_CLIPS:
                raise ConfigError(
                    f"run config: window = 'fixed': the {cfg.model} family's {preset!r} preprocessing has no "
                    "fixed clip; use window = percentile or dicom"
                )
            base["clip"] = FIXED_CLIPS[preset]
    return PreprocessConfig(**{**base, **changes})


def cached_images(site_dir: Path, records: list[ImageRecord], pre: PreprocessConfig, cfg: RunConfig):
    build_cache(site_dir, records, pre, workers=max(1, cfg.workers))
    return open_cache(site_dir, pre)


def unit_index(keys: list[tuple[str, ...]]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Sample -> unit id for units given as one key per sample (first-seen order)."""
    ids: dict[tuple[str, ...], int] = {}
    out = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    return out, list(ids)


def bce(p: np.ndarray, y: np.ndarray) -> float:
    if not len(y):
        return float("nan")
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def unit_predictions(
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


@dataclass
class ScoreRow:
    """One scored unit for ``site predict``: the site's own local (pseudonymous) ids."""

    patient: str
    exam: str
    laterality: str
    score: float | None
    missing_views: list[str] = field(default_factory=list)
    note: str = ""  # why a unit has no score
    unit: str = "breast"  # what the row scores: "breast", or "lesion" (the breast's outlined lesion)


class Task:
    """The interface every family implements (see the module docstring)."""

    family = ""
    unit = "breast"  # what predict() scores
    count_unit = "breast"  # what exams(split) counts
    # What one DP-SGD sample is: "exam" (one patient's study) or a smaller piece (a patch, a
    # lesion) of which a patient has several, so epsilon per sample is not epsilon per patient.
    dp_unit = "sample"
    # The most scored units one patient has (its breasts: 2); None when unbounded (lesions).
    units_per_patient: int | None = 2
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

    def score(self, model: nn.Module, site_dir: str | Path, cfg: RunConfig, device: torch.device) -> list[ScoreRow]:
        """Every unit of every exam at an ingested site, whatever its split or label (``site
        predict``): one :class:`ScoreRow` each, a unit that cannot be scored with ``score`` None
        and ``note`` saying why."""
        raise NotImplementedError(f"not yet: predict does not cover the {self.family!r} family")

    def explain(
        self, model: nn.Module, site_dir: str | Path, cfg: RunConfig, device: torch.device
    ) -> Iterator[ViewHeatmap]:
        """A heatmap per view of every unit :meth:`score` scores (same order), with the unit's
        score and, where the site's annotations outline a lesion, its mask on the heatmap's grid."""
        raise NotImplementedError(f"not yet: --explain does not cover the {self.family!r} family")

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
        kwargs = train_settings(cfg, server_round, device)
        return train_local(model.to(device), loader, loss_fn=loss_fn, **{**kwargs, **local})

    def _site(self, site_dir: str | Path, cfg: RunConfig) -> FamilySite:
        return _open_family(self.family, str(Path(site_dir).resolve()), cfg)

    def build(self, site_dir: Path, cfg: RunConfig) -> FamilySite:
        raise NotImplementedError


def train_settings(cfg: RunConfig, server_round: int, device: torch.device) -> dict[str, Any]:
    """:func:`train_local`'s settings from the run config for one round (every family's)."""
    return dict(
        lr=cfg.lr_at(server_round),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        device=device,
        amp=cfg.amp,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        optimizer=cfg.optimizer,
        freeze=cfg.freeze,
    )


@lru_cache(maxsize=8)
def _open_family(family: str, site_dir: str, cfg: RunConfig) -> FamilySite:
    return _task(family).build(Path(site_dir), cfg)


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
    m = mask.float()
    return (per * m).sum() / m.sum().clamp_min(1.0)


@cache
def _task(family: str) -> Task:
    return family_of(family).task()


def task_for(cfg: RunConfig) -> Task:
    """The site Task of the configured family (the registry in shared/families names it)."""
    return _task(cfg.model)
