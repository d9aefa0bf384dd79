"""The seeds' data and network departures as run-config keys (issue 17 item 2, second part):
``window = fixed`` for every family, seed 004's square slot images (latefusion
``square-resize``), seed 003's shifted validation / test boxes (dualmode ``test-box-shift``),
seed 002's 7-layer fusion network (mgus ``mgus-fusion-layers``) and its three scores
(``test_auc_mg``, ``test_auc_us``, ``test_auc_fused`` in every mgus evaluate reply).

Tiny generated sites (CEM, FFDM + ultrasound, FFDM only), random-init ``smallcnn`` models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedbreast.server.reply_checks import check_metrics
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data import preprocess
from fedbreast.shared.data.datasets import box_shift
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families.mgus.task import BRANCH_AUC_KEYS, branch_aucs
from fedbreast.shared.metrics.classification import auc_mann_whitney
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.tasks import preprocess_config, task_for
from fedbreast.simulation.simulate import PRESET, PRESETS

TINY = dict(
    backbone="smallcnn",
    workers=0,
    amp="off",
    batch_size=4,
    box_size=48,
    crop_size=48,
    patch_size=32,
    n_patches=2,
    image_h=64,
    image_w=32,
    seed=5,
)
FAMILY_SITE = {"multiview": "cem", "birads": "cem", "dualmode": "cem", "mgus": "us", "latefusion": "cem"}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed-options-data")
    profiles = [
        SiteProfile(name="cem", n_patients=8),
        SiteProfile(name="us", n_patients=10, modalities="ffdm+us"),
        SiteProfile(name="ffdm", n_patients=8, modalities="ffdm"),
    ]
    generate_federation(root / "gen", profiles=profiles, seed=3, workers=1)
    out = {}
    for p in profiles:
        src = root / "gen" / p.name
        out[p.name] = site = root / p.name
        # large validation and test splits: several shifted boxes, both classes among the test lesions
        ingest(
            src / "dicom",
            site,
            annotations=src / "annotations.csv",
            site=p.name,
            workers=1,
            split_fractions=(0.4, 0.2, 0.4),
        )
    return out


def _cfg(family: str, **changes) -> RunConfig:
    return RunConfig(**{**PRESET, **PRESETS[family], **TINY, **changes})


def _caches(site) -> list:
    """The image caches the site's train dataset reads (ultrasound's aside)."""
    ds = site.datasets["train"]
    return [c for c in (getattr(ds, "cache", None), getattr(ds, "cache_mg", None)) if c is not None]


# ---- window = fixed, every family ------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILY_SITE))
def test_window_fixed_builds_every_familys_site_with_a_documented_clip(family, sites) -> None:
    cfg = _cfg(family, window="fixed")
    site = task_for(cfg).open(sites[FAMILY_SITE[family]], cfg)
    assert len(site.datasets["train"]) > 0
    caches = _caches(site)
    assert caches
    for cache in caches:
        assert cache.cfg.window == "fixed" and cache.cfg.clip is not None
        lo, hi = cache.cfg.clip
        assert lo < hi
    if family in ("dualmode", "latefusion"):  # seeds 003 / 004 give none: seed 001's 1500-3300
        assert caches[0].cfg.clip == (1500.0, 3300.0)
    if family == "birads":  # its own seed's clip stays
        assert caches[0].cfg.clip == (1900.0, 2500.0)


def test_window_fixed_keeps_the_other_windows_caches_and_ultrasounds_window() -> None:
    for preset in ("roi_box", "modality_view"):
        cfg = _cfg("dualmode")
        # percentile / dicom windows carry no clip: their caches keep their hashes
        assert preprocess_config(preset, cfg).clip is None
        assert (
            preprocess_config(preset, cfg).config_hash()
            == preprocess.PreprocessConfig(
                **{**preprocess.PRESETS[preset].to_dict(), "window": cfg.window}
            ).config_hash()
        )
    assert preprocess_config("us", _cfg("mgus", window="fixed")).window == "percentile"


def test_a_preset_without_a_fixed_clip_is_refused_naming_the_family(monkeypatch) -> None:
    monkeypatch.delitem(preprocess.FIXED_CLIPS, "roi_box")
    monkeypatch.setattr("fedbreast.shared.training.tasks.FIXED_CLIPS", preprocess.FIXED_CLIPS)
    with pytest.raises(ConfigError, match="window = 'fixed': the dualmode family"):
        preprocess_config("roi_box", _cfg("dualmode", window="fixed"))


# ---- latefusion square-resize (seed 004) ---------------------------------------------------------------


def test_square_resize_pads_square_and_keeps_the_aspect(sites) -> None:
    with pytest.raises(ConfigError, match="square-resize"):
        RunConfig.from_flower({"model": "latefusion", "square-resize": "maybe"})
    assert RunConfig.from_flower({"model": "latefusion", "square-resize": "true"}).square_resize is True
    shapes, scales = {}, {}
    for square in (False, True):
        cfg = _cfg("latefusion", square_resize=square)  # image-h x image-w = 64 x 32
        site = task_for(cfg).open(sites["cem"], cfg)
        ds = site.datasets["train"]
        cache = ds.cache
        sha = next(s for s in cache._entries)
        shapes[square], scales[square] = cache.get(sha).shape, cache.geometry(sha).scale
        assert tuple(ds[0]["x"].shape[-2:]) == shapes[square]
    assert shapes[False] == (64, 32)  # today: the padded square squashed to 64 x 32
    assert shapes[True] == (64, 64)  # seed 004: a square of side max(image-h, image-w)
    sy, sx = scales[False]
    assert sy == pytest.approx(2 * sx, rel=0.05)  # squashed: rows kept at twice the columns' scale
    sy, sx = scales[True]
    assert sy == pytest.approx(sx, rel=0.05)  # square: one scale, the breast keeps its aspect
    # no tensor depends on it: the checkpoints of both resume each other
    assert _cfg("latefusion").model_signature() == _cfg("latefusion", square_resize=True).model_signature()


# ---- dualmode test-box-shift (seed 003) -------------------------------------------------------------


def test_test_box_shift_moves_val_and_test_boxes_by_the_distance_deterministically(sites) -> None:
    with pytest.raises(ConfigError, match="test-box-shift"):
        RunConfig.from_flower({"model": "dualmode", "test-box-shift": -1})
    shift = 10.0
    centred_cfg, shifted_cfg = _cfg("dualmode"), _cfg("dualmode", test_box_shift=shift)
    task = task_for(centred_cfg)
    centred, shifted = task.open(sites["cem"], centred_cfg), task.open(sites["cem"], shifted_cfg)
    moved = 0
    for split in ("val", "test"):
        a, b = centred.datasets[split], shifted.datasets[split]
        assert a.breasts == b.breasts
        for i in range(len(a)):
            d = (b.boxes(i) - a.boxes(i)).astype(float)  # (2 views, 2 energies, [dy, dx])
            assert np.array_equal(d[:, 0], d[:, 1])  # LE and DES of a view move together
            dist = np.hypot(d[..., 0], d[..., 1])
            # the distance, up to rounding both boxes' corners to whole px (half a px per axis each)
            assert np.all(np.abs(dist - shift) <= np.sqrt(2) + 1e-9)
            first = b.boxes(i)
            np.testing.assert_array_equal(b.boxes(i), first)  # the same at every call
            b.set_epoch(7)  # and every round
            np.testing.assert_array_equal(b.boxes(i), first)
            expected = np.rint(b._centre[i] - b.box / 2 + box_shift(shifted_cfg.seed, b.breasts[i], shift)[:, None])
            np.testing.assert_array_equal(b.boxes(i), expected.astype(np.int64))
            b.set_epoch(0)
            moved += 1
    assert moved > 0
    # the direction is drawn per lesion breast (and view), from the seed
    keys = shifted.datasets["test"].breasts + shifted.datasets["val"].breasts
    directions = {tuple(np.round(box_shift(5, k, shift)[0], 6)) for k in keys}
    assert len(directions) == len(keys)
    assert not np.allclose(box_shift(5, keys[0], shift), box_shift(6, keys[0], shift))
    # training boxes keep their jitter and no shift; no tensor depends on it
    a, b = centred.datasets["train"], shifted.datasets["train"]
    for i in range(len(a)):
        np.testing.assert_array_equal(a.boxes(i), b.boxes(i))
    assert centred_cfg.model_signature() == shifted_cfg.model_signature()


# ---- mgus: seed 002's 7-layer fusion network and three scores ----------------------------------------------


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_mgus_fusion_layers_selects_the_seeds_depth_and_is_in_the_signature() -> None:
    with pytest.raises(ConfigError, match="mgus-fusion-layers"):
        RunConfig.from_flower({"model": "mgus", "mgus-fusion-layers": 5})
    widths = {}
    for layers in (3, 7):
        cfg = _cfg("mgus", mgus_fusion_layers=layers)
        model = build_model(cfg)
        fc = _linears(model.fusion_body) + _linears(model.fusion_head)
        assert len(fc) == layers
        widths[layers] = [fc[0].in_features] + [m.out_features for m in fc]
        d_mg, d_us = torch.randn(3, cfg.descriptor_dim), torch.randn(3, cfg.descriptor_dim)
        assert model.fusion_logit_and_features(d_mg, d_us)[0].shape == (3,)
    assert widths[3] == [1024, 256, 64, 1]  # today's, the default
    assert widths[7] == [1024, 512, 256, 128, 64, 32, 16, 1]
    assert RunConfig().mgus_fusion_layers == 3
    assert _cfg("mgus").model_signature() != _cfg("mgus", mgus_fusion_layers=7).model_signature()


def test_branch_aucs_per_lesion_mg_over_all_us_and_fused_over_lesions_with_ultrasound() -> None:
    # 4 lesions, 2 samples each; lesion 3 has no ultrasound
    cols = {
        "unit": [np.array([0, 0, 1, 1, 2, 2, 3, 3])],
        "mg": [np.array([0.9, 0.7, 0.2, 0.2, 0.6, 0.6, 0.1, 0.3])],  # means 0.8, 0.2, 0.6, 0.2
        "us": [np.array([0.1, 0.1, 0.9, 0.9, 0.5, 0.5, 0.99, 0.99])],  # 0.1, 0.9, 0.5 (3 without US)
        "fused": [np.array([0.8, 0.8, 0.3, 0.3, 0.4, 0.4, 0.0, 0.0])],
        "has_us": [np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)],
        "y": [np.array([1, 1, 0, 0, 0, 0, 1, 1], np.float32)],
        "mask": [np.ones(8, bool)],
    }
    out = branch_aucs(cols, 4)
    assert set(out) == set(BRANCH_AUC_KEYS)
    assert out["test_auc_mg"] == pytest.approx(0.625)  # pos {0.8, 0.2} vs neg {0.2, 0.6}: (1 + 1 + 0.5 + 0) / 4
    assert out["test_auc_us"] == pytest.approx(0.0)  # lesion 3's 0.99 left out: pos {0.1} vs neg {0.9, 0.5}
    assert out["test_auc_fused"] == pytest.approx(1.0)  # pos {0.8} vs neg {0.3, 0.4}
    assert all(math.isnan(v) for v in branch_aucs({k: [] for k in cols}, 0).values())


@pytest.mark.parametrize("site_name", ["us", "ffdm"])
def test_mgus_evaluate_reply_carries_the_three_scores_at_every_site(site_name, sites) -> None:
    cfg = _cfg("mgus", mgus_fusion_layers=7)
    task = task_for(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    site = task.open(sites[site_name], cfg)
    extra = task.extra_metrics(model, site, cfg, CPU, server_round=cfg.rounds)
    assert tuple(extra) == BRANCH_AUC_KEYS  # fixed keys: every site's reply the same
    assert all(isinstance(v, float) for v in extra.values())
    if site_name == "ffdm":  # no ultrasound: its branch and the fusion network are undefined here
        assert math.isnan(extra["test_auc_us"]) and math.isnan(extra["test_auc_fused"])
    y, p, _ = task.predict(model, site, "test", cfg, CPU)  # the fusion phase: fused where a lesion has US
    assert len(set(y.tolist())) == 2  # the fixture's test split has both classes
    assert 0.0 <= extra["test_auc_mg"] <= 1.0
    if site_name == "ffdm":  # predict scores every lesion by the mammography branch alone
        assert extra["test_auc_mg"] == pytest.approx(auc_mann_whitney(y.astype(np.int8), p))
    else:  # every test lesion has an ultrasound image: predict's score is the fusion network's
        assert all(site.datasets["test"]._has_us)
        assert extra["test_auc_fused"] == pytest.approx(auc_mann_whitney(y.astype(np.int8), p))
        assert 0.0 <= extra["test_auc_us"] <= 1.0
    # the server accepts them (NaN is a scalar metric's "undefined")
    check_metrics({**extra, "num-examples": 3}, hist_bins=cfg.hist_bins)
