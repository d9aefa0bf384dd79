"""What a model family is to the rest of the system: one :class:`Family` per seed model.

A family's registry entry is light (no torch, no data stack): the coordinator, the config
validation and the command line read it without loading any site code. What runs at a
site (the family's data, training and scoring: a :class:`~fedbreast.shared.training.tasks.Task`)
and its network are named by import path and loaded only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.training.tasks import Task

Arrays = dict[str, np.ndarray]
# The coordinator's hook after a train wave: (run config, global arrays before the round, the
# strategy's aggregate, [(a site's arrays, its metrics)]) -> the new global arrays.
AfterTrain = Callable[["RunConfig", Arrays, Arrays, list[tuple[Arrays, Mapping[str, Any]]]], Arrays]
# After an evaluate wave: (global arrays, the sites' evaluate metrics) -> (new arrays, aggregate metrics).
AfterEvaluate = Callable[[Arrays, list[Mapping[str, Any]]], tuple[Arrays, dict[str, float]]]


def keep_aggregate(
    cfg: RunConfig, before: Arrays, aggregated: Arrays, updates: list[tuple[Arrays, Mapping[str, Any]]]
) -> Arrays:
    return aggregated


def no_evaluate_update(arrays: Arrays, metrics: list[Mapping[str, Any]]) -> tuple[Arrays, dict[str, float]]:
    return arrays, {}


def no_notes(cfg: RunConfig) -> list[str]:
    return []


def backbone_name(cfg: RunConfig) -> str:
    """How reports name a run's network: family / backbone (one line per run)."""
    return f"{cfg.model}/{cfg.backbone}"


def load(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported on first use)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Family:
    name: str  # the run-config value of ``model``
    seed: str  # the paper in shared/seeds/ it comes from
    title: str
    unit: str  # what a prediction scores: breast, lesion
    count_unit: str  # what a split's size counts: exam, lesion, breast
    task_path: str  # "module:Class" of its site Task (data, training, scoring)
    model_path: str  # "module:function" building its network from the run config
    signature_keys: tuple[str, ...] = ()  # run-config keys that fix its tensors, beyond the common ones
    # Run-config keys that set the side (px) of the images its backbone sees: the run config
    # refuses a backbone that cannot run on them (inception_v3 needs 75 px: MIN_INPUT_PX).
    input_size_keys: tuple[str, ...] = ("image_h", "image_w")
    preset: Mapping[str, Any] = field(
        default_factory=dict
    )  # `fedbreast simulate --model NAME`, on top of the CPU preset
    # The kind of hospital (cem | ffdm | ffdm+us) `fedbreast simulate --model NAME` generates
    # when --modalities is not given; None: the mixed default federation.
    simulate_modalities: str | None = None
    after_train: AfterTrain = keep_aggregate  # numpy only: runs at the coordinator
    after_evaluate: AfterEvaluate = no_evaluate_update  # numpy only: runs at the coordinator
    settings: type[Settings] | None = None  # its own run-config fields (one base of FamilySettings)
    # What a report and a model card must flag about a run's settings (an input close to the
    # label, a named departure from the seed): one sentence each, empty for the seed's setting.
    notes: Callable[[RunConfig], list[str]] = no_notes
    # A family that synthesises images (cyclegan) instead of scoring them: reports show its image
    # quality, not AUC tables (decided by the run's family, never by which keys replies carry).
    synthesises: bool = False
    # How reports and progress lines name its network (default: "family/backbone").
    describe: Callable[[RunConfig], str] = backbone_name

    def task(self) -> Task:
        """The family's site Task (loads the site's data and training stack)."""
        return load(self.task_path)()

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return load(self.model_path)(cfg)


# The run config's error for a bad value: bad(field name, why) -> the ConfigError to raise.
Bad = Callable[[str, str], Exception]


class Settings:
    """Base of a family's own run settings: a frozen dataclass of flat run-config fields
    (Flower carries a run's settings as one flat dict), mixed into ``RunConfig`` through
    ``FamilySettings`` (shared/families/__init__.py), and checked by the family's ``check``."""

    def check(self, bad: Bad) -> None:
        """Raise ``bad(field, why)`` for an out-of-range value (every family's, whatever the run's model)."""
