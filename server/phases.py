"""The phases of a federated round, composed by the round loop (server/federation.py).

A phase is a callable ``phase(state, server_round, outcome)`` over the run's shared
``RunState``: it talks to the sites through ``state.exchange``, may replace the global
model ``state.arrays``, and records what it saw in ``outcome`` and the run's metrics.

- ``PlainTrainWave``: every sampled site trains; each update is checked, its claimed
  ``num-examples`` held to what the roll call makes plausible, clipped (by default to 3 x
  the round's median change norm), and aggregated by the run's strategy (and the family's
  after-train hook).
- ``SecureTrainWave`` (server/secure_aggregation.py): the same wave under SecAgg+.
- ``EvaluationWave``: every site evaluates the global model; pooled ROC from histograms
  (of mixed resolution: pooled at their common one), and the federated operating point
  (Youden's J on the pooled validation histograms; each site's test metrics at it).
- ``CrossSite`` (server/cross_site.py): after the last round, every model on every site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fedbreast.server.central_dp import CentralLedger
from fedbreast.server.exchange import Exchange, RoundOutcome, SiteReply, to_record
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.reply_checks import (
    VAL_HIST_KEYS,
    MalformedReply,
    check_hist_total,
    printable,
    roll_call_caps,
    shown,
    train_examples_bound,
    unknown_site_cap,
)
from fedbreast.server.validation import check_update, clip_to_median_norm, clip_to_norm
from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.families import family_of
from fedbreast.shared.metrics import (
    CONFUSION_METRIC_KEYS,
    auc_binning_bound,
    federated_operating_point,
    pool_histograms,
    pooled_auc_from_histograms,
    weighted_mean,
)
from fedbreast.shared.training.accounting import CENTRAL_WEIGHT_KEY
from fedbreast.shared.update_encoding import FP32, EncodingError, decode_update, payload_bytes

log = logging.getLogger("fedbreast.server")


@dataclass
class RunState:
    """What every phase of a run reads and writes."""

    cfg: RunConfig
    exchange: Exchange
    strategy: Strategy
    arrays: dict[str, np.ndarray]  # the global model: a phase replaces the dict, never mutates it
    central_dp: CentralLedger | None = None  # the coordinator's epsilon when dp = central
    train_samples: dict[int, int] = field(default_factory=dict)  # node id -> training samples (roll call)
    test_exams: dict[int, int] = field(default_factory=dict)  # node id -> test exams (roll call)
    val_exams: dict[int, int] = field(default_factory=dict)  # node id -> validation exams (roll call)
    # node id -> the most its roll-call count weighs (reply_checks.roll_call_caps), for capped sites only
    train_samples_cap: dict[int, int] = field(default_factory=dict)
    test_exams_cap: dict[int, int] = field(default_factory=dict)
    # sites kept out of training (``holdout-site``): evaluated every round, never sent a train message
    holdout_sites: frozenset[str] = frozenset()

    def weighed_samples(self, node: int) -> int | None:
        """The site's roll-call ``train_samples`` as its weight sees them: capped (None: uncounted)."""
        return _capped(self.train_samples.get(node), self.train_samples_cap.get(node))

    def weighed_exams(self, node: int) -> int | None:
        """The site's roll-call ``test_exams`` as its weight sees them: capped (None: uncounted)."""
        return _capped(self.test_exams.get(node), self.test_exams_cap.get(node))

    @property
    def store(self) -> MetricStore:
        return self.exchange.store

    @property
    def echo(self) -> Callable[[str], None]:
        return self.exchange.echo


def _capped(count: int | None, cap: int | None) -> int | None:
    return count if count is None or cap is None else min(count, cap)


