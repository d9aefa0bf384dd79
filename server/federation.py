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
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedbreast.server.central_dp import CentralLedger
from fedbreast.server.checkpoints import check_resumable, load_checkpoint, save_checkpoint
from fedbreast.server.exchange import Exchange, RoundOutcome
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.phases import EvaluationWave, Phase, PlainTrainWave, RunState
from fedbreast.server.reply_checks import MalformedReply, ReplyLimits, count_metric, roll_call_caps
from fedbreast.server.strategies import build_strategy
from fedbreast.shared import protocol
from fedbreast.shared.config import RunConfig
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.families import family_of

log = logging.getLogger("fedbreast.server")


class FederationStopped(FedbreastError, RuntimeError):
    """The run stopped cleanly for a reason the coordinator must read (too few sites...)."""


def round_phases(cfg: RunConfig) -> tuple[Phase, Phase, list[Phase]]:
    """(train wave, evaluation, phases after the last round) for this run's configuration."""
    if cfg.secure_aggregation:  # SecAgg+: the same sampled sites, their updates summed under masks
        from fedbreast.server.secure_aggregation import SecureTrainWave

        train: Phase = SecureTrainWave()
    else:
        train = PlainTrainWave()
    after: list[Phase] = []
    if cfg.cross_site:
        from fedbreast.server.cross_site import CrossSite

        after.append(CrossSite())
    return train, EvaluationWave(), after


