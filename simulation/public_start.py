"""The default simulation's starting point: a network pretrained on a public, generated federation.

Issue 17 item 5 asks the default ``fedbreast simulate`` run to approach the pooled-centralised
model, serve its smallest site and hurt none. With a fresh network, 4 rounds over 40-70 exams a
site do not get there (docs/default-quality.md); the field's answer is to start from a network
pretrained on data public to the consortium, as a DP run does (docs/differential-privacy.md,
"Public pretraining"). A simulation has no public data, so it generates one: a federation of its
own seed (``PUBLIC_SEED``, never the run's), pretrained centrally without DP by
:func:`fedbreast.simulation.pretrain.pretrain` with the run's own model settings and budget
(``rounds x local-epochs`` passes), and written as a run checkpoint that the federated run and
its baselines (``--baselines``) all start from.

The result is cached under the data folder, keyed by the pretraining settings, so a second run
with the same settings starts at once. ``fedbreast simulate --start scratch`` is the fresh start
(the seeds' setting: every paper here trains from ImageNet or from scratch on its own data).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedbreast.server.checkpoints import CheckpointError, read_checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError

STARTS = ("auto", "public", "scratch")
PUBLIC_SEED = 101  # the public federation's data seed; a run of this seed gets the next one
PUBLIC_SITES = 3
PUBLIC_PATIENTS = 80
# Settings that never change what pretraining learns (sampling, timeouts, reports, the
# aggregation rule, DP accounting that pretraining refuses anyway): left out of the cache key.
_NOT_PRETRAINING = (
    "strategy",
    "fraction-train",
    "fraction-evaluate",
    "min-train-sites",
    "min-evaluate-sites",
    "min-available-sites",
    "round-timeout",
    "wait-for-sites",
    "bootstrap",
    "hist-bins",
    "hist-noise-epsilon",
    "key-metric",
    "model-selection",
    "min-val-for-local-threshold",
    "personal-epochs",
    "personal-steps",
    "personal-lr",
    "update-encoding",
    "update-norm-bound",
    "workers",
    "seed",
    # The public federation holds no virtual images (they are made at a run's own sites), so a
    # run that reads them pretrains the same network as one that does not.
    "virtual-des",
    "virtual-des-replace",
)


def public_seed_for(seed: int) -> int:
    """The public federation's data seed: never the run's own (that would pretrain on its data)."""
    return PUBLIC_SEED if seed != PUBLIC_SEED else PUBLIC_SEED + 1


def resolve_start(start: str, cfg: RunConfig, *, generated: bool, init_checkpoint: Path | None) -> str:
    """``public`` or ``scratch`` for this run. ``auto`` (the default) is ``public`` for the default
    run's kind: a generated federation of the multiview family without DP and without an
    initial checkpoint of its own; anything else starts as it always did."""
    if start not in STARTS:
        raise ConfigError(f"--start {start!r}: must be one of {', '.join(STARTS)}")
    if start == "public":
        if init_checkpoint is not None:
            raise ConfigError("--start public and --init-checkpoint: give one initial model")
        if cfg.model != "multiview":
            raise ConfigError(
                f"--start public: built for the multiview family, not {cfg.model!r}; pretrain it with "
                "`fedbreast pretrain --model-out` and pass --init-checkpoint"
            )
        if cfg.dp != "off":
            raise ConfigError(
                "--start public: pretraining is without DP and writes the BatchNorm network; for a DP run "
                "pretrain the DP form (`fedbreast pretrain --norm group --model-out`) and pass --init-checkpoint"
            )
        return "public"
    if start == "scratch":
        return "scratch"
    usable = generated and init_checkpoint is None and cfg.model == "multiview" and cfg.dp == "off"
    return "public" if usable else "scratch"


def pretraining_key(cfg: RunConfig, public_seed: int, patients: int = PUBLIC_PATIENTS) -> str:
    """What the cached public network depends on: the run settings that shape pretraining
    (model, sizes, optimiser, budget, augmentation) and the public data's recipe."""
    settings = {k: v for k, v in cfg.to_flower().items() if k not in _NOT_PRETRAINING}
    recipe = {"seed": public_seed, "sites": PUBLIC_SITES, "patients": patients, "settings": settings}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def public_checkpoint(
    cache_dir: Path, cfg: RunConfig, seed: int, echo: Any = print, patients: int = PUBLIC_PATIENTS
) -> Path:
    """The run checkpoint of ``cfg``'s network pretrained on the public federation, made once
    per pretraining key under ``cache_dir`` (generated and ingested there, never among the
    run's sites) and reused after."""
    from fedbreast.simulation.pretrain import pretrain
    from fedbreast.simulation.simulate import prepare_federation

    public_seed = public_seed_for(seed)
    key = pretraining_key(cfg, public_seed, patients)
    out = Path(cache_dir) / f"pretrained-{key}"
    final = out / "checkpoints" / "final.pt"
    if final.exists():
        try:
            read_checkpoint(final)  # its content hash checked: a damaged file is made again
            echo(f"the initial model is the public pretraining in {out} (cached)")
            return final
        except CheckpointError as exc:
            echo(f"warning: {exc}; pretraining again")
    data = Path(cache_dir) / f"data-seed{public_seed}"
    echo(
        f"public pretraining: a federation of data seed {public_seed} ({PUBLIC_SITES} sites x {patients} "
        f"patients, not the run's data), {cfg.rounds * cfg.local_epochs} passes, then the run starts from it"
    )
    dirs = prepare_federation(data, PUBLIC_SITES, patients, public_seed, echo)
    overrides = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "seed"}
    overrides.update(virtual_des=False, virtual_des_replace=0.0)  # none at the public sites

    def quiet(line: str) -> None:  # pretrain's hint for its own command line; here the run starts from it
        if not line.startswith("use it with"):
            echo(line)

    pretrain(dirs[0].parent, out / "backbone.pt", overrides, seed=public_seed, model_out=out, echo=quiet)
    return final
