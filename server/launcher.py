"""``fedbreast run FEDERATION``: one federated run on a deployed SuperLink, watched live.

It is ``flwr run APP FEDERATION --stream`` (the FEDERATION being a connection in
``$FLWR_HOME/config.toml``, which ``fedbreast server start`` writes), plus:

- the app folder is generated from the installed fedbreast package, so it works from a
  wheel as well as from a checkout;
- a live table: one line per site and phase as the ServerApp appends it to the run
  directory's ``metrics.jsonl`` (when that directory is on this machine, as it is when the
  coordinator launches runs on the SuperLink's host), and the ServerApp's own progress lines
  from the streamed log either way;
- the real outcome: ``flwr run`` exits 0 even when the ServerApp fails, so the run's status
  is read back with ``flwr ls`` and turned into our exit code;
- a clean resume: each Flower run launched into a run directory is recorded there, and a
  new launch into it first stops an earlier one the SuperLink still lists as unfinished. A
  coordinator killed mid-run leaves its run "running" in the SuperLink's database until the
  dead ServerApp's heartbeat expires (about a minute), and a site holding one of its messages
  keeps retrying that message's objects the whole time, so the resumed run would wait for it.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedbreast.shared import protocol
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.processes import bin_path, flower_env

# Columns of the live table: (header, metrics.jsonl key, width). Missing values print as "-".
COLUMNS = (
    ("round", "round", 5),
    ("site", "site", 16),
    ("phase", "phase", 9),
    ("examples", protocol.NUM_EXAMPLES, 8),
    ("loss", "train_loss", 7),
    ("train s", "train_seconds", 7),
    ("img/s", "train_images_per_s", 7),
    ("val AUC", "val_auc", 7),
    ("test AUC", "test_auc", 8),
    ("test loss", "test_loss", 9),
)
RUN_ID = re.compile(r"run\s+(\d+)", re.IGNORECASE)
RUN_IDS = Path("flower") / "run-ids"  # in a run directory: each Flower run launched into it, one per line


class RunFailed(FedbreastError, RuntimeError):
    """The run did not finish as completed; the message carries Flower's status."""


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    else:
        text = str(value)
    return text[:width].ljust(width)


def table_header() -> str:
    return "  ".join(h.ljust(w) for h, _, w in COLUMNS).rstrip()


def table_row(row: Mapping[str, Any]) -> str | None:
    """One line of the live table for a metrics.jsonl row, None for rows not shown."""
    phase = row.get("phase")
    if phase in ("train", "evaluate"):
        return "  ".join(_cell(row.get(key), w) for _, key, w in COLUMNS).rstrip()
    if phase == "failure":
        head = "  ".join(_cell(row.get(k), w) for _, k, w in COLUMNS[:2])
        return f"{head}  {_cell('LEFT OUT', 9)}  {row.get('stage', '')}: {row.get('reason', '')}"
    if phase == "policy":  # a setting the site clamped under its own policy (client/policy.py)
        head = "  ".join(_cell(row.get(k), w) for _, k, w in COLUMNS[:2])
        return f"{head}  {_cell('CLAMPED', 9)}  {row.get('stage', '')}: {row.get('notes', '')}"
    if phase == "round":
        return (
            f"{_cell(row.get('round'), 5)}  {_cell('all sites', 16)}  {_cell('done', 9)}  "
            f"{row.get('seconds', 0):.1f} s, {row.get('sites_trained', 0)} trained, {row.get('failures', 0)} left out"
        )
    return None


class MetricsTail(threading.Thread):
    """Follows a metrics.jsonl that may not exist yet and prints each new row as a table line."""

    def __init__(self, path: Path, emit: Callable[[str], None], poll: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.path, self.emit, self.poll = path, emit, poll
        self.rows = 0
        self._halt = threading.Event()
        self._offset = 0
        self._partial = ""

    def run(self) -> None:
        while not self._halt.is_set():
            self.drain()
            self._halt.wait(self.poll)
        self.drain()

    def drain(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
                self._offset = fh.tell()
        except FileNotFoundError:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = table_row(row)
            if text is not None:
                if self.rows == 0:
                    self.emit(table_header())
                self.rows += 1
                self.emit(text)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("flwr"), *args], env=env, capture_output=True, text=True)