class TrainingGrid:
    """The grid as a train wave's sampling sees it: without the held-out sites' nodes, and, while
    a site is held out, without any node that has not yet answered under a name (it could be the
    held-out site). Everything else is the run's grid."""

    def __init__(self, grid: Any, excluded: set[int]) -> None:
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def train_messages(state: RunState, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
    """The strategy's train messages for the round; a held-out site's node is never sampled (the
    strategy samples from a TrainingGrid, and waits for no more sites than it may sample)."""
    grid = state.exchange.grid
    if not state.holdout_sites:
        return list(state.strategy.configure_train(server_round, arrays, config, grid))
    names = state.exchange.names
    excluded = {n for n in grid.get_node_ids() if names.get(n, "") in state.holdout_sites or n not in names}
    training = TrainingGrid(grid, excluded)
    eligible = len(training.get_node_ids())
    if eligible == 0:
        state.echo(f"  round {server_round}: no site may train (held out: {', '.join(sorted(state.holdout_sites))})")
        return []
    strategy: Any = state.strategy
    while strategy is not None:  # Flower's DP wrappers hold the aggregation rule as .strategy
        for attr in ("min_available_nodes", "min_train_nodes"):
            if isinstance(getattr(strategy, attr, None), int):
                setattr(strategy, attr, min(getattr(strategy, attr), eligible))
        strategy = getattr(strategy, "strategy", None)
    messages = list(state.strategy.configure_train(server_round, arrays, config, training))  # type: ignore[arg-type]
    assert not {m.metadata.dst_node_id for m in messages} & excluded, "a held-out site was sampled for training"
    return messages


class Phase(Protocol):
    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None: ...


def record_train_aggregate(state: RunState, server_round: int, good: list[SiteReply], released: bool) -> None:
    """One "aggregate-train" row: means over sites, but privacy budgets (dp_epsilon, dp_delta)
    by maximum: the federation's guarantee is that of its worst site, never the average."""
    if not good:
        return
    scalar = [{k: v for k, v in r.metrics.items() if isinstance(v, (int, float))} for r in good]
    agg = weighted_mean(scalar, weight_key=protocol.NUM_EXAMPLES, sum_keys=(protocol.NUM_EXAMPLES, "train_steps"))
    if state.central_dp is not None:
        agg.update(state.central_dp.record(released))
    agg["sites"] = len(good)
    state.store.append(server_round, "aggregate-train", "ALL", agg)


def weigh_claims(
    state: RunState,
    server_round: int,
    outcome: RoundOutcome,
    phase: str,
    replies: list[SiteReply],
    bound_of: Callable[[int], tuple[float, str] | None],
    known_bounds: list[float],
    extra: float,
    weight_of: Callable[[int], float | None] = lambda _node: None,
) -> list[SiteReply]:
    """Hold each reply's ``num-examples`` (its weight in every mean) to what the roll call makes
    plausible. A site the roll call counted that claims more is dropped for the round, the
    reason naming both numbers; ``bound_of(node)`` gives (bound, what it rests on), or None
    for a site the roll call did not count, whose weight is capped instead
    (reply_checks.unknown_site_cap): it keeps its update but can outweigh no counted site.
    ``weight_of(node)``: the most a counted site weighs when its roll-call count was capped
    (reply_checks.roll_call_caps), None otherwise; a larger claim keeps the reply at that weight."""
    kept: list[SiteReply] = []
    unknown: list[SiteReply] = []
    for r in replies:
        claim = float(r.metrics[protocol.NUM_EXAMPLES])
        known = bound_of(r.node_id)
        if known is None:
            unknown.append(r)
        elif claim > known[0]:
            state.exchange.record_failure(
                outcome,
                server_round,
                phase,
                r.node_id,
                f"malformed reply: {protocol.NUM_EXAMPLES!r} = {claim:g} exceeds {known[0]:g}, "
                f"the most plausible ({known[1]})",
            )
            continue
        elif (limit := weight_of(r.node_id)) is not None and claim > limit:
            r.metrics[protocol.NUM_EXAMPLES] = int(limit)
            log.warning(
                "round %d %s: site %s: num-examples %g weighed as %d (its roll-call count is capped)",
                server_round,
                phase,
                r.site,
                claim,
                int(limit),
            )
        kept.append(r)
    if unknown:
        cap = unknown_site_cap(known_bounds, [float(r.metrics[protocol.NUM_EXAMPLES]) for r in kept], extra)
        for r in unknown:
            claim = float(r.metrics[protocol.NUM_EXAMPLES])
            if claim > cap:
                r.metrics[protocol.NUM_EXAMPLES] = int(cap)
                log.warning(
                    "round %d %s: site %s: num-examples %g capped at %d", server_round, phase, r.site, claim, cap
                )
                state.echo(
                    f"  round {server_round} {phase}: site {r.site}: {protocol.NUM_EXAMPLES} {claim:g} capped at "
                    f"{int(cap)} (the roll call has no count for this site)"
                )
    return kept


def train_bound_of(state: RunState) -> Callable[[int], tuple[float, str] | None]:
    """A site's most plausible train ``num-examples`` and what it rests on (weigh_claims)."""
    cfg = state.cfg

    def bound_of(node: int) -> tuple[float, str] | None:
        samples = state.train_samples.get(node)
        bound = train_examples_bound(cfg, samples)
        if bound is None:
            return None
        if cfg.local_steps > 0:
            return bound, f"{cfg.local_steps} local steps x batch-size {cfg.batch_size}, with slack"
        return (
            bound,
            f"its {samples} training samples at the roll call x {max(cfg.local_epochs, 1)} epoch(s), with slack",
        )

    return bound_of


def train_weight_of(state: RunState) -> Callable[[int], float | None]:
    """The most a site whose roll-call ``train_samples`` were capped weighs in a train round:
    local-epochs passes over the capped count (weigh_claims). With local-steps every site's
    bound is the same already."""
    cfg = state.cfg

    def weight_of(node: int) -> float | None:
        cap = state.train_samples_cap.get(node)
        if cap is None or cfg.local_steps > 0:
            return None
        return float(max(cfg.local_epochs, 1) * cap)

    return weight_of


def too_few_trained(state: RunState, server_round: int, trained: int, what: str) -> bool:
    """True, and says so, when fewer than min-train-sites updates can be released this round."""
    if trained >= state.cfg.min_train_sites:
        return False
    state.echo(
        f"  round {server_round}: {trained} {what}, fewer than min-train-sites "
        f"({state.cfg.min_train_sites}); the global model is unchanged this round"
    )
    return True


UPDATE_BYTES = "update_bytes"  # a train row's: the bytes of its update's values as received (the coordinator's count)


def decode_reply(state: RunState, r: SiteReply) -> str | None:
    """Decode a train reply's update (run config ``update-encoding``, shared/update_encoding.py)
    against the global model sent, so every check and the aggregation after it see the model's own
    dtypes; record the update's bytes as received (UPDATE_BYTES, overriding any the site claims).
    Returns why a malformed encoding is dropped (naming the tensor), or None."""
    if r.arrays is None:
        return None  # _problem names it
    r.metrics[UPDATE_BYTES] = payload_bytes(r.arrays)
    encoding = state.cfg.update_encoding
    if encoding == FP32:
        return None  # the weights as sent: nothing to decode
    try:
        r.arrays = decode_update(r.arrays, state.arrays, encoding)
    except EncodingError as exc:
        return f"malformed reply: update-encoding {encoding}: {exc}"
    r.plain_message.content[protocol.ARRAYS] = to_record(r.arrays)  # what Flower's strategy aggregates
    return None


class PlainTrainWave:
    """Every sampled site trains on the global model; updates are checked before they are averaged."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        cfg, exchange = state.cfg, state.exchange
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        messages = train_messages(state, server_round, to_record(state.arrays), config)
        checked: list[SiteReply] = []
        for r in exchange.wave(messages, "train", server_round, outcome, carries_model=True):
            reason = decode_reply(state, r) or self._problem(state, r)
            if reason is None:
                checked.append(r)
            else:
                exchange.record_failure(outcome, server_round, "train", r.node_id, reason)
        known = [
            b for n in state.train_samples if (b := train_examples_bound(cfg, state.weighed_samples(n))) is not None
        ]
        good = weigh_claims(
            state,
            server_round,
            outcome,
            "train",
            checked,
            train_bound_of(state),
            known,
            extra=cfg.batch_size,
            weight_of=train_weight_of(state),
        )
        for r in good:
            state.store.append(server_round, "train", r.site, r.metrics)
        outcome.sites_trained = [r.site for r in good]
        for r in good:
            outcome.add_site_seconds(r.site, "train", r.metrics.get("train_seconds"))
        if too_few_trained(state, server_round, len(good), "usable update(s)"):
            record_train_aggregate(state, server_round, good, released=False)
            return
        multiple = cfg.median_norm_multiple
        if multiple > 0:  # model replacement: a scaled update is cut down before it is averaged
            clipped_arrays, clipped = clip_to_median_norm([r.update for r in good], state.arrays, multiple)
            self._apply_clips(state, server_round, good, clipped_arrays, clipped, f"{multiple:g} x the median")
        weight_keys: tuple[str, ...] = (protocol.NUM_EXAMPLES,)
        if state.central_dp is not None:  # central DP: noise std sigma*C/k for the k sites actually averaged
            # The noise assumes every change is within dp-max-grad-norm: enforced here, not trusted.
            clipped_arrays, clipped = clip_to_norm([r.update for r in good], state.arrays, cfg.dp_max_grad_norm)
            self._apply_clips(state, server_round, good, clipped_arrays, clipped, "dp-max-grad-norm")
            # build_strategy wraps the aggregation rule in Flower's central-DP strategy when dp = central
            assert isinstance(state.strategy, DifferentialPrivacyClientSideFixedClipping)
            state.strategy.num_sampled_clients = len(good)
            weight_keys = (protocol.NUM_EXAMPLES, CENTRAL_WEIGHT_KEY)
        if not any(float(r.metrics[weight_keys[-1]]) > 0 for r in good):  # a weighted mean of nothing
            state.echo(
                f"  round {server_round}: every usable update weighs 0; the global model is unchanged this round"
            )
            record_train_aggregate(state, server_round, good, released=False)
            return
        for r in good:  # Flower's aggregation sees the model and the weights only (see aggregation_content)
            r.plain_message.content = aggregation_content(r, weight_keys)
        agg, _ = state.strategy.aggregate_train(server_round, [r.plain_message for r in good])
        if agg is not None:
            # Averaging turns integer buffers (BatchNorm's num_batches_tracked) into floats: cast back.
            before = state.arrays
            averaged = {k: np.asarray(v.numpy()).astype(before[k].dtype) for k, v in agg.items()}
            # Branches only some sites train (mgus' ultrasound net, late fusion's CESM nets) average over those sites.
            state.arrays = family_of(cfg.model).after_train(
                cfg, before, averaged, [(r.update, r.metrics) for r in good]
            )
        record_train_aggregate(state, server_round, good, released=agg is not None)

    @staticmethod
    def _problem(state: RunState, r: SiteReply) -> str | None:
        """Why a train reply cannot be aggregated (server/validation.py's checks on the update, the
        central-DP weight), or None."""
        if r.arrays is None:
            return "update dropped: reply carried no model arrays"
        if (problem := check_update(r.site, r.arrays, state.arrays)) is not None:
            return f"update dropped: {problem.reason}"
        if state.central_dp is not None and r.metrics.get(CENTRAL_WEIGHT_KEY) != 1:
            # Flower's central-DP mean is weighted by this key: any other value would outweigh the rest.
            return (
                f"malformed reply: {CENTRAL_WEIGHT_KEY!r} = {shown(r.metrics.get(CENTRAL_WEIGHT_KEY))}, "
                "central DP weighs every site 1"
            )
        return None

    @staticmethod
    def _apply_clips(
        state: RunState,
        server_round: int,
        good: list[SiteReply],
        clipped_arrays: list[dict[str, np.ndarray]],
        clipped: list[tuple[int, float, float]],
        why: str,
    ) -> None:
        """The clipped updates (server/validation.py) replace the replies' before aggregation."""
        for i, norm, limit in clipped:
            r = good[i]
            r.arrays = clipped_arrays[i]
            r.plain_message.content["arrays"] = to_record(r.arrays)
            log.warning("round %d train: site %s: update norm %.3g clipped to %.3g", server_round, r.site, norm, limit)
            state.echo(
                f"  round {server_round} train: site {r.site}: update norm {norm:.3g} clipped to {limit:.3g} ({why})"
            )


def aggregation_content(r: SiteReply, weight_keys: tuple[str, ...]) -> RecordDict:
    """A train reply's content as Flower's strategy aggregates it: the model and the weights only.

    Flower averages every metric too and raises (ending the run) when the replies' metric keys,
    list lengths or record counts differ; one site could make them differ. Its metric mean is
    not used (record_train_aggregate averages the checked metrics), so it gets none of them.
    """
    arrays = r.plain_message.content.array_records[protocol.ARRAYS]
    return RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord({k: r.metrics[k] for k in weight_keys})})


