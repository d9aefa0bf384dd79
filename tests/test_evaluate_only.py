"""Evaluation without training (``fedbreast evaluate CKPT``), a held-out site (``simulate
--holdout-site``) and the report of the chosen model (issue 16, parts 3 and 4).

One tiny federated run of three sites with site-3 held out (in-process engine), then an
evaluation-only run of its best checkpoint on the same sites through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedbreast.cli import main
from fedbreast.client.audit import read_audit
from fedbreast.server.checkpoints import CheckpointError, initial_checkpoint, read_checkpoint, save_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.simulation.simulate import prepare_federation, simulate

# val_loss is defined on 8-patient sites (val AUC may not be: one class), so a best checkpoint exists.
# model-selection = best-val: this module checks the best-validation path (seed 001's early stopping).
TINY = dict(
    rounds=2, backbone="smallcnn", image_h=64, image_w=32, bootstrap=20, workers=0, key_metric="val_loss",
    model_selection="best-val",
)  # fmt: skip


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Three sites, site-3 held out; then an evaluation-only run of the best checkpoint."""
    root = tmp_path_factory.mktemp("evaluate-only")
    prepare_federation(root / "data", sites=3, patients=8, seed=0, echo=quiet)
    sites = root / "data" / "sites"
    run = root / "run"
    simulate(run, overrides=TINY, sites_dir=sites, engine="inprocess", echo=quiet, holdout_site="site-3")
    audit_before = {d.name: len(read_audit(d)) for d in sorted(sites.iterdir())}
    evaluation = root / "evaluation"
    best = run / "checkpoints" / "best.pt"
    rc = main(["evaluate", str(best), "--sites-dir", str(sites), "--engine", "inprocess", "--out", str(evaluation)])
    assert rc == 0
    return {"run": run, "sites": sites, "evaluation": evaluation, "best": best, "audit_before": audit_before}


def test_a_held_out_site_never_trains_and_is_reported_as_external_validation(trained) -> None:
    store = MetricStore(trained["run"])
    assert {r["site"] for r in store.rows("train")} == {"site-1", "site-2"}
    assert sorted((r["round"], r["site"]) for r in store.rows("evaluate") if r["site"] == "site-3") == [
        (1, "site-3"),
        (2, "site-3"),
    ]
    # No train message ever reached it: its own audit log of what left the site says so.
    lines = read_audit(trained["sites"] / "site-3")
    assert lines and not [ln for ln in lines if ln.get("type") == "train"]
    assert any(ln.get("type") == "train" for ln in read_audit(trained["sites"] / "site-1"))
    summary = (trained["run"] / "summary.md").read_text()
    assert "## External validation: site-3 (held out of training, evaluated every round)" in summary
    external = summary.split("## External validation")[1]
    assert "| site-3 |" in external and "| site-1 |" not in external.split("Weighted mean")[0]


