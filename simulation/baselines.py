"""What federated learning is judged against: local-only models and a pooled (centralised) model.

Both get the federated run's budget: ``rounds x local_epochs`` passes over their data with
the same optimiser, schedule and augmentation, and both are scored on each site's test
split exactly as the federated model is. With a run's initial model (``init-checkpoint``, e.g. a
public pretraining), both start from it too, so the comparison stays like for like.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.augment import AUGMENT_PRESETS, augment
from fedbreast.shared.data.site_data import SiteData
from fedbreast.shared.metrics import binary_metrics
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.local import predict, train_local
from fedbreast.shared.training.pooled import InterleavedLoader


def _train(loader, cfg: RunConfig, model: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg) if model is None else model
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = AUGMENT_PRESETS["multiview"]
    for epoch in range(1, cfg.rounds * cfg.local_epochs + 1):
        train_local(
            model,
            loader,
            lr=cfg.lr_at((epoch - 1) // cfg.local_epochs + 1),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            steps=cfg.local_steps,
            amp=cfg.amp,
            augment=(lambda x: augment(x, aug, gen)) if cfg.augment else None,
        )
    return model


# The key of run_baselines' row for all sites' test units pooled (the federated report's
# "pooled test AUC"); no site can take this name (site names are folder names, no spaces).
ALL_SITES = "all sites pooled"


def _test_scores(model: torch.nn.Module, data: SiteData, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    y, p, _ = predict(model, data.loader("test", cfg.batch_size, shuffle=False, workers=0), amp=cfg.amp)
    return np.asarray(y), np.asarray(p)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return binary_metrics(y, p)["auc"] if len(y) else float("nan")


def test_auc(model: torch.nn.Module, data: SiteData, cfg: RunConfig) -> float:
    return _auc(*_test_scores(model, data, cfg))


def _started(cfg: RunConfig, start: Mapping[str, np.ndarray] | None) -> torch.nn.Module | None:
    """The configured model with the run's initial weights; None (a fresh build) without them."""
    if start is None:
        return None
    model = build_model(cfg)
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in start.items()}, strict=True)
    return model


def train_local_only(data: SiteData, cfg: RunConfig, start: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
    """A model trained on one site's train split alone, with the federated run's budget (from
    ``start``, the run's initial model, when it has one)."""
    loader = data.loader("train", cfg.batch_size, shuffle=True, workers=0, seed=cfg.seed)
    return _train(loader, cfg, _started(cfg, start))


def train_pooled(sites: list[SiteData], cfg: RunConfig, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """A model trained on all sites' train splits as if they could be pooled, same budget;
    ``model``: train this one (e.g. ``fedbreast pretrain``'s GroupNorm form) instead of a fresh build."""
    loaders = [s.loader("train", cfg.batch_size, shuffle=True, workers=0, seed=cfg.seed) for s in sites]
    return _train(InterleavedLoader(loaders, seed=cfg.seed), cfg, model)


def run_baselines(
    sites: list[SiteData], cfg: RunConfig, echo=print, start: Mapping[str, np.ndarray] | None = None
) -> dict[str, dict[str, float]]:
    """{site: {"local": test AUC of its local-only model, "pooled": test AUC of the pooled model}},
    and under :data:`ALL_SITES` the same two over every site's test units together (each site's
    units scored by its own local-only model; all by the one pooled model): the figure the
    federated run's pooled test AUC is compared with. ``start``: the federated run's initial
    model, which both baselines then start from as well."""
    out: dict[str, dict[str, float]] = {s.name: {} for s in sites}
    scored: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"local": [], "pooled": []}
    for data in sites:
        scored["local"].append(_test_scores(train_local_only(data, cfg, start), data, cfg))
        out[data.name]["local"] = _auc(*scored["local"][-1])
        echo(f"baseline local-only {data.name}: test AUC {out[data.name]['local']:.3f}")
    model = train_pooled(sites, cfg, _started(cfg, start))
    for data in sites:
        scored["pooled"].append(_test_scores(model, data, cfg))
        out[data.name]["pooled"] = _auc(*scored["pooled"][-1])
    echo("baseline pooled: " + ", ".join(f"{n} {v['pooled']:.3f}" for n, v in out.items()))
    out[ALL_SITES] = {
        arm: _auc(np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]))
        for arm, parts in scored.items()
        if parts
    }
    echo(
        f"baseline over all test units: local-only {out[ALL_SITES]['local']:.3f}, pooled {out[ALL_SITES]['pooled']:.3f}"
    )
    return out
