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


def echo(line: str) -> None:
    print(line, flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config, ignore=HARNESS_KEYS)
    run_dir = run_dir_of(context)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flower(), indent=2, sort_keys=True) + "\n")
    echo(
        f"fedbreast: {cfg.rounds} rounds of {cfg.strategy} on {cfg.model}/{cfg.backbone} "
        f"({cfg.image_h}x{cfg.image_w}), run directory {run_dir}"
    )
    federation = FederatedRun(grid, cfg, run_dir, initial_arrays(cfg), echo=echo)
    try:
        federation.run()
    except FederationStopped as exc:
        echo(f"fedbreast: stopped: {exc}")
        (run_dir / "STOPPED").write_text(str(exc) + "\n")
        sys.exit(3)
    paths = write_report(run_dir, cfg)
    echo(f"report: {paths['markdown']}")
