"""The one typed configuration of a federated run, validated before anything starts.

Flower carries run settings as a flat dict with kebab-case keys (``[tool.flwr.app.config]``
in pyproject.toml, ``--run-config`` on ``flwr run``). :func:`RunConfig.from_flower`
turns that dict into this dataclass and rejects an unknown key, a wrong type or an
out-of-range value with the key named. Site-only settings (data path, DP ceiling, GPU)
are not here: they live in the site's own config and never travel in a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

from fedbreast.shared.data.rules import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
MODELS = ("multiview",)
VIEW_FUSIONS = ("average", "concat")
HEADS = ("pooled", "vgg_fc")
AMP_MODES = ("auto", "bf16", "off")
WINDOWS = ("percentile", "dicom", "fixed")
KEY_METRICS = ("val_auc", "val_loss", "val_mcc", "val_accuracy")


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = "multiview"
    backbone: str = "resnet18"
    view_fusion: str = "average"
    head: str = "pooled"
    in_channels: int = 2  # LE+DES; FFDM exams fill the DES channel with zeros
    image_h: int = 256
    image_w: int = 128
    window: str = "percentile"  # percentile (vendor-robust) | dicom | fixed (seed 001's 1500-3300)
    weights_path: str = ""  # local ImageNet state_dict file; never downloaded
    # federation
    rounds: int = 3
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_sites: int = 1
    min_evaluate_sites: int = 1
    min_available_sites: int = 1
    round_timeout: float = 600.0
    wait_for_sites: float = 120.0  # how long to wait for min_available_sites before a clean stop
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam / FedYogi
    trim_beta: float = 0.2  # FedTrimmedAvg
    krum_byzantine: int = 0  # Krum: number of malicious sites tolerated
    # local training (seed 001: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 halved at 10/30/40)
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many batches per round instead of epochs
    batch_size: int = 8
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_rounds: str = "10,30,40"
    lr_decay_factor: float = 0.5
    augment: bool = True
    amp: str = "auto"
    workers: int = 2
    # evaluation and reporting
    key_metric: str = "val_auc"
    bootstrap: int = 1000
    hist_bins: int = 512
    hist_noise_epsilon: float = 0.0  # > 0: Laplace noise on histogram counts (site policy may force it)
    seed: int = 0

    # ---- conversion -------------------------------------------------------------------
    @staticmethod
    def flower_key(name: str) -> str:
        return name.replace("_", "-")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> "RunConfig":
        """Build from Flower's flat kebab-case dict; raises ConfigError naming the key."""
        by_key = {cls.flower_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in ignore:
                continue
            f = by_key.get(key)
            if f is None:
                raise ConfigError(f"run config: unknown key {key!r}; valid keys: {', '.join(sorted(by_key))}")
            values[f.name] = _coerce(key, value, f.type)
        return cls(**values)

    def to_flower(self) -> dict[str, Any]:
        return {self.flower_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def model_signature(self) -> str:
        """Hash of what fixes the model's tensors: a checkpoint of another signature cannot resume."""
        keys = ("model", "backbone", "view_fusion", "head", "in_channels", "image_h", "image_w")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def decay_rounds(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.lr_decay_rounds.split(",") if x.strip())

    def lr_at(self, server_round: int) -> float:
        """Step decay by round (rounds play the role of the seed's epochs)."""
        return self.lr * self.lr_decay_factor ** sum(server_round > r for r in self.decay_rounds)

    # ---- validation -------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"run config: {self.flower_key(name)} = {getattr(self, name)!r}: {why}")

        for name, choices in (
            ("model", MODELS),
            ("strategy", STRATEGIES),
            ("view_fusion", VIEW_FUSIONS),
            ("head", HEADS),
            ("amp", AMP_MODES),
            ("window", WINDOWS),
            ("key_metric", KEY_METRICS),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        from fedbreast.shared.models import available_backbones

        if self.backbone not in available_backbones():
            raise bad("backbone", f"must be one of {', '.join(available_backbones())}")
        if self.in_channels not in (1, 2):
            raise bad("in_channels", "must be 1 (LE / FFDM) or 2 (LE + DES)")
        for name in ("image_h", "image_w"):
            if not 16 <= getattr(self, name) <= 4096:
                raise bad(name, "must be between 16 and 4096 pixels")
        for name in ("rounds", "batch_size", "local_epochs"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("min_train_sites", "min_evaluate_sites", "min_available_sites"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "must be in (0, 1]")
        for name in ("round_timeout", "wait_for_sites", "lr"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in ("local_steps", "weight_decay", "proximal_mu", "krum_byzantine", "bootstrap", "hist_noise_epsilon", "workers"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if not 0 < self.trim_beta < 0.5:
            raise bad("trim_beta", "must be in (0, 0.5)")
        if self.hist_bins < 16:
            raise bad("hist_bins", "must be at least 16")
        try:
            self.decay_rounds
        except ValueError:
            raise bad("lr_decay_rounds", "must be comma-separated round numbers, e.g. '10,30,40'") from None
        if self.head == "vgg_fc" and self.backbone != "vgg16_bn":
            raise bad("head", "the faithful vgg_fc head needs backbone = 'vgg16_bn'")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run config: {key} = {value!r}: expected {kind}") from None
