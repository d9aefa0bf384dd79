"""How the suite is scheduled on three xdist workers (``--dist loadgroup``).

Three kinds of test are heavy; each kind is one xdist group, so two of a kind never run at
once, and the three start together, one per worker:

* ``learning`` (test_family_learning.py): three federations trained in-process until they
  learn. They keep a core busy for minutes; two at once ran each about 2.5x slower than
  alone (2026-12-02: the dualmode run, 101 s alone, 251 s next to another simulation).
* ``drills``: test_fault_tolerance.py (a deployed federation on loopback, ``fedbreast server
  start`` and site daemons, killed and restarted), then the tests marked ``simulation`` (a
  real Flower simulation on Ray: a SuperLink, Ray and one actor per site).
* ``deploy``: test_deploy.py, a second deployed federation.

The deployments mostly wait (round timeouts, SuperNode polls); since the site daemons fork
each ClientApp from a warm process (client/warm_clientapp.py) they cost little CPU. The Ray
runs were in the learning group until 2026-12-03, which made it the longest path through
the suite (17 min with one core busy; the others 9-10 min). Put after test_deploy, they
overlapped the dualmode run and it timed out (fresh clone, one core busy); after the drills
they start when the dualmode run is over. The learning file runs mgus first (test order in
the file), so the dualmode run does not start during the deployments' start-up.

Every other test is grouped by its file, so a module fixture is built once. The heavy
groups are collected first (``--no-loadscope-reorder`` keeps that order), so each worker
starts on one and the light files fill in around them. The measured times per test are in
docs/test-suite.md.
"""

from __future__ import annotations

import pytest

# Collection order: the longest group first.
HEAVY_GROUPS = ("learning", "drills", "deploy")
FILE_GROUPS = {"test_fault_tolerance.py": "drills", "test_deploy.py": "deploy", "test_family_learning.py": "learning"}


def group_of(item: pytest.Item) -> str:
    if item.get_closest_marker("simulation"):
        return "drills"
    return FILE_GROUPS.get(item.path.name, item.path.name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "simulation: runs a real Flower simulation on Ray (one at a time, see tests/conftest.py)"
    )


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection, not in modifyitems: xdist's worker turns the group marks into node ids there.
    item.add_marker(pytest.mark.xdist_group(group_of(item)))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_GROUPS)}
    # In the drills group, the drills first and the Ray simulations after them (stable: the
    # rest keep their order).
    items.sort(
        key=lambda item: (rank.get(group_of(item), len(HEAVY_GROUPS)), bool(item.get_closest_marker("simulation")))
    )
