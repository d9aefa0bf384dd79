"""What a site's reply may hold before the coordinator reads it (docs/server-robustness.md).

A reply is data from another party. One malformed or hostile reply (a NaN or a list where a
count belongs, a histogram of the wrong length, a site name like ``../../etc``, a record far
larger than the model) must cost that site its place in the round, with the reason named,
and never end the run or reach the logs, the metrics file, the CSV or the report unchecked.

The checks here are pure: :class:`~fedbreast.server.exchange.Exchange` runs them on every
reply of every wave (roll call, train, evaluate, cross-site), the secure train wave on the
results of SecAgg+, and the phases check the claimed ``num-examples`` against the roll call
(:func:`train_examples_bound`, :func:`unknown_site_cap`).
"""

from __future__ import annotations

import math
import numbers
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.metrics import DEFAULT_BINS, DEFAULT_MAX_KEYS

# A registered site's name: it becomes a file-name-like label in logs, metrics.jsonl, CSV and
# Markdown, so nothing that could climb a path, start a spreadsheet formula or break a table.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A metric key becomes a column of metrics.jsonl and of the report: the same alphabet.
METRIC_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# MetricStore's own columns: a metric of that name would overwrite the row's round or site.
RESERVED_KEYS = frozenset({"round", "phase", "site", "time"})
HIST_KEYS = ("test_hist_pos", "test_hist_neg")
VAL_HIST_KEYS = ("val_hist_pos", "val_hist_neg")  # the federated operating point's (server/phases.py)
HIST_PAIRS = (HIST_KEYS, VAL_HIST_KEYS)
# Metric keys the coordinator writes into a site's evaluate row (the federated operating point):
# a site sending one would pass its own numbers off as the coordinator's.
COORDINATOR_PREFIX = "fed_"
# Privacy budgets may be +inf (no guarantee at all); aggregated by maximum, it must stay visible.
UNBOUNDED_KEYS = frozenset(DEFAULT_MAX_KEYS)

# Size limits (item 5 of the server-side robustness issue): model arrays up to the global
# model's size plus 1% and 64 KiB (Flower's .npy header per tensor, rounding), and metric
# values up to four full histograms (test and validation, two classes each) twice over plus
# room for the scalar keys.
ARRAY_SLACK, ARRAY_EXTRA_BYTES, NPY_HEADER_BYTES = 1.01, 64 * 1024, 128
VALUES_PER_BIN, EXTRA_VALUES = 8, 256
MAX_TEXT_CHARS = 64 * 1024  # strings in a reply's config records (the site record's reason, notes)
# num-examples slack over the roll call's count: rounding, and DP-SGD's Poisson batches, whose
# sizes vary around batch-size (about 5 standard deviations above the mean for small sites).
EXAMPLES_SLACK = 1.5
# A score histogram's counts: each below 2**31, so no sum of them (4096 bins, any number of
# sites) comes near int64's limit. Its total (pos + neg) counts the site's test units: at most
# two an exam (a breast-level family: both breasts of an exam), plus room for Laplace noise on a
# noised histogram (client/app.py test_histograms: 16 groups a class, each of scale u/epsilon for
# u units a patient; the total moves by a standard deviation of about 8 u/epsilon: 64 is 4 of
# them at u = 2 and epsilon 1, 8 at u = 1). A site noising with a much smaller epsilon can pass it.
MAX_HIST_COUNT = 2**31
HIST_UNITS_PER_EXAM, HIST_EXTRA = 2, 64
# A site's roll-call counts weigh at most this multiple of the roll call's median (roll_call_caps).
ROLL_CALL_CAP_MULTIPLE = 10


class MalformedReply(ValueError):
    """A reply the coordinator must not use; the text names the key and what is wrong."""


@dataclass(frozen=True)
class ReplyLimits:
    """The largest reply the coordinator reads: model arrays and metric values."""

    model_bytes: int = 0  # the global model's array bytes; 0: replies carry no arrays
    model_arrays: int = 0  # its number of tensors (each travels with a .npy header)
    hist_bins: int = DEFAULT_BINS

    @classmethod
    def for_model(cls, arrays: Mapping[str, np.ndarray], hist_bins: int) -> ReplyLimits:
        return cls(int(sum(a.nbytes for a in arrays.values())), len(arrays), hist_bins)

    @property
    def max_array_bytes(self) -> int:
        """A reply that carries the model (train, personal): at most the model's size and slack."""
        raw = self.model_bytes + NPY_HEADER_BYTES * self.model_arrays
        return int(raw * ARRAY_SLACK) + ARRAY_EXTRA_BYTES

    def max_values(self, extra: int = 0) -> int:
        """Metric entries plus list elements one reply may hold (``extra``: the phase's own, e.g.
        the cross-site matrix's keys per model)."""
        return VALUES_PER_BIN * self.hist_bins + EXTRA_VALUES + extra


