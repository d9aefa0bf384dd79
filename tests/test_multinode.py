"""A Flower simulation on a two-node Ray cluster started on this machine (docs/multi-node.md).

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``): a head node with no
CPUs, as a head that only coordinates, and one worker node with two, each a raylet with its
own ports. ``fedbreast simulate --ray-address auto`` joins it instead of starting Ray
(``auto``: the cluster whose head started last, found through the private temp dir below).
Flower sizes its actor pool from the cluster's CPUs, so every site must run on the second
node, which the cluster's actor table then shows.

Not on the loopback address: a driver that joins ``127.0.0.1:PORT`` is sent to this
machine's own address instead (Ray's ``resolve_ip_for_localhost``), where a loopback-bound
head does not listen, and it waits there for minutes. So the nodes take Ray's default, this
machine's own address; nothing leaves the machine.

The cluster lives in its own Ray temp dir (``RAY_TMPDIR``): its "current cluster" file stays
there, so no other Ray start on this machine (a parallel test's simulation) joins it, and
``shutdown`` stops only its own processes (never ``ray stop``, which stops every Ray here).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from test_simulation import TINY

from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.data.rules import ConfigError
from fedbreast.simulation.flower_runner import cpus_per_site_for, ray_environment
from fedbreast.simulation.simulate import prepare_federation, simulate


@pytest.fixture
def two_node_cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    # Short: Ray's Unix sockets live under it (108 characters at most), so not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="fb-ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # the nodes, this process and the simulation's driver
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=0, include_dashboard=False)  # the head: coordinates, runs no actor
        worker = cluster.add_node(num_cpus=2, include_dashboard=False)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.simulation
@pytest.mark.timeout(300)  # a driver that cannot reach the cluster waits for minutes: fail sooner
def test_a_simulation_joins_a_two_node_ray_cluster_and_runs_its_sites_on_the_second_node(tmp_path, two_node_cluster):
    cluster, worker = two_node_cluster
    data = tmp_path / "data"
    prepare_federation(data, sites=3, patients=8, seed=0, echo=lambda _line: None)
    run = tmp_path / "run"
    result = simulate(
        run,
        overrides={**TINY, "rounds": 1},
        sites_dir=data / "sites",
        ray_address="auto",  # the cluster the last head start wrote to RAY_TMPDIR/ray/ray_current_cluster
        echo=lambda _line: None,
    )
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    assert sorted(r["site"] for r in store.rows("evaluate")) == ["site-1", "site-2", "site-3"]
    assert [r["round"] for r in store.rows("round")] == [1]
    # The sites ran in the cluster's actors, all on the worker node (the head has no CPU for one);
    # a Ray started by the simulation itself would have left the cluster's actor table empty.
    actors = [a for a in cluster.global_state.actor_table(None).values() if "ClientAppActor" in a["ActorClassName"]]
    assert len(actors) == 2, actors  # the worker node's 2 CPUs / 1 CPU per site
    assert {a["Address"]["NodeID"] for a in actors} == {worker.node_id}
    assert len(cluster.global_state.job_table()) == 1  # one driver joined: the simulation's


def test_a_local_run_starts_its_own_ray_and_a_cluster_run_is_ray_only(tmp_path):
    # "local": a fresh Ray here even while a cluster started with `ray start` runs on this machine.
    assert ray_environment(None) == {"RAY_ADDRESS": "local"}
    assert ray_environment("auto") == {"RAY_ADDRESS": "auto"}
    assert cpus_per_site_for(10**6) == 1  # never below one CPU (and torch thread) per site
    with pytest.raises(ConfigError, match="ray-address"):
        simulate(tmp_path / "run", sites_dir=tmp_path, engine="inprocess", ray_address="auto")
    with pytest.raises(ConfigError, match="site-workers"):
        simulate(tmp_path / "run", sites_dir=tmp_path, ray_address="auto", workers=2)
