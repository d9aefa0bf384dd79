"""``fedbreast server start``: the coordinator's SuperLink with our defaults.

Flower's ``flower-superlink`` does the transport. This wrapper makes the safe choice the
default one:

- TLS and SuperNode authentication are on; only sites whose public key was registered
  (``deploy/tls/register-site.sh``) can join. ``--insecure`` is an explicit opt-out that
  prints a warning (Flower cannot authenticate nodes without TLS, so it turns that off too).
- The SuperLink's state (runs, registered nodes and their ids) lives in a SQLite database in
  the state directory, so a restart keeps the federation, and ServerApp run directories go
  to ``STATE/runs`` by default.
- No telemetry, update checks or runtime dependency installs.
- A Prometheus endpoint for the coordinator (``fedbreast.server.observability``).
- A connection named after the federation is written to ``$FLWR_HOME/config.toml``, so
  ``fedbreast run NAME`` / ``flwr run . NAME`` / ``register-site.sh`` reach this SuperLink.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedbreast.shared.durable import atomic_write_json, atomic_write_text
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.processes import StopSignal, bin_path, flower_env, http_ok, probe_host, stop_group, wait_until

DEFAULT_PORT = 9092
DEFAULT_METRICS_PORT = 9400
INSECURE_WARNING = (
    "WARNING: --insecure: the SuperLink runs WITHOUT TLS and WITHOUT SuperNode authentication. "
    "Model updates travel unencrypted and any machine that reaches this port can join the federation. "
    "Use it only on a closed test network."
)


class DeployError(FedbreastError, RuntimeError):
    """An operator error in deployment settings; the message names the file or flag."""


@dataclass(frozen=True)
class SuperLinkSettings:
    state_dir: Path
    tls_dir: Path | None = None  # ca.crt, server.crt, server.key (deploy/tls/provision.sh output)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    federation: str = "fedbreast"
    flwr_home: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = DEFAULT_METRICS_PORT  # 0 / None: no endpoint
    insecure: bool = False
    connect_address: str | None = None  # written to the connection; default: reach it on this machine

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def tls_files(self) -> dict[str, Path]:
        root = self.tls_dir if self.tls_dir is not None else self.state_dir / "tls"
        return {"ca": root / "ca.crt", "cert": root / "server.crt", "key": root / "server.key"}

    @property
    def address(self) -> str:
        """How clients on this machine reach the SuperLink (the certificate covers 127.0.0.1)."""
        return f"{probe_host(self.host)}:{self.port}"


def check_tls(settings: SuperLinkSettings) -> dict[str, Path]:
    """The TLS files, each present and readable; otherwise one error naming them all and the fix."""
    files = settings.tls_files()
    problems = []
    for path in files.values():
        try:
            with open(path, "rb") as fh:
                if not fh.read(64).startswith(b"-----BEGIN"):
                    problems.append(f"{path}: not a PEM file")
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
    if problems:
        root = files["ca"].parent
        raise DeployError(
            "TLS is on by default and its files are not usable: "
            + "; ".join(problems)
            + f". Create them with `deploy/tls/provision.sh {root} --host YOUR_HOSTNAME SITE...` (or point --tls-dir at them);"
            " to run without TLS on a test network pass --insecure."
        )
    return files


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    # No message size limit can be set here: flower-superlink 1.41 has no option for it (its
    # Fleet API server is built with GRPC_MAX_MESSAGE_LENGTH, 2 GiB, fixed in
    # flwr/superlink/cli/flower_superlink.py), and Flower sends arrays as separate chunks of
    # FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), so a per-gRPC-message cap would not bound a
    # reply anyway. The coordinator bounds each reply itself, before reading it
    # (server/reply_checks.py; docs/server-robustness.md).
    cmd = [
        bin_path("flower-superlink"),
        "--database",
        str(settings.database),
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--disable-runtime-dependency-installation",
    ]
    if settings.insecure:
        return cmd + ["--insecure"]
    files = check_tls(settings)
    return cmd + [
        "--ssl-ca-certfile",
        str(files["ca"]),
        "--ssl-certfile",
        str(files["cert"]),
        "--ssl-keyfile",
        str(files["key"]),
        "--enable-supernode-auth",
    ]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add or update ``[superlink.NAME]`` in ``FLWR_HOME/config.toml``, keeping other entries."""
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    try:
        doc = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"{path}: not valid TOML ({exc}); fix or remove it") from None
    links = doc.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates.resolve())
    links[name] = entry
    links.setdefault("default", name)
    atomic_write_text(path, tomli_w.dumps(doc), mode=0o666)  # Flower's own config: never half-written
    return path


