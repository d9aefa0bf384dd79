"""SecAgg+ for the FedAvg train wave: the coordinator learns the weighted mean of the sites'
updates and never any single site's update.

Flower 1.41 ships SecAgg+ only as a legacy workflow (``SecAggPlusWorkflow`` driving a
``flwr.server.strategy`` strategy through a ``LegacyContext``, with ``secaggplus_mod`` on the
client). We run that workflow unchanged for the train wave of a round and adapt at its two
edges: a duck-typed legacy strategy hands it the round's FitIns and takes back the unmasked
sum, and ``fedbreast.client.secure_aggregation`` turns the legacy FitIns into our ordinary
train message at the site. The rest of the round (evaluation, checkpoints, reports) is the
same as without it.

What the sites mask is their *change* to the global model, not their weights: the protocol
quantises values into [-clip, clip] before masking, which model weights (and BatchNorm
statistics) would overflow while one round's changes do not.

Limitations, by construction of secure aggregation: the coordinator cannot validate or clip
an individual update (NaN, shape, norm bound), so those checks move to the site
(``client/secure_aggregation.py`` refuses a non-finite or out-of-range change) and
``update-norm-bound``, robust strategies and central DP are refused with it (shared/config.py;
the default "auto" bound clips nothing here). What each site reports beside its masked update
(name, metrics, num-examples) is checked like any reply (server/reply_checks.py); a site that
fails them cannot be taken out of the masked sum, so that round's sum is not released. The
weight a site masks into its vector is beyond the coordinator's reach (docs/server-robustness.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedbreast.server.exchange import TIMEOUT_REASON, Exchange, RoundOutcome, SiteReply, array_bytes, to_record
from fedbreast.server.phases import RunState, record_train_aggregate, too_few_trained
from fedbreast.server.reply_checks import (
    MalformedReply,
    check_metrics,
    printable,
    shown,
    train_examples_bound,
    unknown_site_cap,
    valid_site_name,
    value_count,
)
from fedbreast.shared import protocol
from fedbreast.shared.secure_aggregation import ARRAY_NAMES_KEY, SITE_NAME_KEY

log = logging.getLogger("fedbreast.server")

QUANTIZATION_RANGE = 1 << 22  # Flower's default: with ratio 1 a step of 2*clip/4M (2e-6 for clip 4)


@dataclass
class _Proxy:
    """The workflow only reads ``node_id`` from the legacy ClientProxy it is handed."""

    node_id: int


@dataclass
class _RoundStrategy:
    """The two legacy Strategy calls SecAggPlusWorkflow makes, for one round."""

    nodes: list[int]
    config: dict[str, Any]
    results: list[tuple[_Proxy, Any]] = field(default_factory=list)
    mean_delta: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters, client_manager) -> list[tuple[_Proxy, FitIns]]:
        return [(_Proxy(n), FitIns(parameters, dict(self.config))) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results, failures):
        # The workflow has already put the unmasked weighted mean into every result's parameters.
        self.results = list(results)
        if results:
            self.mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # the workflow's own history and state are not used


class _WatchedGrid:
    """The run's Grid, as the workflow sees it: replies are pulled every 0.1 s (not Flower's 3 s),
    error replies are remembered per node so a site that drops out is named, and bytes are counted."""

    def __init__(self, exchange: Exchange, outcome: RoundOutcome):
        self._exchange, self._outcome = exchange, outcome
        self.errors: dict[int, str | None] = {}  # node -> the error's reason (Flower's Error.reason is optional)

    def __getattr__(self, name: str):
        return getattr(self._exchange.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self._outcome.bytes_sent += sum(_payload_bytes(m) for m in messages)
        replies, by_msg_id = self._exchange.send_and_collect(messages)
        for reply in replies:
            node = by_msg_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self.errors.setdefault(node, reply.error.reason)
            else:
                self._outcome.bytes_received += _payload_bytes(reply)
        return replies


def _payload_bytes(message: Message) -> int:
    """Array bytes plus the byte strings SecAgg+ carries in config records (keys, shares, masked vectors)."""
    if not message.has_content():
        return 0
    total = array_bytes(message)
    for rec in message.content.config_records.values():
        for v in rec.values():
            if isinstance(v, bytes):
                total += len(v)
            elif isinstance(v, list):
                total += sum(len(x) for x in v if isinstance(x, bytes))
    return total


def _apply(current: np.ndarray, delta: np.ndarray) -> np.ndarray:
    new = current + delta.reshape(current.shape)
    # Integer buffers (BatchNorm's step counter) are rounded, not truncated, back to their dtype.
    return (np.rint(new) if np.issubdtype(current.dtype, np.integer) else new).astype(current.dtype)


def expected_weight(state: RunState, nodes: list[int]) -> float:
    """The largest FedAvg weight (samples trained this round) a sampled site should report.

    Each site masks ``change x weight / max_weight``, quantised in steps of 2 clip / 2^22: a
    max_weight near the real largest weight keeps the full resolution. A weight a little
    over it (DP's Poisson batches) is harmless: one round's change is far inside the clip.
    """
    cfg = state.cfg
    samples = max((state.train_samples.get(n, 0) for n in nodes), default=0)
    per_round = cfg.local_steps * cfg.batch_size if cfg.local_steps > 0 else samples * cfg.local_epochs
    return float(max(per_round, 1))


def _checked_result(state: RunState, node: int, fitres: Any, cap: float) -> tuple[str, dict[str, Any]]:
    """A SecAgg+ result's site name and metrics, checked as any reply's (server/reply_checks.py);
    its num-examples against the roll call (``cap`` for a site the roll call did not count).
    Raises MalformedReply naming what is wrong."""
    exchange, cfg = state.exchange, state.cfg
    metrics = dict(fitres.metrics)
    name = metrics.pop(SITE_NAME_KEY, "")
    if name:
        if not isinstance(name, str) or not valid_site_name(name):
            raise MalformedReply(f"invalid site name {shown(name)!r}")
        exchange.names[node] = name
    if (values := value_count(metrics)) > exchange.limits.max_values():
        raise MalformedReply(f"metrics hold {values} values, more than the limit of {exchange.limits.max_values()}")
    metrics[protocol.NUM_EXAMPLES] = fitres.num_examples
    check_metrics(metrics, exchange.limits.hist_bins)
    claim = float(fitres.num_examples)
    bound = train_examples_bound(cfg, state.train_samples.get(node))
    if bound is not None and claim > bound:
        raise MalformedReply(
            f"{protocol.NUM_EXAMPLES!r} = {claim:g} exceeds {bound:g}, the most its roll call count and the run allow"
        )
    if bound is None and claim > cap:  # the weight is masked into the sum: it cannot be capped, only refused
        raise MalformedReply(
            f"{protocol.NUM_EXAMPLES!r} = {claim:g} exceeds {cap:g}, "
            "the most a site without a roll call count may claim"
        )
    return exchange.site_name(node), metrics


class SecureTrainWave:
    """The train wave under SecAgg+ (the phase that replaces ``PlainTrainWave`` when
    ``secure-aggregation`` is on): the same sampled sites, their updates summed under masks."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        sampled = state.strategy.configure_train(server_round, to_record(state.arrays), config, state.exchange.grid)
        secure_train_round(state, server_round, outcome, [m.metadata.dst_node_id for m in sampled])


def secure_train_round(state: RunState, server_round: int, outcome: RoundOutcome, nodes: list[int]) -> None:
    """One train wave under SecAgg+: every sampled site masks its change, the coordinator
    unmasks only the sum. Per-site training metrics (time, loss, epsilon) still arrive: they
    are aggregate statistics, not the update."""
    cfg, exchange = state.cfg, state.exchange
    names = list(state.arrays)
    config = {protocol.SERVER_ROUND: server_round, ARRAY_NAMES_KEY: "\n".join(names)}
    strategy = _RoundStrategy(nodes=nodes, config=config)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)  # type: ignore[arg-type]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([state.arrays[k] for k in names]), keep_input=True
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    workflow = SecAggPlusWorkflow(
        num_shares=cfg.secagg_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=expected_weight(state, nodes),
        clipping_range=cfg.secagg_clip_range,
        quantization_range=QUANTIZATION_RANGE,
        timeout=cfg.round_timeout,
    )
    grid = _WatchedGrid(exchange, outcome)
    t0 = time.monotonic()
    workflow(grid, legacy)  # type: ignore[arg-type]
    log.info("round %d: secure aggregation took %.1f s", server_round, time.monotonic() - t0)

    good: list[SiteReply] = []
    refused = False  # a site in the sum whose reply the coordinator refuses
    claims = [float(f.num_examples) for _, f in strategy.results if isinstance(f.num_examples, (int, float))]
    cap = unknown_site_cap(
        [b for s in state.train_samples.values() if (b := train_examples_bound(cfg, s)) is not None],
        [c for c in claims if c == c],  # NaN claims are refused below; the median is of the others
        cfg.batch_size,
    )
    for proxy, fitres in strategy.results:
        try:
            site, metrics = _checked_result(state, proxy.node_id, fitres, cap)
        except MalformedReply as exc:
            reason = f"malformed reply: {exc}"
        except Exception as exc:  # noqa: BLE001 - one site's reply, however broken, never ends the run
            reason = f"malformed reply: unreadable ({type(exc).__name__}: {printable(exc, 120)})"
        else:
            good.append(SiteReply(site, proxy.node_id, metrics, None, None))
            continue
        refused = True
        exchange.record_failure(
            outcome, server_round, "train", proxy.node_id, f"{reason} (its masked update is in this round's sum)"
        )
    in_sum = {proxy.node_id for proxy, _ in strategy.results}
    for node in nodes:
        if node not in in_sum:
            if node not in grid.errors:
                outcome.timed_out.add(node)
            reason = printable(grid.errors.get(node, TIMEOUT_REASON.format(cfg.round_timeout)))
            exchange.record_failure(outcome, server_round, "train", node, f"left secure aggregation: {reason}")
    outcome.sites_trained = [r.site for r in good]
    for r in good:
        state.store.append(server_round, "train", r.site, r.metrics)
        outcome.site_seconds[r.site] = float(r.metrics.get("train_seconds", 0.0))
    released = (
        strategy.mean_delta is not None
        and not refused
        and not too_few_trained(state, server_round, len(good), "site(s) in the secure sum")
    )
    if refused and strategy.mean_delta is not None:
        state.echo(
            f"  round {server_round}: the secure sum holds a reply the coordinator refused, and a masked update "
            "cannot be taken out of it; the global model is unchanged this round"
        )
    if strategy.mean_delta is None:
        state.echo(
            f"  round {server_round}: secure aggregation did not complete (too few sites answered every stage); "
            "the global model is unchanged this round"
        )
    if released:
        assert strategy.mean_delta is not None  # released implies it
        state.arrays = {k: _apply(state.arrays[k], d) for k, d in zip(names, strategy.mean_delta)}
    record_train_aggregate(state, server_round, good, released=released)
