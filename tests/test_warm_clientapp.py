"""The warm ClientApp launcher (fedbreast.client.warm_clientapp and its shim): a real server
process and the real shim script, with a stand-in entry point (tests/warm_entry.py) in place
of Flower's ``flwr-clientapp``. The deployed runs of test_deploy.py and test_fault_tolerance.py
use it with Flower's own entry point (they check the daemons' logs for it)."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbreast.client.warm_clientapp import install_shim, socket_path

TESTS = Path(__file__).parent


def start_server(sock: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    """The warm server as the daemon starts it (``python -m``), on the test entry point."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedbreast.client.warm_clientapp",
            str(sock),
            "--entry",
            "warm_entry:main",
            "--no-preload",
        ]
        + list(args),
        env=dict(os.environ, PYTHONPATH=str(TESTS)),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert "ready" in server.stdout.readline()
    return server


def wait_for_output(server: subprocess.Popen, text: str, timeout: float = 30.0) -> str:
    """The server's next output line containing ``text`` (what it says, not a sleep: a loaded
    machine may take longer than any fixed pause)."""
    deadline = time.monotonic() + timeout
    assert server.stdout is not None
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([server.stdout], [], [], left)
        if not ready:
            break
        line = server.stdout.readline()
        if text in line:
            return line
    raise AssertionError(f"the warm server did not say {text!r} within {timeout} s")


def stop_server(server: subprocess.Popen) -> str:
    server.terminate()
    out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    sock = socket_path(root)
    fallback = root / "cold-clientapp"
    fallback.write_text(f"#!{sys.executable}\nimport sys\nprint('cold', sys.argv[1:])\n")
    fallback.chmod(0o755)
    server = start_server(sock)
    shim = install_shim(root / "bin", sock, str(fallback))
    yield {"server": server, "shim": shim, "sock": sock, "root": root, "fallback": fallback}
    stop_server(server)


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


def most_at_once(log: Path) -> int:
    """The most ClientApps that ran at the same time, from the start / end lines they logged."""
    events = sorted(
        (float(t), kind == "start") for _, kind, t in (line.split() for line in log.read_text().splitlines())
    )
    running = most = 0
    for _, started in events:  # at a tie an end sorts first: it happened before the next fork
        running += 1 if started else -1
        most = max(most, running)
    return most


def test_at_most_max_children_clientapps_run_and_the_rest_wait_their_turn(tmp_path) -> None:
    # The state directory is the server's working directory; a warm_entry.py dropped there
    # must not be what the ClientApps import (python -m puts the folder first on sys.path).
    (tmp_path / "warm_entry.py").write_text("def main():\n    print('shadowed')\n")
    sock = socket_path(tmp_path)
    server = start_server(sock, "--max-children", "2", cwd=tmp_path)
    shim = install_shim(tmp_path / "bin", sock, "/bin/false")
    log = tmp_path / "ran.log"
    t0 = time.monotonic()
    shims = [
        subprocess.Popen([shim, "hold", "0.5", str(log), str(10 + i)], stdout=subprocess.PIPE, text=True)
        for i in range(5)
    ]
    outs = [p.communicate(timeout=60)[0] for p in shims]
    elapsed = time.monotonic() - t0
    out = stop_server(server)
    assert [p.returncode for p in shims] == [10, 11, 12, 13, 14], outs  # each its own exit code
    assert all(o.startswith("pid=") and "shadowed" not in o for o in outs), outs
    assert most_at_once(log) == 2, log.read_text()  # two at once, never three
    assert elapsed >= 1.5, elapsed  # three turns of 0.5 s
    assert "further requests wait for one to exit" in out and "no request waits any more (3 waited" in out, out


def test_a_request_whose_shim_died_while_it_waited_starts_no_clientapp(tmp_path) -> None:
    sock = socket_path(tmp_path)
    server = start_server(sock, "--max-children", "1")
    shim = install_shim(tmp_path / "bin", sock, "/bin/false")
    log = tmp_path / "ran.log"
    first = subprocess.Popen([shim, "hold", "3", str(log), "1"], stdout=subprocess.PIPE, text=True)
    assert "argv=['hold'" in first.stdout.readline()  # it runs, and holds the only slot
    dead = subprocess.Popen([shim, "hold", "0", str(log), "2"], stdout=subprocess.PIPE, text=True)
    wait_for_output(server, "further requests wait for one to exit")  # connected and queued
    dead.kill()  # as the SuperNode would stop a task it gave up on
    dead.wait(timeout=10)
    third = subprocess.run([shim, "hold", "0", str(log), "3"], capture_output=True, text=True, timeout=30)
    assert first.wait(timeout=30) == 1 and third.returncode == 3, third
    out = stop_server(server)
    assert [line.split()[0] for line in log.read_text().splitlines() if "start" in line] == ["1", "3"]
    assert "its flwr-clientapp exited while the request waited for a slot" in out, out
