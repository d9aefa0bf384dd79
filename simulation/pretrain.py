"""``fedbreast pretrain``: a backbone trained centrally, without DP, on data public to the consortium.

DP-SGD on 40-70 exams per site cannot train a 10 M-parameter network from scratch
(docs/differential-privacy.md). The literature's answer is public pretraining: train the
network on public data (an imported CDD-CESM, or a generated federation with its own seed,
never the private sites' data) without DP, then fine-tune privately only a chosen scope
(``dp-train-scope``). This module is the first half:

* the family's network is trained on the train splits of every ingested site folder under
  ``sites_dir``, pooled: the multiview family through :func:`simulation.baselines.train_pooled`
  (the pooled baseline's loop and budget, ``rounds x local-epochs`` passes), the other families
  through their own Task's training, every site in turn for each round;
* the trained registry backbone is written as a flat state_dict that ``weights-path`` loads
  (:func:`fedbreast.shared.models.backbones.backbone_file_state`): the body's keys, the stem at
  the channel count it was trained with (so a 2-channel LE + DES stem survives exactly, which a
  3-channel torchvision file could not carry), and a marker naming the backbone and its norm.

``norm = "group"`` trains the DP form of the network (GroupNorm for BatchNorm, as ``dp = local``
builds it) so a DP run starts from exactly the pretrained normalisation; a BatchNorm file loaded
into a DP run keeps its convolutions but gets fresh GroupNorm layers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.manifest import MANIFEST
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import FAMILIES, family_of
from fedbreast.shared.models.backbones import NORMS, FeatureExtractor, backbone_file_state


def public_site_dirs(sites_dir: str | os.PathLike[str]) -> list[Path]:
    """The ingested site folders under ``sites_dir`` (each holds a manifest.jsonl), or
    ``sites_dir`` itself when it is one; ConfigError naming the folder when there is none."""
    root = Path(sites_dir)
    if not root.is_dir():
        raise ConfigError(f"--sites-dir {root}: not a folder")
    if (root / MANIFEST).is_file():
        return [root]
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file())
    if not dirs:
        raise ConfigError(
            f"--sites-dir {root}: no ingested site in it (a site folder holds {MANIFEST}; write one with "
            "`fedbreast site ingest` or `fedbreast site import-cdd-cesm`)"
        )
    return dirs


def backbone_parts(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> spatial body of every registry backbone in ``model`` (module order):
    ``backbone`` for multiview and birads, ``mg.net`` / ``us.net`` for mgus, ``le`` / ``des`` for
    dualmode, one per slot for latefusion."""
    parts = {n: m.body for n, m in model.named_modules() if isinstance(m, FeatureExtractor)}
    body = getattr(model, "backbone", None)  # the multi-view vgg_fc head keeps the bare body
    if isinstance(body, nn.Module) and not isinstance(body, FeatureExtractor) and "backbone" not in parts:
        parts = {"backbone": body, **parts}
    return parts


def pretrain_config(overrides: dict[str, Any] | None = None, seed: int = 0) -> RunConfig:
    """The run config pretraining uses: ``simulate``'s preset and the family's, then ``overrides``."""
    from fedbreast.simulation.simulate import PRESET

    overrides = dict(overrides or {})
    family = str(overrides.get("model", "multiview"))
    if family not in FAMILIES:
        raise ConfigError(f"model {family!r}: not a registered family; one of {', '.join(FAMILIES)}")
    cfg = RunConfig(**{**PRESET, **FAMILIES[family].preset, "seed": seed}).replace(**overrides)
    if cfg.dp != "off":
        raise ConfigError(
            f"pretrain: dp = {cfg.dp!r}: pretraining is on public data, without DP; to write a backbone "
            "for DP runs (GroupNorm), use --norm group"
        )
    return cfg


