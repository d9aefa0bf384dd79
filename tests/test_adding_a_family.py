"""A model family defined only here, registered with one line, runs through the whole system.

docs/adding-a-family.md says what a family is; this proves the registry carries it: the run
config accepts its name and its own signature key, the model factory builds its network, the
simulation takes its preset, the site runs its Task, and the coordinator calls its
aggregation hook, in a federated run of the in-process engine (simulation/inprocess.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import FAMILIES, Family
from fedbreast.shared.families.multiview.task import MultiviewTask
from fedbreast.shared.models.factory import build_model
from fedbreast.simulation.simulate import prepare_federation, simulate


class TinyTask(MultiviewTask):
    """The multi-view exams, under the test family's name."""

    family = "tiny"


def build_tiny(cfg: RunConfig):
    from fedbreast.shared.models.multiview import MultiViewFusionNet

    return MultiViewFusionNet(backbone="smallcnn", in_channels=cfg.in_channels, view_fusion="concat", head="pooled")


def count_sites(arrays: dict[str, np.ndarray], metrics: list) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    return arrays, {"tiny_sites_evaluated": float(len(metrics))}


TINY_FAMILY = Family(
    name="tiny",
    seed="test",
    title="a test family",
    unit="breast",
    count_unit="exam",
    task_path="test_adding_a_family:TinyTask",
    model_path="test_adding_a_family:build_tiny",
    signature_keys=("box_size",),  # any run-config key: it must enter the model signature
    preset=dict(model="tiny", backbone="smallcnn", image_h=64, image_w=32, rounds=1, bootstrap=0, hist_bins=64),
    after_evaluate=count_sites,
)


@pytest.fixture
def tiny_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "tiny", TINY_FAMILY)  # the one line a new family adds to the registry
    return TINY_FAMILY


def test_the_registry_is_the_only_place_a_family_is_named(tiny_family, tmp_path: Path) -> None:
    cfg = RunConfig(model="tiny", backbone="smallcnn", image_h=64, image_w=32)
    assert cfg.model_signature() != cfg.replace(box_size=cfg.box_size + 1).model_signature()
    assert type(build_model(cfg)).__name__ == "MultiViewFusionNet"
    data = tmp_path / "data"
    prepare_federation(data, sites=2, patients=8, seed=0, echo=lambda _line: None)
    run = tmp_path / "run"
    result = simulate(
        run, overrides={"model": "tiny"}, sites_dir=data / "sites", engine="inprocess", echo=lambda _line: None
    )
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    assert sorted(r["site"] for r in store.rows("train")) == ["site-1", "site-2"]
    assert [r["tiny_sites_evaluated"] for r in store.rows("aggregate")] == [2.0]  # its coordinator hook ran


def test_an_unregistered_family_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="model = 'tiny'"):
        RunConfig(model="tiny")


def test_a_familys_settings_live_in_its_package_and_are_checked_there() -> None:
    import dataclasses

    from fedbreast.shared.families import FamilySettings

    common = {f.name for f in dataclasses.fields(RunConfig)} - {f.name for f in dataclasses.fields(FamilySettings)}
    owned: dict[str, str] = {}
    for family in FAMILIES.values():
        if family.settings is None:
            continue
        assert issubclass(FamilySettings, family.settings), f"{family.name}: settings not a base of FamilySettings"
        assert family.settings.__module__ == f"fedbreast.shared.families.{family.name}.settings"
        for f in dataclasses.fields(family.settings):
            assert f.name not in owned and f.name not in common, f"{f.name} is declared twice"
            owned[f.name] = family.name
    assert {"box_size", "patch_size", "crop_size", "mgus_loss", "birads_groups"} <= set(owned)
    assert set(owned) == {f.name for f in dataclasses.fields(FamilySettings)}  # no settings outside a family
    # The family's check runs in RunConfig's validation, for every family, and names the flat key.
    with pytest.raises(ConfigError, match=r"box-jitter = 0\.7: must be in \[0, 0\.5\)"):
        RunConfig(model="multiview", box_jitter=0.7)
    with pytest.raises(ConfigError, match=r"mgus-loss = 'hinge': must be one of bce, cosface"):
        RunConfig.from_flower({"model": "mgus", "mgus-loss": "hinge"})
    assert RunConfig.from_flower({"crop-size": 32}).to_flower()["crop-size"] == 32  # flat, as Flower carries it
