"""How the suite is scheduled on three xdist workers (``--dist loadgroup``).

Three kinds of test are heavy, and they are two xdist groups, so at most two heavy tests run
at once, one per worker:

* ``drills``: the tests marked ``simulation`` (a real Flower simulation on Ray: a SuperLink,
  Ray and one actor per site), then test_fault_tolerance.py (a deployed federation on
  loopback, ``fedbreast server start`` and site daemons, killed and restarted). The Ray runs
  come first so that the drills' federation does not start beside test_deploy's: with both
  start-ups at once, the first drill took 194 s with its set-up (2026-12-03).
* ``deploy-learning``: test_deploy.py (a second deployed federation), then
  test_family_learning.py (three federations trained in-process until they learn; they keep
  a core busy for minutes).

The learning runs wait for the deployment: started together, they ran through the start-up of
both deployed federations (seven site daemons, two SuperLinks) and with one core busy the
mgus run took 207 s and the dualmode run 329 s of their 600 s timeout (2026-12-03). Two
learning runs at once ran each about 2.5x slower than alone (2026-12-02). In the learning
file the cheap mgus run comes first.

Every other test is grouped by its file, so a module fixture is built once. The heavy
groups are collected first (``--no-loadscope-reorder`` keeps that order), so two workers
start on them and the light files fill the third and the gaps.

The light files run at a lower CPU priority (nice +5) than the heavy groups. They use the
CPU the heavy groups leave idle (the deployments wait on round timeouts and polls) but do
not take it from a learning run or a drill's round. The measured times per test are in
docs/test-suite.md.
"""

from __future__ import annotations

import os
import warnings

import pytest

# Collection order: the longest group first. Within a group, files in the order listed here.
HEAVY_GROUPS = ("deploy-learning", "drills")
FILE_GROUPS = {
    "test_deploy.py": "deploy-learning",
    "test_family_learning.py": "deploy-learning",
    "test_fault_tolerance.py": "drills",
}


# nice value of a worker running a light test; a weight of about a third of a heavy test's
# under Linux's scheduler, so a light test still progresses when every worker is busy.
LIGHT_NICE = 5
# Relative to what the worker started with (a CI job may itself run niced).
START_NICE = os.getpriority(os.PRIO_PROCESS, 0)


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
    files = list(FILE_GROUPS)
    # In the drills group, the Ray simulations first and the drills after them; in
    # deploy-learning, the deployment first (stable: the rest keep their order).
    items.sort(
        key=lambda item: (
            rank.get(group_of(item), len(HEAVY_GROUPS)),
            not item.get_closest_marker("simulation"),
            files.index(item.path.name) if item.path.name in FILE_GROUPS else 0,
        )
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Only under xdist: a single process (``-n0``) has nothing to share the CPU with. The
    # priority is the worker's, so the daemons and simulations a test starts inherit it.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _set_priority(START_NICE if group_of(item) in HEAVY_GROUPS else START_NICE + LIGHT_NICE)


def _set_priority(nice: int) -> None:
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    elif nice < current:
        # Going back needs CAP_SYS_NICE, so it is not tried. With three workers it never
        # happens: each heavy group is collected first and starts a worker of its own.
        warnings.warn(f"a heavy test runs at nice {current} on this worker (its light tests lowered it)", stacklevel=1)
