"""Real deployment on loopback: the deploy/tls scripts, `fedbreast server start` (SuperLink with
TLS + SuperNode authentication), `fedbreast site start` daemons, `fedbreast run`, and the
offline checks of deploy/ (compose, Dockerfiles, systemd unit).

Every process is real and talks HTTPS on 127.0.0.1 with free ports; FLWR_HOME is private.
One module-scoped federation serves the slow tests: 3 registered sites with data, one
registered site whose data folder is missing, and one unregistered key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedbreast.client.audit import read_audit
from fedbreast.client.site_config import load_site_config
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.processes import QUIET_ENV, free_port, http_ok
from fedbreast.simulation.simulate import prepare_federation

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TLS_SCRIPTS = DEPLOY / "tls"
BIN = Path(sys.executable).parent
FEDBREAST = str(BIN / "fedbreast")
FLWR = str(BIN / "flwr")
GOOD_SITES = ("hospital-a", "hospital-b", "hospital-c")  # deliberately not the data folders' names
BROKEN_SITE = "hospital-d"
# A site with its own privacy ceiling takes part only in DP runs: in this non-DP run it
# refuses to train (proof that the node config reaches the ClientApp) but still evaluates.
DP_SITE, DP_POLICY = "hospital-c", "dp-max-epsilon = 8.0\n"
# The TINY model of tests/test_simulation.py, one round.
RUN_FLAGS = [
    "--rounds",
    "1",
    "--backbone",
    "smallcnn",
    "--image-size",
    "64x32",
    "--set",
    "bootstrap=100",
    "--set",
    "hist-bins=64",
    "--set",
    "workers=0",
    "--set",
    "min-available-sites=4",
    "--set",
    "round-timeout=180",
    "--set",
    "wait-for-sites=60",
]


def env_for(home: Path) -> dict[str, str]:
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return dict(os.environ, **QUIET_ENV, FLWR_HOME=str(home), PATH=path, FLWR_BIN=FLWR, OMP_NUM_THREADS="1")


def sh(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (our tmp paths): nothing may outlive a test."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def stop(proc: subprocess.Popen, timeout: float = 45) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return reap(proc, timeout)


def reap(proc: subprocess.Popen, timeout: float = 45) -> int:
    """Wait for a process already sent SIGTERM; SIGKILL its group if it hangs."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def site_toml(
    path: Path, name: str, data: Path, tls: Path, key: Path | None, link: str, metrics_port: int, extra: str = ""
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = f'[keys]\nprivate-key = "{key}"\n' if key else ""
    path.write_text(
        f'[site]\nname = "{name}"\ndata-path = "{data}"\nstate-dir = "{path.parent / "state"}"\n{extra}\n'
        f'[superlink]\naddress = "{link}"\nroot-certificates = "{tls / "ca.crt"}"\n\n{keys}\n'
        f'[daemon]\nmetrics-port = {metrics_port}\nclientapp-port = {free_port()}\nwarm-image-size = "64x32"\n'
        f"max-backoff-seconds = 2\n"
    )
    return path


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def supernodes(federation: str, env: dict[str, str]) -> dict[str, dict]:
    out = sh(FLWR, "supernode", "list", federation, "--format", "json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return {n["node-id"]: n for n in json.loads(out.stdout)["nodes"]}


def wait_for(check, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- deploy/tls ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    missing = [tool for tool in ("openssl", "ssh-keygen") if not shutil.which(tool)]
    assert not missing, f"deploy/tls needs {', '.join(missing)} (Debian packages openssl, openssh-client)"
    out = tmp_path_factory.mktemp("tls")
    result = sh(
        "bash", TLS_SCRIPTS / "provision.sh", out, "--host", "coordinator.test", *GOOD_SITES, BROKEN_SITE, "intruder"
    )
    assert result.returncode == 0, result.stderr
    return out


def test_tls_scripts_make_a_verifiable_chain_and_ecdsa_site_keys_idempotently(tls):
    assert sh("openssl", "verify", "-CAfile", tls / "ca.crt", tls / "server.crt").returncode == 0
    sans = sh("openssl", "x509", "-in", tls / "server.crt", "-noout", "-ext", "subjectAltName").stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:coordinator.test"):
        assert name in sans
    for site in (*GOOD_SITES, BROKEN_SITE):
        fingerprint = sh("ssh-keygen", "-l", "-f", tls / "sites" / site / "site.key.pub").stdout
        assert fingerprint.startswith("384 ") and "(ECDSA)" in fingerprint
        assert (tls / "sites" / site / "site.key").stat().st_mode & 0o077 == 0  # private key: owner only
    before = {p: p.read_bytes() for p in tls.rglob("*") if p.is_file()}
    again = sh("bash", TLS_SCRIPTS / "provision.sh", tls, "--host", "coordinator.test", *GOOD_SITES)
    assert again.returncode == 0 and "kept existing" in again.stdout
    assert {p: p.read_bytes() for p in tls.rglob("*") if p.is_file()} == before
    # A certificate that does not cover a newly asked name is re-issued, still under the same CA.
    assert "issued" in sh("bash", TLS_SCRIPTS / "make-server-cert.sh", tls, "coordinator.test", "10.9.8.7").stdout
    assert (tls / "ca.crt").read_bytes() == before[tls / "ca.crt"]
    assert (
        "IP Address:10.9.8.7"
        in sh("openssl", "x509", "-in", tls / "server.crt", "-noout", "-ext", "subjectAltName").stdout
    )


def test_site_keys_refuse_bad_names(tmp_path):
    bad = sh("bash", TLS_SCRIPTS / "make-site-key.sh", tmp_path, "../escape")
    assert bad.returncode == 2 and "site name" in bad.stderr


# ---- configuration at the edge ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ('[site]\nname = "a"\n', r"\[site\] data-path: required"),
        (
            '[site]\nname = "a"\ndata-path = "d"\ndp-max-epsilon = -1\n[superlink]\naddress = "h:1"\n',
            r"\[site\] dp-max-epsilon = -1: expected a number > 0",
        ),
        (
            '[site]\nname = "a"\ndata-path = "d"\n[superlink]\naddress = "https://h:1"\n',
            r"\[superlink\] address = 'https://h:1'",
        ),
        ('[site]\nname = "a"\ndata-path = "d"\ngpu = true\n', r"\[site\] gpu: unknown key"),
        ('[site]\nname = "a b"\ndata-path = "d"\n', r"\[site\] name = 'a b'"),
        (
            '[site]\nname = "a"\ndata-path = "d"\n[superlink]\naddress = "h:1"\n',
            r"\[superlink\] root-certificates: required",
        ),
        ("[daemon]\nmetrics-port = 70000\n", r"\[daemon\] metrics-port = 70000"),
        ("[site\n", r"not valid TOML"),
    ],
)
def test_site_config_errors_name_the_key(tmp_path, body, message):
    path = tmp_path / "site.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_site_config(path)
    assert str(path) in str(info.value)


