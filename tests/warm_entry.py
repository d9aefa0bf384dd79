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