def test_the_report_scores_the_best_validation_model_and_the_last_round_beside_it(trained) -> None:
    run = trained["run"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    summary = (run / "summary.md").read_text()
    value = f"{best['key_value']:.4f}"
    assert f"Scores of the best-validation model, round {best['round']} (key metric val_loss = {value}" in summary
    if best["round"] != 2:
        assert "## Last round (2), for comparison" in summary
    store = MetricStore(run)
    aggregate = next(r for r in store.rows("aggregate") if r["round"] == best["round"])
    assert math.isclose(aggregate["val_loss"], best["key_value"])
    rows = [r for r in store.rows("evaluate") if r["round"] == best["round"]]
    site1 = next(r for r in rows if r["site"] == "site-1")
    line = next(ln for ln in summary.splitlines() if ln.startswith("| site-1 |"))
    assert f"{site1['test_auc']:.3f}" in line  # the first site-1 line is the chosen round's


def test_evaluate_runs_the_checkpoint_on_every_site_without_training(trained) -> None:
    evaluation, sites = trained["evaluation"], trained["sites"]
    store = MetricStore(evaluation)
    assert store.rows("train") == [] and store.rows("aggregate-train") == []
    rows = sorted(store.rows("evaluate"), key=lambda r: r["site"])
    assert [(r["round"], r["site"]) for r in rows] == [(1, "site-1"), (1, "site-2"), (1, "site-3")]
    (aggregate,) = store.rows("aggregate")
    assert 0.0 <= aggregate["test_pooled_auc"] <= 1.0
    # No train message reached a site in this run: the audit lines it added are evaluate / query only.
    for site in sites.iterdir():
        added = read_audit(site)[trained["audit_before"][site.name] :]
        assert added and {ln.get("type") for ln in added} <= {"query", "evaluate"}, site.name
    # Same model, same data: the scores the original run's evaluation wave gave it.
    ckpt = read_checkpoint(trained["best"])
    original = {r["site"]: r for r in MetricStore(trained["run"]).rows("evaluate") if r["round"] == ckpt.round}
    for r in rows:
        for key in ("test_auc", "val_loss", "test_loss"):
            if r.get(key) is not None or original[r["site"]].get(key) is not None:
                assert abs(r[key] - original[r["site"]][key]) < 1e-9, (r["site"], key)
    assert not (evaluation / "checkpoints").exists()  # nothing new was trained, nothing is saved
    summary = (evaluation / "summary.md").read_text()
    assert f"Evaluation only of {trained['best']} (round {ckpt.round} of run {trained['run']}" in summary
    assert "evaluation only (no training)" in summary
    for name in ("summary.csv", "roc.png"):
        assert (evaluation / name).stat().st_size > 0


def test_a_holdout_site_must_be_one_of_the_sites(trained, tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"--holdout-site 'site-9': no such site; the sites are site-1, site-2, site-3"
    ):
        simulate(
            tmp_path / "run", overrides=TINY, sites_dir=trained["sites"], engine="inprocess", holdout_site="site-9"
        )


def test_the_coordinator_refuses_a_checkpoint_of_another_model_or_a_damaged_one(trained, tmp_path) -> None:
    cfg = RunConfig.from_flower(read_checkpoint(trained["best"]).meta["config"])
    assert initial_checkpoint(trained["best"], cfg.model_signature()).round >= 1
    with pytest.raises(CheckpointError, match="different model"):
        initial_checkpoint(trained["best"], cfg.replace(image_h=128).model_signature())
    ckpt = read_checkpoint(trained["best"])
    path = save_checkpoint(tmp_path, "best", ckpt.arrays, ckpt.meta)
    payload_meta = {**ckpt.meta, "sha256": "0" * 64}
    import torch

    torch.save(
        {"arrays": {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt.arrays.items()}, "meta": payload_meta}, path
    )
    with pytest.raises(CheckpointError, match="content hash does not match"):
        initial_checkpoint(path, cfg.model_signature())


def test_evaluate_on_a_deployed_federation_launches_flwr_run_with_the_checkpoint(
    trained, tmp_path, monkeypatch
) -> None:
    """The deployed path's argument building (a deployed federation is test_deploy.py's, too
    expensive here): ``fedbreast run``'s launcher gets the checkpoint's run config, one round,
    init-checkpoint and evaluate-only."""
    import fedbreast.server.launcher as launcher

    seen: dict = {}

    def fake_launch(federation, run_dir, run_config, app_dir=None, flwr_home=None, echo=print):
        seen.update(federation=federation, run_dir=run_dir, run_config=dict(run_config))
        return {"run-id": 7, "status": "finished:completed"}

    monkeypatch.setattr(launcher, "launch", fake_launch)
    out = tmp_path / "deployed"
    assert main(["evaluate", str(trained["best"]), "--federation", "hospitals", "--out", str(out)]) == 0
    rc = seen["run_config"]
    assert seen["federation"] == "hospitals" and Path(seen["run_dir"]) == out.resolve()
    assert rc["init-checkpoint"] == str(trained["best"].resolve()) and rc["evaluate-only"] == "true"
    assert rc["rounds"] == 1 and rc["backbone"] == "smallcnn" and rc["image-h"] == 64
    RunConfig.from_flower(rc, ignore=("init-checkpoint", "evaluate-only"))  # every other key is a run setting


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no histograms: an empty ROC plot
def test_a_report_whose_best_round_is_not_the_last_gives_both(tmp_path) -> None:
    """write_report on a run whose validation peaked in round 1 of 2: round 1 is scored, round 2 beside it."""
    from fedbreast.server.report import write_report

    store = MetricStore(tmp_path)
    for rnd, auc, val in ((1, 0.81, 0.9), (2, 0.62, 0.7)):
        store.append(rnd, "evaluate", "site-a", {"test_auc": auc, "test_n": 10, "test_exams": 5, "val_auc": val})
        store.append(rnd, "aggregate", "ALL", {"test_auc": auc, "val_auc": val})
    arrays = {"w": np.zeros(2, dtype=np.float32)}
    save_checkpoint(tmp_path, "best", arrays, {"round": 1, "key_metric": "val_auc", "key_value": 0.9})
    write_report(tmp_path, RunConfig(backbone="smallcnn", rounds=2, model_selection="best-val"))
    summary = (tmp_path / "summary.md").read_text()
    assert "Scores of the best-validation model, round 1 (key metric val_auc = 0.9000" in summary
    chosen, last = summary.split("## Last round (2), for comparison")
    assert "| site-a | 5 | 10 | 0.810" in chosen and "| site-a | 5 | 10 | 0.620" in last
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_rows[0].endswith("model,external") and [r.split(",")[-2] for r in csv_rows[1:]] == ["chosen", "last"]


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no histograms: an empty ROC plot
def test_by_default_the_report_and_the_cli_use_the_last_rounds_model(tmp_path) -> None:
    """model-selection = last-round (the default): the last round is scored even when validation
    peaked earlier, the best round is named beside it, and a run directory given to predict,
    export or evaluate resolves to the same model; a run made before the key existed (its
    config.json has no model-selection) still resolves to its best checkpoint."""
    from fedbreast.cli import _checkpoint_arg
    from fedbreast.server.checkpoints import reported_kinds
    from fedbreast.server.report import write_report

    store = MetricStore(tmp_path)
    for rnd, auc, val in ((1, 0.81, 0.9), (2, 0.62, 0.7)):
        store.append(rnd, "evaluate", "site-a", {"test_auc": auc, "test_n": 10, "test_exams": 5, "val_auc": val})
        store.append(rnd, "aggregate", "ALL", {"test_auc": auc, "val_auc": val})
    cfg = RunConfig(backbone="smallcnn", rounds=2)
    assert cfg.model_selection == "last-round"
    save_checkpoint(
        tmp_path, "best", {"w": np.zeros(2, dtype=np.float32)}, {"round": 1, "key_metric": "val_auc", "key_value": 0.9}
    )
    save_checkpoint(tmp_path, "final", {"w": np.ones(2, dtype=np.float32)}, {"round": 2, "config": cfg.to_flower()})
    write_report(tmp_path, cfg)
    summary = (tmp_path / "summary.md").read_text()
    assert "Scores of the last round's model, round 2 (model-selection = last-round" in summary
    assert "the best-validation round, 1 (val_auc = 0.9000), is in checkpoints/best.pt" in summary
    assert "| site-a | 5 | 10 | 0.620" in summary and "0.810" not in summary and "for comparison" not in summary
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_flower()))
    assert reported_kinds(tmp_path) == ["final", "best"]
    _, kind, ckpt = _checkpoint_arg(str(tmp_path))
    assert kind == "final" and ckpt.round == 2
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_flower(), "model-selection": "best-val"}))
    assert _checkpoint_arg(str(tmp_path))[1] == "best"
    legacy = {k: v for k, v in cfg.to_flower().items() if k != "model-selection"}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert reported_kinds(tmp_path)[0] == "best"
    with pytest.raises(ConfigError, match="model_selection|model-selection"):
        RunConfig.from_flower({"model-selection": "lucky-round"})


