"""The coordinator's round loop: train, validate updates, aggregate, evaluate, keep every site.

We drive Flower strategies' configure/aggregate steps ourselves rather than calling
``Strategy.start`` because the product needs what ``start`` does not give: resuming at
round k from a checkpoint, dropping a bad update (NaN, wrong shape) with the site named
before it can poison the average, sites that answer "unable" instead of failing the
round, per-site metrics written as they arrive, and a clean stop when too few sites come.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from fedbreast.server.central_dp import CentralLedger
from fedbreast.server.checkpoints import check_resumable, load_checkpoint, save_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.secure_aggregation import secure_train_round
from fedbreast.server.strategies import build_strategy
from fedbreast.server.validation import check_update, clip_to_median_norm
from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.families import family_of
from fedbreast.shared.metrics import auc_binning_bound, pooled_auc_from_histograms, weighted_mean

log = logging.getLogger("fedbreast.server")

HIST_KEYS = ("test_hist_pos", "test_hist_neg")
TIMEOUT_REASON = "no reply within the round timeout ({:.0f} s)"
POLL_SECONDS = 0.1  # replies are pulled from the local SuperLink; polling is cheap


class FederationStopped(FedbreastError, RuntimeError):
    """The run stopped cleanly for a reason the coordinator must read (too few sites...)."""


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

    @property
    def slowest_site_seconds(self) -> float:
        return max(self.site_seconds.values(), default=0.0)


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def array_bytes(message: Message) -> int:
    return (
        sum(len(a.data) for rec in message.content.array_records.values() for a in rec.values())
        if message.has_content()
        else 0
    )


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray would turn 0-d tensors (BatchNorm step counters) into shape (1,).
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


class FederatedRun:
    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path, initial: dict[str, np.ndarray], echo=print):
        self.grid, self.cfg, self.run_dir = grid, cfg, Path(run_dir)
        self.store = MetricStore(self.run_dir)
        self.strategy = build_strategy(cfg)
        self.central_dp = CentralLedger(self.run_dir, cfg) if cfg.dp == "central" else None  # the coordinator's epsilon
        self.names: dict[int, str] = {}  # node id -> site name, learned from replies
        self.train_samples: dict[int, int] = {}  # node id -> training samples, from the roll call
        self.echo = echo
        self.arrays = initial
        self.start_round = 1
        self.best_value: float | None = None
        self.history: list[RoundOutcome] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending_checkpoint: Future | None = None
        self._resume()

    # ---- checkpoints and resume -----------------------------------------------------------
    def _resume(self) -> None:
        ckpt = load_checkpoint(self.run_dir, "latest")
        if ckpt is None:
            return
        check_resumable(ckpt, self.cfg.model_signature(), str(self.run_dir / "checkpoints" / "latest.pt"))
        self.arrays = ckpt.arrays
        self.start_round = ckpt.round + 1
        dropped = self.store.truncate_after(ckpt.round)
        best = load_checkpoint(self.run_dir, "best")
        if best is not None:
            self.best_value = best.meta.get("key_value")
        self.echo(
            f"resuming from {self.run_dir / 'checkpoints' / 'latest.pt'} at round {self.start_round}"
            + (f" ({dropped} metric rows of the interrupted round discarded)" if dropped else "")
        )

    def _meta(self, server_round: int, aggregate: dict[str, float]) -> dict[str, Any]:
        return {
            "round": server_round,
            "config": self.cfg.to_flower(),
            "model_signature": self.cfg.model_signature(),
            "metrics": {k: v for k, v in aggregate.items() if isinstance(v, (int, float))},
            "key_metric": self.cfg.key_metric,
            "key_value": aggregate.get(self.cfg.key_metric),
            "time": time.time(),
        }

    def _checkpoint(self, server_round: int, aggregate: dict[str, float]) -> None:
        """Write best (if improved) then latest on a background thread, so the next round's
        messages go out while the disk works; one write at a time keeps them in order."""
        meta = self._meta(server_round, aggregate)
        kinds = []
        value = aggregate.get(self.cfg.key_metric)
        if value is not None and math.isfinite(value):
            better = self.best_value is None or (
                value < self.best_value if self.cfg.key_metric == "val_loss" else value > self.best_value
            )
            if better:
                self.best_value = value
                kinds.append("best")
        # latest last: a crash between the two never leaves "latest" ahead of "best"
        kinds.append("latest")
        self._flush_checkpoints()
        arrays = self.arrays  # aggregation replaces the dict, never mutates it: safe to hand over
        self._pending_checkpoint = self._writer.submit(
            lambda: [save_checkpoint(self.run_dir, k, arrays, meta) for k in kinds]
        )

    def _flush_checkpoints(self) -> None:
        """Wait for the checkpoint being written; a failed write surfaces here, not silently."""
        if self._pending_checkpoint is not None:
            self._pending_checkpoint.result()
            self._pending_checkpoint = None

    # ---- sites ------------------------------------------------------------------------------
    def wait_for_sites(self) -> list[int]:
        """Wait up to ``wait_for_sites`` seconds for the minimum; stop cleanly otherwise."""
        deadline = time.monotonic() + self.cfg.wait_for_sites
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_available_sites:
                return nodes
            if time.monotonic() > deadline:
                raise FederationStopped(
                    f"only {len(nodes)} site(s) connected after {self.cfg.wait_for_sites:.0f} s; "
                    f"min-available-sites is {self.cfg.min_available_sites}. Stopping without training."
                )
            time.sleep(1.0)

    def roll_call(self, nodes: list[int]) -> None:
        """Ask every site for its name and readiness before round 1 (this also starts the
        ClientApp runtime, so round 1's time is training, not start-up)."""
        outcome = RoundOutcome(0)
        messages = [protocol.query(n, 0) for n in nodes]
        for reply in self.exchange(messages, "roll-call", 0, outcome):
            self.train_samples[reply.node_id] = int(reply.metrics.get("train_samples", 0))
            counts = ", ".join(f"{k.split('_')[0]} {int(v)}" for k, v in reply.metrics.items() if k.endswith("_exams"))
            self.echo(f"site {reply.site} ready: {counts} exams")

    def site_name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def exchange(
        self, messages: Iterable[Message], phase: str, server_round: int, outcome: RoundOutcome
    ) -> list[SiteReply]:
        """Send, collect within the round timeout, and sort replies into usable ones and failures."""
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
            if reply.has_error():
                self.record_failure(outcome, server_round, phase, node, f"error: {reply.error.reason}")
                continue
            got = protocol.read_reply(reply.content)
            if got.site is not None and got.site.name:
                self.names[node] = got.site.name
            if got.site is not None and not got.site.ok:
                self.record_failure(outcome, server_round, phase, node, f"unable: {got.site.reason}")
                continue
            metrics = got.metrics
            arrays = to_numpy(got.arrays) if got.arrays is not None else None
            usable.append(SiteReply(self.site_name(node), node, metrics, arrays, reply))
        for node in sent_to - answered:
            outcome.timed_out.add(node)
            self.record_failure(outcome, server_round, phase, node, TIMEOUT_REASON.format(self.cfg.round_timeout))
        return usable

    def send_and_collect(self, messages: list[Message]) -> tuple[list[Message], dict[str, int]]:
        """Push, then poll for replies every POLL_SECONDS until all answered or the round times out.

        ``Grid.send_and_receive`` sleeps 3 s between pulls, which adds 1.5 s on average to every
        wave (two waves a round); pulling is a cheap local call, so we poll much faster.
        """
        ids = list(self.grid.push_messages(messages))
        by_msg_id = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        pending = set(ids)
        replies: list[Message] = []
        deadline = time.monotonic() + self.cfg.round_timeout
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        return replies, by_msg_id

    def record_failure(self, outcome: RoundOutcome, server_round: int, phase: str, node: int, reason: str) -> None:
        site = self.site_name(node)
        outcome.failures[site] = reason
        log.warning("round %d %s: site %s: %s", server_round, phase, site, reason)
        self.echo(f"  round {server_round} {phase}: site {site} left out: {reason}")
        self.store.append(server_round, "failure", site, {"stage": phase, "reason": reason})

    # ---- one round --------------------------------------------------------------------------
    def train_round(self, server_round: int, outcome: RoundOutcome) -> None:
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        messages = self.strategy.configure_train(server_round, to_record(self.arrays), config, self.grid)
        if self.cfg.secure_aggregation:  # SecAgg+: the same sampled sites, their updates summed under masks
            secure_train_round(self, server_round, outcome, [m.metadata.dst_node_id for m in messages])
            return
        replies = self.exchange(messages, "train", server_round, outcome)
        good: list[SiteReply] = []
        for r in replies:
            problem = check_update(r.site, r.arrays or {}, self.arrays) if r.arrays is not None else None
            if r.arrays is None:
                problem_reason = "reply carried no model arrays"
            elif problem is not None:
                problem_reason = problem.reason
            else:
                good.append(r)
                self.store.append(server_round, "train", r.site, r.metrics)
                continue
            self.record_failure(outcome, server_round, "train", r.node_id, f"update dropped: {problem_reason}")
        outcome.sites_trained = [r.site for r in good]
        for r in good:
            outcome.site_seconds[r.site] = float(r.metrics.get("train_seconds", 0.0))
        if len(good) < self.cfg.min_train_sites:
            self.echo(
                f"  round {server_round}: {len(good)} usable update(s), fewer than min-train-sites "
                f"({self.cfg.min_train_sites}); the global model is unchanged this round"
            )
            self.record_train_aggregate(server_round, good, released=False)
            return
        if self.cfg.update_norm_bound > 0:  # model replacement: a scaled update is cut down before it is averaged
            self._clip_updates(server_round, good)
        if self.central_dp is not None:  # central DP: noise std sigma*C/k for the k sites actually averaged
            # build_strategy wraps the aggregation rule in Flower's central-DP strategy when dp = central
            assert isinstance(self.strategy, DifferentialPrivacyClientSideFixedClipping)
            self.strategy.num_sampled_clients = len(good)
        # Replies must share metric keys for Flower's aggregation; ours do by construction.
        agg, _ = self.strategy.aggregate_train(server_round, [r.plain_message for r in good])
        if agg is not None:
            # Averaging turns integer buffers (BatchNorm's num_batches_tracked) into floats: cast back.
            before, self.arrays = (
                self.arrays,
                {k: np.asarray(v.numpy()).astype(self.arrays[k].dtype) for k, v in agg.items()},
            )
            # Branches only some sites train (mgus' ultrasound net, late fusion's CESM nets) average over those sites.
            self.arrays = family_of(self.cfg.model).after_train(
                self.cfg, before, self.arrays, [(r.update, r.metrics) for r in good]
            )
        self.record_train_aggregate(server_round, good, released=agg is not None)

    def _clip_updates(self, server_round: int, good: list[SiteReply]) -> None:
        """Clip each update's change to update-norm-bound x the round's median change norm
        (server/validation.py); the clipped arrays replace the reply's before aggregation."""
        clipped_arrays, clipped = clip_to_median_norm([r.update for r in good], self.arrays, self.cfg.update_norm_bound)
        for i, norm, limit in clipped:
            r = good[i]
            r.arrays = clipped_arrays[i]
            r.plain_message.content["arrays"] = to_record(r.arrays)
            log.warning("round %d train: site %s: update norm %.3g clipped to %.3g", server_round, r.site, norm, limit)
            self.echo(
                f"  round {server_round} train: site {r.site}: update norm {norm:.3g} clipped to {limit:.3g} "
                f"({self.cfg.update_norm_bound:g} x the median)"
            )

    def record_train_aggregate(self, server_round: int, good: list[SiteReply], released: bool) -> None:
        """One "aggregate-train" row: means over sites, but privacy budgets (dp_epsilon, dp_delta)
        by maximum: the federation's guarantee is that of its worst site, never the average."""
        if not good:
            return
        scalar = [{k: v for k, v in r.metrics.items() if isinstance(v, (int, float))} for r in good]
        agg = weighted_mean(scalar, weight_key=protocol.NUM_EXAMPLES, sum_keys=(protocol.NUM_EXAMPLES, "train_steps"))
        if self.central_dp is not None:
            agg.update(self.central_dp.record(released))
        agg["sites"] = len(good)
        self.store.append(server_round, "aggregate-train", "ALL", agg)

    def evaluate_round(self, server_round: int, outcome: RoundOutcome) -> None:
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        messages = self.strategy.configure_evaluate(server_round, to_record(self.arrays), config, self.grid)
        # A site that missed the train wave's timeout is still busy with (or lost) that message: an
        # evaluate message would only queue behind it and hold the round for a second timeout.
        for node in {m.metadata.dst_node_id for m in messages} & outcome.timed_out:
            self.record_failure(
                outcome, server_round, "evaluate", node, "skipped: no train reply within the round timeout"
            )
        messages = [m for m in messages if m.metadata.dst_node_id not in outcome.timed_out]
        replies = self.exchange(messages, "evaluate", server_round, outcome)
        outcome.sites_evaluated = [r.site for r in replies]
        for r in replies:
            # Histograms are aggregate counts (no per-patient score); kept for per-site ROC curves.
            self.store.append(server_round, "evaluate", r.site, r.metrics)
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
        hists = [
            {"hist_pos": r.metrics["test_hist_pos"], "hist_neg": r.metrics["test_hist_neg"]}
            for r in replies
            if "test_hist_pos" in r.metrics
        ]
        if hists and sum(sum(h["hist_pos"]) for h in hists) and sum(sum(h["hist_neg"]) for h in hists):
            with_edges = [self._with_edges(h) for h in hists]
            agg["test_pooled_auc"] = pooled_auc_from_histograms(with_edges)
            agg["test_pooled_auc_binning_bound"] = auc_binning_bound(with_edges)
        agg["sites"] = len(replies)
        # A family may update the global model from aggregate evaluation counts (late fusion: MCC weights).
        self.arrays, family_agg = family_of(self.cfg.model).after_evaluate(self.arrays, [r.metrics for r in replies])
        agg.update(family_agg)
        outcome.aggregate = agg
        self.store.append(server_round, "aggregate", "ALL", agg)

    def _with_edges(self, hist: dict) -> dict:
        from fedbreast.shared.metrics import default_bin_edges

        return {**hist, "hist_edges": list(default_bin_edges(self.cfg.hist_bins))}

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> list[RoundOutcome]:
        if self.start_round > self.cfg.rounds:
            self.echo(f"all {self.cfg.rounds} rounds are already done in {self.run_dir}")
            return self.history
        self.roll_call(self.wait_for_sites())
        for server_round in range(self.start_round, self.cfg.rounds + 1):
            outcome = RoundOutcome(server_round)
            t0 = time.perf_counter()
            self.train_round(server_round, outcome)
            t1 = time.perf_counter()
            self.evaluate_round(server_round, outcome)
            t2 = time.perf_counter()
            self._checkpoint(server_round, outcome.aggregate)
            outcome.seconds = time.perf_counter() - t0  # checkpointing is part of the round's cost
            self.store.append(
                server_round,
                "round",
                "ALL",
                {
                    "seconds": outcome.seconds,
                    "slowest_site_seconds": outcome.slowest_site_seconds,
                    "train_phase_seconds": t1 - t0,
                    "evaluate_phase_seconds": t2 - t1,
                    "checkpoint_seconds": outcome.seconds - (t2 - t0),
                    "sites_trained": len(outcome.sites_trained),
                    "failures": len(outcome.failures),
                    "bytes_sent": outcome.bytes_sent,
                    "bytes_received": outcome.bytes_received,
                },
            )
            self.history.append(outcome)
            self.echo(self._progress_line(outcome))
        self._flush_checkpoints()
        save_checkpoint(
            self.run_dir,
            "final",
            self.arrays,
            self._meta(self.cfg.rounds, self.history[-1].aggregate if self.history else {}),
        )
        if self.cfg.cross_site:
            self.cross_site_matrix()
        return self.history

    def cross_site_matrix(self) -> dict[str, Path]:
        """After the last round: every site's personalised model and the global one on every
        site's test split (server/cross_site.py). The final model is saved already, so a
        failure here costs only the matrix."""
        from fedbreast.server.cross_site import run_cross_site

        try:
            return run_cross_site(self)
        except Exception as exc:  # noqa: BLE001 - the run's results stand without the matrix
            log.exception("cross-site phase failed")
            self.echo(f"cross-site phase failed: {type(exc).__name__}: {exc}")
            return {}

    def _progress_line(self, o: RoundOutcome) -> str:
        per_site = ", ".join(
            f"{r['site']} {_fmt(r.get('val_auc'))}" for r in self.store.rows("evaluate") if r["round"] == o.round
        )
        agg = o.aggregate
        return (
            f"round {o.round}/{self.cfg.rounds}  {o.seconds:5.1f} s  trained {len(o.sites_trained)}  "
            f"val AUC mean {_fmt(agg.get('val_auc'))} [{per_site}]  test pooled AUC {_fmt(agg.get('test_pooled_auc'))}"
            + (f"  failures: {', '.join(o.failures)}" if o.failures else "")
        )


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"
