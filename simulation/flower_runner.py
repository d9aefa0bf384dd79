"""Running our ServerApp + ClientApp on Flower's simulation engine, blocking, from Python.

The non-deprecated path in Flower 1.41 (run_simulation is deprecated and ignores the run
config): our own in-memory SuperLink in simulation mode on free loopback ports, a
connection written into a private FLWR_HOME, then ``flwr run APP CONN --stream``.
``flwr run`` exits 0 even when the ServerApp fails, so the real status is read back with
``flwr ls``. Nothing leaves the machine: telemetry, update checks and the SuperLink's
runtime dependency install are all switched off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedbreast.shared.config import HARNESS_KEYS, RunConfig
from fedbreast.shared.errors import FedbreastError

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
HARNESS_DEFAULTS = dict.fromkeys(HARNESS_KEYS, "")


class SimulationFailed(FedbreastError, RuntimeError):
    """The Flower run did not finish as completed; the message carries Flower's status."""


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def app_config_toml() -> str:
    """``[tool.flwr.app.config]``: every run-config key with its default (Flower only
    accepts overrides of keys declared here)."""
    items = {**RunConfig().to_flower(), **HARNESS_DEFAULTS}
    return "\n".join(f"{k} = {toml_value(v)}" for k, v in items.items())


def write_app_dir(path: Path) -> Path:
    """A minimal Flower app folder whose components are the installed fedbreast apps.

    The FAB built from it holds only this pyproject; the code that runs is the installed
    fedbreast package, so the app works from an editable or a regular install alike.
    """
    path.mkdir(parents=True, exist_ok=True)
    from fedbreast import __version__

    (path / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "fedbreast-app"
version = "{__version__}"
description = "fedbreast ServerApp and ClientApp (the installed fedbreast package)"
license = "Apache-2.0"
dependencies = ["fedbreast"]

[tool.flwr.app]
publisher = "fedbreast"

[tool.flwr.app.components]
serverapp = "fedbreast.server.app:app"
clientapp = "fedbreast.client.app:app"

[tool.flwr.app.config]
{app_config_toml()}
"""
    )
    return path


def ray_environment(ray_address: str | None) -> dict[str, str]:
    """Where the simulation's ``ray.init()`` (in flwr-simulation, started by the SuperLink) goes:
    ``RAY_ADDRESS``, which Ray reads when Flower passes no address (Flower's run config has no
    key for one). ``None``: ``local``, a fresh Ray on this machine, even when a cluster started
    with ``ray start`` is running here (a bare ``ray.init()`` would join that one). Otherwise
    that cluster: ``auto`` (the last ``ray start --head`` on this machine) or the head's
    ``HOST:PORT`` (docs/multi-node.md)."""
    return {"RAY_ADDRESS": ray_address or "local"}


def cpus_per_site_for(concurrent: int) -> int:
    """Ray CPUs per site's actor on this machine: its cores shared among the sites that run at
    once (at least 1). Ray sets an actor's torch threads (OMP_NUM_THREADS) to its CPUs when the
    environment does not, so this is also the threads per actor: one each on a 2-core box with
    three sites, five each on a 16-core one (Ray's 1 would leave 13 cores idle)."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrent))


@contextmanager
def simulation_superlink(
    home: Path, log_path: Path, ray_address: str | None = None
) -> Iterator[tuple[str, dict[str, str]]]:
    """Start an in-memory simulation SuperLink; yield (connection name, env); stop it after.
    ``ray_address``: the Ray cluster its simulation joins (:func:`ray_environment`)."""
    port = free_port()
    # The SuperLink starts flower-superexec / flwr-simulation by name: our venv's bin must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, **QUIET_ENV, **ray_environment(ray_address), FLWR_HOME=str(home), PATH=path)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedbreast-sim"\n\n[superlink.fedbreast-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = open(log_path, "w")
    link = subprocess.Popen(
        [
            bin_path("flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if link.poll() is not None:
                raise SimulationFailed(f"the SuperLink exited with code {link.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SimulationFailed(f"the SuperLink did not become healthy in 60 s; see {log_path}") from None
                time.sleep(0.2)
        yield "fedbreast-sim", env
    finally:
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGTERM)
            try:
                link.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(link.pid, signal.SIGKILL)
                link.wait()
        log.close()


def default_workers(num_sites: int) -> int:
    """How many sites run at once when the caller does not say: every site of a small federation
    (on a 2-core box, three sites at once finish a round in one site-time, not two), at most
    max(4, CPUs). Each worker is a resident Ray actor with its own torch (0.3-0.5 GB before any
    model), so one per site does not scale: 100 sites would be 100 processes."""
    return max(1, min(num_sites, max(4, os.cpu_count() or 1)))


def federation_config(num_sites: int, workers: int, cpus_per_site: int = 1) -> str:
    """``flwr run --federation-config``: ``num_sites`` SuperNodes served by a pool of ``workers``
    Ray actors. Flower's Ray backend makes (Ray's CPUs / client CPUs) actors and lends each
    message to an idle one, so telling Ray it has ``workers * cpus_per_site`` CPUs bounds the
    pool; an actor then serves many sites in turn, opening each site's data on demand (the
    ClientApp's site caches are LRU-bounded: shared/data/site_data.py, shared/training/tasks.py)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return (
        f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site} "
        f"init-args-num-cpus={workers * cpus_per_site}"
    )


def run_simulation(
    run_dir: Path,
    run_config: Mapping[str, Any],
    num_sites: int,
    cpus_per_site: int | None = None,
    stream: bool = True,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the federation on ``num_sites`` simulated SuperNodes; return Flower's run record.
    ``workers``: at most this many sites run at once, each in one of a pool of that many Ray
    actors (default :func:`default_workers`); more than ``num_sites`` would only idle.
    ``cpus_per_site``: Ray CPUs, and so torch threads, per actor (default :func:`cpus_per_site_for`
    the pool; 1 on a cluster). ``ray_address``: join that running Ray cluster (``auto`` or the
    head's HOST:PORT) instead of starting Ray here; its CPUs / ``cpus_per_site`` size the pool."""
    run_dir = Path(run_dir).resolve()
    if ray_address is not None and workers is not None:
        raise ValueError("workers: on a Ray cluster (ray_address) the pool is the cluster's CPUs / cpus_per_site")
    pool = min(num_sites, workers) if workers is not None else default_workers(num_sites)
    if cpus_per_site is None:
        cpus_per_site = 1 if ray_address is not None else cpus_per_site_for(pool)
    flower_dir = run_dir / "flower"
    app_dir = write_app_dir(flower_dir / "app")
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    with simulation_superlink(flower_dir / "home", flower_dir / "superlink.log", ray_address) as (conn, env):
        cmd = [
            bin_path("flwr"),
            "run",
            str(app_dir),
            conn,
            "--run-config",
            overrides,
            "--federation-config",
            federation_config(num_sites, pool, cpus_per_site)
            if ray_address is None
            # Ray refuses num_cpus when joining a cluster: the cluster's own CPUs bound the pool.
            else f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site}",
        ]
        if stream:
            cmd.append("--stream")
        with open(flower_dir / "flwr-run.log", "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if stream and _is_progress(line):
                    print(_strip_log_prefix(line), flush=True)
            proc.wait()
        listing = subprocess.run(
            [bin_path("flwr"), "ls", conn, "--format", "json"], env=env, capture_output=True, text=True
        )
        try:
            runs = json.loads(listing.stdout)["runs"]
        except (ValueError, KeyError):
            raise SimulationFailed(f"could not read the run status: {listing.stdout or listing.stderr}") from None
        if not runs:
            raise SimulationFailed(f"Flower started no run; see {flower_dir / 'flwr-run.log'}")
        record = runs[-1]
        logs = subprocess.run(
            [bin_path("flwr"), "log", str(record["run-id"]), conn, "--show"], env=env, capture_output=True, text=True
        )
        (flower_dir / "run.log").write_text(logs.stdout)
    if record.get("status") != "finished:completed":
        raise SimulationFailed(
            f"Flower run {record.get('run-id')} ended {record.get('status')}: {record.get('status-details')} "
            f"(logs: {flower_dir / 'run.log'})"
        )
    return record


def _strip_log_prefix(line: str) -> str:
    return line.rstrip("\n").split(" : ", 1)[-1] if " : " in line else line.rstrip("\n")


def _is_progress(line: str) -> bool:
    # Our ServerApp prints its own progress lines; Flower's INFO chatter stays in the log file.
    text = _strip_log_prefix(line)
    return text.startswith(("fedbreast:", "round ", "  round ", "resuming", "report:", "all "))