def run_status(federation: str, run_id: int | None, env: dict[str, str]) -> dict[str, Any]:
    args = ["ls", federation, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    listing = _flwr(args, env)
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (ValueError, KeyError):
        raise RunFailed(
            f"could not read the run status from the SuperLink: {(listing.stdout or listing.stderr).strip()}"
        ) from None
    if not runs:
        raise RunFailed("the SuperLink lists no run")
    return runs[-1]


def stop_unfinished_runs(federation: str, run_dir: Path, env: dict[str, str], emit: Callable[[str], None]) -> list[int]:
    """Stop the run last launched into ``run_dir`` if the SuperLink still lists it as
    unfinished, and return the ids stopped. A run directory has one live run: an earlier one
    left going would race the new one on its checkpoints and metrics. Only the last can be
    unfinished: every launch stops the one before it (or fails)."""
    try:
        earlier = [int(line) for line in (run_dir / RUN_IDS).read_text().split()]
    except FileNotFoundError:
        return []
    except ValueError:
        raise RunFailed(f"{run_dir / RUN_IDS}: not a list of Flower run ids; remove it to launch") from None
    if not earlier:
        return []
    run_id = earlier[-1]
    try:
        status = str(run_status(federation, run_id, env).get("status", ""))
    except RunFailed:
        return []  # a run this SuperLink does not know (another SuperLink, or a fresh database)
    if status.startswith("finished"):
        return []
    out = _flwr(["stop", str(run_id), federation], env)
    if out.returncode != 0:
        raise RunFailed(
            f"run {run_id}, launched into {run_dir} before, is still {status} and could not be stopped: "
            f"{(out.stdout + out.stderr).strip()}"
        )
    emit(f"stopped run {run_id}: launched into this run directory before, still {status} (its coordinator stopped)")
    return [run_id]


def _record_run_id(run_dir: Path, run_id: int) -> None:
    with open(run_dir / RUN_IDS, "a", encoding="utf-8") as fh:
        fh.write(f"{run_id}\n")


def default_run_dir(federation: str, flwr_home: Path | None, stamp: str) -> Path:
    """``STATE/runs/FEDERATION-STAMP`` of the SuperLink that ``fedbreast server start`` runs on
    this machine (so its /metrics sees the run), else ``./runs/FEDERATION-STAMP``."""
    from fedbreast.server.superlink import pointer_path, resolve_flwr_home

    pointer = pointer_path(resolve_flwr_home(flwr_home), federation)
    try:
        runs = Path(json.loads(pointer.read_text())["runs_dir"])
    except (OSError, ValueError, KeyError):
        runs = Path("runs")
    return runs / f"{federation}-{stamp}"


def launch(
    federation: str,
    run_dir: Path,
    run_config: Mapping[str, Any],
    app_dir: Path | None = None,
    flwr_home: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start a run on ``federation``, print its live table, return Flower's run record."""
    from fedbreast.simulation.flower_runner import toml_value, write_app_dir

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    app = Path(app_dir) if app_dir is not None else write_app_dir(run_dir / "flower" / "app")
    env = flower_env({"FLWR_HOME": str(flwr_home)} if flwr_home is not None else None)
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in {**run_config, "run-dir": str(run_dir)}.items())
    cmd = [bin_path("flwr"), "run", str(app), federation, "--run-config", overrides, "--stream"]
    log_path = run_dir / "flower" / "flwr-run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            echo(line)

    stop_unfinished_runs(federation, run_dir, env, emit)
    tail = MetricsTail(run_dir / "metrics.jsonl", emit)
    tail.start()
    run_id: int | None = None
    t0 = time.monotonic()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if (
                    run_id is None
                    and (m := RUN_ID.search(line))
                    and ("start" in line.lower() or "created" in line.lower())
                ):
                    run_id = int(m.group(1))
                    _record_run_id(run_dir, run_id)
                    emit(f"run {run_id} started on '{federation}'; run directory {run_dir}")
                if _is_progress(line):
                    emit(_strip_log_prefix(line))
            proc.wait()
    finally:
        tail.stop()
    if proc.returncode != 0:
        raise RunFailed(f"`flwr run` exited with code {proc.returncode}; see {log_path}:\n{_last_lines(log_path)}")
    record = run_status(federation, run_id, env)
    emit(f"run {record.get('run-id')}: {record.get('status')} in {time.monotonic() - t0:.0f} s")
    if record.get("status") != "finished:completed":
        raise RunFailed(
            f"run {record.get('run-id')} ended {record.get('status')}: {record.get('status-details')} (log: {log_path})"
        )
    return record


def _last_lines(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


def _strip_log_prefix(line: str) -> str:
    return line.rstrip("\n").split(" : ", 1)[-1] if " : " in line else line.rstrip("\n")


def _is_progress(line: str) -> bool:
    # The ServerApp's own lines (roll call, round summaries, report path); Flower's chatter stays in the log.
    text = _strip_log_prefix(line)
    return text.startswith(("fedbreast:", "site ", "round ", "  round ", "resuming", "report:", "all "))
