"""The site's side of SecAgg+ (see server/secure_aggregation.py).

Flower's ``secaggplus_mod`` speaks the legacy FitIns/FitRes format. ``secure_aggregation_mod``
passes every other message straight through; for a SecAgg+ train message it runs Flower's
mod, and at the masking stage turns the legacy FitIns back into our train message, runs the
ordinary train handler, and hands the mod the *change* to the global model to mask. Only
the masked vector and aggregate training metrics leave.

The checks the coordinator can no longer make on a masked update happen here, before
masking: a non-finite change, or one outside the quantisation range, is refused (the
site leaves this round's sum) rather than silently corrupting or clipping the average.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.secure_aggregation import ARRAY_NAMES_KEY, SITE_NAME_KEY

log = logging.getLogger("fedbreast.client")


class SecureAggregationRefused(FedbreastError, RuntimeError):
    """This site's change cannot go into the masked sum; the message names why."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    check_stage_request(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _train_for_secagg(m, c, call_next))


def check_stage_request(msg: Message, context: Context) -> None:
    """The coordinator chooses SecAgg+'s parameters and peer lists, and Flower's mod checks only
    their types. A coordinator that sets ``share_num = threshold = 1``, lists the site as its
    own only peer, or names one node both active and dead, gets back the very secret that masks
    the site's update. Refused here, before Flower's mod sees the stage:

    - setup: at least ``secagg-min-peers`` (site policy, default 3) share holders and a
      threshold of at least 2; a site that requires secure aggregation also demands a majority
      threshold (2 t > n), so that no split of the peers into "active" and "dead" halves can
      gather t shares of both secrets of one site;
    - share keys: exactly the ``share_num`` peers of the setup, this site among them;
    - unmask: no node both active and dead, this site not dead.
    """
    from fedbreast.client.policy import policy_of

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = str(configs.get(Key.STAGE, ""))
    policy = policy_of(context)
    min_peers = (
        policy.secagg_min_peers if policy is not None else 2
    )  # a simulation without a policy: only the degenerate case
    if stage == Stage.SETUP:
        n, t = _int(configs.get(Key.SHARE_NUMBER)), _int(configs.get(Key.THRESHOLD))
        if n < min_peers or t < 2:
            raise SecureAggregationRefused(
                f"secure aggregation: refused: share_num = {n}, threshold = {t}; this site shares its "
                f"secrets with at least secagg-min-peers = {min_peers} sites and a threshold of at least 2"
            )
        if policy is not None and policy.require_secure_aggregation and not 2 * t > n:
            raise SecureAggregationRefused(
                f"secure aggregation: refused: threshold {t} of {n} shares is not a majority "
                "(policy require-secure-aggregation)"
            )
        return
    state = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({}))
    me = msg.metadata.dst_node_id
    if stage == Stage.SHARE_KEYS:
        peers = [k for k in configs if k != Key.STAGE]
        expected = _int(state.get("share_num", 0))
        if len(peers) != expected or str(me) not in peers:
            raise SecureAggregationRefused(
                f"secure aggregation: refused: {len(peers)} peers' keys, the setup agreed {expected} "
                "including this site"
            )
    elif stage == Stage.UNMASK:
        active = {_int(n) for n in _list(configs.get(Key.ACTIVE_NODE_ID_LIST))}
        dead = {_int(n) for n in _list(configs.get(Key.DEAD_NODE_ID_LIST))}
        if active & dead or me in dead:
            raise SecureAggregationRefused(
                "secure aggregation: refused: a node listed both active and dead (or this site dead) "
                "would reveal both secrets of one site"
            )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecureAggregationRefused(f"secure aggregation: refused: expected an integer, got {value!r}")
    return value


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise SecureAggregationRefused(f"secure aggregation: refused: expected a list, got {type(value).__name__}")
    return value


def _train_for_secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Legacy FitIns in, our train handler in the middle, a FitRes holding the change out."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, ConfigRecordValues] = dict(fitins.config)
    names = str(config.pop(ARRAY_NAMES_KEY, "")).split("\n")
    received = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(received):
        raise SecureAggregationRefused(
            f"secure aggregation: {len(received)} arrays but {len(names)} names in the train message"
        )
    secagg_configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord(
                OrderedDict((n, Array(np.require(a, requirements="C"))) for n, a in zip(names, received))
            ),
            "config": ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    msg.content.config_records[RECORD_KEY_CONFIGS] = secagg_configs  # the mod reads its stage config back afterwards
    if reply.has_error():
        return reply
    content = reply.content
    site = content["site"] if "site" in content.config_records else ConfigRecord({})
    if str(site.get("status", "ok")) != "ok":
        raise SecureAggregationRefused(f"unable: {site.get('reason', '')}")
    trained = {k: v.numpy() for k, v in protocol.array_record(content, "arrays").items()}
    clip = float(context.run_config.get("secagg-clip-range", RunConfig.secagg_clip_range))
    # Flat: Flower's unmasking offsets each array in place, which a 0-d array (a step counter) escapes.
    delta = [change(n, trained[n], base, clip).reshape(-1) for n, base in zip(names, received)]
    metrics: dict[str, ConfigRecordValues] = dict(next(iter(content.metric_records.values()), {}))
    num_examples = protocol.record_int(metrics.pop("num-examples", 0))
    metrics[SITE_NAME_KEY] = str(site.get("name", ""))
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(delta),
        num_examples,
        metrics,  # type: ignore[arg-type]  # typed as scalars; fitres_to_recorddict makes a ConfigRecord, lists too
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def change(name: str, trained: np.ndarray, received: np.ndarray, clip: float) -> np.ndarray:
    """The site's change to one array, checked the way the coordinator checks a plain update."""
    if trained.shape != received.shape:
        raise SecureAggregationRefused(
            f"secure aggregation: {name} has shape {trained.shape}, the global model {received.shape}"
        )
    delta = trained.astype(np.float64) - received.astype(np.float64)
    if not np.isfinite(delta).all():
        raise SecureAggregationRefused(f"secure aggregation: the update of {name} is not finite; not sent")
    if np.issubdtype(received.dtype, np.integer):
        # BatchNorm's step counter (unused with a momentum set): masked like the rest, clipped
        # here rather than by the quantiser, rounded back at the coordinator.
        return np.clip(delta, -clip, clip).astype(np.float32)
    worst = float(np.abs(delta).max(initial=0.0))
    if worst > clip:
        raise SecureAggregationRefused(
            f"secure aggregation: {name} changed by {worst:.3g}, beyond secagg-clip-range {clip:g}; "
            "raise secagg-clip-range or lower the learning rate"
        )
    return delta.astype(np.float32)
