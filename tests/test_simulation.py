"""Real Flower simulation runs (SuperLink in simulation mode, Ray SuperNodes) with a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedbreast.server.app import initial_arrays
from fedbreast.server.checkpoints import CheckpointError
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.simulation.simulate import prepare_federation, simulate

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=100, hist_bins=64, rounds=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("federation")
    prepare_federation(data, sites=3, patients=8, seed=0, echo=lambda _line: None)
    return data


def test_a_run_resumes_at_the_next_round_and_writes_a_full_report(tmp_path, data_dir):
    run = tmp_path / "run"
    simulate(run, sites=3, patients=8, overrides={**TINY, "rounds": 1}, data_dir=data_dir)
    result = simulate(run, sites=3, patients=8, overrides=TINY, data_dir=data_dir)  # round 2, from round 1's checkpoint
    assert result["run"]["status"] == "finished:completed"
    assert "resuming" in (run / "flower" / "run.log").read_text()
    store = MetricStore(run)
    evaluations = store.rows("evaluate")
    # Round 1 not repeated: each (round, site) once.
    assert sorted((r["round"], r["site"]) for r in evaluations) == [(rnd, f"site-{k}") for rnd in (1, 2) for k in (1, 2, 3)]
    assert len(store.rows("train")) == 6
    for name in ("summary.md", "summary.csv", "roc.png", "learning_curves.png", "config.json"):
        assert (run / name).stat().st_size > 0, name
    # "best" needs a defined validation AUC, which 8-patient sites may not have.
    for kind in ("latest", "final"):
        meta = json.loads((run / "checkpoints" / f"{kind}.json").read_text())
        assert meta["sha256"] and meta["config"]["backbone"] == "smallcnn" and meta["round"] == 2
    summary = (run / "summary.md").read_text()
    assert all(f"| site-{k} |" in summary for k in (1, 2, 3))
    # Only aggregate metrics came back: no per-exam lists other than the fixed-size histograms.
    for row in evaluations:
        lists = {k: v for k, v in row.items() if isinstance(v, list)}
        assert set(lists) == {"test_hist_pos", "test_hist_neg"} and all(len(v) == 64 for v in lists.values())
    # Resuming with another model is refused (the ServerApp's own check, run here without a Flower start-up).
    other = RunConfig.from_flower(json.loads((run / "config.json").read_text())).replace(rounds=3, image_h=96)
    with pytest.raises(CheckpointError, match="different model"):
        FederatedRun(None, other, run, initial_arrays(other), echo=lambda _line: None)


def test_a_site_that_cannot_train_does_not_fail_the_round(tmp_path, data_dir):
    sites = tmp_path / "sites"
    shutil.copytree(data_dir / "sites", sites, ignore=shutil.ignore_patterns("cache"))
    (sites / "site-2" / "manifest.jsonl").write_text("{not json\n")
    run = tmp_path / "run"
    simulate(run, overrides={**TINY, "rounds": 1}, sites_dir=sites)
    store = MetricStore(run)
    assert {r["site"] for r in store.rows("evaluate")} == {"site-1", "site-3"}
    failures = store.rows("failure")
    assert {f["stage"] for f in failures} == {"roll-call", "train", "evaluate"}
    assert all("manifest.jsonl:1" in f["reason"] and f["site"] == "site-2" for f in failures)
    assert "Sites left out of a round" in (run / "summary.md").read_text()
