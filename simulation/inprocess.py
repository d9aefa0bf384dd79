"""The in-process engine: the real ServerApp and ClientApp in one Python process, no Ray.

``fedbreast simulate --engine inprocess`` runs the same round loop (``FederatedRun``) and the
same ClientApp handlers and mods as the Flower simulation engine, on real Flower messages,
but delivers each message by calling the ClientApp directly: no SuperLink, no Ray actors,
no process per site. Sites take turns on the machine instead of all training at once.

What it is for: runs whose question is the model, not the transport (learning curves,
hyper-parameters, tests of a family's learning), where Ray's start-up and one resident
torch process per site cost more than the training. What it does not prove: the Flower
runtime path (SuperLink, SuperNodes, message serialisation across processes); that is
what ``--engine ray`` (the default) and the deployment tests exercise.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

# (site folder, the request, the ClientApp's reply) -> the reply sent; tests use it to play a
# malicious site. The identity keeps every honest reply.
ReplyHook = Callable[[Path, Message, Message], Message]


def _honest(site_dir: Path, request: Message, reply: Message) -> Message:
    return reply


class InProcessGrid:
    """A Flower Grid whose nodes are the real ClientApp, one per site folder, answered in-process.

    Each message is deep-copied before delivery, as serialisation would: messages may share
    records (SecAgg+'s do), and a mod that edits its copy must not change another site's. An
    exception in the ClientApp becomes an error reply, as Flower's runtime makes it.
    """

    def __init__(
        self,
        site_dirs: Iterable[Path],
        run_config: Mapping[str, Any],
        on_reply: ReplyHook = _honest,
        site_names: bool = False,
    ):
        from fedbreast.client.app import app  # the site's code: loaded only when this engine runs sites

        self.app, self.on_reply = app, on_reply
        self.nodes = {100 + i: Path(d) for i, d in enumerate(site_dirs)}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                state=RecordDict(),
                run_config=dict(run_config),
                node_config=self._node_config(i, len(self.nodes), d, site_names),
            )
            for i, (node, d) in enumerate(self.nodes.items())
        }
        self._ids = itertools.count(1)
        self._outbox: list[Message] = []
        # Flower stamps every message with the running task's identity; this process is the run's one task.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    @staticmethod
    def _node_config(partition: int, partitions: int, site_dir: Path, site_names: bool) -> dict[str, Any]:
        # Like a simulated SuperNode (partition of sim-sites-dir); ``site_names`` adds the deployed
        # form (data-path + site-name) for callers that pass folders from several places.
        config: dict[str, Any] = {"partition-id": partition, "num-partitions": partitions}
        if site_names:
            config.update({"data-path": str(site_dir), "site-name": site_dir.name})
        return config

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            node = m.metadata.dst_node_id
            try:
                reply = self.app(copy.deepcopy(m), self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - as Flower's runtime: the site's exception is its error reply
                reply = Message(Error(code=0, reason=str(exc)), reply_to=m)
            else:
                reply = self.on_reply(self.nodes[node], m, reply)
            reply.metadata.__dict__["_src_node_id"] = node
            self._outbox.append(reply)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r.metadata.reply_to_message_id not in wanted]
        return out


def run_inprocess(run_config: Mapping[str, Any], site_dirs: list[Path]) -> dict[str, Any]:
    """The ServerApp's main on an :class:`InProcessGrid`; returns a run record shaped like
    Flower's (``status``), so callers treat both engines alike."""
    from fedbreast.server.app import main

    grid = InProcessGrid(site_dirs, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    try:
        main(grid, context)  # type: ignore[arg-type]  # duck-typed Grid: get_node_ids, push and pull
    except SystemExit as exc:  # the ServerApp stops cleanly with exit code 3 when too few sites came
        return {"run-id": 1, "status": "finished:failed", "status-details": f"ServerApp exited with {exc.code}"}
    return {"run-id": 1, "status": "finished:completed", "status-details": ""}
