"""Suite order: the longest files first, so that under ``-n 2 --dist loadfile`` neither worker
ends with a long file alone (measured: the loopback drills ~7 min, the family runs ~4.5 min)."""

from __future__ import annotations

import pytest

FIRST = ("test_fault_tolerance.py", "test_model_families.py", "test_deploy.py", "test_simulation.py", "test_dp.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order