def shown(text: object, limit: int = 64) -> str:
    """An untrusted name as it may appear in a reason: every character outside the site-name
    alphabet replaced by '?', cut to ``limit`` (so ``=cmd|x`` reads ``?cmd?x``)."""
    s = str(text)
    return re.sub(r"[^A-Za-z0-9._-]", "?", s[:limit]) + ("..." if len(s) > limit else "")


def printable(text: object, limit: int = 300) -> str:
    """A site's free text (an "unable" reason, an error message) on one line, cut to ``limit``:
    a newline or a control character in it would forge lines in the coordinator's log."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit] + "..."


def valid_site_name(name: str) -> bool:
    return bool(SITE_NAME.match(name))


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def value_count(record: Mapping[str, Any]) -> int:
    """A record's entries plus its lists' elements: what the size limit counts."""
    return sum(1 + (len(v) if isinstance(v, list) else 0) for v in record.values())


def _text_chars(key: str, value: Any) -> int:
    items = value if isinstance(value, list) else [value]
    return len(key) + sum(len(x) for x in items if isinstance(x, (str, bytes)))


def check_size(content: RecordDict, limits: ReplyLimits, carries_model: bool, extra_values: int = 0) -> None:
    """Raise MalformedReply when a reply is larger than it can honestly be. Counts bytes and
    entries only (``len`` of each Array's buffer): nothing is converted to numpy before this."""
    allowed = limits.max_array_bytes if carries_model else 0
    got = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    if got > allowed:
        expected = f"at most {allowed} bytes (the global model's size)" if carries_model else "none"
        raise MalformedReply(f"arrays of {got} bytes, expected {expected}")
    most = limits.max_values(extra_values)
    for kind, records in (("metric", content.metric_records), ("config", content.config_records)):
        values = sum(value_count(rec) for rec in records.values())
        if values > most:
            raise MalformedReply(f"{kind} records hold {values} values, more than the limit of {most}")
    text = sum(_text_chars(k, v) for rec in content.config_records.values() for k, v in rec.items())
    if text > MAX_TEXT_CHARS:
        raise MalformedReply(f"config records hold {text} characters of text, more than the limit of {MAX_TEXT_CHARS}")


def check_metrics(metrics: Mapping[str, Any], hist_bins: int) -> None:
    """Raise MalformedReply unless every metric is a number or a list of finite numbers under a
    plain key, ``num-examples`` is a finite non-negative number, and the score histograms are
    counts of an allowed resolution (:func:`check_histograms`).

    NaN is a scalar metric's "undefined" in the protocol (an AUC on one class, DP's withheld
    train loss) and is kept; infinity is refused except +inf on a privacy budget.
    """
    for key, value in metrics.items():
        if not isinstance(key, str) or not METRIC_KEY.match(key):
            raise MalformedReply(f"metric key {shown(key)!r} is not a plain name")
        if key in RESERVED_KEYS:
            raise MalformedReply(f"metric key {key!r} is reserved for the metrics file's own columns")
        if key.startswith(COORDINATOR_PREFIX):
            raise MalformedReply(
                f"metric key {key!r} is reserved for the coordinator's own values ({COORDINATOR_PREFIX}*)"
            )
        if isinstance(value, list):
            if not all(_real(x) and math.isfinite(x) for x in value):
                raise MalformedReply(f"metric {key!r} is a list holding something other than finite numbers")
        elif not _real(value):
            raise MalformedReply(f"metric {key!r} is a {type(value).__name__}, not a number or a list of numbers")
        elif math.isinf(value) and not (key in UNBOUNDED_KEYS and value > 0):
            raise MalformedReply(f"metric {key!r} is {value}, not a finite number")
    weight = metrics.get(protocol.NUM_EXAMPLES)
    if weight is None:
        raise MalformedReply(f"no {protocol.NUM_EXAMPLES!r}")
    if not _real(weight) or not math.isfinite(weight) or weight < 0:
        raise MalformedReply(f"{protocol.NUM_EXAMPLES!r} = {shown(weight)} is not a finite non-negative number")
    check_histograms(metrics, hist_bins)


def check_histograms(metrics: Mapping[str, Any], hist_bins: int) -> None:
    """Per split (test, validation): both score histograms or neither; each a list of non-negative
    integer counts whose length k divides the run's ``hist-bins`` (a site may send fewer bins:
    server/phases.py pools them at the common resolution), both of one length."""
    for pair in HIST_PAIRS:
        _check_histogram_pair(metrics, hist_bins, pair)


def _check_histogram_pair(metrics: Mapping[str, Any], hist_bins: int, pair: tuple[str, str]) -> None:
    present = [k for k in pair if k in metrics]
    if not present:
        return
    if len(present) == 1:
        raise MalformedReply(f"{present[0]!r} without {next(k for k in pair if k not in present)!r}")
    lengths = []
    for key in pair:
        value = metrics[key]
        if not isinstance(value, list):
            raise MalformedReply(f"histogram {key!r} is not a list of counts")
        if not all(_real(x) and math.isfinite(x) and x >= 0 and float(x).is_integer() for x in value):
            raise MalformedReply(f"histogram {key!r} holds a value that is not a non-negative integer count")
        if any(x >= MAX_HIST_COUNT for x in value):
            raise MalformedReply(f"histogram {key!r} holds a count of 2**31 or more")
        if not value or hist_bins % len(value):
            raise MalformedReply(
                f"histogram {key!r} has {len(value)} bins; it must have hist-bins ({hist_bins}) or a divisor of it"
            )
        lengths.append(len(value))
    if lengths[0] != lengths[1]:
        raise MalformedReply(f"histograms {pair[0]!r} and {pair[1]!r} have {lengths[0]} and {lengths[1]} bins")


def hist_total_bound(test_exams: int) -> int:
    """The most units a site with ``test_exams`` (the roll call's; or its ``val_exams`` for the
    validation histograms) can count in its score histograms: HIST_UNITS_PER_EXAM an exam, plus
    HIST_EXTRA for noise."""
    return HIST_UNITS_PER_EXAM * test_exams + HIST_EXTRA


def check_hist_total(metrics: Mapping[str, Any], test_exams: int, pair: tuple[str, str] = HIST_KEYS) -> None:
    """Raise MalformedReply when a reply's score histograms (checked by check_histograms) count
    more than a site with ``test_exams`` exams of that split at the roll call can (``pair``: the
    test histograms, or VAL_HIST_KEYS against the roll call's ``val_exams``)."""
    if not all(k in metrics for k in pair):
        return
    total = int(sum(metrics[pair[0]]) + sum(metrics[pair[1]]))
    split = pair[0].split("_")[0]
    if total > hist_total_bound(test_exams):
        raise MalformedReply(
            f"{pair[0]} + {pair[1]} total {total} exceeds the roll call's {split} exams {test_exams} "
            f"(at most {HIST_UNITS_PER_EXAM} x {test_exams} + {HIST_EXTRA})"
        )


def count_metric(metrics: Mapping[str, Any], key: str) -> int | None:
    """A count a site reports (the roll call's ``train_samples``, ``test_exams``): None when
    absent, MalformedReply when it is not a non-negative integer."""
    if key not in metrics:
        return None
    value = metrics[key]
    if not _real(value) or not math.isfinite(value) or value < 0 or not float(value).is_integer():
        raise MalformedReply(f"{key!r} = {shown(value)} is not a count")
    return int(value)


# ---- num-examples against the roll call --------------------------------------------------------


def train_examples_bound(cfg: RunConfig, samples: int | None) -> float | None:
    """The most examples a site can honestly count in one round of local training (its
    ``num-examples``, shared/training/local.py TrainStats.examples): local-steps x batch-size
    batches, or local-epochs passes over its ``samples`` (the roll call's ``train_samples``),
    with slack for rounding and DP-SGD's Poisson batches. None: no bound (epochs and no count)."""
    if cfg.local_steps > 0:
        return EXAMPLES_SLACK * cfg.local_steps * cfg.batch_size + cfg.batch_size
    if samples is None:
        return None
    return EXAMPLES_SLACK * max(cfg.local_epochs, 1) * samples + cfg.batch_size


def unknown_site_cap(known_bounds: Iterable[float], claims: Sequence[float], extra: float) -> float:
    """The weight a site without a roll-call figure may carry: no more than the largest site
    the roll call knows (so staying silent at the roll call buys nothing); when the roll call
    knows no site at all, EXAMPLES_SLACK x the round's median claim + ``extra`` (an honest
    majority, as the median norm clip assumes)."""
    known = list(known_bounds)
    if known:
        return max(known)
    return EXAMPLES_SLACK * statistics.median(claims) + extra if claims else 0.0


def roll_call_caps(counts: Mapping[int, int], multiple: int = ROLL_CALL_CAP_MULTIPLE) -> dict[int, tuple[int, str]]:
    """The roll call's counts (node -> ``train_samples`` or ``test_exams``) are each site's own
    word, and they set its weight. node -> (the most its count weighs, what that rests on), for
    every site whose count exceeds ``multiple`` x the median of the sites that counted any;
    with two such sites, ``multiple`` x the other's count (a median of two is their mean, which
    one huge count sets); with one, there is nothing to compare with and no cap."""
    positive = {node: c for node, c in counts.items() if c > 0}
    caps: dict[int, tuple[int, str]] = {}
    if len(positive) >= 3:
        cap = int(multiple * statistics.median(positive.values()))
        caps = {node: (cap, f"{multiple} x the median") for node, c in positive.items() if c > cap}
    elif len(positive) == 2:
        (a, count_a), (b, count_b) = positive.items()
        for node, count, other in ((a, count_a, count_b), (b, count_b, count_a)):
            if count > multiple * other:
                caps[node] = (multiple * other, f"{multiple} x the other site's")
    return caps
