"""Update validation, checkpoints and the per-site metric store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedbreast.server.checkpoints import CheckpointError, check_resumable, load_checkpoint, save_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.validation import check_update
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError


@pytest.fixture()
def reference():
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32), "n": np.array(5, np.int64)}


def test_sound_update_passes(reference):
    update = {k: v + 0.1 if v.dtype == np.float32 else v for k, v in reference.items()}
    assert check_update("a", update, reference) is None


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda u: u.__setitem__("w", np.full((3, 2), np.nan, np.float32)), "non-finite"),
        (lambda u: u.__setitem__("b", np.full(2, np.inf, np.float32)), "non-finite"),
        (lambda u: u.__setitem__("w", np.zeros((2, 3), np.float32)), "shape"),
        (lambda u: u.__setitem__("w", np.zeros((3, 2), np.float64)), "dtype"),
        (lambda u: u.pop("b"), "missing"),
        (lambda u: u.__setitem__("extra", np.zeros(1, np.float32)), "unexpected"),
    ],
)
def test_bad_update_is_dropped_with_a_reason_naming_the_site(reference, mutate, needle):
    update = dict(reference)
    mutate(update)
    problem = check_update("hospital-b", update, reference)
    assert problem is not None and needle in problem.reason
    assert "hospital-b" in str(problem)


def test_norm_bound(reference):
    update = dict(reference, w=np.full((3, 2), 100, np.float32))
    assert "exceeds the bound" in check_update("s", update, reference, max_update_norm=10).reason
    assert check_update("s", update, reference, max_update_norm=1e4) is None


def test_checkpoint_roundtrip_hash_and_resume_refusal(tmp_path, reference):
    cfg = RunConfig(backbone="smallcnn")
    meta = {
        "round": 3,
        "config": cfg.to_flower(),
        "model_signature": cfg.model_signature(),
        "metrics": {"val_auc": 0.8},
    }
    save_checkpoint(tmp_path, "latest", reference, meta)
    ckpt = load_checkpoint(tmp_path, "latest")
    assert ckpt.round == 3 and set(ckpt.arrays) == set(reference)
    assert (tmp_path / "checkpoints" / "latest.json").exists()
    check_resumable(ckpt, cfg.model_signature())
    with pytest.raises(CheckpointError, match="different model"):
        check_resumable(ckpt, cfg.replace(image_h=512).model_signature())
    assert load_checkpoint(tmp_path, "best") is None
    # A damaged file is detected, not silently loaded.
    path = tmp_path / "checkpoints" / "latest.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="latest.pt"):
        load_checkpoint(tmp_path, "latest")


def test_metric_store_keeps_every_site_and_truncates_cut_rounds(tmp_path):
    store = MetricStore(tmp_path)
    for rnd in (1, 2, 3):
        for site in ("a", "b"):
            store.append(rnd, "evaluate", site, {"val_auc": 0.5 + rnd / 10, "nan": float("nan")})
    assert len(store.rows("evaluate")) == 6
    assert store.rows()[0]["nan"] is None
    assert store.truncate_after(2) == 2
    assert {r["round"] for r in store.rows()} == {1, 2}
    assert not math.isnan(store.rows()[0]["val_auc"])


def test_run_config_rejects_bad_values_by_key():
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        RunConfig.from_flower({"roundz": 2})
    with pytest.raises(ConfigError, match="rounds = 0"):
        RunConfig.from_flower({"rounds": 0})
    with pytest.raises(ConfigError, match="expected int"):
        RunConfig.from_flower({"batch-size": "eight"})
    cfg = RunConfig.from_flower({"rounds": 4, "augment": "false", "lr": 1})
    assert cfg.rounds == 4 and cfg.augment is False and cfg.lr == 1.0
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_simulate_rejects_a_bad_config_before_anything_starts(tmp_path, capsys):
    from fedbreast.cli import main

    assert main(["simulate", "--out", str(tmp_path / "run"), "--set", "roundz=2"]) == 2
    assert "unknown key 'roundz'" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "run"), "--image-size", "256by128"]) == 2
    assert "expected HxW" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