def test_site_config_resolves_relative_paths_and_builds_the_node_config(tmp_path):
    path = tmp_path / "conf" / "site.toml"
    path.parent.mkdir()
    path.write_text(
        '[site]\nname = "h-1"\ndata-path = "../data"\ndp-max-epsilon = 3\n[superlink]\naddress = "127.0.0.1:9092"\n'
        'root-certificates = "tls/ca.crt"\n[keys]\nprivate-key = "/k/site.key"\n'
        "[policy]\nmin-batch-size = 8\nmessages = ['hello', 'train', 'evaluate']\n"
    )
    cfg = load_site_config(path)
    assert cfg.data_path == tmp_path / "conf" / ".." / "data" and cfg.state_dir == tmp_path / "conf" / "state"
    assert cfg.root_certificates == tmp_path / "conf" / "tls" / "ca.crt"
    assert cfg.node_config() == {
        "data-path": str(cfg.data_path),
        "site-name": "h-1",
        "state-dir": str(cfg.state_dir),
        "dp-max-epsilon": 3.0,
        "policy": cfg.policy.to_json(),
    }
    # The [policy] travels to the ClientApp as JSON in the node config (client/policy.py reads it back).
    policy = json.loads(cfg.node_config()["policy"])
    assert policy["min-batch-size"] == 8 and policy["messages"] == ["hello", "train", "evaluate"]
    assert policy["max-hist-bins"] == 32  # the defaults of every key the section leaves out


# ---- insecure mode needs the flag ----------------------------------------------------------------


