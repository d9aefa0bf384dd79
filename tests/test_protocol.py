"""The wire contract (shared/protocol.py): what both sides build, and how the coordinator reads
a reply it cannot trust (a malformed or hostile ``site`` record is never a good reply)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from clientapp_messages import as_task, request
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedbreast.shared import protocol


def test_a_reply_round_trips_through_the_protocol() -> None:
    as_task()
    msg = request("train", 3, {"w": np.zeros(2, np.float32)})
    assert protocol.round_of(msg.content, default=None) == 3
    sent = protocol.reply(
        msg, protocol.SiteInfo("hospital-a"), {protocol.NUM_EXAMPLES: 7, "train_loss": 0.5}, ArrayRecord({})
    )
    got = protocol.read_reply(sent.content)
    assert got.site == protocol.SiteInfo("hospital-a") and got.site.ok
    assert got.num_examples == 7.0 and got.metrics["train_loss"] == 0.5 and got.arrays is not None
    refused = protocol.read_reply(protocol.unable(msg, "hospital-b", "no CEM images").content)
    assert refused.site == protocol.SiteInfo("hospital-b", protocol.SiteStatus.UNABLE, "no CEM images")
    assert refused.num_examples == 0.0 and refused.arrays is None


def test_a_config_without_a_round_gets_the_default_and_no_config_is_an_error() -> None:
    assert protocol.round_of(protocol.instruction(5), default=1) == 5
    assert protocol.round_of(RecordDict({protocol.CONFIG: ConfigRecord({"other": 1})}), default=4) == 4
    with pytest.raises(KeyError):
        protocol.round_of(RecordDict({}), default=1)


def test_an_unknown_status_or_a_missing_count_is_never_read_as_good() -> None:
    content = RecordDict(
        {
            protocol.SITE: ConfigRecord({"name": "x", "status": "OK!", "reason": "trust me"}),
            protocol.METRICS: MetricRecord({"val_auc": 0.9}),
        }
    )
    got = protocol.read_reply(content)
    assert not got.site.ok and "unknown site status 'OK!'" in got.site.reason
    assert math.isnan(got.num_examples)  # no num-examples: the caller must refuse the weight, not trust it
    assert protocol.read_reply(RecordDict({})).site is None  # no site record at all
    assert protocol.SiteInfo.from_content(RecordDict({protocol.SITE: MetricRecord({"name": 1})})) is None
