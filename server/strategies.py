"""Mapping the run config's strategy name to a Flower strategy (flwr.serverapp.strategy)."""

from __future__ import annotations

from typing import TypedDict

from flwr.serverapp import strategy as fl

from fedbreast.shared.config import RunConfig


class _Sampling(TypedDict):
    """The keyword arguments every strategy below takes: how many sites a round samples."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


def build_strategy(cfg: RunConfig) -> fl.Strategy:
    """The configured aggregation rule, wrapped in Flower's central-DP strategy when ``dp = central``."""
    strategy = _base_strategy(cfg)
    if cfg.dp == "central":
        from fedbreast.server.central_dp import central_dp_strategy

        return central_dp_strategy(strategy, cfg)
    return strategy


def _base_strategy(cfg: RunConfig) -> fl.FedAvg:
    """The configured aggregation rule. Sampling minimums come from the run config; the
    round loop (server/federation.py) waits for sites itself, so nothing here blocks."""
    common = _Sampling(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_sites,
        min_evaluate_nodes=cfg.min_evaluate_sites,
        min_available_nodes=cfg.min_available_sites,
    )
    name = cfg.strategy
    if name == "fedavg":
        return fl.FedAvg(**common)
    if name == "fedprox":  # the proximal term is added by the client (shared/training/local.py)
        return fl.FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedadam":
        return fl.FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedyogi":
        return fl.FedYogi(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedmedian":
        return fl.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl.FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if name == "krum":
        return fl.Krum(**common, num_malicious_nodes=cfg.krum_byzantine)
    raise ValueError(f"unknown strategy {name!r}")