class FederatedRun:
    """The round loop: roll call, then per round the train wave, the evaluation wave and a
    checkpoint, then the phases after the last round. The phases (server/phases.py) share
    one ``RunState``; this class owns the order, the checkpoints and the resume."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_dir: Path,
        initial: dict[str, np.ndarray],
        echo=print,
        holdout: tuple[str, ...] = (),
        evaluate_only: bool = False,
    ):
        """``holdout``: site names kept out of training, evaluated every round (external validation).
        ``evaluate_only``: one evaluation wave of ``initial`` and nothing else: no train message,
        no checkpoint, no phase after the last round (``fedbreast evaluate``)."""
        self.grid, self.cfg, self.run_dir = grid, cfg, Path(run_dir)
        self.store = MetricStore(self.run_dir)
        self.echo = echo
        self.state = RunState(
            cfg=cfg,
            # Replies are held to the model's size (server/reply_checks.py): its shapes never change.
            exchange=Exchange(grid, self.store, echo, cfg.round_timeout, ReplyLimits.for_model(initial, cfg.hist_bins)),
            strategy=build_strategy(cfg),
            arrays=initial,
            central_dp=CentralLedger(self.run_dir, cfg) if cfg.dp == "central" else None,  # the coordinator's epsilon
            holdout_sites=frozenset(holdout),
        )
        self.evaluate_only = evaluate_only
        self.train_wave, self.evaluation, self.after_last_round = round_phases(cfg)
        self.start_round = 1
        self.best_value: float | None = None
        self.history: list[RoundOutcome] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending_checkpoint: Future | None = None
        if not evaluate_only:
            self._resume()

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The global model."""
        return self.state.arrays

    @arrays.setter
    def arrays(self, value: dict[str, np.ndarray]) -> None:
        self.state.arrays = value

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
        ClientApp runtime, so round 1's time is training, not start-up). Its counts bound what a
        site may claim later: train_samples its train num-examples, test_exams its evaluate ones
        (server/phases.py weigh_claims); a site without them is capped instead. They are the site's
        own word: a count above 10 x the roll call's median weighs as that much (cap_roll_call)."""
        outcome = RoundOutcome(0)
        messages = [protocol.query(n, 0) for n in nodes]
        exchange = self.state.exchange
        for reply in exchange.wave(messages, "roll-call", 0, outcome):
            try:
                counts = {k: count_metric(reply.metrics, k) for k in reply.metrics if k.endswith("_exams")}
                samples = count_metric(reply.metrics, "train_samples")
            except MalformedReply as exc:  # a count that is no count: the site is left uncounted
                exchange.record_failure(outcome, 0, "roll-call", reply.node_id, f"malformed reply: {exc}")
                continue
            if samples is not None:
                self.state.train_samples[reply.node_id] = samples
            if counts.get("test_exams") is not None:
                self.state.test_exams[reply.node_id] = int(counts["test_exams"] or 0)
            if counts.get("val_exams") is not None:  # bounds its validation histograms (the federated cut-off)
                self.state.val_exams[reply.node_id] = int(counts["val_exams"] or 0)
            listed = ", ".join(f"{k.split('_')[0]} {v}" for k, v in counts.items())
            self.echo(f"site {reply.site} ready: {listed} exams")
        self.cap_roll_call()

    def cap_roll_call(self) -> None:
        """Cap the weight of a site whose roll-call count is far above the others'
        (reply_checks.roll_call_caps), and say so: a site that claims 10**9 training samples
        would otherwise take FedAvg over. Under SecAgg+ a site masks its train weight into its update,
        out of this cap's reach (docs/server-robustness.md); its evaluate weight is capped all the same."""
        state = self.state
        for counts, caps, what in (
            (state.train_samples, state.train_samples_cap, "training samples"),
            (state.test_exams, state.test_exams_cap, "test exams"),
        ):
            caps.clear()
            for node, (cap, why) in roll_call_caps(counts).items():
                caps[node] = cap
                line = (
                    f"site {state.exchange.site_name(node)} claims {counts[node]} {what} at the roll call; "
                    f"weighted as at most {cap} ({why})"
                )
                log.warning(line)
                self.echo(line)

    def check_holdout(self) -> None:
        """Every held-out site must have answered the roll call under its name; stop otherwise,
        naming the sites that did."""
        missing = sorted(self.state.holdout_sites - set(self.state.exchange.owners))
        if missing:
            known = ", ".join(sorted(self.state.exchange.owners)) or "none"
            raise FederationStopped(
                f"holdout-site {', '.join(missing)}: no such site answered the roll call (sites: {known})"
            )
        if self.state.holdout_sites:
            self.echo(f"held out of training (external validation): {', '.join(sorted(self.state.holdout_sites))}")

    def run_evaluation_only(self) -> list[RoundOutcome]:
        """One evaluation wave of the given model on every site: the only message a site gets
        after the roll call is evaluate; nothing is trained, no update leaves a site."""
        outcome = RoundOutcome(1)
        t0 = time.perf_counter()
        self.evaluation(self.state, 1, outcome)
        outcome.seconds = time.perf_counter() - t0
        self.store.append(
            1,
            "round",
            "ALL",
            {
                **outcome.timing(),
                **machine_load(),
                "evaluate_phase_seconds": outcome.seconds,
                "sites_trained": 0,
                "failures": len(outcome.failures),
                "bytes_sent": outcome.bytes_sent,
                "bytes_received": outcome.bytes_received,
            },
        )
        self.history.append(outcome)
        self.echo(self._progress_line(outcome).replace("/" + str(self.cfg.rounds), " (evaluation only)", 1))
        return self.history

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> list[RoundOutcome]:
        if not self.evaluate_only and self.start_round > self.cfg.rounds:
            self.echo(f"all {self.cfg.rounds} rounds are already done in {self.run_dir}")
            return self.history
        self.roll_call(self.wait_for_sites())
        self.check_holdout()
        if self.evaluate_only:
            return self.run_evaluation_only()
        for server_round in range(self.start_round, self.cfg.rounds + 1):
            outcome = RoundOutcome(server_round)
            t0 = time.perf_counter()
            self.train_wave(self.state, server_round, outcome)
            t1 = time.perf_counter()
            self.evaluation(self.state, server_round, outcome)
            t2 = time.perf_counter()
            self._checkpoint(server_round, outcome.aggregate)
            outcome.seconds = time.perf_counter() - t0  # checkpointing is part of the round's cost
            self.store.append(
                server_round,
                "round",
                "ALL",
                {
                    **outcome.timing(),  # wall, slowest site's train and evaluate, the overhead
                    **machine_load(),  # a round slower than the last on a busy machine says so here
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
        for phase in self.after_last_round:
            self._after_last_round(phase)
        return self.history

    def _after_last_round(self, phase: Phase) -> None:
        """A phase after the last round (the cross-site matrix). The final model is saved
        already, so a failure here costs only that phase's output."""
        try:
            phase(self.state, self.cfg.rounds, RoundOutcome(self.cfg.rounds))
        except Exception as exc:  # noqa: BLE001 - the run's results stand without it
            log.exception("%s phase failed", type(phase).__name__)
            self.echo(f"{type(phase).__name__} phase failed: {type(exc).__name__}: {exc}")

    def _progress_line(self, o: RoundOutcome) -> str:
        per_site = ", ".join(
            f"{r['site']} {_fmt(r.get('val_auc'))}" for r in self.store.rows("evaluate") if r["round"] == o.round
        )
        agg = o.aggregate
        overhead = o.timing()["overhead_fraction"]
        head = f"round {o.round}/{self.cfg.rounds}  {o.seconds:5.1f} s (overhead {100 * overhead:.0f}%)  trained {len(o.sites_trained)}  "
        tail = f"  failures: {', '.join(o.failures)}" if o.failures else ""
        if family_of(self.cfg.model).synthesises:  # a translator (cyclegan): image quality, no AUC
            return (
                head
                + f"val L1 {_fmt(agg.get('val_loss'))}  test pooled PSNR {_fmt(agg.get('test_pooled_synth_psnr'))} dB"
                f"  SSIM {_fmt(agg.get('test_pooled_synth_ssim'))}" + tail
            )
        return (
            head
            + f"val AUC mean {_fmt(agg.get('val_auc'))} [{per_site}]  test pooled AUC {_fmt(agg.get('test_pooled_auc'))}"
            + tail
        )


def machine_load() -> dict[str, Any]:
    """The coordinator machine's 1-minute load average and CPU count as the round ends (in a
    simulation, the machine the sites train on too); the load is None where the OS has none."""
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return {"load_1m": load, "cpus": os.cpu_count()}


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"
