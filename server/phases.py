"""The phases of a federated round, composed by the round loop (server/federation.py).

A phase is a callable ``phase(state, server_round, outcome)`` over the run's shared
``RunState``: it talks to the sites through ``state.exchange``, may replace the global
model ``state.arrays``, and records what it saw in ``outcome`` and the run's metrics.

- ``PlainTrainWave``: every sampled site trains; each update is checked, optionally
  clipped, and aggregated by the run's strategy (and the family's after-train hook).
- ``SecureTrainWave`` (server/secure_aggregation.py): the same wave under SecAgg+.
- ``EvaluationWave``: every site evaluates the global model; pooled ROC from histograms.
- ``CrossSite`` (server/cross_site.py): after the last round, every model on every site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fedbreast.server.central_dp import CentralLedger
from fedbreast.server.exchange import Exchange, RoundOutcome, SiteReply, to_record
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.validation import check_update, clip_to_median_norm
from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.families import family_of
from fedbreast.shared.metrics import auc_binning_bound, default_bin_edges, pooled_auc_from_histograms, weighted_mean

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

    @property
    def store(self) -> MetricStore:
        return self.exchange.store

    @property
    def echo(self) -> Callable[[str], None]:
        return self.exchange.echo


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


def too_few_trained(state: RunState, server_round: int, trained: int, what: str) -> bool:
    """True, and says so, when fewer than min-train-sites updates can be released this round."""
    if trained >= state.cfg.min_train_sites:
        return False
    state.echo(
        f"  round {server_round}: {trained} {what}, fewer than min-train-sites "
        f"({state.cfg.min_train_sites}); the global model is unchanged this round"
    )
    return True


class PlainTrainWave:
    """Every sampled site trains on the global model; updates are checked before they are averaged."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        cfg, exchange = state.cfg, state.exchange
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        messages = state.strategy.configure_train(server_round, to_record(state.arrays), config, exchange.grid)
        good: list[SiteReply] = []
        for r in exchange.wave(messages, "train", server_round, outcome):
            if r.arrays is None:
                reason = "reply carried no model arrays"
            elif (problem := check_update(r.site, r.arrays, state.arrays)) is not None:
                reason = problem.reason
            else:
                good.append(r)
                state.store.append(server_round, "train", r.site, r.metrics)
                continue
            exchange.record_failure(outcome, server_round, "train", r.node_id, f"update dropped: {reason}")
        outcome.sites_trained = [r.site for r in good]
        for r in good:
            outcome.site_seconds[r.site] = float(r.metrics.get("train_seconds", 0.0))
        if too_few_trained(state, server_round, len(good), "usable update(s)"):
            record_train_aggregate(state, server_round, good, released=False)
            return
        if cfg.update_norm_bound > 0:  # model replacement: a scaled update is cut down before it is averaged
            self._clip_updates(state, server_round, good)
        if state.central_dp is not None:  # central DP: noise std sigma*C/k for the k sites actually averaged
            # build_strategy wraps the aggregation rule in Flower's central-DP strategy when dp = central
            assert isinstance(state.strategy, DifferentialPrivacyClientSideFixedClipping)
            state.strategy.num_sampled_clients = len(good)
        # Replies must share metric keys for Flower's aggregation; ours do by construction.
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
    def _clip_updates(state: RunState, server_round: int, good: list[SiteReply]) -> None:
        """Clip each update's change to update-norm-bound x the round's median change norm
        (server/validation.py); the clipped arrays replace the reply's before aggregation."""
        bound = state.cfg.update_norm_bound
        clipped_arrays, clipped = clip_to_median_norm([r.update for r in good], state.arrays, bound)
        for i, norm, limit in clipped:
            r = good[i]
            r.arrays = clipped_arrays[i]
            r.plain_message.content["arrays"] = to_record(r.arrays)
            log.warning("round %d train: site %s: update norm %.3g clipped to %.3g", server_round, r.site, norm, limit)
            state.echo(
                f"  round {server_round} train: site {r.site}: update norm {norm:.3g} clipped to {limit:.3g} "
                f"({bound:g} x the median)"
            )


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
        replies = exchange.wave(messages, "evaluate", server_round, outcome)
        outcome.sites_evaluated = [r.site for r in replies]
        for r in replies:
            # Histograms are aggregate counts (no per-patient score); kept for per-site ROC curves.
            state.store.append(server_round, "evaluate", r.site, r.metrics)
            outcome.site_seconds[r.site] = outcome.site_seconds.get(r.site, 0.0) + float(
                r.metrics.get("eval_seconds", 0.0)
            )
        if not replies:
            return
        scalar = [{k: v for k, v in r.metrics.items() if isinstance(v, (int, float))} for r in replies]
        agg = weighted_mean(
            scalar,
            weight_key=protocol.NUM_EXAMPLES,
            sum_keys=(protocol.NUM_EXAMPLES, "val_exams", "test_exams", "val_n", "test_n"),
        )
        edges = list(default_bin_edges(cfg.hist_bins))
        hists = [
            {"hist_pos": r.metrics["test_hist_pos"], "hist_neg": r.metrics["test_hist_neg"], "hist_edges": edges}
            for r in replies
            if "test_hist_pos" in r.metrics
        ]
        if hists and sum(sum(h["hist_pos"]) for h in hists) and sum(sum(h["hist_neg"]) for h in hists):
            agg["test_pooled_auc"] = pooled_auc_from_histograms(hists)
            agg["test_pooled_auc_binning_bound"] = auc_binning_bound(hists)
        agg["sites"] = len(replies)
        # A family may update the global model from aggregate evaluation counts (late fusion: MCC weights).
        state.arrays, family_agg = family_of(cfg.model).after_evaluate(state.arrays, [r.metrics for r in replies])
        agg.update(family_agg)
        outcome.aggregate = agg
        state.store.append(server_round, "aggregate", "ALL", agg)
