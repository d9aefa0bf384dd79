"""A warm process that starts each message's ClientApp by fork instead of a fresh interpreter.

Flower's SuperNode runs every message (train, evaluate, each SecAgg+ stage) in a new
``flwr-clientapp`` process. Each one imports torch, Flower and our ClientApp before it reads
the message: 2.4-2.6 s of CPU, 1.7 s more with Opacus, paid per message per site (measured
on the 2-core machine, docs/test-suite.md). On a hospital's machine that is latency in every
round; three sites on one box queue behind each other's imports.

The site daemon runs :func:`serve`, which imports all of that once, and puts a
``flwr-clientapp`` shim first on the SuperNode's PATH (:func:`install_shim`). The shim
(client/clientapp_shim.py, standard library only) hands its arguments and its stdin, stdout
and stderr to the server over a Unix socket; the server forks a child that runs Flower's own
``flwr-clientapp`` entry point with them, and tells the shim the child's exit code. So:

- every message still runs in a process of its own: nothing a message loads or changes
  carries over to the next one, as before;
- the code that runs is the site's installed ClientApp, imported before any run's app bundle
  is seen (Flower's loader reuses a module that is already imported);
- if the server is not running, the shim execs a cold ``flwr-clientapp``: slower, never
  a lost message;
- warm or cold, the entry point is the pinned one (client/pinned_clientapp.py): a run's app
  bundle selects the installed ClientApp and never brings code of its own.

The socket is created without group or other access, in the daemon's state directory: only
the site's own user can ask for a ClientApp, which it could start itself anyway.

At most ``--max-children`` ClientApps (default 4) run at once, each a full torch process: a
coordinator that sends many messages at once (Flower's SuperExec starts a ``flwr-clientapp``
for every one) gets them run a few at a time. A request beyond the bound is accepted and
waits, in order, until a ClientApp exits; its shim simply waits longer for the answer. The
wait must stay short: Flower 1.41's SuperNode gives a claimed task 30 s
(``HEARTBEAT_DEFAULT_INTERVAL``) to send its first heartbeat, which the ClientApp does as it
starts, then expires it and answers the coordinator with an error for that message. A
queued ClientApp whose task expired starts, is refused its message by the SuperNode and
exits; a request whose shim has gone is dropped without starting one.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

# What every ClientApp process would import anyway (the families' site tasks are loaded by
# path when a message names them; Opacus only under DP, but then it is the slowest import).
# torch._dynamo: torch.optim imports it when the first optimizer is built, in every train
# message (0.76 s of CPU); sklearn.metrics: the site's evaluation metrics (0.40 s). Both
# were paid by each forked ClientApp until 2026-12-03.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "sklearn.metrics",
    "flwr.supernode.cli.flwr_clientapp",
    "fedbreast.client.app",
    "fedbreast.client.pinned_clientapp",
    "opacus",
)
FLOWER_ENTRY = "fedbreast.client.pinned_clientapp:main"  # Flower's flwr-clientapp, pinned
SHIM_NAME = "flwr-clientapp"
MAX_REQUEST = 64 * 1024
DEFAULT_MAX_CHILDREN = 4  # ClientApp processes at once; more requests wait for one to exit
# sockaddr_un holds 108 bytes on Linux; longer state paths get a private temp folder.
MAX_SOCKET_PATH = 100


def socket_path(state_dir: Path) -> Path:
    """Where the daemon's warm server listens: in its state directory when the path fits a
    Unix socket address, else in a private (0700) folder named after the state directory."""
    path = state_dir / "clientapp.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedbreast-{os.getuid()}-{digest}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise OSError(f"{folder}: not a private folder of this user; cannot place the ClientApp socket there")
    return folder / "clientapp.sock"


def preload_modules(extra: Sequence[str] = ()) -> list[str]:
    """Import what each ClientApp needs; returns the names that could not be imported (the
    child imports them itself then, as a cold process would)."""
    missing = []
    names = list(PRELOAD) + list(extra)
    try:
        from fedbreast.shared.families import FAMILIES

        names += [f.task_path.partition(":")[0] for f in FAMILIES.values()]
    except ImportError:
        missing.append("fedbreast.shared.families")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _entry(ref: str) -> Callable[[], object]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def _hung_up(conn: socket.socket) -> bool:
    """Whether the shim closed its end (it was killed while its request waited for a slot).
    Its request was the only thing it sends, so anything readable now is the end of file."""
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        conn.settimeout(5.0)


def _run_child(argv: list[str], fds: list[int], inherited: list[socket.socket], entry: str) -> NoReturn:
    """In the forked child: take the shim's stdio and arguments, run the entry point, exit."""
    code = 1
    try:
        for s in inherited:
            s.close()
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        # A fresh interpreter draws numpy's legacy global seed from the OS; forked children
        # would all share the server's. (Our code uses seeded Generators; this keeps any
        # library that does not on the cold path's behaviour.)
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = [SHIM_NAME, *argv]
        _entry(entry)()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - the child reports and exits; the server never sees it
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class WarmServer:
    """The accept / fork / reap loop. Single-threaded on purpose: a fork from a process with
    other threads can copy a lock one of them held. Every connection is accepted at once and
    queued; a request is read and forked only while fewer than ``max_children`` run."""

    def __init__(
        self,
        path: Path,
        entry: str = FLOWER_ENTRY,
        echo: Callable[[str], None] = print,
        max_children: int = DEFAULT_MAX_CHILDREN,
    ) -> None:
        if max_children < 1:
            raise ValueError(f"max_children must be at least 1, not {max_children}")
        self.path, self.entry, self.echo, self.max_children = path, entry, echo, max_children
        self.children: dict[int, socket.socket] = {}
        # (connection, accepted at, found every slot taken), oldest first
        self.pending: deque[tuple[socket.socket, float, bool]] = deque()
        self.forked = 0
        self.waited = 0  # requests that found every slot taken
        self.longest_wait = 0.0
        self._queue_reported = False
        self._stop = False

    def _listen(self) -> socket.socket:
        self.path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            srv.bind(str(self.path))
        finally:
            os.umask(old)
        srv.listen(64)
        return srv

    def _accept(self, srv: socket.socket) -> None:
        conn, _ = srv.accept()
        full = len(self.children) + len(self.pending) >= self.max_children
        if full and not self._queue_reported:
            self._queue_reported = True
            self.echo(
                f"warm ClientApp: {len(self.children)} ClientApps running (--max-children {self.max_children}); "
                "further requests wait for one to exit"
            )
        self.pending.append((conn, time.monotonic(), full))

    def _dispatch(self, srv: socket.socket) -> None:
        """Fork the queued requests, oldest first, while there are free slots."""
        while self.pending and len(self.children) < self.max_children:
            conn, accepted, full = self.pending.popleft()
            if full:
                self.waited += 1
                self.longest_wait = max(self.longest_wait, time.monotonic() - accepted)
            self._handle(srv, conn)
        if not self.pending and self._queue_reported:
            self._queue_reported = False
            self.echo(
                f"warm ClientApp: no request waits any more ({self.waited} waited so far, "
                f"the longest {self.longest_wait:.1f} s)"
            )

    def _handle(self, srv: socket.socket, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(5.0)
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
            if not msg and not fds:  # closed before its request was sent: killed while it waited
                raise ValueError("its flwr-clientapp exited while the request waited for a slot")
            request = json.loads(msg)
            argv = request["argv"]
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)) or len(fds) != 3:
                raise ValueError("a request is {'argv': [str, ...]} with stdin, stdout and stderr attached")
            if _hung_up(conn):
                raise ValueError("its flwr-clientapp exited while the request waited for a slot")
        except (OSError, ValueError, KeyError, TypeError) as err:
            for fd in fds:
                os.close(fd)
            self.echo(f"warm ClientApp: refused a request: {err}")
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            queued = [c for c, _, _ in self.pending]
            _run_child(argv, fds, [srv, conn, *self.children.values(), *queued], self.entry)
        for fd in fds:
            os.close(fd)
        self.forked += 1
        try:
            conn.send(json.dumps({"pid": pid}).encode())
        except OSError:
            pass  # the shim is gone; the child still runs its message, and is reaped below
        self.children[pid] = conn

    def _reap(self) -> int:
        """Answer the shims of the ClientApps that exited; returns how many did."""
        reaped = 0
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped += 1
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                conn.close()
        return reaped

    def _close_pending(self) -> None:
        # Their shims find the connection closed without an answer and start a cold
        # flwr-clientapp, as for a server that is not running.
        while self.pending:
            self.pending.popleft()[0].close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = True

    def serve(self, ready: Callable[[], None] | None = None) -> int:
        srv = self._listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        sel = selectors.DefaultSelector()
        sel.register(srv, selectors.EVENT_READ)
        if ready is not None:
            ready()
        paused_until: float | None = None
        try:
            while not self._stop:
                for _key, _events in sel.select(timeout=0.1):
                    try:
                        self._accept(srv)
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            # Out of descriptors (thousands queued): leave the rest in the
                            # listen backlog, where their shims wait in connect(), until a
                            # ClientApp exits or a second passes, rather than spin on a
                            # socket that stays readable.
                            sel.unregister(srv)
                            paused_until = time.monotonic() + 1.0
                reaped = self._reap()
                self._dispatch(srv)
                if paused_until is not None and (reaped or time.monotonic() > paused_until):
                    sel.register(srv, selectors.EVENT_READ)
                    paused_until = None
        finally:
            sel.close()
            srv.close()
            self._close_pending()
            self.path.unlink(missing_ok=True)
            # Stopping the daemon stops the messages in flight, as stopping the SuperNode's
            # own ClientApp processes would.
            for pid in list(self.children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.children and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)
        self.echo(f"warm ClientApp: stopped after starting {self.forked} ClientApp process(es)")
        return 0


