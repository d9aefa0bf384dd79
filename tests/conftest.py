"""How the suite is scheduled on two xdist workers (``--dist loadgroup``).

Two kinds of test are heavy, and two of a kind must never run at once:

* ``simulation``: a real Flower simulation (a SuperLink, Ray and one actor per site, each
  training). Two of them at once put 8-10 training processes on 2 cores, and each ran about
  2.5x slower than alone (measured 2026-12-02: the dualmode learning run, 101 s alone,
  251 s next to another simulation). They share one xdist group, so one worker runs them
  one after the other.
* ``loopback``: a deployed federation on loopback (``fedbreast server start`` and site
  daemons): the deployment tests and the fault drills. They mostly wait on round timeouts,
  heartbeats and SuperNode polls, and their timing assertions want a machine that is not
  also running a second federation: they share a group too (the other worker).

Every other test is grouped by its file, so a module fixture is built once. Heavy groups
are collected first, so each worker starts on one and the light files fill in around them.
The measured times per test are in docs/test-suite.md.
"""

from __future__ import annotations

import pytest

HEAVY_GROUPS = ("simulation", "loopback")  # collection order: the longest group first
LOOPBACK_FILES = ("test_fault_tolerance.py", "test_deploy.py")


def group_of(item: pytest.Item) -> str:
    if item.get_closest_marker("simulation"):
        return "simulation"
    if item.path.name in LOOPBACK_FILES:
        return "loopback"
    return item.path.name


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "simulation: runs a real Flower simulation (one at a time, see tests/conftest.py)"
    )


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection, not in modifyitems: xdist's worker turns the group marks into node ids there.
    item.add_marker(pytest.mark.xdist_group(group_of(item)))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item), len(HEAVY_GROUPS)))  # stable: the rest keep their order
