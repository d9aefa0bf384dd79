"""The site's side of personalisation, FedBN, the cross-site phase and patient-specific
fine-tuning, around the family tasks (shared/families/<name>/task.py).

The ClientApp handlers (client/app.py) stay thin: they load the config, the site and the
received model, and call these functions. Everything here runs on the site; what it
returns for a reply is model weights or aggregate metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.families.birads.psft import _normal_patches, psft_split  # noqa: F401
from fedbreast.shared.metrics import BINARY_METRIC_KEYS, binary_metrics, operating_threshold
from fedbreast.shared.training.accounting import run_key
from fedbreast.shared.training.dp import CEILING_KEY, DPRefused, site_ceiling
from fedbreast.shared.training.personalise import (
    PersonalSettings,
    PersonalStore,
    SitePersonaliser,
    state_digest,
    suffixed,
)
from fedbreast.shared.training.tasks import Task

log = logging.getLogger("fedbreast.client")

PERSONAL_SUFFIX = "_personal"
# split_metrics(split, y, p, loss, units, threshold) -> the reply's fixed key set for one split
SplitMetrics = Callable[[str, np.ndarray, np.ndarray, float, int, float], dict[str, Any]]


def refuse_fine_tuning_outside_dp(context: Context, cfg: RunConfig) -> None:
    """DPRefused when this message would fine-tune on the site's data without DP-SGD (personal
    or patient-specific fine-tuning) at a site whose policy requires DP (``dp-max-epsilon``).

    With dp on, the run config itself refuses them (the site validates its own copy); this is
    the case the run config cannot see: dp = off at a site that requires DP, where training is
    refused already (shared/training/dp.py) and evaluate and personal queries must not train
    either."""
    keys = cfg.fine_tunes_without_dp
    ceiling = site_ceiling(context.node_config)
    if keys and ceiling is not None:
        raise DPRefused(
            f"this site's policy ({CEILING_KEY} = {ceiling:g}) requires differential privacy, but "
            f"{' and '.join(keys)} would fine-tune on its data without DP-SGD"
        )


def personaliser_for(context: Context, cfg: RunConfig, site_dir: Path) -> SitePersonaliser:
    """This run's personal state on the site's disk (see shared/training/personalise.py)."""
    key = run_key(context.run_config, context.run_id, model_signature=cfg.model_signature())
    settings = PersonalSettings(
        epochs=cfg.personal_epochs, steps=cfg.personal_steps, lr=cfg.personal_lr, fedbn=cfg.fedbn
    )
    return SitePersonaliser(PersonalStore(site_dir, key), settings)


def global_digest(model: nn.Module) -> str:
    """Digest of the received global weights (call before the site's norms are applied)."""
    return state_digest(model.state_dict())


def personal_fine_tune(
    task: Task, site: Any, cfg: RunConfig, server_round: int, device: torch.device
) -> Callable[[nn.Module], Any]:
    """Fine-tuning of a copy of the global model on the site's train split, with the family's
    own training step: ``personal-epochs`` (or ``personal-steps`` batches), no FedProx term."""
    lr = cfg.personal_lr or cfg.lr_at(server_round)

    def fine_tune(model: nn.Module) -> Any:
        try:
            return task.train(
                model.to(device),
                site,
                cfg,
                server_round,
                device,
                lr=lr,
                epochs=max(cfg.personal_epochs, 1),
                steps=cfg.personal_steps,
                proximal_mu=0.0,
            )
        except SiteUnavailable as exc:  # e.g. mgus' fusion step at a site without ultrasound
            log.info("personal fine-tuning skipped this round: %s", exc)
            return None

    return fine_tune


def personal_metrics(
    task: Task,
    site: Any,
    model: nn.Module,
    digest: str,
    cfg: RunConfig,
    server_round: int,
    device: torch.device,
    personaliser: SitePersonaliser,
    split_metrics: SplitMetrics,
    grid: int | None = None,
) -> dict[str, Any]:
    """The personalised model's val/test metrics under ``*_personal`` keys (same keys at every
    site), plus whether it was reused from disk. As for the global model, the thresholded
    metrics use the personal model's own operating point from the validation split.
    ``model`` holds the global weights (with the site's norm layers under FedBN) and is not changed."""
    personal, reused = personaliser.personal_model(
        model, digest, server_round, personal_fine_tune(task, site, cfg, server_round, device)
    )
    out: dict[str, Any] = {}
    threshold = 0.5
    for split in ("val", "test"):
        y, p, loss = task.predict(personal.to(device), site, split, cfg, device, server_round=server_round)
        if split == "val" and len(y):
            threshold = operating_threshold(y, p, grid=grid or cfg.hist_bins)
        out.update(suffixed(split_metrics(split, y, p, loss, site.exams(split), threshold), PERSONAL_SUFFIX))
    out["personal_reused"] = int(reused)
    return out


def personal_arrays(
    task: Task,
    site: Any,
    model: nn.Module,
    digest: str,
    cfg: RunConfig,
    server_round: int,
    device: torch.device,
    personaliser: SitePersonaliser,
) -> dict[str, torch.Tensor]:
    """The personalised weights for the cross-site phase (from disk, or fine-tuned now)."""
    personal, _ = personaliser.personal_model(
        model, digest, server_round, personal_fine_tune(task, site, cfg, server_round, device)
    )
    return {k: v.detach().cpu() for k, v in personal.state_dict().items()}


def cross_site_metrics(
    task: Task,
    site: Any,
    models: list[tuple[str, nn.Module]],
    cfg: RunConfig,
    server_round: int,
    device: torch.device,
    personaliser: SitePersonaliser,
    keys: tuple[str, ...],
) -> dict[str, Any]:
    """Every model on this site's test split: ``m{i}_{key}`` per model (NaN where undefined).

    Under FedBN the global model's norm layers are the untrained initial ones, so the site
    evaluates it with its own norm layers, as it does in every round."""
    out: dict[str, Any] = {}
    for i, (name, model) in enumerate(models):
        if name == "global":
            personaliser.use_local_norms(model, server_round)
        y, p, _ = task.predict(model.to(device), site, "test", cfg, device, server_round=server_round)
        m = (
            binary_metrics(y, p)
            if len(y)
            else {k: float("nan") for k in BINARY_METRIC_KEYS} | {"n": 0, "n_pos": 0, "n_neg": 0}
        )
        for key in keys:
            out[f"m{i}_{key}"] = m.get(key.removeprefix("test_"), float("nan"))
    return out


# ---- patient-specific fine-tuning (seed 000; the "birads" patch family) --------------------------
# psft_split and _normal_patches live with the family (shared/families/birads/psft.py, which
# site predict uses too); imported above, and from here by the claims benchmark and tests.


def psft_metrics(
    task: Task, site: Any, model: nn.Module, cfg: RunConfig, device: torch.device, grid: int | None = None
) -> dict[str, Any]:
    """``val_*_psft`` / ``test_*_psft`` metrics of the patch family with patient-specific
    fine-tuning, and per split the counts of patients fine-tuned / skipped (no normal
    tissue). As for the plain model, thresholded test metrics use the operating point found
    on the validation split (here: of the fine-tuned scores). Only aggregates return."""
    from fedbreast.shared.training.patient_finetune import PSFTConfig

    if task.family != "birads":
        raise ValueError(f"patient-finetune needs the patch family 'birads', not {task.family!r}")
    pcfg = PSFTConfig.from_run(cfg)
    out: dict[str, Any] = {}
    threshold = 0.5
    for split in ("val", "test"):
        result = psft_split(site, model, cfg, pcfg, device, split)
        if split == "val" and len(result.y):
            threshold = operating_threshold(result.y, result.p_psft, grid=grid or cfg.hist_bins)
        out.update(result.metrics(split, threshold=threshold))
    return out
