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

Flower's workflow reads each stage's replies unchecked (``zip(strict=True)``, direct record
lookups, masked vectors added as they come): ``_WatchedGrid`` checks every stage reply against
what the workflow will read (check_stage_reply) and hands it a malformed one as that site's
error reply, so the workflow drops the site; an exception the workflow still raises fails that
round's secure aggregation (the model unchanged, the reason recorded), never the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedbreast.server.exchange import TIMEOUT_REASON, Exchange, RoundOutcome, SiteReply, array_bytes, to_record
from fedbreast.server.phases import RunState, record_train_aggregate, too_few_trained, train_messages
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
# A public key (PEM, 215 bytes), a ciphertext of two shares (612 bytes), a share (52 or 308 bytes):
# each at most this; a masked vector's element is an int64, and its .npy header at most this.
SECRET_BYTES, VECTOR_HEADER_BYTES = 4096, 1024


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


def _items(record: ConfigRecord, key: str, kind: type, stage: str) -> list[Any]:
    """``record[key]``, a list of ``kind`` (bool is no int), or MalformedReply naming the key."""
    if key not in record:
        raise MalformedReply(f"{stage} stage: no {key!r}")
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in value):
        raise MalformedReply(f"{stage} stage: {key!r} is not a list of {kind.__name__}")
    return value


