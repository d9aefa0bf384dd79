"""The warm ClientApp launcher (fedbreast.client.warm_clientapp and its shim): a real server
process and the real shim script, with a stand-in entry point (tests/warm_entry.py) in place
of Flower's ``flwr-clientapp``. The deployed runs of test_deploy.py and test_fault_tolerance.py
use it with Flower's own entry point (they check the daemons' logs for it)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbreast.client.warm_clientapp import install_shim, socket_path

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    sock = socket_path(root)
    fallback = root / "cold-clientapp"
    fallback.write_text(f"#!{sys.executable}\nimport sys\nprint('cold', sys.argv[1:])\n")
    fallback.chmod(0o755)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedbreast.client.warm_clientapp",
            str(sock),
            "--entry",
            "warm_entry:main",
            "--no-preload",
        ],
        env=dict(os.environ, PYTHONPATH=str(TESTS)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert "ready" in server.stdout.readline()
    shim = install_shim(root / "bin", sock, str(fallback))
    yield {"server": server, "shim": shim, "sock": sock, "root": root, "fallback": fallback}
    server.terminate()
    out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out


def test_the_socket_is_private_to_the_sites_user(warm) -> None:
    assert warm["sock"].stat().st_mode & 0o077 == 0  # no access for group or others


def test_a_forked_clientapp_gets_the_shims_arguments_stdio_and_exit_code(warm) -> None:
    out = subprocess.run([warm["shim"], "exit", "3", "--token", "abc"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3, out
    m = re.match(r"pid=(\d+) ppid=(\d+) argv=\['exit', '3', '--token', 'abc'\]", out.stdout)
    assert m, out.stdout
    assert int(m.group(2)) == warm["server"].pid  # forked by the warm server, not started by the shim
    assert out.stderr.strip() == "to stderr"
    ok = subprocess.run([warm["shim"], "done"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "argv=['done']" in ok.stdout


def test_a_failing_clientapp_exits_non_zero_with_its_traceback(warm) -> None:
    out = subprocess.run([warm["shim"], "raise"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "RuntimeError: the ClientApp failed" in out.stderr


def test_signals_to_the_shim_reach_the_clientapp(warm) -> None:
    shim = subprocess.Popen([warm["shim"], "sleep", "60"], stdout=subprocess.PIPE, text=True)
    assert "argv=['sleep', '60']" in shim.stdout.readline()
    t0 = time.monotonic()
    shim.send_signal(signal.SIGTERM)
    assert shim.wait(timeout=20) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10  # the child died of the signal, it did not sleep on


def test_clientapps_run_side_by_side(warm) -> None:
    procs = [subprocess.Popen([warm["shim"], "sleep", "1"], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=30)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and time.monotonic() - t0 < 2.9, outs
    assert len({re.match(r"pid=(\d+)", o).group(1) for o in outs}) == 3  # a process per message


def test_a_malformed_request_is_refused_and_the_server_goes_on(warm) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(warm["sock"]))
        s.send(b"{not json")
        assert s.recv(100) == b""  # closed, nothing forked
    out = subprocess.run([warm["shim"], "exit", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert warm["server"].poll() is None


def test_without_the_server_the_shim_starts_the_cold_clientapp(tmp_path, warm) -> None:
    shim = install_shim(tmp_path / "bin", tmp_path / "no-such.sock", str(warm["fallback"]))
    out = subprocess.run([shim, "--token", "t"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "cold ['--token', 't']", out
    assert "no warm ClientApp server" in out.stderr


def test_a_long_state_path_gets_a_private_socket_folder(tmp_path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = socket_path(deep)
    assert len(os.fsencode(path)) <= 100 and path.parent.stat().st_mode & 0o777 == 0o700
    assert socket_path(deep) == path  # the same state directory, the same socket
