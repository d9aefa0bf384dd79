"""SecAgg+ on the FedAvg train wave (issue 5, item 3).

In-process, against the real ClientApp (simulation/inprocess.py's InProcessGrid): the masked
sum gives the same global model as plain FedAvg, and a site that drops out at the masking
stage is unmasked away while the others' sum completes. Then the same through a real Flower
simulation; the deployment run over TLS is in tests/test_deploy.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_poisoning import make_sites, run_federation

from fedbreast.client.secure_aggregation import SecureAggregationRefused, change
from fedbreast.server.checkpoints import load_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import ConfigError, RunConfig
from fedbreast.simulation.inprocess import InProcessGrid
from fedbreast.simulation.simulate import simulate

SITES = 4


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory) -> Path:
    return make_sites(tmp_path_factory.mktemp("secagg"), sites=SITES, patients=12)


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(run_dir, "final").arrays


def test_the_masked_sum_gives_the_fedavg_model(sites_dir, tmp_path, monkeypatch):
    run_federation(sites_dir, tmp_path / "plain", 0, {}, rounds=1)
    replies = []
    pull = InProcessGrid.pull_messages
    monkeypatch.setattr(InProcessGrid, "pull_messages", lambda self, ids: replies.extend(out := pull(self, ids)) or out)
    _, secure = run_federation(sites_dir, tmp_path / "secure", 0, {}, rounds=1, secure_aggregation=True)
    # What left the sites in the train wave: no model array at all, only keys, shares and masked
    # vectors (bytes) and the aggregate training metrics.
    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == 4 * SITES  # four stages
    for r in train:
        assert all(len(rec) == 0 for rec in r.content.array_records.values())
        assert set(r.content.config_records) <= {"secaggplus_configs", "fitres.metrics", "fitres.status"}
        for v in r.content.config_records.get("fitres.metrics", {}).values():
            assert isinstance(v, (int, float)) or v in {f"site-{i}" for i in range(1, SITES + 1)}, v
    assert not secure.rows("failure"), secure.rows("failure")
    assert sorted(r["site"] for r in secure.rows("train")) == [f"site-{i}" for i in range(1, SITES + 1)]
    a, b = final_arrays(tmp_path / "plain"), final_arrays(tmp_path / "secure")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        # Stochastic quantisation: a step of 2 * clip / 2^22 = 2e-6 per value, per site.
        np.testing.assert_allclose(b[k], a[k], atol=2e-5, err_msg=k)
    # Per-site training metrics still arrive under their names; the aggregate row is written.
    agg = secure.rows("aggregate-train")
    assert agg and agg[0]["sites"] == SITES


def test_a_site_dropping_out_at_the_masking_stage_is_unmasked_away(sites_dir, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(sites_dir, broken, ignore=shutil.ignore_patterns("cache"))
    (broken / "site-2" / "manifest.jsonl").write_text("{not json\n")
    run_federation(broken, tmp_path / "plain", 0, {}, rounds=1)  # plain FedAvg of sites 1, 3 and 4

    # site-2 takes part in key setup and sharing, then crashes at the stage that trains and masks.
    import fedbreast.client.app as client_app

    def crash_at_site_2(context):
        if context.node_config["site-name"] == "site-2":
            raise RuntimeError("site-2 went down while training")

    monkeypatch.setattr(client_app, "straggle", crash_at_site_2)
    _, secure = run_federation(sites_dir, tmp_path / "secure", 0, {}, rounds=1, secure_aggregation=True)
    train_failures = [f for f in secure.rows("failure") if f["stage"] == "train"]
    assert [f["site"] for f in train_failures] == ["site-2"], train_failures
    assert "left secure aggregation: RuntimeError in the site's train handler" in train_failures[0]["reason"]
    assert sorted(r["site"] for r in secure.rows("train")) == ["site-1", "site-3", "site-4"]
    # Its masks were reconstructed from the others' shares: the result is FedAvg of the three survivors.
    a, b = final_arrays(tmp_path / "plain"), final_arrays(tmp_path / "secure")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-5, err_msg=k)


def test_sites_refuse_what_the_coordinator_can_no_longer_check():
    base = np.zeros(3, np.float32)
    with pytest.raises(SecureAggregationRefused, match="conv.weight.*not finite"):
        change("conv.weight", np.array([0, np.nan, 0], np.float32), base, clip=4.0)
    with pytest.raises(SecureAggregationRefused, match="fc.bias changed by 9.*secagg-clip-range 4"):
        change("fc.bias", np.array([0, 9, 0], np.float32), base, clip=4.0)
    with pytest.raises(SecureAggregationRefused, match="shape"):
        change("fc.bias", np.zeros(4, np.float32), base, clip=4.0)
    np.testing.assert_allclose(change("w", np.array([1, -2, 0.5], np.float32), base, clip=4.0), [1, -2, 0.5])
    # A step counter's change is clipped here, not by the quantiser.
    assert change("bn.num_batches_tracked", np.array(30), np.array(10), clip=4.0) == 4.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"strategy": "fedmedian"}, "fedavg"),
        ({"update_norm_bound": 1.0}, "update-norm-bound"),
        ({"dp": "central"}, "dp = 'local'"),
        ({"model": "latefusion"}, "per-site updates"),
        ({"secagg_threshold": 0.0}, "secagg-threshold"),
    ],
)
def test_secure_aggregation_refuses_what_needs_single_updates(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{"secure_aggregation": True, **changes})


@pytest.mark.simulation
def test_secure_aggregation_in_a_flower_simulation(tmp_path):
    run = tmp_path / "run"
    tiny = dict(
        backbone="smallcnn", image_h=64, image_w=32, bootstrap=100, hist_bins=64, rounds=1, secure_aggregation=True
    )
    result = simulate(run, sites=3, patients=8, overrides=tiny, data_dir=tmp_path / "data")
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    assert not store.rows("failure"), store.rows("failure")
    assert sorted(r["site"] for r in store.rows("train")) == ["site-1", "site-2", "site-3"]
    assert sorted(r["site"] for r in store.rows("evaluate")) == ["site-1", "site-2", "site-3"]
    log = (run / "flower" / "run.log").read_text()
    assert "Secure aggregation commencing" in log or "secure" in log.lower()
