"""The site runs only its own installed ClientApp: an app bundle selects it, never replaces it.

Flower's SuperNode installs whatever app bundle (FAB) a run brings and imports the ClientApp
the bundle names, from the bundle's own files. Anyone who can start a run at the SuperLink
(Flower's open-source Control API has no user authentication) could ship a ClientApp that
reads the DICOM folder and the site's keys and skips the audit and DP code. Flower 1.41's
``--trusted-entities`` check needs verifications from Flower's hosted platform, so it does
not work offline.

So every ClientApp process of a site daemon starts here (the warm server's fork and the
cold ``flwr-clientapp`` the daemon puts on the SuperNode's PATH both run :func:`main`), and
Flower's ClientApp runtime is wrapped at three points before it runs:

1. **pull**: the bundle that came with the message is checked (:func:`verify_bundle`): its
   content hashes to the hash Flower names, its pyproject's ``clientapp`` component is this
   site's installed ``fedbreast.client.app:app``, and, when the site's policy lists
   ``app-hashes``, its sha256 is one of them (the coordinator publishes the hash of a
   release with ``fedbreast release hash``);
2. **install**: the bundle is never unpacked (nothing from it reaches the disk or
   ``sys.path``), and Flower's runtime dependency installation is off;
3. **load**: the ClientApp is the installed ``fedbreast.client.app.app``, or, for a bundle
   the site did not approve, a stand-in that answers "unable: refused: ..." and writes the
   refusal to the site's audit log (which ``/healthz`` reads).

None of the bundle's code runs in either case. Offline: nothing here contacts anyone.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedbreast.client.pinned")

INSTALLED_CLIENTAPP = "fedbreast.client.app:app"
BUNDLE_TYPE = "app-bundle"  # the audit log's message type for a bundle verdict
MAX_FAB_BYTES = 16 * 1024 * 1024  # ours is one pyproject.toml (~10 kB); larger is not a release of ours
MAX_PYPROJECT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class BundleVerdict:
    sha256: str
    fab_id: str
    refused: str = ""  # why the bundle is refused; empty when approved

    @property
    def approved(self) -> bool:
        return not self.refused


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def bundle_clientapp(content: bytes) -> str:
    """The ``clientapp`` component named by the bundle's pyproject.toml, read from the zip in
    memory (nothing is extracted); ValueError when the bundle is not one."""
    if len(content) > MAX_FAB_BYTES:
        raise ValueError(f"the bundle is {len(content)} bytes, more than {MAX_FAB_BYTES} for a fedbreast release")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            info = fab.getinfo("pyproject.toml")
            if info.file_size > MAX_PYPROJECT_BYTES:
                raise ValueError(f"its pyproject.toml declares {info.file_size} bytes")
            doc = tomllib.loads(fab.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"not a readable app bundle ({type(exc).__name__}: {exc})") from None
    component = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if not isinstance(component, str):
        raise ValueError("its pyproject.toml names no [tool.flwr.app.components] clientapp")
    return component


def verify_bundle(
    content: bytes, claimed_hash: str, fab_id: str, allowed_hashes: tuple[str, ...] | None
) -> BundleVerdict:
    """Whether this site runs a message that came with this bundle (module doc)."""
    digest = fab_sha256(content)

    def refuse(why: str) -> BundleVerdict:
        return BundleVerdict(digest, fab_id, f"app bundle {fab_id or '?'} sha256:{digest[:16]}: {why}")

    if claimed_hash and claimed_hash != digest:
        return refuse(f"its content does not match the hash it came with ({claimed_hash[:16]})")
    try:
        component = bundle_clientapp(content)
    except ValueError as exc:
        return refuse(str(exc))
    if component != INSTALLED_CLIENTAPP:
        return refuse(f"it names the ClientApp {component!r}; this site runs only its installed {INSTALLED_CLIENTAPP}")
    if allowed_hashes is not None and digest not in allowed_hashes:
        return refuse("not in this site's policy app-hashes (fedbreast release hash prints a release's hash)")
    return BundleVerdict(digest, fab_id)


def _allowed_hashes(context: Any) -> tuple[str, ...] | None:
    from fedbreast.client.policy import policy_of

    policy = policy_of(context)  # PolicyRefused (unreadable policy) propagates: refuse the bundle
    return policy.app_hashes if policy is not None else None


def _audit(context: Any, message: Any, verdict: BundleVerdict) -> None:
    """The refusal on the site's audit log (fsync'd), where ``fedbreast site audit`` and /healthz see it."""
    from fedbreast.client.audit import append_line, audit_path, describe

    data_path = context.node_config.get("data-path")
    if not data_path or not os.path.isdir(str(data_path)):  # never create a data folder that is not there
        log.error("no data folder: the bundle refusal cannot be audited: %s", verdict.refused)
        return
    line = describe(message, None, context, status="refused", reason=verdict.refused)
    line.update(type=BUNDLE_TYPE, fab_hash=verdict.sha256, request_type=str(message.metadata.message_type))
    append_line(audit_path(data_path), line)


def refusing_app(verdict: BundleVerdict) -> Callable[[Any, Any], Any]:
    """The stand-in ClientApp for a refused bundle: an "unable" reply naming why, nothing else."""

    def answer(message: Any, context: Any) -> Any:
        from fedbreast.shared import protocol

        log.error("refused: %s", verdict.refused)
        _audit(context, message, verdict)
        name = str(context.node_config.get("site-name", f"node-{context.node_id}"))
        return protocol.unable(message, name, f"refused: {verdict.refused}")

    return answer


_CURRENT: dict[str, str] = {}  # this process's bundle (one message per ClientApp process)


def current_bundle_sha256() -> str:
    """The sha256 of the bundle the running message came with ('' outside the pinned runtime)."""
    return _CURRENT.get("sha256", "")


def pin_flower_runtime() -> None:
    """Wrap Flower's ClientApp runtime (flwr.supernode.runtime.run_clientapp) as the module doc says."""
    from flwr.supernode.runtime import run_clientapp as runtime

    original_pull = runtime.pull_task_input
    seen: dict[str, BundleVerdict] = {}

    def pull_and_verify(client: Any) -> Any:
        message, context, run, fab = original_pull(client)
        try:
            allowed = _allowed_hashes(context)
        except Exception as exc:  # noqa: BLE001 - an unreadable policy refuses, with its reason
            seen["verdict"] = BundleVerdict(fab_sha256(fab.content), run.fab_id, f"policy: {exc}")
        else:
            seen["verdict"] = verify_bundle(fab.content, fab.hash_str, run.fab_id, allowed)
        _CURRENT["sha256"] = seen["verdict"].sha256
        return message, context, run, fab

    def never_install(*_args: Any, **_kwargs: Any) -> None:
        return None  # the bundle's files stay in memory: nothing of it is importable

    def load_installed(*_args: Any, **_kwargs: Any) -> Callable[..., Any]:
        def loader(*_a: Any, **_k: Any) -> Any:
            verdict = seen.get("verdict")
            if verdict is None or not verdict.approved:
                return refusing_app(verdict or BundleVerdict("", "", "no bundle was checked"))
            from fedbreast.client.app import app

            return app

        return loader

    runtime.pull_task_input = pull_and_verify  # type: ignore[assignment]
    runtime.install_from_fab = never_install  # type: ignore[assignment]
    runtime.install_app_dependencies = never_install  # type: ignore[assignment]
    runtime.get_load_client_app_fn = load_installed  # type: ignore[assignment]