def pretrain(
    sites_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    norm: str = "batch",
    part: str | None = None,
    model_out: str | os.PathLike[str] | None = None,
    echo=print,
) -> dict[str, Any]:
    """Train the family's network on the public sites under ``sites_dir`` and write its backbone
    (``part``: which one, for families with several; default the first) to ``out``. Returns
    what was written: path, backbone, part, norm, stem channels, sites, parameters, seconds, and
    under ``network`` the trained model itself (on the CPU)."""
    from fedbreast.shared.data.site_data import SiteUnavailable
    from fedbreast.shared.training.tasks import task_for

    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: must be one of {', '.join(NORMS)}")
    cfg = pretrain_config(overrides, seed)
    dirs = public_site_dirs(sites_dir)
    t0 = time.perf_counter()
    task = task_for(cfg)
    sites = []
    for d in dirs:
        try:
            sites.append(task.open(d, cfg))
        except SiteUnavailable as exc:
            echo(f"warning: {d} is not used: {exc}")
    if not sites:
        raise ConfigError(f"--sites-dir {Path(sites_dir)}: no site there can train model {cfg.model!r}")
    torch.manual_seed(cfg.seed)
    model = family_of(cfg.model).build_model(cfg)
    if norm == "group":
        from fedbreast.shared.training.dp import prepare_dp_model

        model = prepare_dp_model(model)
    parts = backbone_parts(model)
    if not parts:
        raise ConfigError(f"pretrain: model {cfg.model!r} has no registry backbone to write")
    chosen = part or next(iter(parts))
    if chosen not in parts:
        raise ConfigError(f"--part {chosen!r}: model {cfg.model!r} has the backbones {', '.join(parts)}")
    if cfg.model == "multiview":
        from fedbreast.simulation.baselines import train_pooled

        model = train_pooled(sites, cfg, model=model)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for server_round in range(1, cfg.rounds + 1):
            for site in sites:
                task.train(model, site, cfg, server_round, device)
        model.to("cpu")
    body = backbone_parts(model)[chosen]
    state = backbone_file_state(body, cfg.backbone, norm)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)  # a reader never sees half a file
    stem = next(m for m in body.modules() if isinstance(m, nn.Conv2d))
    checkpoint = _write_model(model_out, model, cfg, norm, dirs) if model_out is not None else None
    info = {
        "out": str(out),
        "model": cfg.model,
        "backbone": cfg.backbone,
        "part": chosen,
        "norm": norm,
        "stem_channels": int(stem.in_channels),
        "sites": [str(d) for d in dirs],
        "parameters": sum(p.numel() for p in body.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
        "checkpoint": checkpoint,
    }
    echo(
        f"pretrained {cfg.backbone} ({chosen} of model {cfg.model}, {norm} norm, {info['stem_channels']}-channel "
        f"stem, {info['parameters']:,} parameters) on {len(sites)} public sites in {info['seconds']:.0f} s: {out}"
    )
    echo(f"use it with --set weights-path={out}" + (" --set dp=local" if norm == "group" else ""))
    return {**info, "network": model}


def _write_model(
    model_out: str | os.PathLike[str], model: nn.Module, cfg: RunConfig, norm: str, dirs: list[Path]
) -> str:
    """The whole pretrained network (heads included) as MODEL_OUT/checkpoints/final.pt, a run
    checkpoint that ``init-checkpoint`` (``fedbreast simulate --init-checkpoint``) starts a run
    from: public pretraining of the full model, then private fine-tuning. Its model signature is
    the run's with ``norm = group`` for a ``--norm group`` network (a DP run's, or ``norm = group``)."""
    from fedbreast.server.checkpoints import save_checkpoint

    run_cfg = cfg.replace(norm="group") if norm == "group" else cfg
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    meta = {
        "round": 0,
        "model_signature": run_cfg.model_signature(),
        "config": run_cfg.to_flower(),
        "pretrained_on": [str(d) for d in dirs],
        "pretrain_passes": cfg.rounds * cfg.local_epochs,
    }
    return str(save_checkpoint(Path(model_out), "final", arrays, meta))
