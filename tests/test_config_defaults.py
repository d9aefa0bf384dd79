"""The deployed ServerApp's run config (pyproject.toml [tool.flwr.app.config], what `flwr run`
starts from) holds every RunConfig key at RunConfig's default: a deployment and a simulation
start from the same settings. (It once kept birads-groups with the reader's assessment after
the default had become seed 000's four groups: a label leak in every deployed BI-RADS run.)"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from fedbreast.shared.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
# Keys the simulation engine fills in for a run (not settings of the model or training).
RUN_PLUMBING = {"sim-sites-dir", "run-dir"}


def test_pyproject_run_config_is_runconfigs_defaults() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig()
    keys = {RunConfig.flower_key(f.name): f.name for f in dataclasses.fields(RunConfig)}
    assert set(table) - RUN_PLUMBING == set(keys), "pyproject.toml and RunConfig name different keys"
    parsed = RunConfig.from_flower({k: v for k, v in table.items() if k not in RUN_PLUMBING})
    for key, name in keys.items():
        assert getattr(parsed, name) == getattr(defaults, name), key
