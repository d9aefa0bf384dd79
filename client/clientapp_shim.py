"""The ``flwr-clientapp`` that a site's SuperExec starts: it asks the daemon's warm server to
fork the ClientApp (client/warm_clientapp.py) and waits for it, as if it ran it itself.

Standard library only, run with ``python -IS``: it must start in milliseconds, which is the
point. ``argv``: SOCKET FALLBACK then flwr-clientapp's own arguments. Signals (SIGTERM,
SIGINT) are passed on to the forked ClientApp; its exit code is this process's exit code.
If the server cannot be reached, the real ``flwr-clientapp`` (FALLBACK) replaces this
process: slower, never a lost message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def _cold(fallback: str, args: list[str], why: BaseException) -> None:
    print(f"flwr-clientapp: no warm ClientApp server ({why}); starting a cold one", file=sys.stderr, flush=True)
    os.execv(fallback, [fallback, *args])


def run(sock_path: str, fallback: str, args: list[str]) -> int:
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(sock_path)
        socket.send_fds(conn, [json.dumps({"argv": args}).encode()], [0, 1, 2])
        pid = int(json.loads(conn.recv(4096))["pid"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        _cold(fallback, args, err)
        return 127  # not reached: execv replaced this process

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        reply = conn.recv(4096)  # the server answers when the child has exited
    except OSError:
        reply = b""
    if not reply:
        print(f"flwr-clientapp: the warm server closed the connection; ClientApp pid {pid}", file=sys.stderr)
        return 1
    code = int(json.loads(reply)["exit"])
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