POOLED_AUC_UNAVAILABLE = "test_pooled_auc_unavailable"  # the round's aggregate: why it has no pooled AUC


def pooled_auc(hists: list[dict[str, list]]) -> dict[str, float]:
    """The pooled test AUC, its binning bound and resolution of the sites' histograms (checked on
    arrival: reply_checks.check_histograms, held_to_test_exams). A site may send fewer bins (its
    policy caps them): pooled at the common resolution. Empty when a class is absent overall;
    ValueError when the histograms share no resolution finer than one bin."""
    pooled = pool_histograms(hists)
    if not (sum(pooled["hist_pos"]) and sum(pooled["hist_neg"])):
        return {}
    return {
        "test_pooled_auc": pooled_auc_from_histograms([pooled]),
        "test_pooled_auc_binning_bound": auc_binning_bound([pooled]),
        "test_pooled_hist_bins": len(pooled["hist_pos"]),
    }


def held_to_test_exams(
    state: RunState, server_round: int, outcome: RoundOutcome, replies: list[SiteReply]
) -> list[SiteReply]:
    """Drop an evaluate reply whose score histograms count more than its roll-call ``test_exams``
    allow (reply_checks.hist_total_bound), or whose validation histograms more than its
    ``val_exams`` (:func:`val_exams_bound`); a site the roll call did not count is held to the
    largest counted site's (capped) count, and to none when the roll call counted no site."""
    known = [e for n in state.test_exams if (e := state.weighed_exams(n)) is not None]
    kept = []
    for r in replies:
        exams = state.test_exams.get(r.node_id, max(known) if known else None)
        val = val_exams_bound(state, r.node_id)
        try:
            if exams is not None:
                check_hist_total(r.metrics, exams)
            if val is not None:
                check_hist_total(r.metrics, val, VAL_HIST_KEYS)
        except MalformedReply as exc:
            state.exchange.record_failure(outcome, server_round, "evaluate", r.node_id, f"malformed reply: {exc}")
            continue
        kept.append(r)
    return kept