def test_the_reported_checkpoint_survives_odd_run_folders(tmp_path) -> None:
    """reported_kinds on folders a user may hand over: no config.json (the checkpoints' own
    config decides), a config.json that cannot be read or names no known selection (an error
    naming the file, not a silent pick), and a finished run resumed for more rounds and stopped
    again (its latest is newer than its final: the newer is the last round's model)."""
    from fedbreast.server.checkpoints import CheckpointError, reported_kinds

    cfg = RunConfig(backbone="smallcnn", rounds=4)
    w = {"w": np.zeros(2, dtype=np.float32)}
    save_checkpoint(tmp_path, "best", w, {"round": 1, "config": cfg.to_flower()})
    save_checkpoint(tmp_path, "final", w, {"round": 4, "config": cfg.to_flower()})
    save_checkpoint(tmp_path, "latest", w, {"round": 4, "config": cfg.to_flower()})
    assert reported_kinds(tmp_path) == ["final", "latest", "best"]  # no config.json: the checkpoints' config
    save_checkpoint(tmp_path, "latest", w, {"round": 6, "config": cfg.replace(rounds=8).to_flower()})
    assert reported_kinds(tmp_path)[0] == "latest"  # resumed to round 6 of 8 and stopped: final (4) is stale
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        reported_kinds(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model-selection": "Last-Round"}))
    with pytest.raises(CheckpointError, match="model-selection 'Last-Round' must be one of"):
        reported_kinds(tmp_path)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_a_final_round_without_evaluate_rows_is_named_not_passed_off(tmp_path) -> None:
    from fedbreast.server.report import write_report

    store = MetricStore(tmp_path)
    store.append(1, "evaluate", "site-a", {"test_auc": 0.7, "test_n": 10, "test_exams": 5, "val_auc": 0.8})
    store.append(1, "aggregate", "ALL", {"test_auc": 0.7, "val_auc": 0.8})
    save_checkpoint(tmp_path, "final", {"w": np.zeros(2, dtype=np.float32)}, {"round": 2})
    write_report(tmp_path, RunConfig(backbone="smallcnn", rounds=2))
    summary = (tmp_path / "summary.md").read_text()
    assert "Scores of round 1's model: the last round's (2, checkpoints/final.pt" in summary
    assert "has no evaluate rows in metrics.jsonl" in summary
