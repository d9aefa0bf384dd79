"""``fedbreast site start``: the hospital's long-lived client daemon.

The daemon is a Flower SuperNode (``flower-supernode``) with the site's configuration,
plus what a hospital operator needs around it:

1. **Preflight, before joining** (printed as a report): key and root certificate readable
   and of the right kind, GPU present if the site requires one, manifest valid and the site
   able to train, preprocessing cache warm (or warming in the background). Key, certificate
   and GPU problems stop the daemon (exit 2: restarting cannot fix them). A bad data folder
   does not: the SuperNode still joins, ``/healthz`` reports the reason, and the ClientApp
   answers "unable" so the federation goes on without this site.
2. **Supervision:** the SuperNode is a child process, restarted with exponential backoff if
   it dies; SIGTERM / Ctrl-C is passed on and the daemon exits 0. Identity is the site key
   (same key, same registered node id) and state lives on disk, so restarts of the child,
   of the daemon (systemd, container restart policy) or of the machine change nothing.
3. **Observability:** ``/metrics`` and ``/healthz`` (fedbreast.client.observability).
4. **No other traffic:** telemetry, update checks and dependency installs are off.
5. **A warm ClientApp** (``[daemon] warm-clientapp``, on by default): each message's
   ClientApp is forked from a process that imported torch, Flower and the app once, instead
   of a fresh interpreter per message (fedbreast.client.warm_clientapp).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedbreast.client.site_config import SiteConfig
from fedbreast.shared.processes import StopSignal, bin_path, flower_env, stop_group, wait_until

if TYPE_CHECKING:  # annotations only; plan() imports the data modules when it runs
    from fedbreast.shared.data.preprocess import PreprocessConfig
    from fedbreast.shared.data.schema import ImageRecord

# Flower's exit codes that restarting with the same settings cannot fix (flwr.supercore.exit).
KEY_INVALID = 302
REFUSED = 305  # connection refused at start-up: for an authenticated SuperLink, an unregistered key
# Exit statuses are 8 bits (305 would read as 49), so giving up after refusals exits with
# sysexits' EX_NOPERM: the SuperLink does not let this key in.
EXIT_REFUSED = 77
HEALTHY_RUN_SECONDS = 60.0  # a child that ran this long resets the backoff
# A SuperNode that died without deactivating stays "online" at the SuperLink until two
# heartbeats (2 x 30 s in Flower 1.41) are missed; activating again before that is refused.
STALE_NODE_SECONDS = 60.0
REFUSED_RETRY_SECONDS = 5.0
FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
WARM_START_SECONDS = 60.0  # the longest the first join waits for the warm ClientApp server


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = False  # stops the daemon (vs. reported, joined anyway)
    warn: bool = False

    def line(self) -> str:
        tag = "ok" if self.ok and not self.warn else ("warn" if self.ok else ("FAIL" if self.fatal else "bad"))
        return f"  [{tag:>4}] {self.name}: {self.detail}"


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)

    @property
    def fatal(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.fatal]

    @property
    def data_problem(self) -> str | None:
        bad = [c for c in self.checks if not c.ok and not c.fatal]
        return "; ".join(f"{c.name}: {c.detail}" for c in bad) or None

    def render(self, cfg: SiteConfig) -> str:
        head = f"fedbreast site {cfg.name}: preflight ({cfg.source})"
        return "\n".join([head, *(c.line() for c in self.checks)])


# ---- preflight ---------------------------------------------------------------------------------


def check_private_key(path: Path) -> Check:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except OSError as exc:
        return Check("site key", False, f"{path}: {exc.strerror or exc}", fatal=True)
    except (ValueError, TypeError) as exc:
        return Check(
            "site key",
            False,
            f"{path}: not an unencrypted OpenSSH private key ({exc}); create one with deploy/tls/make-site-key.sh",
            fatal=True,
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check(
            "site key",
            False,
            f"{path}: {type(key).__name__}, but SuperNode authentication needs ECDSA (ssh-keygen -t ecdsa -b 384)",
            fatal=True,
        )
    if path.stat().st_mode & 0o077:
        return Check(
            "site key", True, f"{path}: ECDSA {key.curve.name}; readable by other users: chmod 600 it", warn=True
        )
    return Check("site key", True, f"{path}: ECDSA {key.curve.name}")


def check_root_certificate(path: Path) -> Check:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return Check("root certificate", False, f"{path}: {exc.strerror or exc}", fatal=True)
    except ValueError as exc:
        return Check("root certificate", False, f"{path}: not a PEM certificate ({exc})", fatal=True)
    cert = certs[0]
    expires = cert.not_valid_after_utc
    days = (expires.timestamp() - time.time()) / 86400
    if days < 0:
        return Check("root certificate", False, f"{path}: expired on {expires:%Y-%m-%d}", fatal=True)
    detail = f"{path}: {cert.subject.rfc4514_string()}, valid until {expires:%Y-%m-%d}"
    return Check("root certificate", True, detail + (" (less than 30 days left)" if days < 30 else ""), warn=days < 30)


def check_gpu(required: bool) -> Check:
    if not required:
        return Check("GPU", True, "not required by this site's config")
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return Check("GPU", True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    return Check(
        "GPU",
        False,
        "gpu-required = true but torch sees no CUDA device (driver, container --gpus, or CUDA_VISIBLE_DEVICES?)",
        fatal=True,
    )


def check_data(cfg: SiteConfig) -> Check:
    from fedbreast.shared.data.check import check_site
    from fedbreast.shared.data.manifest import ManifestError

    if not cfg.data_path.is_dir():
        return Check("data", False, f"{cfg.data_path}: no such folder (set [site] data-path)")
    try:
        result = check_site(cfg.data_path)
    except (ManifestError, OSError) as exc:
        return Check("data", False, str(exc))
    summary = f"{cfg.data_path}: {result.images} images, {result.exams} exams, {result.patients} patients"
    if not result.can_train:
        return Check("data", False, f"{summary}; cannot train: {'; '.join(result.problems)}")
    return Check("data", True, summary)


class CacheWarmer(threading.Thread):
    """Preprocesses the site's images for the expected input size in the background, so the
    first round trains instead of decoding DICOM; the ClientApp's own cache build takes the
    same lock and skips what is done."""

    def __init__(self, cfg: SiteConfig) -> None:
        super().__init__(daemon=True, name="cache-warmer")
        self.cfg = cfg
        self.status = "not started"

    def plan(self) -> tuple[PreprocessConfig, list[ImageRecord], int]:
        from fedbreast.shared.config import RunConfig
        from fedbreast.shared.data.cache import CacheError, open_cache
        from fedbreast.shared.data.manifest import load_manifest
        from fedbreast.shared.data.site_data import preprocess_for

        h, w = self.cfg.warm_image_size
        pre = preprocess_for(RunConfig(image_h=h, image_w=w, window=self.cfg.warm_window))
        mammo = [r for r in load_manifest(self.cfg.data_path) if r.view.is_mammo]
        try:
            cache = open_cache(self.cfg.data_path, pre)
            cached = len({r.sha256 for r in mammo if cache.has(r.sha256)})
        except CacheError:
            cached = 0
        return pre, mammo, cached

    def preflight(self) -> Check:
        h, w = self.cfg.warm_image_size
        try:
            _, mammo, cached = self.plan()
        except Exception as exc:  # a cache we cannot read is reported, the ClientApp rebuilds it
            return Check("cache", True, f"cannot read the cache ({exc}); the first round rebuilds it", warn=True)
        total = len({r.sha256 for r in mammo})
        if cached >= total:
            self.status = f"warm ({total} images at {h}x{w})"
            return Check("cache", True, self.status)
        self.status = f"warming: {cached}/{total} images at {h}x{w}"
        return Check(
            "cache", True, f"{cached}/{total} images preprocessed at {h}x{w}; warming in the background", warn=True
        )

    def run(self) -> None:
        from fedbreast.shared.data.cache import build_cache

        try:
            pre, mammo, _ = self.plan()
            total = len({r.sha256 for r in mammo})

            def progress(done: int, todo: int) -> None:
                self.status = f"warming: {done}/{todo} images left to preprocess"

            stats = build_cache(self.cfg.data_path, mammo, pre, workers=1, progress=progress)
            self.status = f"warm ({total} images, {stats.failed} failed to preprocess)"
        except Exception as exc:  # reported on /healthz detail; the ClientApp will say why it cannot train
            self.status = f"warming failed: {exc}"


def preflight(cfg: SiteConfig, insecure: bool) -> tuple[Preflight, CacheWarmer | None]:
    report = Preflight()
    if not insecure:
        assert cfg.private_key is not None and cfg.root_certificates is not None  # load_site_config enforces it
        report.checks.append(check_private_key(cfg.private_key))
        report.checks.append(check_root_certificate(cfg.root_certificates))
    report.checks.append(check_gpu(cfg.gpu_required))
    data = check_data(cfg)
    report.checks.append(data)
    warmer = None
    if data.ok:
        warmer = CacheWarmer(cfg)
        report.checks.append(warmer.preflight())
    return report, warmer


# ---- the SuperNode -----------------------------------------------------------------------------


def write_node_config(cfg: SiteConfig) -> Path:
    """The node config as a TOML file (flower-supernode accepts one), so paths need no shell quoting."""
    import json

    def value(v: object) -> str:  # floats stay floats (8.0, not 8): the ClientApp gets the type it was given
        return repr(v) if isinstance(v, float) else json.dumps(v)  # a JSON string is a TOML basic string

    path = cfg.state_dir / "node-config.toml"
    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in cfg.node_config().items()), encoding="utf-8")
    return path


def supernode_command(cfg: SiteConfig, node_config: Path, insecure: bool) -> list[str]:
    cmd = [
        bin_path("flower-supernode"),
        "--superlink",
        cfg.superlink,
        "--node-config",
        str(node_config),
        "--host",
        "127.0.0.1",  # the local runtime API: never exposed beyond this machine
        "--port",
        str(cfg.clientapp_port),
    ]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + [
        "--root-certificates",
        str(cfg.root_certificates),
        "--auth-supernode-private-key",
        str(cfg.private_key),
    ]


class SiteDaemon:
    def __init__(
        self,
        cfg: SiteConfig,
        insecure: bool = False,
        max_restarts: int | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.insecure, self.max_restarts, self.echo = cfg, insecure, max_restarts, echo
        self.data_problem: str | None = None
        self.link_problem: str | None = "starting"
        self.warmer: CacheWarmer | None = None
        self.child: subprocess.Popen | None = None
        self.warm: subprocess.Popen | None = None
        self.warm_socket: Path | None = None
        self.env: dict[str, str] = {}
        self.restarts = 0

    # /healthz: healthy = the data can train and the SuperNode is up and accepted.
    def health(self) -> tuple[bool, str]:
        problems = [p for p in (self.data_problem, self.link_problem) if p]
        cache = f"; cache {self.warmer.status}" if self.warmer else ""
        if problems:
            return False, "; ".join(problems) + cache
        return True, f"site {self.cfg.name}: SuperNode running, SuperLink {self.cfg.superlink}{cache}"

    def _start_exporter(self) -> object | None:
        if not self.cfg.metrics_port:
            return None
        from fedbreast.client.observability import start_site_exporter

        server = start_site_exporter(
            self.cfg.data_path,
            port=self.cfg.metrics_port,
            host=self.cfg.metrics_host,
            health=self.health,
            site_name=self.cfg.name,
        )
        self.echo(f"metrics and health: http://{self.cfg.metrics_host}:{self.cfg.metrics_port}/metrics and /healthz")
        return server

    def run(self) -> int:
        cfg = self.cfg
        report, self.warmer = preflight(cfg, self.insecure)
        self.echo(report.render(cfg))
        if report.fatal:
            self.echo(
                f"fedbreast site {cfg.name}: not joining: " + "; ".join(f"{c.name}: {c.detail}" for c in report.fatal)
            )
            return 2
        self.data_problem = report.data_problem
        if self.data_problem:
            self.echo(
                f"fedbreast site {cfg.name}: joining anyway, reporting unhealthy; the site will answer "
                f"'unable' until the data is fixed ({self.data_problem})"
            )
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        node_config = write_node_config(cfg)
        cmd = supernode_command(cfg, node_config, self.insecure)
        exporter = self._start_exporter()
        if self.warmer is not None:
            self.warmer.start()
        self.env = self._supernode_env()
        try:
            return self._supervise(cmd)
        finally:
            if self.child is not None and self.child.poll() is None:
                stop_group(self.child)
            if self.warm is not None:
                stop_group(self.warm)
            for name in ("shutdown", "stop", "close"):
                if callable(fn := getattr(exporter, name, None)):
                    fn()
                    break

    def _pump(self, stream, tail: deque) -> None:
        """Pass the SuperNode's output through (journald / docker logs get it) and keep its end,
        where Flower prints the exit code it means (the process itself often exits 1)."""
        for line in stream:
            tail.append(line)
            self.echo(line.rstrip("\n"))

    def _supernode_env(self) -> dict[str, str]:
        """Flower's quiet environment, and our ``flwr-clientapp`` first on the PATH the
        SuperNode's SuperExec searches: the pinned ClientApp (client/pinned_clientapp.py), forked
        from the warm server or, without one, started cold. Flower's own never runs here."""
        env = flower_env()
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        from fedbreast.client.pinned_clientapp import install_pinned_runtime
        from fedbreast.client.warm_clientapp import install_pinned, install_shim, socket_path

        bin_dir = self.cfg.state_dir / "bin"
        install_pinned_runtime(bin_dir)  # flower-superexec for ClientApp tasks only; no other task command
        if not self.cfg.warm_clientapp:
            entry = install_pinned(bin_dir)
        else:
            self.warm_socket = socket_path(self.cfg.state_dir)
            cold = install_pinned(bin_dir, "flwr-clientapp-cold")
            entry = install_shim(bin_dir, self.warm_socket, str(cold))
        env["PATH"] = os.pathsep.join([str(entry.parent), env["PATH"]])
        return env

    def _keep_warm_server(self) -> None:
        """(Re)start the warm ClientApp server; until it is up the shim falls back to the cold path."""
        previous = self.warm
        if not self.cfg.warm_clientapp or (previous is not None and previous.poll() is None):
            return
        first = previous is None
        if previous is not None:
            self.echo(
                f"fedbreast site {self.cfg.name}: the warm ClientApp server exited ({previous.returncode}); restarting it"
            )
        sock = self.warm_socket
        assert sock is not None  # set with the SuperNode's environment, before any start
        sock.unlink(missing_ok=True)  # a socket left by a crashed server must not read as "up"
        warm = self.warm = self._spawn(
            # -P: the state directory (its cwd) is not on the import path; nothing dropped there shadows an import
            [sys.executable, "-P", "-m", "fedbreast.client.warm_clientapp", str(sock)],
            "warm-output",
            1,
        )[0]
        # Join once it listens (its imports take 3-15 s), so the first round's messages are
        # warm too; a server that does not come up only costs the cold path, not the join.
        if first and not wait_until(sock.exists, WARM_START_SECONDS, alive=lambda: warm.poll() is None):
            self.echo(
                f"fedbreast site {self.cfg.name}: the warm ClientApp server is not up; joining with cold ClientApps"
            )

    def _spawn(self, cmd: list[str], name: str, keep: int) -> tuple[subprocess.Popen, deque, threading.Thread]:
        """A child in its own process group, its output passed through (the last ``keep`` lines kept)."""
        child = subprocess.Popen(
            cmd,
            cwd=self.cfg.state_dir,
            env=self.env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        tail: deque = deque(maxlen=keep)
        reader = threading.Thread(target=self._pump, args=(child.stdout, tail), daemon=True, name=name)
        reader.start()
        return child, tail, reader

    def _start_child(self, cmd: list[str]) -> tuple[subprocess.Popen, deque, threading.Thread]:
        self._keep_warm_server()
        child, tail, reader = self._spawn(cmd, "supernode-output", 60)
        (self.cfg.state_dir / "supernode.pid").write_text(f"{child.pid}\n")
        return child, tail, reader

    def _supervise(self, cmd: list[str]) -> int:
        cfg = self.cfg
        backoff = 1.0
        refused_since: float | None = None
        last_data_check = time.monotonic()
        with StopSignal() as stop:
            while True:
                self.echo(
                    f"fedbreast site {cfg.name}: joining {cfg.superlink} "
                    f"({'INSECURE' if self.insecure else 'TLS, key ' + str(cfg.private_key)})"
                    + (f", restart {self.restarts}" if self.restarts else "")
                )
                started = time.monotonic()
                self.child, tail, reader = self._start_child(cmd)
                self.link_problem = None
                while self.child.poll() is None and stop.received is None:
                    stop.sleep(0.5)
                    self._keep_warm_server()
                    if self.data_problem and time.monotonic() - last_data_check > 60:
                        # An operator may fix the folder while we run: clear the flag when it trains again.
                        last_data_check = time.monotonic()
                        if check_data(cfg).ok:
                            self.data_problem = None
                if stop.received is not None:
                    self.echo(f"fedbreast site {cfg.name}: stopping (signal {stop.received})")
                    stop_group(self.child)
                    reader.join(timeout=5)
                    return 0
                code = stop_group(self.child)  # also clears ClientApp processes it left behind
                reader.join(timeout=5)
                ran = time.monotonic() - started
                flower_code = flower_exit_code(tail)
                if KEY_INVALID in (code, flower_code):
                    self.echo(
                        f"fedbreast site {cfg.name}: the SuperNode cannot use the key {cfg.private_key} (exit {KEY_INVALID})"
                    )
                    return 2
                refused = REFUSED in (code, flower_code)
                if refused:
                    refused_since = refused_since or time.monotonic()
                    self.link_problem = (
                        f"the SuperLink {cfg.superlink} refused to activate this site (Flower exit {REFUSED}): either its "
                        f"public key is not registered under '{cfg.name}' (coordinator: deploy/tls/register-site.sh "
                        f"{cfg.name} site.key.pub), or the SuperLink still counts it online after an unclean stop "
                        f"(that clears within {STALE_NODE_SECONDS:.0f} s)"
                    )
                else:
                    refused_since = None
                    self.link_problem = f"SuperNode exited with code {code} after {ran:.0f} s"
                self.echo(f"fedbreast site {cfg.name}: {self.link_problem}")
                if self.max_restarts is not None and self.restarts >= self.max_restarts:
                    self.echo(f"fedbreast site {cfg.name}: giving up after {self.restarts} restart(s)")
                    return EXIT_REFUSED if refused else (code if code > 0 else 1)
                if ran >= HEALTHY_RUN_SECONDS:
                    backoff = 1.0  # it had been fine for a while: a one-off crash, come back quickly
                if refused_since is not None and time.monotonic() - refused_since < STALE_NODE_SECONDS + 10:
                    # After a crash the SuperLink refuses us until our old heartbeat expires:
                    # retry steadily through that window instead of backing off past it.
                    delay = min(REFUSED_RETRY_SECONDS, cfg.max_backoff_seconds)
                else:
                    delay, backoff = backoff, min(backoff * 2, cfg.max_backoff_seconds)
                self.echo(f"fedbreast site {cfg.name}: restarting the SuperNode in {delay:.0f} s")
                self.restarts += 1
                if not stop.sleep(delay):
                    return 0


def flower_exit_code(lines: Iterable[str]) -> int | None:
    """The last ``Exit Code: N`` Flower printed (it logs the code it means before exiting)."""
    found = None
    for line in lines:
        if m := FLOWER_EXIT.search(line):
            found = int(m.group(1))
    return found


def restrict_umask() -> int:
    """Make every file this process and its children (SuperNode, ClientApps) create private
    to the site's user: 0600 files, 0700 folders. The cache shards hold patient images and
    the state files models fitted to them. Returns the previous umask."""
    return os.umask(0o077)


def run_site(config_path: Path, insecure: bool = False, max_restarts: int | None = None) -> int:
    from fedbreast.client.site_config import load_site_config

    restrict_umask()  # first: before any file (node config, cache, state) is written
    cfg = load_site_config(config_path, insecure=insecure)
    if insecure:
        print(
            "WARNING: --insecure: this site connects WITHOUT TLS and WITHOUT its site key. Model updates travel "
            "unencrypted and the coordinator cannot tell this site from an impostor. Test networks only.",
            file=sys.stderr,
            flush=True,
        )

    def echo(line: str) -> None:
        print(line, flush=True)

    return SiteDaemon(cfg, insecure=insecure, max_restarts=max_restarts, echo=echo).run()
