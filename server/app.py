"""The coordinator's Flower ServerApp (``fedbreast.server.app:app``).

The same app runs under ``flwr run .`` in simulation and deployment. The run directory
(``run-dir`` in the run config, default ``runs/<flower run id>``) receives the resolved
config, metrics.jsonl, checkpoints and the report.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbreast.server.federation import FederatedRun, FederationStopped
from fedbreast.server.report import write_report
from fedbreast.shared.config import HARNESS_KEYS, RunConfig
from fedbreast.shared.families import family_of
from fedbreast.shared.models.factory import build_model

log = logging.getLogger("fedbreast.server")
app = ServerApp()


def initial_arrays(cfg: RunConfig) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(cfg.seed)
    return {k: v.detach().cpu().numpy().copy() for k, v in build_model(cfg).state_dict().items()}


def run_dir_of(context: Context) -> Path:
    configured = str(context.run_config.get("run-dir", "") or "")
    return Path(configured) if configured else Path("runs") / str(context.run_id)


def truthy(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def run_mode(context: Context, cfg: RunConfig, run_dir: Path) -> tuple[dict[str, np.ndarray] | None, dict]:
    """The coordinator's harness keys: the initial model from ``init-checkpoint`` (a file on the
    coordinator's own disk: sha256 and model signature checked), ``evaluate-only`` and
    ``holdout-site``. Written to ``run_mode.json`` for the report."""
    from fedbreast.server.checkpoints import CheckpointError, initial_checkpoint

    rc = context.run_config
    mode: dict = {
        "evaluate_only": truthy(rc.get("evaluate-only", "")),
        "holdout_sites": [n.strip() for n in str(rc.get("holdout-site", "") or "").split(",") if n.strip()],
    }
    path = str(rc.get("init-checkpoint", "") or "")
    arrays = None
    if path:
        ckpt = initial_checkpoint(Path(path), cfg.model_signature())
        arrays = ckpt.arrays
        mode["checkpoint"] = {
            "path": str(Path(path).resolve()),
            "round": ckpt.meta.get("round"),
            "kind": ckpt.meta.get("kind"),
            "sha256": ckpt.meta.get("sha256"),
            "run_dir": str(Path(path).resolve().parent.parent),
            "key_metric": ckpt.meta.get("key_metric"),
            "key_value": ckpt.meta.get("key_value"),
        }
    elif mode["evaluate_only"]:
        raise CheckpointError("evaluate-only: no init-checkpoint given; there is no model to evaluate")
    (run_dir / "run_mode.json").write_text(json.dumps(mode, indent=2, sort_keys=True) + "\n")
    return arrays, mode


def echo(line: str) -> None:
    print(line, flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config, ignore=HARNESS_KEYS)
    run_dir = run_dir_of(context)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flower(), indent=2, sort_keys=True) + "\n")
    echo(
        f"fedbreast: {cfg.rounds} rounds of {cfg.strategy} on {family_of(cfg.model).describe(cfg)} "
        f"({cfg.image_h}x{cfg.image_w}), run directory {run_dir}"
    )
    given, mode = run_mode(context, cfg, run_dir)
    if mode["evaluate_only"]:
        ck = mode["checkpoint"]
        echo(f"fedbreast: evaluation only of {ck['path']} (round {ck['round']}); no site trains")
    federation = FederatedRun(
        grid,
        cfg,
        run_dir,
        given if given is not None else initial_arrays(cfg),
        echo=echo,
        holdout=tuple(mode["holdout_sites"]),
        evaluate_only=mode["evaluate_only"],
    )
    try:
        federation.run()
    except FederationStopped as exc:
        echo(f"fedbreast: stopped: {exc}")
        (run_dir / "STOPPED").write_text(str(exc) + "\n")
        sys.exit(3)
    paths = write_report(run_dir, cfg)
    echo(f"report: {paths['markdown']}")
