"""simulate's public start (simulation/public_start.py): the default run begins from its network
pretrained on a generated public federation of another data seed, cached, shared with the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import FAMILIES
from fedbreast.simulation.public_start import (
    PUBLIC_SEED,
    pretraining_key,
    public_checkpoint,
    public_seed_for,
    resolve_start,
)
from fedbreast.simulation.simulate import PRESET, simulate

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=50, hist_bins=64, rounds=1)


def test_auto_is_public_only_for_a_generated_multiview_run_without_dp_or_a_start_of_its_own(tmp_path) -> None:
    plain = RunConfig(**TINY)
    assert resolve_start("auto", plain, generated=True, init_checkpoint=None) == "public"
    assert resolve_start("auto", plain, generated=False, init_checkpoint=None) == "scratch"  # real sites
    assert resolve_start("auto", plain, generated=True, init_checkpoint=tmp_path / "c.pt") == "scratch"
    assert resolve_start("auto", plain.replace(dp="local"), generated=True, init_checkpoint=None) == "scratch"
    assert resolve_start("auto", plain.replace(model="birads"), generated=True, init_checkpoint=None) == "scratch"
    assert resolve_start("scratch", plain, generated=True, init_checkpoint=None) == "scratch"
    for cfg, init, match in (
        (plain.replace(dp="local"), None, "norm group"),
        (plain.replace(model="dualmode"), None, "multiview family"),
        (plain, tmp_path / "c.pt", "give one initial model"),
    ):
        with pytest.raises(ConfigError, match=match):
            resolve_start("public", cfg, generated=True, init_checkpoint=init)
    with pytest.raises(ConfigError, match="--start 'imagenet'"):
        resolve_start("imagenet", plain, generated=True, init_checkpoint=None)
    # Never the run's own data: a run of the public seed gets the next one.
    assert public_seed_for(0) == PUBLIC_SEED and public_seed_for(PUBLIC_SEED) != PUBLIC_SEED


def test_the_cache_key_follows_what_shapes_pretraining_and_nothing_else() -> None:
    cfg = RunConfig(**TINY)
    key = pretraining_key(cfg, PUBLIC_SEED)
    assert pretraining_key(cfg.replace(seed=7, strategy="fedprox", bootstrap=10), PUBLIC_SEED) == key
    # the public sites have no virtual images: a run that reads its own pretrains the same network
    assert pretraining_key(cfg.replace(virtual_des=True, virtual_des_replace=0.5), PUBLIC_SEED) == key
    for changed in (
        cfg.replace(lr=0.02),
        cfg.replace(rounds=2),
        cfg.replace(image_h=128),
        cfg.replace(in_channels=1, single_channel="des"),
    ):
        assert pretraining_key(changed, PUBLIC_SEED) != key
    assert pretraining_key(cfg, PUBLIC_SEED + 1) != key and pretraining_key(cfg, PUBLIC_SEED, patients=9) != key


def test_a_generated_run_starts_from_its_public_pretraining_which_is_made_once(tmp_path) -> None:
    lines: list[str] = []
    data = tmp_path / "data"
    simulate(
        tmp_path / "run",
        sites=3,
        patients=6,
        seed=0,
        overrides=dict(TINY),
        data_dir=data,
        engine="inprocess",
        start="public",
        echo=lines.append,
    )
    text = "\n".join(lines)
    assert f"federation of data seed {PUBLIC_SEED}" in text and "pretrained smallcnn" in text
    assert "use it with --set weights-path" not in text  # the run uses it; no command line to follow
    # The public federation is its own folder, never among the run's sites.
    public_sites = sorted(p.name for p in (data / "public" / f"data-seed{PUBLIC_SEED}" / "sites").iterdir())
    assert public_sites == ["site-1", "site-2", "site-3"]
    assert sorted(p.name for p in (data / "sites").iterdir()) == ["site-1", "site-2", "site-3"]
    (final,) = (data / "public").glob("pretrained-*/checkpoints/final.pt")
    config = json.loads((tmp_path / "run" / "simulate.json").read_text())["run"]
    assert str(final.resolve()) in json.dumps(config) or f"the initial model is {final}" in text
    # Made once: the same settings find it, another data seed of the run too (same public data).
    again: list[str] = []
    cfg = RunConfig(**{**PRESET, **FAMILIES["multiview"].preset, "seed": 3}).replace(**TINY)  # as simulate's
    assert public_checkpoint(data / "public", cfg, 3, again.append, patients=6) == final
    assert any("(cached)" in line for line in again) and not any("pretrained" in line for line in again[1:])
    # A damaged cache file is made again, not used.
    final.write_bytes(b"not a checkpoint")
    redo: list[str] = []
    assert public_checkpoint(data / "public", cfg, 3, redo.append, patients=6) == final
    assert any("pretraining again" in line for line in redo) and Path(final).stat().st_size > 100
