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
from fedbreast.shared.data.rules import ConfigError
from fedbreast.simulation.simulate import prepare_federation, simulate

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=100, hist_bins=64, rounds=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("federation")
    prepare_federation(data, sites=3, patients=8, seed=0, echo=lambda _line: None)
    return data


@pytest.mark.simulation
def test_a_run_resumes_at_the_next_round_and_a_site_that_cannot_train_does_not_fail_it(tmp_path, data_dir):
    """Two claims, one pair of runs: round 1 on three good sites, then a resume on Flower's
    simulation engine for round 2 after site-2's manifest broke. Round 1 runs in-process (the
    same ServerApp round loop and checkpoint writer, test_the_in_process_engine_runs_the_same_apps
    below): a Ray start-up costs 40-60 s of CPU, and the claim is that a Ray run resumes."""
    sites = tmp_path / "sites"
    shutil.copytree(data_dir / "sites", sites, ignore=shutil.ignore_patterns("cache"))
    run = tmp_path / "run"
    simulate(run, overrides={**TINY, "rounds": 1}, sites_dir=sites, engine="inprocess", echo=lambda _line: None)
    assert not (run / "flower").exists()
    (sites / "site-2" / "manifest.jsonl").write_text("{not json\n")
    result = simulate(run, overrides=TINY, sites_dir=sites)  # round 2, from round 1's checkpoint
    assert result["run"]["status"] == "finished:completed"
    assert "resuming" in (run / "flower" / "run.log").read_text()
    store = MetricStore(run)
    evaluations = store.rows("evaluate")
    # Round 1 not repeated: each (round, site) once; in round 2 site-2 could not take part ...
    assert sorted((r["round"], r["site"]) for r in evaluations) == [
        (1, "site-1"),
        (1, "site-2"),
        (1, "site-3"),
        (2, "site-1"),
        (2, "site-3"),
    ]
    assert len(store.rows("train")) == 5
    # ... and said why at every stage, naming the file and line, without failing the round.
    failures = store.rows("failure")
    assert {f["stage"] for f in failures} == {"roll-call", "train", "evaluate"}
    assert all("manifest.jsonl:1" in f["reason"] and f["site"] == "site-2" and f["round"] in (0, 2) for f in failures)
    summary = (run / "summary.md").read_text()
    assert "Sites left out of a round" in summary
    for name in ("summary.md", "summary.csv", "roc.png", "learning_curves.png", "config.json"):
        assert (run / name).stat().st_size > 0, name
    # "best" needs a defined validation AUC, which 8-patient sites may not have.
    for kind in ("latest", "final"):
        meta = json.loads((run / "checkpoints" / f"{kind}.json").read_text())
        assert meta["sha256"] and meta["config"]["backbone"] == "smallcnn" and meta["round"] == 2
    assert all(f"| site-{k} |" in summary for k in (1, 3))
    # Only aggregate metrics came back: no per-exam lists other than the fixed-size histograms.
    for row in evaluations:
        lists = {k: v for k, v in row.items() if isinstance(v, list)}
        want = {"test_hist_pos", "test_hist_neg", "val_hist_pos", "val_hist_neg"}  # val: the federated cut-off
        assert set(lists) == want and all(len(v) == 64 for v in lists.values())
    # Resuming with another model is refused (the ServerApp's own check, run here without a Flower start-up).
    other = RunConfig.from_flower(json.loads((run / "config.json").read_text())).replace(rounds=3, image_h=96)
    with pytest.raises(CheckpointError, match="different model"):
        FederatedRun(None, other, run, initial_arrays(other), echo=lambda _line: None)


def test_the_in_process_engine_runs_the_same_apps_without_ray(tmp_path, data_dir):
    """``--engine inprocess``: the ServerApp's round loop and the ClientApp in this process."""
    run = tmp_path / "run"
    result = simulate(
        run, overrides={**TINY, "rounds": 1}, sites_dir=data_dir / "sites", engine="inprocess", echo=lambda _line: None
    )
    assert result["run"]["status"] == "finished:completed"
    assert not (run / "flower").exists()  # no SuperLink, no Ray: nothing of Flower's runtime was started
    store = MetricStore(run)
    assert sorted(r["site"] for r in store.rows("evaluate")) == ["site-1", "site-2", "site-3"]
    assert (run / "summary.md").stat().st_size > 0 and (run / "checkpoints" / "final.json").exists()
    with pytest.raises(ConfigError, match="engine"):
        simulate(run, sites_dir=data_dir / "sites", engine="threads")