def resolve_flwr_home(flwr_home: Path | None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home)
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def pointer_path(flwr_home: Path, federation: str) -> Path:
    """Where ``fedbreast run FEDERATION`` on this machine learns the coordinator's runs folder."""
    return flwr_home / f"fedbreast-{federation}.json"


def write_pointer(flwr_home: Path, settings: SuperLinkSettings) -> Path:
    path = pointer_path(flwr_home, settings.federation)
    where = {"state_dir": str(settings.state_dir), "runs_dir": str(settings.runs_dir)}
    atomic_write_json(path, where, mode=0o666, indent=None)  # 0o666 less the umask, as before
    return path


def _start_exporter(
    settings: SuperLinkSettings, health: Callable[[], tuple[bool, str]], echo: Callable[[str], None]
) -> object | None:
    if not settings.metrics_port:
        return None
    from fedbreast.server.observability import start_server_exporter

    server = start_server_exporter(
        settings.runs_dir, port=settings.metrics_port, host=settings.metrics_host, health=health
    )
    echo(
        f"coordinator metrics: http://{probe_host(settings.metrics_host)}:{settings.metrics_port}/metrics and /healthz"
    )
    return server


def _stop_exporter(server: object | None) -> None:
    for name in ("shutdown", "stop", "close"):
        fn = getattr(server, name, None)
        if callable(fn):
            fn()
            return


def run_superlink(settings: SuperLinkSettings, echo: Callable[[str], None] = print, ready_timeout: float = 90.0) -> int:
    """Start the SuperLink in the foreground; return its exit status (0 after SIGTERM / Ctrl-C)."""
    cmd = superlink_command(settings)  # raises DeployError before anything starts
    if settings.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    scheme = "http" if settings.insecure else "https"
    ca = None if settings.insecure else settings.tls_files()["ca"]
    health_url = f"{scheme}://{settings.address}/health"
    # cwd = state dir: the ServerApp's default run directory (runs/<run id>) lands in STATE/runs.
    proc = subprocess.Popen(cmd, cwd=settings.state_dir, env=flower_env(), start_new_session=True)

    def health() -> tuple[bool, str]:
        if proc.poll() is not None:
            return False, f"the SuperLink exited with code {proc.returncode}"
        if not http_ok(health_url, ca):
            return False, f"the SuperLink does not answer {health_url}"
        return True, f"SuperLink up on {settings.host}:{settings.port}"

    def stop_superlink(_sig: int) -> None:
        if proc.poll() is None:
            proc.terminate()

    exporter = _start_exporter(settings, health, echo)
    try:
        with StopSignal(on_stop=stop_superlink) as stop:
            if wait_until(
                lambda: http_ok(health_url, ca),
                ready_timeout,
                alive=lambda: proc.poll() is None and stop.received is None,
            ):
                home = resolve_flwr_home(settings.flwr_home)
                conf = write_connection(home, settings.federation, settings.connect_address or settings.address, ca)
                write_pointer(home, settings)
                echo(
                    f"SuperLink ready on {settings.host}:{settings.port} "
                    f"({'INSECURE' if settings.insecure else 'TLS, SuperNode authentication'}), state {settings.database}"
                )
                echo(
                    f"federation '{settings.federation}' written to {conf}; "
                    f"register sites with deploy/tls/register-site.sh SITE KEY.pub {settings.federation}, "
                    f"then: fedbreast run {settings.federation}"
                )
            elif proc.poll() is None and stop.received is None:
                echo(
                    f"warning: the SuperLink did not answer {health_url} within {ready_timeout:.0f} s; still waiting on it"
                )
            while proc.poll() is None and stop.received is None:
                stop.sleep(0.5)
            code = stop_group(proc)
            return 0 if stop.received is not None else code
    finally:
        if proc.poll() is None:
            stop_group(proc)
        _stop_exporter(exporter)
