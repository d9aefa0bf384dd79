"""Many sites on one machine (issue 19): 20 sites with a tiny model, client sampling, a bounded
worker pool. The Ray engine's pool is checked through the federation config it is started with
(a Ray start-up alone costs 40-60 s of CPU here); the 100-site Ray run with its measured memory
is benchmarks/bench_scale.py's (docs/performance.md)."""

from __future__ import annotations

from collections import Counter

import pytest

from fedbreast.cli import build_parser
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.site_data import open_site
from fedbreast.simulation.flower_runner import default_workers, federation_config
from fedbreast.simulation.simulate import prepare_federation, simulate

SITES = 20
TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=0, hist_bins=16, rounds=2, fraction_train=0.5)


def test_twenty_sites_sample_half_each_round_none_twice_and_every_sampled_site_reports(tmp_path):
    data = tmp_path / "data"
    # FFDM-only sites of ~3 patients: the fewest images that still give every site a train exam.
    site_dirs = prepare_federation(data, sites=SITES, patients=3, seed=0, echo=lambda _line: None, modalities="ffdm")
    assert len(site_dirs) == SITES
    open_site.cache_clear()
    run = tmp_path / "run"
    result = simulate(run, overrides=TINY, sites_dir=data / "sites", engine="inprocess", echo=lambda _line: None)
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    failures = store.rows("failure")
    assert failures == [], failures  # every site of this federation can train: none is left out
    names = {f"site-{k}" for k in range(1, SITES + 1)}
    for rnd in (1, 2):
        trained = [r["site"] for r in store.rows("train") if r["round"] == rnd]
        # fraction-train 0.5 of 20 sites: 10 sampled, each trained once, each with its own train metrics
        assert len(trained) == SITES // 2 and len(set(trained)) == len(trained), Counter(trained)
        assert set(trained) <= names
        rows = [r for r in store.rows("train") if r["round"] == rnd]
        assert all(r["train_seconds"] > 0 and r["num-examples"] > 0 for r in rows)
        evaluated = [r["site"] for r in store.rows("evaluate") if r["round"] == rnd]
        assert sorted(evaluated) == sorted(names)  # fraction-evaluate 1: every site, once
        (summary,) = [r for r in store.rows("round") if r["round"] == rnd]
        assert summary["sites_trained"] == SITES // 2
    # The two rounds sample independently: not one fixed half of the federation.
    first, second = ({r["site"] for r in store.rows("train") if r["round"] == rnd} for rnd in (1, 2))
    assert first != second
    # One process served all 20 sites; the opened sites it keeps are LRU-bounded, not one per site.
    info = open_site.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize < SITES
    assert info.misses >= SITES  # ... so sites were opened again on demand after being evicted


def test_the_ray_engine_serves_many_sites_from_a_bounded_actor_pool():
    # Flower's Ray backend makes (Ray CPUs / client CPUs) actors: the pool is init-args-num-cpus.
    assert federation_config(100, 4) == "num-supernodes=100 client-resources-num-cpus=1 init-args-num-cpus=4"
    assert federation_config(100, 3, cpus_per_site=2).endswith("init-args-num-cpus=6")
    assert default_workers(3) == 3  # a small federation: every site at once, as before
    assert 4 <= default_workers(100) < 100  # 100 sites: a bounded pool, not a process per site
    assert default_workers(1) == 1
    with pytest.raises(ValueError, match="workers"):
        federation_config(10, 0)
    args = build_parser().parse_args(["simulate", "--sites", "100", "--site-workers", "3"])
    assert args.site_workers == 3 and args.sites == 100
    with pytest.raises(ConfigError, match="workers"):
        simulate("unused", workers=0, echo=lambda _line: None)
