"""One wave of messages between the coordinator and the sites.

Every phase of a round (the plain and the secure train wave, evaluation, cross-site) talks
to the sites through an ``Exchange``: it sends, collects the replies within the round
timeout, and sorts them into usable replies and failures. A failure (an error reply, a site
that answers "unable", a site that does not answer in time, a malformed reply) is named,
recorded in the run's metrics and printed, and never ends the run.

Every reply is checked before anything in it is used (server/reply_checks.py): its size
against the model's (before any conversion to numpy), the site's name against the
registered-site pattern, and every metric's type and range. A reply that fails is dropped
for the round as "malformed reply: <what, naming the key>"; so is one whose reading raises.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from fedbreast.server.metric_store import MetricStore
from fedbreast.server.reply_checks import (
    MalformedReply,
    ReplyLimits,
    check_metrics,
    check_size,
    printable,
    shown,
    valid_site_name,
)
from fedbreast.shared import protocol

log = logging.getLogger("fedbreast.server")

TIMEOUT_REASON = "no reply within the round timeout ({:.0f} s)"
POLL_SECONDS = 0.1  # replies are pulled from the local SuperLink; polling is cheap


@dataclass
class SiteReply:
    site: str
    node_id: int
    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] | None
    message: Message | None  # None under secure aggregation: the site's update is never seen alone

    @property
    def plain_message(self) -> Message:
        """The reply's message, in a plain round (not secure aggregation, where there is none)."""
        assert self.message is not None
        return self.message

    @property
    def update(self) -> dict[str, np.ndarray]:
        """The reply's model arrays, for a reply already checked to carry them."""
        assert self.arrays is not None
        return self.arrays


@dataclass
class RoundOutcome:
    round: int
    sites_trained: list[str] = field(default_factory=list)
    sites_evaluated: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # site -> reason
    aggregate: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    site_seconds: dict[str, float] = field(default_factory=dict)  # local train + eval time per site
    bytes_sent: int = 0  # model array bytes to / from sites (the coordinator's /metrics)
    bytes_received: int = 0
    timed_out: set[int] = field(default_factory=set)  # nodes that missed a wave's timeout this round
    # Each site's own time (its reply's train_seconds / eval_seconds), per wave.
    train_site_seconds: dict[str, float] = field(default_factory=dict)
    evaluate_site_seconds: dict[str, float] = field(default_factory=dict)

    def add_site_seconds(self, site: str, wave: str, seconds: Any) -> None:
        """A usable reply's own time for ``wave`` (train | evaluate): the site's local step as it
        measured it (an absent or non-number value counts 0)."""
        value = float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 0.0
        (self.train_site_seconds if wave == "train" else self.evaluate_site_seconds)[site] = value
        self.site_seconds[site] = self.site_seconds.get(site, 0.0) + value

    @property
    def slowest_site_seconds(self) -> float:
        return max(self.site_seconds.values(), default=0.0)

    @property
    def critical_seconds(self) -> float:
        """The slowest site's train plus the slowest site's evaluate: the least a round can take
        when sites work at once and each wave waits for its last reply."""
        return max(self.train_site_seconds.values(), default=0.0) + max(
            self.evaluate_site_seconds.values(), default=0.0
        )

    def timing(self) -> dict[str, float]:
        """The round's time split for metrics.jsonl: the wall time, the slowest site's train and
        evaluate, and the overhead, the rest (messages, serialisation, aggregation, polling, the
        checkpoint hand-off, and a site waiting for a free worker), in seconds and as a fraction."""
        overhead = self.seconds - self.critical_seconds
        return {
            "seconds": self.seconds,
            "slowest_site_seconds": self.slowest_site_seconds,
            "slowest_train_seconds": max(self.train_site_seconds.values(), default=0.0),
            "slowest_evaluate_seconds": max(self.evaluate_site_seconds.values(), default=0.0),
            "overhead_seconds": overhead,
            "overhead_fraction": overhead / self.seconds if self.seconds > 0 else 0.0,
        }


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray would turn 0-d tensors (BatchNorm step counters) into shape (1,).
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


def array_bytes(message: Message) -> int:
    return (
        sum(len(a.data) for rec in message.content.array_records.values() for a in rec.values())
        if message.has_content()
        else 0
    )


