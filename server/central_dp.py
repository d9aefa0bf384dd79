"""Central differential privacy, the coordinator's side: Flower's client-side fixed-clipping
wrapper around the strategy, and the coordinator's own epsilon ledger in the run directory.

The sites clip their updates (``central_dp_mod`` in shared/training/dp.py); the coordinator
adds Gaussian noise of std sigma*C/k to the mean of the k clipped updates, once per round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedbreast.shared.config import RunConfig
from fedbreast.shared.durable import atomic_write_json
from fedbreast.shared.training.accounting import CENTRAL_WEIGHT_KEY, epsilon_of, noise_for_budget

if TYPE_CHECKING:
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg


def central_noise_multiplier(cfg: RunConfig) -> float:
    """Noise for the coordinator's Gaussian release: one per round, no sampling amplification."""
    if cfg.dp_epsilon > 0:
        return noise_for_budget(cfg.dp_epsilon, cfg.dp_delta, 1.0, cfg.rounds)
    return cfg.dp_noise_multiplier


def central_dp_strategy(base: FedAvg, cfg: RunConfig) -> DifferentialPrivacyClientSideFixedClipping:
    """Flower's central-DP wrapper (client-side clipping) around ``base``, which must average
    with equal weights: the noise std sigma*C/k assumes each site moves the mean by <= C/k."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    base.weighted_by_key = CENTRAL_WEIGHT_KEY
    return DifferentialPrivacyClientSideFixedClipping(
        base,
        noise_multiplier=central_noise_multiplier(cfg),
        clipping_norm=cfg.dp_max_grad_norm,
        num_sampled_clients=cfg.min_train_sites,  # the round loop sets it to the sites that replied
    )


class CentralLedger:
    """The coordinator's accountant for central DP: released rounds on disk in the run directory."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.path = Path(run_dir) / "dp" / "central.json"
        self.noise_multiplier = central_noise_multiplier(cfg)
        self.delta = cfg.dp_delta
        self.releases = int(json.loads(self.path.read_text())["releases"]) if self.path.exists() else 0

    def epsilon(self) -> float:
        return epsilon_of([(self.noise_multiplier, 1.0, self.releases)] if self.releases else [], self.delta)

    def record(self, released: bool) -> dict[str, float]:
        """Count this round's noised aggregate (if any); the metrics for the round's train row."""
        if released:
            self.releases += 1
            # Durable: a release forgotten after a power cut would under-report the ε spent.
            atomic_write_json(
                self.path, {"releases": self.releases, "noise_multiplier": self.noise_multiplier}, indent=None
            )
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.delta, "dp_noise_multiplier": self.noise_multiplier}