def _secret(value: Any, key: str, stage: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > SECRET_BYTES:
        raise MalformedReply(f"{stage} stage: {key!r} is not bytes of at most {SECRET_BYTES}")
    return value


def _per_node(got: ConfigRecord, stage: str, nodes: tuple[str, str], secrets: tuple[str, str]) -> list[bytes]:
    """A list of node ids and a list of secrets (bytes of at most SECRET_BYTES), one a node
    (the workflow zips them with strict=True); returns the secrets."""
    (ids_key, ids_what), (key, what) = nodes, secrets
    ids, items = _items(got, ids_key, int, stage), _items(got, key, bytes, stage)
    if len(ids) != len(items):
        raise MalformedReply(f"{stage} stage: {len(ids)} {ids_what} ({ids_key!r}) and {len(items)} {what} ({key!r})")
    return [_secret(x, key, stage) for x in items]


def _named_among(got: ConfigRecord, stage: str, key: str, allowed: set[int], otherwise: str) -> None:
    ids = got[key]
    assert isinstance(ids, list)  # _per_node checked it
    if len(set(ids)) != len(ids) or not set(ids) <= allowed:
        raise MalformedReply(f"{stage} stage: {key!r} names a node twice or one {otherwise}")


def check_stage_reply(request: Message, reply: Message, node: int, sizes: list[int]) -> None:
    """Raise MalformedReply (naming the stage and the key) unless ``reply`` holds what Flower's
    SecAggPlusWorkflow (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py) reads
    from a reply to ``request``, of the kinds and lengths it assumes:

    - setup: ``pk1`` and ``pk2``, public keys;
    - share_keys: ``dsts`` (node ids among the neighbours the request named, each once) and
      ``ctxts`` (bytes), one ciphertext a destination;
    - collect_masked_vectors: ``masked_params``, one integer vector of the weight factor (1
      value) then one a model tensor (``sizes``: each tensor's number of values, flattened),
      and FitRes records Flower can read;
    - unmask: ``nids`` (among the active and dead nodes the request named, each once) and
      ``shares`` (bytes in Flower's share layout: a 4-byte index and 16-byte chunks), as many.

    No stage reply carries arrays: the masked vector travels as bytes."""
    if not reply.has_content():
        raise MalformedReply("no content")
    content = reply.content
    if got_bytes := sum(len(a.data) for rec in content.array_records.values() for a in rec.values()):
        raise MalformedReply(f"arrays of {got_bytes} bytes, expected none")
    asked = request.content.config_records[RECORD_KEY_CONFIGS]
    stage = str(asked[SecAggKey.STAGE])
    if RECORD_KEY_CONFIGS not in content.config_records:
        raise MalformedReply(f"{stage} stage: no {RECORD_KEY_CONFIGS!r} record")
    got = content.config_records[RECORD_KEY_CONFIGS]
    if stage == Stage.SETUP:
        for key in (SecAggKey.PUBLIC_KEY_1, SecAggKey.PUBLIC_KEY_2):
            try:
                bytes_to_public_key(_secret(got.get(key), key, stage))
            except MalformedReply:
                raise
            except Exception:  # noqa: BLE001 - whatever the key parser raises: not a key
                raise MalformedReply(f"{stage} stage: {key!r} is not a public key") from None
    elif stage == Stage.SHARE_KEYS:
        neighbours = {int(k) for k in asked if k != SecAggKey.STAGE} - {node}
        _per_node(got, stage, (SecAggKey.DESTINATION_LIST, "destinations"), (SecAggKey.CIPHERTEXT_LIST, "ciphertexts"))
        _named_among(got, stage, SecAggKey.DESTINATION_LIST, neighbours, "that is not its neighbour")
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        key = SecAggKey.MASKED_PARAMETERS
        vectors = _items(got, key, bytes, stage)
        expected = [1, *sizes]
        if len(vectors) != len(expected):
            raise MalformedReply(f"{stage} stage: {key!r} holds {len(vectors)} vectors, expected {len(expected)}")
        for i, (raw, n) in enumerate(zip(vectors, expected)):
            if len(raw) > 8 * n + VECTOR_HEADER_BYTES:  # before numpy reads it
                raise MalformedReply(f"{stage} stage: {key!r}[{i}] is {len(raw)} bytes, expected {n} int64 values")
            vector = bytes_to_ndarray(raw)
            if vector.shape != (n,) or vector.dtype.kind not in "iu":
                raise MalformedReply(
                    f"{stage} stage: {key!r}[{i}] is {vector.dtype} of shape {vector.shape}, expected {n} integers"
                )
        try:
            compat.recorddict_to_fitres(content, keep_input=True)
        except Exception as exc:  # noqa: BLE001 - what the workflow would raise on, named
            raise MalformedReply(
                f"{stage} stage: its FitRes records are unreadable ({type(exc).__name__}: {printable(exc, 120)})"
            ) from None
    elif stage == Stage.UNMASK:
        named = set(_items(asked, SecAggKey.ACTIVE_NODE_ID_LIST, int, stage))
        named |= set(_items(asked, SecAggKey.DEAD_NODE_ID_LIST, int, stage))
        shares = _per_node(got, stage, (SecAggKey.NODE_ID_LIST, "node ids"), (SecAggKey.SHARE_LIST, "shares"))
        _named_among(got, stage, SecAggKey.NODE_ID_LIST, named, "the request did not name")
        for share in shares:
            if len(share) < 20 or (len(share) - 4) % 16:
                raise MalformedReply(f"{stage} stage: {SecAggKey.SHARE_LIST!r} holds a share of {len(share)} bytes")


class _WatchedGrid:
    """The run's Grid, as the workflow sees it: replies are pulled every 0.1 s (not Flower's 3 s),
    error replies are remembered per node so a site that drops out is named, bytes are counted,
    and a stage reply the workflow could not read (check_stage_reply) reaches it as an error reply."""

    def __init__(self, exchange: Exchange, outcome: RoundOutcome, sizes: list[int]):
        self._exchange, self._outcome, self._sizes = exchange, outcome, sizes
        self.errors: dict[int, str | None] = {}  # node -> the error's reason (Flower's Error.reason is optional)

    def __getattr__(self, name: str):
        return getattr(self._exchange.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self._outcome.bytes_sent += sum(_payload_bytes(m) for m in messages)
        replies, by_msg_id = self._exchange.send_and_collect(messages)
        requests = {m.metadata.dst_node_id: m for m in messages}
        checked: list[Message] = []
        for reply in replies:
            node = by_msg_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in requests:  # pulled by the ids of what was sent: cannot happen, and is not used
                continue
            if reply.has_error():
                self.errors.setdefault(node, reply.error.reason)
                checked.append(reply)
                continue
            self._outcome.bytes_received += _payload_bytes(reply)
            try:
                check_stage_reply(requests[node], reply, node, self._sizes)
            except MalformedReply as exc:
                reason = f"malformed reply: {exc}"
            except Exception as exc:  # noqa: BLE001 - one site's reply, however broken, never ends the run
                reason = f"malformed reply: unreadable ({type(exc).__name__}: {printable(exc, 120)})"
            else:
                checked.append(reply)
                continue
            log.warning("secure aggregation: site %s: %s", self._exchange.site_name(node), reason)
            self.errors.setdefault(node, reason)
            # The workflow takes a node with an error reply for one that dropped out.
            checked.append(Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=requests[node]))
        return checked


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
        exchange.bind_name(node, name)
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


def _secure_round_failed(
    state: RunState, server_round: int, outcome: RoundOutcome, grid: _WatchedGrid, reason: str
) -> None:
    """The workflow raised: the sites that dropped out (an error, a malformed stage reply) are
    named, the round's failure is recorded under "ALL" with the reason, and the global model
    stays as it is."""
    exchange = state.exchange
    for node, why in grid.errors.items():
        exchange.record_failure(outcome, server_round, "train", node, f"left secure aggregation: {printable(why)}")
    why = f"secure aggregation failed: {reason}"
    outcome.failures["ALL"] = why
    exchange.store.append(server_round, "failure", "ALL", {"stage": "train", "reason": why})
    state.echo(f"  round {server_round} train: {why}; the global model is unchanged this round")
    record_train_aggregate(state, server_round, [], released=False)


class SecureTrainWave:
    """The train wave under SecAgg+ (the phase that replaces ``PlainTrainWave`` when
    ``secure-aggregation`` is on): the same sampled sites, their updates summed under masks."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        sampled = train_messages(state, server_round, to_record(state.arrays), config)
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
    grid = _WatchedGrid(exchange, outcome, [int(np.asarray(state.arrays[k]).size) for k in names])
    t0 = time.monotonic()
    try:
        workflow(grid, legacy)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - what a site sent made Flower's workflow raise: this round, not the run
        log.exception("round %d: secure aggregation failed", server_round)
        _secure_round_failed(state, server_round, outcome, grid, f"{type(exc).__name__}: {printable(exc, 200)}")
        return
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
    for node in sorted(in_sum & set(grid.errors)):  # in the sum, then out at the unmask stage: unmasked all the same
        state.echo(
            f"  round {server_round} train: site {exchange.site_name(node)} at the unmask stage: "
            f"{printable(grid.errors[node])} (its update is in the sum, unmasked from the others' shares)"
        )
    for node in nodes:
        if node not in in_sum:
            if node not in grid.errors:
                outcome.timed_out.add(node)
            reason = printable(grid.errors.get(node, TIMEOUT_REASON.format(cfg.round_timeout)))
            exchange.record_failure(outcome, server_round, "train", node, f"left secure aggregation: {reason}")
    outcome.sites_trained = [r.site for r in good]
    for r in good:
        state.store.append(server_round, "train", r.site, r.metrics)
        outcome.add_site_seconds(r.site, "train", r.metrics.get("train_seconds"))
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
