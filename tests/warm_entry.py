"""A stand-in for Flower's ``flwr-clientapp`` entry point, for tests/test_warm_clientapp.py:
the warm server forks a child that runs :func:`main` with the shim's arguments and stdio."""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    print(f"pid={os.getpid()} ppid={os.getppid()} argv={args}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if args[:1] == ["sleep"]:
        time.sleep(float(args[1]))
    if args[:1] == ["exit"]:
        sys.exit(int(args[1]))
    if args[:1] == ["raise"]:
        raise RuntimeError("the ClientApp failed")
    if args[:1] == ["hold"]:  # hold SECONDS LOG CODE: a ClientApp that logs when it runs
        seconds, log, code = float(args[1]), args[2], int(args[3])
        with open(log, "a") as fh:
            fh.write(f"{code} start {time.time()}\n")
        time.sleep(seconds)
        with open(log, "a") as fh:
            fh.write(f"{code} end {time.time()}\n")
        sys.exit(code)
