"""``fedbreast evaluate CKPT``: an evaluation-only federated run of a finished model.

The ServerApp is the same as a training run's; the run config adds the coordinator's harness
keys ``init-checkpoint`` (the checkpoint file, read by the coordinator only: sha256 and model
signature checked, server/checkpoints.py initial_checkpoint) and ``evaluate-only = "true"``:
after the roll call the only message a site gets is one evaluate message (server/federation.py
run_evaluation_only). No train message is sent, no update leaves a site. The report is the one
``fedbreast simulate`` writes (server/report.py), headed "Evaluation only of CKPT (round R of
run X)".

- In simulation, on already-ingested site folders (``--sites-dir``, e.g. an imported public
  dataset as an external site), with either engine.
- On a deployed federation by name: ``fedbreast run``'s launcher (``flwr run``) with the same
  run config; the checkpoint path must be readable on the coordinator's machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbreast.server.checkpoints import Checkpoint, read_checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError


def evaluation_run_config(ckpt_path: Path, ckpt: Checkpoint, **changes: Any) -> dict[str, Any]:
    """The run config of an evaluation-only run of ``ckpt``: the checkpoint's own run config (its
    model settings fix the tensors; its evaluation settings make the scores comparable), one
    round, plus ``init-checkpoint`` and ``evaluate-only``. ``changes``: RunConfig fields to set
    (e.g. ``min_available_sites``)."""
    saved = ckpt.meta.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{ckpt_path}: the checkpoint carries no run config; it cannot be evaluated by name")
    cfg = RunConfig.from_flower(saved).replace(rounds=1, **changes)
    return {**cfg.to_flower(), "init-checkpoint": str(Path(ckpt_path).resolve()), "evaluate-only": "true"}


def evaluate_checkpoint(
    ckpt_path: Path,
    run_dir: Path,
    sites_dir: Path | None = None,
    engine: str = "inprocess",
    federation: str | None = None,
    flwr_home: Path | None = None,
    app_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the checkpoint on ``sites_dir``'s sites (simulation) or on ``federation`` (a
    deployed one); return the run record. The report is in ``run_dir``."""
    ckpt_path = Path(ckpt_path).resolve()
    ckpt = read_checkpoint(ckpt_path)  # a damaged file stops here, before any site is asked
    run_dir = Path(run_dir).resolve()
    if (sites_dir is None) == (federation is None):
        raise ConfigError("fedbreast evaluate: give either --sites-dir (simulation) or --federation (deployed)")
    echo(f"evaluation only of {ckpt_path} (round {ckpt.meta.get('round')}, sha256 {ckpt.meta.get('sha256')})")
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if federation is not None:
        from fedbreast.server.launcher import launch

        run_config = evaluation_run_config(ckpt_path, ckpt)
        record = launch(federation, run_dir, run_config, app_dir=app_dir, flwr_home=flwr_home, echo=echo)
    else:
        assert sites_dir is not None
        sites_root = Path(sites_dir).resolve()
        site_dirs = sorted(p for p in sites_root.iterdir() if p.is_dir())
        if not site_dirs:
            raise FileNotFoundError(f"{sites_root}: no site directories in it")
        run_config = {
            **evaluation_run_config(ckpt_path, ckpt, min_available_sites=len(site_dirs)),
            "sim-sites-dir": str(sites_root),
            "run-dir": str(run_dir),
        }
        from fedbreast.simulation.simulate import run_on_engine

        record = run_on_engine(engine, run_dir, run_config, site_dirs)
    results = {"run": record, "checkpoint": str(ckpt_path), "seconds": time.perf_counter() - t0}
    (run_dir / "evaluate.json").write_text(json.dumps(results, indent=2, default=str))
    summary = run_dir / "summary.md"
    if summary.exists():
        echo("")
        echo(summary.read_text())
    echo(f"run directory: {run_dir} ({results['seconds']:.0f} s)")
    return results