def test_server_without_tls_files_refuses_and_insecure_warns(tmp_path):
    env = env_for(tmp_path / "home")
    refused = sh(FEDBREAST, "server", "start", "--state-dir", tmp_path / "state", "--port", free_port(), env=env)
    assert refused.returncode == 2
    assert "server.crt" in refused.stderr and "--insecure" in refused.stderr and "provision.sh" in refused.stderr
    assert not (tmp_path / "state" / "superlink.db").exists()  # nothing started

    port = free_port()
    log = open(tmp_path / "insecure.log", "w")
    proc = subprocess.Popen(
        [
            FEDBREAST,
            "server",
            "start",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--insecure",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the insecure SuperLink")
        wait_for(lambda: "SuperLink ready" in (tmp_path / "insecure.log").read_text(), 10, "the ready line")
    finally:
        code = stop(proc)
        log.close()
    text = (tmp_path / "insecure.log").read_text()
    assert "WARNING: --insecure" in text and "WITHOUT TLS" in text
    assert code == 0
    conf = (tmp_path / "home" / "config.toml").read_text()
    assert "insecure = true" in conf and f"127.0.0.1:{port}" in conf
    assert processes_mentioning(str(tmp_path)) == []


def test_site_without_tls_settings_refuses_and_insecure_warns(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text(f'[site]\nname = "h"\ndata-path = "{tmp_path / "nodata"}"\n[superlink]\naddress = "127.0.0.1:1"\n')
    refused = sh(FEDBREAST, "site", "start", toml, env=env_for(tmp_path / "home"))
    assert (
        refused.returncode == 2 and "root-certificates: required" in refused.stderr and "--insecure" in refused.stderr
    )
    # With --insecure it warns, runs preflight (bad data is reported, not fatal) and tries to join;
    # with nothing listening on port 1 the SuperNode keeps retrying, so stop it with SIGTERM.
    toml.write_text(toml.read_text() + "[daemon]\nmetrics-port = 0\n")
    log = open(tmp_path / "site.log", "w")
    proc = subprocess.Popen(
        [FEDBREAST, "site", "start", str(toml), "--insecure"],
        env=env_for(tmp_path / "home"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: "joining 127.0.0.1:1" in (tmp_path / "site.log").read_text(), 60, "the site to try joining")
    finally:
        code = stop(proc)
        log.close()
    text = (tmp_path / "site.log").read_text()
    assert "WARNING: --insecure" in text and "[ bad] data" in text and "no such folder" in text
    assert code == 0
    assert processes_mentioning(str(tmp_path)) == []


def test_a_site_that_requires_a_gpu_does_not_start_without_one(tls, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the refusal cannot be shown here")
    toml = site_toml(
        tmp_path / "site.toml",
        GOOD_SITES[0],
        tmp_path / "data",
        tls,
        tls / "sites" / GOOD_SITES[0] / "site.key",
        "127.0.0.1:1",
        0,
        extra="gpu-required = true\n",
    )
    out = sh(FEDBREAST, "site", "start", toml, env=env_for(tmp_path / "home"), timeout=120)
    assert out.returncode == 2  # a configuration error: systemd's RestartPreventExitStatus=2 does not loop on it
    assert "[FAIL] GPU: gpu-required = true but torch sees no CUDA device" in out.stdout
    assert "not joining" in out.stdout and "joining 127.0.0.1:1" not in out.stdout


def test_superlink_state_survives_a_restart(tls, tmp_path):
    """The registered sites and their node ids live in STATE/superlink.db."""
    env, state, port = env_for(tmp_path / "home"), tmp_path / "state", free_port()

    def start() -> subprocess.Popen:
        log = open(tmp_path / "server.log", "a")
        proc = subprocess.Popen(
            [
                FEDBREAST,
                "server",
                "start",
                "--state-dir",
                str(state),
                "--tls-dir",
                str(tls),
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--federation",
                "restart",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(
            lambda: http_ok(f"https://127.0.0.1:{port}/health", tls / "ca.crt") or proc.poll() is not None,
            60,
            "the SuperLink",
        )
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        return proc

    proc = start()
    try:
        reg = sh(
            "bash",
            TLS_SCRIPTS / "register-site.sh",
            GOOD_SITES[1],
            tls / "sites" / GOOD_SITES[1] / "site.key.pub",
            "restart",
            env=env,
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_id = re.search(r'"node-id":\s*(\d+)', reg.stdout).group(1)
    finally:
        assert stop(proc) == 0
    proc = start()
    try:
        assert supernodes("restart", env)[node_id]["status"] == "registered"
        again = sh(
            "bash",
            TLS_SCRIPTS / "register-site.sh",
            GOOD_SITES[1],
            tls / "sites" / GOOD_SITES[1] / "site.key.pub",
            "restart",
            env=env,
        )
        assert again.returncode == 0 and "already registered" in again.stdout
    finally:
        assert stop(proc) == 0
    assert processes_mentioning(str(tmp_path)) == []


# ---- the federation: SuperLink + 4 daemons on loopback -------------------------------------------


def start_server(fed: dict) -> subprocess.Popen:
    """`fedbreast server start` on the federation's state folder and port (again after a crash:
    same database, so the same registrations and node ids)."""
    root = fed["root"]

    def readies() -> int:
        return (root / "server.log").read_text().count("SuperLink ready") if (root / "server.log").exists() else 0

    ready = readies() + 1
    with open(root / "server.log", "a") as log:
        server = subprocess.Popen(
            [
                FEDBREAST,
                "server",
                "start",
                "--state-dir",
                str(root / "server"),
                "--tls-dir",
                str(fed["tls"]),
                "--port",
                str(fed["port"]),
                "--metrics-port",
                str(fed["server_metrics"]),
                "--federation",
                fed["name"],
            ],
            env=fed["env"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fed["server"] = server
    wait_for(lambda: readies() >= ready or server.poll() is not None, 90, "the SuperLink")
    assert server.poll() is None, (root / "server.log").read_text()
    return server


def add_site(fed: dict, site: str, data: Path, extra: str = "") -> subprocess.Popen:
    """Register ``site``'s key (provisioned by the tls fixture) and start its daemon."""
    root, env = fed["root"], fed["env"]
    reg = sh(
        "bash",
        TLS_SCRIPTS / "register-site.sh",
        site,
        fed["tls"] / "sites" / site / "site.key.pub",
        fed["name"],
        env=env,
    )
    assert reg.returncode == 0, reg.stdout + reg.stderr
    fed["node_ids"][site] = re.search(r'"node-id":\s*(\d+)', reg.stdout).group(1)
    mport = free_port()
    toml = site_toml(
        root / site / "site.toml",
        site,
        data,
        fed["tls"],
        fed["tls"] / "sites" / site / "site.key",
        f"127.0.0.1:{fed['port']}",
        mport,
        extra=extra,
    )
    with open(root / site / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            [FEDBREAST, "site", "start", str(toml)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fed["daemons"][site] = (proc, mport, root / site)
    fed.setdefault("data", {})[site] = data
    return proc


def activated_nodes(server_log: Path) -> set[str]:
    """Node ids the SuperLink's log shows active: activated and not deactivated since. Across a
    restart too: the state database keeps a node's activation, and its SuperNode does not
    activate again."""
    try:
        text = server_log.read_text(errors="replace")
    except FileNotFoundError:
        return set()
    active: set[str] = set()
    for kind, node in re.findall(r"\[Fleet\.(Activate|Deactivate)Node\] \w+ node_id=(\d+)", text):
        (active.add if kind == "Activate" else active.discard)(node)
    return active


def wait_online(fed: dict, count: int, timeout: float = 120) -> dict[str, dict]:
    """Wait until exactly ``count`` SuperNodes are online, as `flwr supernode list` reports them.

    Each `flwr` call is a fresh CLI process (about 1.3 s of CPU): polled back to back it took
    most of a core while the daemons it waited for were starting. So the SuperLink's own log is
    watched first (cheap), and the CLI confirms, every 2 s."""
    deadline = time.monotonic() + timeout
    wait_for(lambda: len(activated_nodes(fed["root"] / "server.log")) >= count, timeout, f"{count} activations")
    return wait_for(
        lambda: (lambda n: n if sum(v["status"] == "online" for v in n.values()) == count else None)(
            supernodes(fed["name"], fed["env"])
        ),
        max(deadline - time.monotonic(), 10.0),
        f"{count} SuperNodes online",
        step=2.0,
    )


@contextmanager
def running_federation(root: Path, tls: Path, sites: dict[str, tuple[Path, str]], name: str = "test-fed"):
    """A SuperLink and one daemon per site ({site: (data folder, extra [site] TOML)}), all real
    processes on loopback; stopped with SIGTERM on exit, which must be clean and leave nothing."""
    fed = dict(
        root=root,
        env=env_for(root / "flwr-home"),
        port=free_port(),
        server_metrics=free_port(),
        tls=tls,
        name=name,
        daemons={},
        node_ids={},
    )
    try:
        start_server(fed)
        for site, (data, extra) in sites.items():
            add_site(fed, site, data, extra)
        fed["online"] = wait_online(fed, len(sites))
        yield fed
    finally:
        daemons = fed["daemons"]
        for proc, _, _ in daemons.values():  # stop all at once: each waits for its SuperNode to sign off
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {
            site: reap(proc) for site, (proc, _, _) in daemons.items()
        }  # no second SIGTERM: it would race the exit
        server_code = stop(fed["server"]) if "server" in fed else 0
        leftovers = processes_mentioning(str(root))
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    # Clean shutdown on SIGTERM: daemons and server exit 0 and leave no process behind.
    assert codes == {site: 0 for site in daemons}, codes
    assert server_code == 0
    assert leftovers == []


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tls):
    root = tmp_path_factory.mktemp("deploy")
    site_dirs = prepare_federation(root / "data", sites=3, patients=8, seed=0, echo=lambda _line: None)
    data_of = dict(zip(GOOD_SITES, site_dirs)) | {BROKEN_SITE: root / "data" / "sites" / "never-ingested"}
    with running_federation(
        root, tls, {site: (data, DP_POLICY if site == DP_SITE else "") for site, data in data_of.items()}
    ) as fed:
        yield fed


def test_registered_sites_are_accepted_under_their_registered_ids(federation):
    online = {nid for nid, n in federation["online"].items() if n["status"] == "online"}
    assert online == set(federation["node_ids"].values())
    for site, (_, _mport, folder) in federation["daemons"].items():
        text = (folder / "daemon.log").read_text()
        assert "[  ok] site key" in text and "ECDSA secp384r1" in text and "[  ok] root certificate" in text
        node_config = (folder / "state" / "node-config.toml").read_text()
        assert f'site-name = "{site}"' in node_config and "data-path = " in node_config
        assert ("dp-max-epsilon = 8.0" in node_config) == (site == DP_SITE)
        # The SuperNode's SuperExec is the daemon's (ClientApp tasks only), not Flower's own.
        assert processes_mentioning(str(folder / "state" / "bin" / "flower-superexec")), site


def test_health_endpoints_report_the_bad_data_folder(federation):
    for site in GOOD_SITES:
        status, body = healthz(federation["daemons"][site][1])
        assert status == 200 and body["ok"] is True, body
    status, body = healthz(federation["daemons"][BROKEN_SITE][1])
    assert status == 503 and body["ok"] is False
    assert "never-ingested" in body["reason"] and "no such folder" in body["reason"]
    assert "joining anyway" in (federation["daemons"][BROKEN_SITE][2] / "daemon.log").read_text()
    status, body = healthz(federation["server_metrics"])
    assert status == 200 and body["ok"] is True


def test_an_unregistered_key_is_refused(federation, tmp_path):
    # (no data folder: the refusal comes first, and the preflight skips the cache warm-up)
    toml = site_toml(
        tmp_path / "intruder" / "site.toml",
        "intruder",
        tmp_path / "no-data",
        federation["tls"],
        federation["tls"] / "sites" / "intruder" / "site.key",
        f"127.0.0.1:{federation['port']}",
        0,
    )
    refused = sh(FEDBREAST, "site", "start", toml, "--max-restarts", "0", env=federation["env"], timeout=120)
    # Flower means exit code 305 (it prints it; 305 does not fit an 8-bit exit status): the
    # daemon names it and exits EX_NOPERM (77) once it gives up.
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert "Exit Code: 305" in refused.stdout and "refused to activate" in refused.stdout
    assert "registered under 'intruder'" in refused.stdout
    assert len(supernodes("test-fed", federation["env"])) == 4  # it never became a node


def test_fedbreast_run_over_tls_reports_per_site_with_registered_names(federation):
    root, env = federation["root"], federation["env"]
    run_dir = root / "run"
    t0 = time.monotonic()
    # Under SecAgg+ (issue 5, item 3): 4 sites set up keys, 2 of them then refuse to train, and
    # their masks are reconstructed from the 2 others' shares (threshold 0.5 x 4 shares = 2).
    out = sh(
        FEDBREAST,
        "run",
        "test-fed",
        "--run-dir",
        run_dir,
        *RUN_FLAGS,
        "--set",
        "secure-aggregation=true",
        "--set",
        "secagg-threshold=0.5",
        env=env,
        timeout=420,
    )
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    store = MetricStore(run_dir)
    trainers = set(GOOD_SITES) - {DP_SITE}
    assert {r["site"] for r in store.rows("evaluate")} == set(GOOD_SITES)
    assert {r["site"] for r in store.rows("train")} == trainers
    failures = store.rows("failure")
    assert {f["site"] for f in failures} == {BROKEN_SITE, DP_SITE}
    assert {f["stage"] for f in failures if f["site"] == BROKEN_SITE} == {"roll-call", "train", "evaluate"}
    assert all("manifest" in f["reason"] for f in failures if f["site"] == BROKEN_SITE)
    dp_refusals = [f for f in failures if f["site"] == DP_SITE]
    assert [f["stage"] for f in dp_refusals] == ["train"] and "dp-max-epsilon = 8" in dp_refusals[0]["reason"]
    # The live table: a header, one line per site and phase, the sites left out with the reason.
    assert "round  site" in out.stdout
    for site in trainers:
        assert re.search(rf"^1\s+{site}\s+train", out.stdout, re.M)
    for site in GOOD_SITES:
        assert re.search(rf"^1\s+{site}\s+evaluate", out.stdout, re.M)
    assert re.search(rf"^1\s+{BROKEN_SITE}\s+LEFT OUT", out.stdout, re.M)
    assert re.search(rf"^1\s+{DP_SITE}\s+LEFT OUT\s+train: .*dp-max-epsilon", out.stdout, re.M)
    assert "finished:completed" in out.stdout
    assert [r["sites"] for r in store.rows("aggregate-train")] == [len(trainers)]  # the masked sum of the 2 trainers
    assert all("left secure aggregation" in f["reason"] for f in failures if f["stage"] == "train")
    for site in GOOD_SITES:  # every ClientApp was forked from the site's warm process (client/warm_clientapp.py)
        log = (federation["daemons"][site][2] / "daemon.log").read_text()
        assert "warm ClientApp: ready" in log and "starting a cold one" not in log, log[-3000:]
    print(f"1-round TLS deployment run with 4 SuperNodes under SecAgg+: {seconds:.1f} s")


EVIL_APP = """
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def steal(msg: Message, context: Context) -> Message:
    # What a hostile bundle would do at a site: read its data and keys, send them out.
    loot = {"site": str(context.node_config.get("site-name")), "data": str(context.node_config.get("data-path"))}
    Path(str(context.run_config["marker"])).write_text(json.dumps(loot))
    return Message(RecordDict({"loot": ConfigRecord(loot)}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = sorted(grid.get_node_ids())
    config = RecordDict({"config": ConfigRecord({"server-round": 0})})
    msgs = [Message(config, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=120):
        if reply.has_error():
            out.append({"error": reply.error.reason})
        else:
            out.append({k: dict(v) for k, v in reply.content.config_records.items()})
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
"""


def test_a_bundle_the_sites_did_not_approve_never_runs_there(federation, tmp_path):
    """The attack suite's malicious bundle (tests/test_attacks.py lists it): anyone who reaches
    the SuperLink submits an app whose ClientApp would read each site's data. Every site answers
    with the refusal instead, none of the bundle's code runs at a site, the refusal is on each
    site's audit log and /healthz, and the daemons go on (the run test below uses them)."""
    app = tmp_path / "evil-app"
    app.mkdir()
    marker, out_file = tmp_path / "loot.json", tmp_path / "replies.json"
    (app / "evil.py").write_text(EVIL_APP)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\nlicense = "Apache-2.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:client"\n'
        f'[tool.flwr.app.config]\nmarker = "{marker}"\nout = "{out_file}"\n'
    )
    run = sh(FLWR, "run", app, federation["name"], "--stream", env=federation["env"], timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for(out_file.exists, 60, "the ServerApp's replies")
    replies = json.loads(out_file.read_text())
    assert not marker.exists(), f"the bundle's ClientApp ran at a site: {marker.read_text()}"
    assert len(replies) == len(federation["daemons"]), replies
    for reply in replies:
        site = reply["site"]
        assert site["status"] == "unable" and "loot" not in reply, reply
        assert "refused: app bundle mallory/evil" in site["reason"], site
        assert "names the ClientApp 'evil:client'" in site["reason"], site
    for site in GOOD_SITES:
        lines = read_audit(federation["data"][site])
        refusal = [x for x in lines if x["type"] == "app-bundle"][-1]
        assert refusal["status"] == "refused" and "evil:client" in refusal["reason"] and len(refusal["fab_hash"]) == 64
        status, health = healthz(federation["daemons"][site][1])
        assert status == 200 and "refused 1 app bundle" in health["reason"] and "evil:client" in health["reason"]


# A SuperNode killed with kill -9 (restarted by its daemon under the same node id, and
# training again in a later round) is tested in tests/test_fault_tolerance.py.


# ---- deploy/: compose, Dockerfiles, systemd --------------------------------------------------------

DOCKER_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
    "MAINTAINER",
}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line; fails on anything that is not an instruction."""
    out, pending = [], ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        pending += " " + line.rstrip("\\").strip() if pending else line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, args = pending.partition(" ")
        assert word.upper() == word and word in DOCKER_INSTRUCTIONS, (
            f"{path.name}:{number}: {word!r} is not a Dockerfile instruction"
        )
        out.append((word, args.strip()))
        pending = ""
    assert not pending, f"{path.name}: ends inside a continued line"
    return out


@pytest.mark.parametrize("name", ["Dockerfile.site", "Dockerfile.server"])
def test_dockerfiles_parse_and_copy_what_exists(name):
    from fedbreast.cli import build_parser

    steps = dockerfile_instructions(DEPLOY / name)
    assert steps[0][0] == "FROM"
    if name == "Dockerfile.site":
        assert steps[0][1].startswith("nvidia/cuda:")
    for word, args in steps:
        if word in ("CMD", "ENTRYPOINT") and args.startswith("["):
            json.loads(args)
        if word == "COPY":
            for src in args.split()[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
    entry = json.loads(next(a for w, a in steps if w == "ENTRYPOINT"))
    cmd = json.loads(next(a for w, a in steps if w == "CMD"))
    assert entry[0] == "fedbreast"
    build_parser().parse_args(entry[1:] + cmd)  # the image's default command is a valid fedbreast command
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    for folder in ("fedbreast", "server", "client", "shared", "simulation"):
        assert f"!{folder}/" in ignore


def test_compose_file_parses_and_runs_the_tested_commands():
    import yaml

    from fedbreast.cli import build_parser

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert {"superlink", "site-1", "site-2", "site-3", "provision", "register"} <= set(services)
    parser = build_parser()
    args = parser.parse_args(["server", "start", *services["superlink"]["command"]])
    assert not args.insecure and args.tls_dir == "/tls" and args.host == "0.0.0.0"
    assert args.connect_address == "superlink:9092"  # what `register` (another container) connects to
    for k in (1, 2, 3):
        svc = services[f"site-{k}"]
        assert svc["image"] == "fedbreast-site:latest" and svc["restart"] == "on-failure"
        assert svc["depends_on"]["register"]["condition"] == "service_completed_successfully"
        args = parser.parse_args(["site", "start", *svc["command"]])
        assert not args.insecure
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        toml = DEPLOY / mounts[args.config]
        cfg = load_site_config(toml)
        assert cfg.name == f"site-{k}" and cfg.superlink == "superlink:9092"
        assert str(cfg.private_key).startswith("/tls/sites/site-") and cfg.root_certificates == Path("/tls/ca.crt")
    assert "--host superlink" in services["provision"]["command"][0]
    assert "register-site.sh" in services["register"]["command"][0]
    assert services["register"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    for name in doc["volumes"]:
        assert any(name == v.split(":")[0] for s in services.values() for v in s.get("volumes", []))
    load_site_config(DEPLOY / "site.example.toml")


def test_systemd_unit_verifies_and_runs_the_tested_command(tmp_path):
    from fedbreast.cli import build_parser

    unit = (DEPLOY / "systemd" / "fedbreast-site.service").read_text()
    assert "Restart=on-failure" in unit and re.search(r"^RestartSec=\d+", unit, re.M)
    assert "RestartPreventExitStatus=2" in unit and "StateDirectory=fedbreast" in unit
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start.group(1).endswith("/bin/fedbreast")
    build_parser().parse_args(exec_start.group(2).split())
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this environment's fedbreast.
    local = tmp_path / "fedbreast-site.service"
    local.write_text(unit.replace(exec_start.group(1), FEDBREAST))
    result = sh("systemd-analyze", "verify", local)
    assert result.returncode == 0 and "fedbreast-site.service" not in result.stderr, result.stderr