# Flower's other task commands (flwr.supercore.constant.TASK_TYPE_TO_COMMAND). A run whose
# bundle names an ``agentapp`` makes the SuperNode create an AGENT_APP task, which Flower's own
# ``flwr-agentapp`` would run by unpacking and importing the bundle: none of them may run here.
REFUSED_COMMANDS = ("flwr-agentapp", "flwr-serverapp", "flwr-simulation", "flwr-model", "flwr-connector")


def superexec_main() -> None:
    """``flower-superexec`` as the site runs it: Flower's, executing ClientApp tasks only.

    Any other task type a run asks for (an AgentApp bundle) is logged by Flower as an unknown
    task type and never started; the coordinator sees no answer from this site."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    restrict_superexec()
    flower_superexec()


def restrict_superexec() -> None:
    """Flower's SuperExec plugin runs only ClientApp tasks in this process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})


def install_pinned_runtime(bin_dir: Path) -> None:
    """The site's ``flower-superexec`` (ClientApp tasks only) and a refusing stand-in for every
    other Flower task command, in ``bin_dir`` (first on the SuperNode's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "flower-superexec": "from fedbreast.client.pinned_clientapp import superexec_main\nsuperexec_main()\n",
        **{
            name: (
                "import sys\n"
                f"print('{name}: refused: this fedbreast site runs only its installed ClientApp', file=sys.stderr)\n"
                "sys.exit(1)\n"
            )
            for name in REFUSED_COMMANDS
        },
    }
    for name, body in scripts.items():
        target = bin_dir / name
        target.write_text(f"#!{sys.executable} -P\n{body}", encoding="utf-8")
        target.chmod(0o755)


def main() -> None:
    """``flwr-clientapp`` as the site runs it: Flower's entry point, pinned."""
    pin_flower_runtime()
    if "--allow-runtime-dependency-installation" in sys.argv:  # never: it would run the bundle's installer
        sys.argv.remove("--allow-runtime-dependency-installation")
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    started = time.monotonic()
    try:
        flwr_clientapp()
    finally:
        log.debug("pinned ClientApp ran %.1f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