def install_pinned(bin_dir: Path, name: str = SHIM_NAME) -> Path:
    """Write a cold ``flwr-clientapp`` that runs the pinned entry point (no warm server)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / name
    # -P: a script's own folder (the state directory's bin/) is not put on sys.path, so
    # nothing dropped beside it shadows an import.
    target.write_text(
        f"#!{sys.executable} -P\nfrom fedbreast.client.pinned_clientapp import main\nmain()\n", encoding="utf-8"
    )
    target.chmod(0o755)
    return target


def install_shim(bin_dir: Path, sock: Path, fallback: str) -> Path:
    """Write the ``flwr-clientapp`` the SuperNode's SuperExec will find first on its PATH."""
    shim = Path(__file__).with_name("clientapp_shim.py")
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / SHIM_NAME
    # -I -S: no site-packages, no user paths: the shim starts in milliseconds.
    target.write_text(
        f"#!{sys.executable} -IS\n"
        "import runpy, sys\n"
        f"sys.argv[0:1] = [{str(shim)!r}, {str(sock)!r}, {fallback!r}]\n"
        f"runpy.run_path({str(shim)!r}, run_name='__main__')\n",
        encoding="utf-8",
    )
    target.chmod(0o755)
    return target


def _drop_working_directory_from_path() -> None:
    """Take the working directory off ``sys.path``.

    ``python -m`` puts it first, and the daemon starts this server in its state directory:
    a ``torch.py`` (or ``fedbreast/``) dropped there would be imported in place of the real
    one by the preloads and by every forked ClientApp. Modules imported before ``main`` runs
    (this one, its package, the standard library it imports) are not covered: for those the
    server must be started with ``python -P`` (Python 3.11+), which never adds the folder.
    """
    here = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != here]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -P -m fedbreast.client.warm_clientapp SOCKET [--max-children N] [--entry MODULE:FUNC]``
    (the daemon starts it; ``--entry`` is for tests)."""
    import argparse

    _drop_working_directory_from_path()
    parser = argparse.ArgumentParser(prog="fedbreast.client.warm_clientapp")
    parser.add_argument("socket", type=Path)
    parser.add_argument(
        "--max-children",
        type=int,
        default=DEFAULT_MAX_CHILDREN,
        help=f"ClientApp processes at once; further requests wait for one to exit (default {DEFAULT_MAX_CHILDREN})",
    )
    parser.add_argument("--entry", default=FLOWER_ENTRY)
    parser.add_argument("--no-preload", action="store_true")
    args = parser.parse_args(argv)
    if args.max_children < 1:
        parser.error(f"--max-children must be at least 1, not {args.max_children}")
    started = time.monotonic()
    missing = [] if args.no_preload else preload_modules()
    server = WarmServer(
        args.socket, entry=args.entry, echo=lambda line: print(line, flush=True), max_children=args.max_children
    )
    return server.serve(
        ready=lambda: print(
            f"warm ClientApp: ready on {args.socket} after {time.monotonic() - started:.1f} s, "
            f"up to {args.max_children} ClientApps at once"
            + (f" (not preloaded: {', '.join(missing)})" if missing else ""),
            flush=True,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