def val_exams_bound(state: RunState, node: int) -> int | None:
    """The validation exams a site's validation histograms may count, as for the test ones
    (held_to_test_exams): its own roll-call ``val_exams``; a site the roll call did not count is
    held to the largest counted site's, capped like the test counts (reply_checks.roll_call_caps),
    and to none when the roll call counted no site."""
    if node in state.val_exams:
        return state.val_exams[node]
    caps = {n: cap for n, (cap, _) in roll_call_caps(state.val_exams).items()}
    known = [min(c, caps.get(n, c)) for n, c in state.val_exams.items()]
    return max(known) if known else None


THRESHOLD_UNAVAILABLE = "fed_threshold_unavailable"  # the round's aggregate: why there is no federated cut-off


def local_threshold_allowed(metrics: dict[str, Any], min_units: int) -> tuple[bool, str]:
    """Whether a site's own Youden cut-off may stand for it: its validation split holds at least
    ``min_units`` units (``min-val-for-local-threshold``) and at least a quarter of that of each
    class (RunConfig's comment says why); the reason in words either way."""
    per_class = -(-min_units // 4)
    try:
        n, n_pos, n_neg = (int(metrics.get(f"val_{k}") or 0) for k in ("n", "n_pos", "n_neg"))
    except (TypeError, ValueError, OverflowError):
        n = n_pos = n_neg = 0
    said = f"validation {n} units ({n_pos} malignant, {n_neg} benign)"
    if n >= min_units and min(n_pos, n_neg) >= per_class:
        return True, f"{said}: at least {min_units}, {per_class} a class"
    return False, f"{said}: below {min_units}, {per_class} a class (min-val-for-local-threshold)"


def operating_points(
    state: RunState, server_round: int, replies: list[SiteReply]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The federated cut-off (Youden's J on the sum of the sites' validation histograms, a bin
    edge: shared/metrics/operating_point.py) and, per site, its test metrics at that cut-off from
    its own test histogram (exact at a bin edge: no second message to the sites), and which
    cut-off the report uses for it: its own when its validation split is large enough
    (:func:`local_threshold_allowed`), else the federated one. Returns the aggregate's keys and
    each site's (all ``fed_*``); the histograms were checked on arrival (reply_checks)."""
    val = {
        r.site: {"hist_pos": r.metrics[VAL_HIST_KEYS[0]], "hist_neg": r.metrics[VAL_HIST_KEYS[1]]}
        for r in replies
        if VAL_HIST_KEYS[0] in r.metrics
    }
    test = {
        r.site: {"hist_pos": r.metrics["test_hist_pos"], "hist_neg": r.metrics["test_hist_neg"]}
        for r in replies
        if "test_hist_pos" in r.metrics
    }
    agg: dict[str, Any] = {}
    at_fed: dict[str, dict[str, float]] = {}
    try:
        pooled, at_fed = federated_operating_point(val, test)
        agg = {f"fed_{k}" if k == "threshold" else f"fed_threshold_{k}": v for k, v in pooled.items()}
    except Exception as exc:  # noqa: BLE001 - the cut-off is one number of the round, never the round
        if not isinstance(exc, ValueError):
            log.exception("round %d: the federated operating point failed", server_round)
        reason = printable(f"{type(exc).__name__}: {exc}")
        state.echo(f"  round {server_round} evaluate: no federated cut-off: {reason}")
        agg[THRESHOLD_UNAVAILABLE] = reason
    per_site: dict[str, dict[str, Any]] = {}
    for r in replies:
        local_ok, why = local_threshold_allowed(r.metrics, state.cfg.min_val_for_local_threshold)
        row: dict[str, Any] = {}
        fed = at_fed.get(r.site)
        if fed is not None:
            row["fed_threshold"] = fed["threshold"]
            row.update({f"fed_test_{k}": fed[k] for k in CONFUSION_METRIC_KEYS})
        if not local_ok and fed is not None:
            row.update(fed_threshold_source="federated", fed_threshold_used=fed["threshold"])
        else:  # large enough for its own; or too small, but there is no federated one for it: said so
            row.update(fed_threshold_source="local", fed_threshold_used=r.metrics.get("test_threshold"))
            if not local_ok:
                why += "; no federated cut-off for this site"
        row["fed_threshold_reason"] = why
        per_site[r.site] = row
    return agg, per_site


class EvaluationWave:
    """Every site evaluates the global model; the coordinator pools aggregate metrics only."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        cfg, exchange = state.cfg, state.exchange
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        messages = state.strategy.configure_evaluate(server_round, to_record(state.arrays), config, exchange.grid)
        # A site that missed the train wave's timeout is still busy with (or lost) that message: an
        # evaluate message would only queue behind it and hold the round for a second timeout.
        for node in {m.metadata.dst_node_id for m in messages} & outcome.timed_out:
            exchange.record_failure(
                outcome, server_round, "evaluate", node, "skipped: no train reply within the round timeout"
            )
        messages = [m for m in messages if m.metadata.dst_node_id not in outcome.timed_out]
        replies = weigh_claims(
            state,
            server_round,
            outcome,
            "evaluate",
            exchange.wave(messages, "evaluate", server_round, outcome),
            lambda node: (
                (float(state.test_exams[node]), "its test_exams at the roll call") if node in state.test_exams else None
            ),
            [float(state.weighed_exams(n) or 0) for n in state.test_exams],
            extra=0.0,
            weight_of=lambda node: None if (cap := state.test_exams_cap.get(node)) is None else float(cap),
        )
        replies = held_to_test_exams(state, server_round, outcome, replies)
        outcome.sites_evaluated = [r.site for r in replies]
        fed_agg, fed_sites = operating_points(state, server_round, replies) if replies else ({}, {})
        for r in replies:
            # Histograms are aggregate counts (no per-patient score); kept for per-site ROC curves.
            # The coordinator's operating-point values (fed_*) join the site's row.
            state.store.append(server_round, "evaluate", r.site, {**r.metrics, **fed_sites.get(r.site, {})})
            outcome.add_site_seconds(r.site, "evaluate", r.metrics.get("eval_seconds"))
        if not replies:
            return
        scalar = [{k: v for k, v in r.metrics.items() if isinstance(v, (int, float))} for r in replies]
        agg = weighted_mean(
            scalar,
            weight_key=protocol.NUM_EXAMPLES,
            sum_keys=(protocol.NUM_EXAMPLES, "val_exams", "test_exams", "val_n", "test_n"),
        )
        # Checked on arrival (reply_checks.check_histograms): counts, of hist-bins or a divisor of it.
        hists = [
            {"hist_pos": r.metrics["test_hist_pos"], "hist_neg": r.metrics["test_hist_neg"]}
            for r in replies
            if "test_hist_pos" in r.metrics
        ]
        if hists:
            try:
                agg.update(pooled_auc(hists))
            except Exception as exc:  # noqa: BLE001 - the pooled AUC is one number of the round, never the round
                if not isinstance(exc, ValueError):
                    log.exception("round %d: the pooled test AUC failed", server_round)
                reason = printable(f"{type(exc).__name__}: {exc}")
                state.echo(f"  round {server_round} evaluate: no pooled test AUC: {reason}")
                agg[POOLED_AUC_UNAVAILABLE] = reason  # type: ignore[assignment]  # a reason among the numbers
        agg.update(fed_agg)
        agg["sites"] = len(replies)
        # A family may update the global model from aggregate evaluation counts (late fusion: MCC weights).
        try:
            state.arrays, family_agg = family_of(cfg.model).after_evaluate(state.arrays, [r.metrics for r in replies])
        except Exception as exc:  # noqa: BLE001 - family counts from the sites (of a wrong shape) never end the run
            log.exception("round %d: the family's after-evaluate hook failed", server_round)
            state.echo(
                f"  round {server_round} evaluate: {cfg.model}'s after-evaluate update skipped "
                f"({type(exc).__name__}: {exc}); the global model is unchanged by it"
            )
            family_agg = {}
        agg.update(family_agg)
        outcome.aggregate = agg
        state.store.append(server_round, "aggregate", "ALL", agg)
