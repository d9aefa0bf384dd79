"""benchmarks/default_quality.py's arithmetic: the issue's three criteria on the means over
seeds, the paired per-seed differences (update encodings, strategies against the default),
and merging measurements of different seeds without counting one twice."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "default_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "default_quality.py"
)
assert _SPEC is not None and _SPEC.loader is not None
dq = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dq)


def run(seed: int, fed: float, small_fed: float, small_local: float, big_fed: float = 0.80) -> dict[str, Any]:
    site = lambda f, loc, n: {  # noqa: E731
        "train_exams": n,
        "federated": f,
        "federated_last": f,
        "personalised": None,
        "local": loc,
        "pooled": 0.8,
    }
    return {
        "seed": seed,
        "seconds": 1.0,
        "pooled": {"federated": fed, "federated_last": fed, "local": 0.85, "pooled": 0.80},
        "sites": {"site-a": site(big_fed, 0.84, 70), "site-b": site(small_fed, small_local, 40)},
    }


def test_the_criteria_are_judged_on_the_means_over_seeds():
    # site-b is the smallest; it loses on seed 0 and wins by more on seed 1: on the means it wins.
    runs = [run(0, 0.79, 0.60, 0.65), run(1, 0.79, 0.90, 0.80)]
    v = dq.verdicts(runs)
    assert v["smallest_site"] == "site-b"
    assert v["1 pooled ratio (global, best-validation round)"] == pytest.approx(0.79 / 0.80)
    assert v["1 pooled >= 0.98 x pooled-centralised (global, best-validation round)"] is True
    assert v["2 beats local-only at the smallest site (global, best-validation round)"] is True
    # site-a: 0.80 against 0.84, within 0.05.
    assert v["3 no site more than 0.05 below local-only (global, best-validation round)"] is True
    worse = dq.verdicts([run(0, 0.70, 0.60, 0.65, big_fed=0.70), run(1, 0.70, 0.60, 0.65, big_fed=0.70)])
    assert worse["1 pooled >= 0.98 x pooled-centralised (global, best-validation round)"] is False
    assert worse["2 beats local-only at the smallest site (global, best-validation round)"] is False
    assert worse["3 no site more than 0.05 below local-only (global, best-validation round)"] is False
    # No personalised figures measured: no verdict is made up for them.
    assert not any("personalised" in k for k in v)


def test_paired_differences_are_per_seed_and_only_on_common_seeds():
    ref = [run(0, 0.80, 0.70, 0.70), run(1, 0.75, 0.70, 0.70)]
    new = [run(0, 0.81, 0.70, 0.70), run(1, 0.74, 0.72, 0.70), run(2, 0.50, 0.50, 0.50)]
    text = dq.paired(new, ref)
    pooled = next(line for line in text.splitlines() if line.startswith("| all test units pooled | global, best"))
    assert "+0.010" in pooled and "-0.010" in pooled and "+0.000 ± 0.014" in pooled
    assert "seed 2" not in text  # not in the reference: not paired
    with pytest.raises(SystemExit, match="no seed in common"):
        dq.paired([run(5, 0.8, 0.7, 0.7)], ref)


def test_rescore_refuses_a_seed_measured_twice(tmp_path):
    doc = tmp_path / "a.json"
    doc.write_text(json.dumps({"runs": [run(0, 0.8, 0.7, 0.7)]}))
    with pytest.raises(SystemExit, match="seed 0 is in more than one file"):
        dq.rescore([doc, doc], tmp_path)
