"""Real Flower messages and contexts for driving ClientApp code in-process (no SuperNode)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedbreast.server.exchange import to_record
from fedbreast.shared import protocol

_ids = itertools.count(1)


def as_task() -> None:
    # Flower stamps messages with the running task's identity; a test is no task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def request(kind: str, server_round: int, arrays: dict[str, np.ndarray] | None = None) -> Message:
    """A message as the coordinator sends it (config with server-round, arrays for train/evaluate)."""
    content = protocol.instruction(server_round, to_record(arrays) if arrays is not None else None)
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"req-{next(_ids)}"
    return msg


def site_context(
    site_dir: Path,
    run_config: dict | None = None,
    run_id: int = 42,
    site_name: str = "hospital-a",
    policy: dict | None = None,
) -> Context:
    """The context a site's SuperNode gives its ClientApp; ``policy``: more node-config keys
    (the site's own settings, e.g. dp-max-epsilon)."""
    return Context(
        run_id=run_id,
        node_id=7,
        node_config={"data-path": str(site_dir), "site-name": site_name, **(policy or {})},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def reply(
    msg: Message,
    metrics: dict,
    arrays: dict[str, np.ndarray] | None = None,
    status: str = "ok",
    reason: str = "",
    name: str = "hospital-a",
) -> Message:
    site = protocol.SiteInfo(name, protocol.SiteStatus(status), reason)
    return protocol.reply(msg, site, metrics, to_record(arrays) if arrays is not None else None)
