"""The wire contract between the coordinator and a site: every record and key that crosses.

A message's content is a Flower ``RecordDict`` holding at most these records:

* ``arrays`` (ArrayRecord): model tensors, either way;
* ``config`` (ConfigRecord): the coordinator's instructions, always with ``server-round``;
* ``metrics`` (MetricRecord): the site's aggregate metrics, always with ``num-examples``;
* ``site`` (ConfigRecord): who answered and whether it could (name, status, reason).

Both sides build and read messages only through this module, so a key is named once.
Reading is defensive: a reply is data from another party, and a malformed one must be
told apart from a good one, never crash the reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, MessageType, MetricRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

SERVER_ROUND = "server-round"
NUM_EXAMPLES = "num-examples"  # Flower's weighting key for aggregation


class SiteStatus(str, Enum):
    OK = "ok"
    UNABLE = "unable"  # the site cannot take part in this message (no data for the family, policy, ...)


@dataclass(frozen=True)
class SiteInfo:
    """The ``site`` record: the name a site reports under, and whether it could answer."""

    name: str
    status: SiteStatus = SiteStatus.OK
    reason: str = ""
    notes: str = ""  # settings the site clamped under its own policy (client/policy.py)

    @property
    def ok(self) -> bool:
        return self.status is SiteStatus.OK

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"name": self.name, "status": self.status.value, "reason": self.reason})

    @classmethod
    def from_content(cls, content: RecordDict) -> SiteInfo | None:
        """The reply's ``site`` record; None when there is none. An unknown status reads as
        unable, so a reply the coordinator cannot understand is never taken as a good one."""
        record = content.get(SITE) if SITE in content else None
        if not isinstance(record, ConfigRecord):
            return None
        status = str(record.get("status", SiteStatus.OK.value))
        reason = str(record.get("reason", ""))
        try:
            parsed = SiteStatus(status)
        except ValueError:
            parsed, reason = SiteStatus.UNABLE, f"unknown site status {status!r}" + (f": {reason}" if reason else "")
        name = record.get("name")
        return cls(str(name) if name else "", parsed, reason, str(record.get("notes", "") or ""))


# ---- the coordinator's side ------------------------------------------------------------------


def instruction(server_round: int, arrays: ArrayRecord | None = None, **config: Any) -> RecordDict:
    """The content of a message to a site: the round (and any other instructions), the model."""
    records: dict[str, Any] = {CONFIG: ConfigRecord({SERVER_ROUND: server_round, **config})}
    if arrays is not None:
        records[ARRAYS] = arrays
    return RecordDict(records)


def query(node_id: int, server_round: int, **config: Any) -> Message:
    """A QUERY message to one site (the roll call and the cross-site phase's requests)."""
    return Message(instruction(server_round, **config), dst_node_id=node_id, message_type=MessageType.QUERY)


@dataclass
class Reply:
    """A site's reply as the coordinator reads it."""

    site: SiteInfo | None
    metrics: dict[str, Any]
    arrays: ArrayRecord | None

    @property
    def num_examples(self) -> float:
        """``num-examples``, or NaN when missing or not a finite number (the caller refuses it)."""
        value = self.metrics.get(NUM_EXAMPLES)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return math.nan
        return float(value)


def read_reply(content: RecordDict) -> Reply:
    metrics = dict(next(iter(content.metric_records.values()), {}))
    arrays = content.array_records.get(ARRAYS)
    return Reply(SiteInfo.from_content(content), metrics, arrays)


def record_int(value: ConfigRecordValues) -> int:
    """``int(value)`` for a number read from a config or metric record; a list raises TypeError,
    as ``int()`` itself does."""
    if isinstance(value, list):
        raise TypeError(f"expected a number, got a list: {value!r}")
    return int(value)


# ---- the site's side -------------------------------------------------------------------------


def array_record(content: RecordDict, key: str = ARRAYS) -> ArrayRecord:
    """The ArrayRecord under ``key`` (the model, by default); KeyError when there is none."""
    record = content[key]
    assert isinstance(record, ArrayRecord), f"record {key!r} is a {type(record).__name__}, not an ArrayRecord"
    return record


def config_record(content: RecordDict, key: str = CONFIG) -> ConfigRecord:
    """The ConfigRecord under ``key`` (the instructions, by default); KeyError when there is none."""
    record = content[key]
    assert isinstance(record, ConfigRecord), f"record {key!r} is a {type(record).__name__}, not a ConfigRecord"
    return record


def round_of(content: RecordDict, default: int) -> int:
    """The ``server-round`` of the message's ``config`` record, ``default`` when the record has
    none; a message without a ``config`` record raises KeyError (the site's error reply)."""
    return int(content[CONFIG].get(SERVER_ROUND, default))  # type: ignore[arg-type]


def reply(
    msg: Message, site: SiteInfo, metrics: Mapping[str, Any], arrays: ArrayRecord | None = None, **records: Any
) -> Message:
    """A site's reply: its metrics, its name and status, and (train, personal) its model."""
    content: dict[str, Any] = {METRICS: MetricRecord(dict(metrics)), SITE: site.to_record(), **records}
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(RecordDict(content), reply_to=msg)


def unable(msg: Message, name: str, reason: str) -> Message:
    """The site cannot take part in this message: it says why, and the round goes on."""
    return reply(msg, SiteInfo(name, SiteStatus.UNABLE, reason), {NUM_EXAMPLES: 0})
