"""How the suite is scheduled on three xdist workers (``--dist loadgroup``).

Three kinds of test are heavy; each kind is one xdist group, so two of a kind never run at
once, and the three start together, one per worker:

* ``cpu``: the tests that keep a core busy for minutes. Those marked ``simulation`` run a
  real Flower simulation (a SuperLink, Ray and one actor per site, each training);
  test_family_learning.py trains three federations in-process until they learn. Two of
  them at once ran each about 2.5x slower than alone (measured 2026-12-02: the dualmode
  learning run, 101 s alone, 251 s next to another simulation), and beside each other the
  dualmode test took 490 s (2026-12-03); one after the other they leave the second core to
  the rest of the suite.
* ``drills`` (test_fault_tolerance.py) and ``deploy`` (test_deploy.py): a deployed
  federation on loopback (``fedbreast server start`` and site daemons). They mostly wait on
  round timeouts, SuperNode polls and a ``flwr-clientapp`` process per message, so they cost
  little CPU; one after the other they were 13 minutes of one worker's time, the longest
  path through the suite (2026-12-02). Apart, each waits while the other works.

Every other test is grouped by its file, so a module fixture is built once. The heavy
groups are collected first (``--no-loadscope-reorder`` keeps that order), so each worker
starts on one and the light files fill in around them. The measured times per test are in
docs/test-suite.md.
"""

from __future__ import annotations

import pytest

# Collection order: the longest group first.
HEAVY_GROUPS = ("drills", "cpu", "deploy")
FILE_GROUPS = {"test_fault_tolerance.py": "drills", "test_deploy.py": "deploy", "test_family_learning.py": "cpu"}


def group_of(item: pytest.Item) -> str:
    if item.get_closest_marker("simulation"):
        return "cpu"
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
    # In the cpu group, the short Ray simulations first: the learning runs then start after the
    # deployments' start-up (TLS, data, daemons) has left the CPU (stable: the rest keep their order).
    items.sort(
        key=lambda item: (rank.get(group_of(item), len(HEAVY_GROUPS)), not item.get_closest_marker("simulation"))
    )