class Exchange:
    """Sends waves of messages to the sites and sorts what comes back.

    It also keeps the node id -> site name map, learned from the sites' replies, so every
    failure names the site (``node-<id>`` until the site has answered once with a valid name).
    A name belongs to the first node that answers with it (bind_name): another node's reply
    under it is refused while that node is online.
    ``limits`` bounds what one reply may carry; without it, replies may carry no model arrays.
    """

    def __init__(
        self,
        grid: Grid,
        store: MetricStore,
        echo: Callable[[str], None],
        round_timeout: float,
        limits: ReplyLimits | None = None,
    ) -> None:
        self.grid, self.store, self.echo, self.round_timeout = grid, store, echo, float(round_timeout)
        self.limits = limits if limits is not None else ReplyLimits()
        self.names: dict[int, str] = {}
        self.owners: dict[str, int] = {}  # site name -> the node that answers under it

    def bind_name(self, node: int, name: str) -> None:
        """Bind a (valid) site name to the node that answered with it; raise MalformedReply when
        another node still online answers under it. A restarted site may come back under a new
        node id (a SuperNode without authentication; an authenticated one keeps its id): its name
        moves to the new node once the old one has left the SuperLink's node list."""
        owner = self.owners.get(name)
        if owner is not None and owner != node:
            if owner in set(self.grid.get_node_ids()):
                raise MalformedReply(f"site name {name!r} is already answered by node {owner}")
            log.info("site %s answers from node %d now (node %d is gone)", name, node, owner)
        previous = self.names.get(node)
        if previous is not None and previous != name and self.owners.get(previous) == node:
            del self.owners[previous]  # a node that renames itself frees its old name
        self.owners[name] = node
        self.names[node] = name

    def site_name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def wave(
        self,
        messages: Iterable[Message],
        phase: str,
        server_round: int,
        outcome: RoundOutcome,
        *,
        carries_model: bool = False,
        extra_values: int = 0,
    ) -> list[SiteReply]:
        """Send, collect within the round timeout, and sort replies into usable ones (ordered by
        site name) and failures. ``carries_model``: the replies carry the model (train, the
        personal model), up to the model's size; ``extra_values``: metric values a reply of this
        phase may hold beyond the usual limit (the cross-site matrix)."""
        messages = list(messages)
        sent_to = {m.metadata.dst_node_id for m in messages}
        replies, by_msg_id = self.send_and_collect(messages)
        outcome.bytes_sent += sum(array_bytes(m) for m in messages)
        outcome.bytes_received += sum(array_bytes(r) for r in replies if not r.has_error())
        usable: list[SiteReply] = []
        answered: set[int] = set()
        for reply in replies:
            # A dead node's error comes from the SuperLink itself: map it back by message id.
            node = by_msg_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            try:
                sorted_reply = self.read(reply, node, carries_model, extra_values)
            except MalformedReply as exc:
                sorted_reply = f"malformed reply: {exc}"
            except Exception as exc:  # noqa: BLE001 - one site's reply, however broken, never ends the run
                log.warning("round %d %s: reply of node %d unreadable", server_round, phase, node, exc_info=True)
                sorted_reply = f"malformed reply: unreadable ({type(exc).__name__}: {printable(exc, 120)})"
            if isinstance(sorted_reply, str):
                self.record_failure(outcome, server_round, phase, node, sorted_reply)
            else:
                usable.append(sorted_reply)
                self.record_clamps(server_round, phase, sorted_reply)
        for node in sent_to - answered:
            outcome.timed_out.add(node)
            self.record_failure(outcome, server_round, phase, node, TIMEOUT_REASON.format(self.round_timeout))
        # In one order whatever order the replies came in (sampling order, network timing): a
        # weighted sum of float32 arrays depends on its order in the last bits, and a few rounds
        # of training turn those bits into a different model. Sorted, a seeded run repeats.
        return sorted(usable, key=lambda r: (r.site, r.node_id))

    def read(self, reply: Message, node: int, carries_model: bool, extra_values: int) -> SiteReply | str:
        """One reply, checked: the usable reply, or why it is a failure ("error", "unable");
        raises MalformedReply naming what is wrong with it."""
        if reply.has_error():
            return f"error: {printable(reply.error.reason)}"
        if not reply.has_content():
            raise MalformedReply("no content")
        check_size(reply.content, self.limits, carries_model, extra_values)  # before any array is read
        got = protocol.read_reply(reply.content)
        if got.site is not None and got.site.name:
            if not valid_site_name(got.site.name):
                raise MalformedReply(f"invalid site name {shown(got.site.name)!r}")
            self.bind_name(node, got.site.name)
        if got.site is not None and not got.site.ok:
            return f"unable: {printable(got.site.reason)}"
        check_metrics(got.metrics, self.limits.hist_bins)
        arrays = to_numpy(got.arrays) if got.arrays is not None else None
        return SiteReply(self.site_name(node), node, got.metrics, arrays, reply)

    def send_and_collect(self, messages: list[Message]) -> tuple[list[Message], dict[str, int]]:
        """Push, then poll for replies every POLL_SECONDS until all answered or the round times out;
        returns the replies and message id -> destination node.

        ``Grid.send_and_receive`` sleeps 3 s between pulls, which adds 1.5 s on average to every
        wave (two waves a round); pulling is a cheap local call, so we poll much faster.
        """
        ids = list(self.grid.push_messages(messages))
        by_msg_id = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        pending = set(ids)
        replies: list[Message] = []
        deadline = time.monotonic() + self.round_timeout
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        return replies, by_msg_id

    def record_clamps(self, server_round: int, phase: str, reply: SiteReply) -> None:
        """A site that answered with settings clamped under its own policy: shown and recorded."""
        message = reply.message
        site = (
            protocol.SiteInfo.from_content(message.content) if message is not None and message.has_content() else None
        )
        if site is None or not site.notes:
            return
        notes = printable(site.notes)
        self.echo(f"  round {server_round} {phase}: site {reply.site} clamped under its policy: {notes}")
        self.store.append(server_round, "policy", reply.site, {"stage": phase, "notes": notes})

    def record_failure(self, outcome: RoundOutcome, server_round: int, phase: str, node: int, reason: str) -> None:
        site = self.site_name(node)
        outcome.failures[site] = reason
        log.warning("round %d %s: site %s: %s", server_round, phase, site, reason)
        self.echo(f"  round {server_round} {phase}: site {site} left out: {reason}")
        self.store.append(server_round, "failure", site, {"stage": phase, "reason": reason})
