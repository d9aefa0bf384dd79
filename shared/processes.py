"""Running Flower's long-lived processes (SuperLink, SuperNode) under our commands.

Both ``fedbreast server start`` and ``fedbreast site start`` start a Flower binary as a
child, pass SIGTERM on to it, and must keep every byte of outbound traffic to the
federation itself: no telemetry, no update checks, no runtime dependency installs.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

# Hospitals allow no outbound traffic besides the SuperLink: these must reach every Flower
# process (SuperLink, SuperExec, ServerApp, SuperNode, ClientApp), so they go in the env.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment (flwr, flower-superlink, ...)."""
    return str(Path(sys.executable).parent / name)


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower children: quiet, and our venv's bin first on PATH, because
    the SuperLink / SuperNode start flower-superexec and flwr-serverapp/-clientapp by name."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, **QUIET_ENV, PATH=path, **(extra or {}))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def probe_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def http_ok(url: str, cafile: Path | None = None, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 2xx (HTTPS verified against ``cafile`` when given)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True, step: float = 0.2
) -> bool:
    """Poll ``check`` until it is true (True), ``alive`` turns false or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return False
        time.sleep(step)
    return check()


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> int:
    """SIGTERM the child's process group (it was started with ``start_new_session``), then
    SIGKILL after ``grace`` seconds; also reaps what the child left in its group."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Grandchildren (flwr-clientapp, superexec) can outlive a crashed parent in its group.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the supervision loop reads (and restores the
    previous handlers on exit), so a stop request is forwarded instead of killing us."""

    def __init__(self, on_stop: Callable[[int], None] | None = None) -> None:
        self.received: int | None = None
        self._on_stop = on_stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum
        if self._on_stop is not None:
            self._on_stop(signum)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False as soon as a stop was requested."""
        deadline = time.monotonic() + seconds
        while self.received is None and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.received is None
