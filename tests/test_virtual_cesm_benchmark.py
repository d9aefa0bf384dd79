"""The seed 004 experiments' arithmetic (issue 18 item 4): claims.py's scoring by breast-density
group (each group's units scored by the task's own code on a subset of the split, every unit
in exactly one group), virtual_cesm.py's claims from paired per-seed differences, and its
section of docs/claims.md surviving claims.py's rewrite of the file."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims  # noqa: E402
import virtual_cesm  # noqa: E402


class _Exams(torch.utils.data.Dataset):
    def __init__(self, exams: list[str], y: list[int]) -> None:
        self.exams, self.y = exams, y

    def __len__(self) -> int:
        return len(self.exams)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.exams[i], self.y[i]


@dataclass
class _Site:
    site_dir: Path
    datasets: dict[str, Any] = field(default_factory=dict)


def test_each_unit_is_scored_once_in_its_density_group(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _Exams(["e1", "e2", "e3", "e4", "e5"], [1, 0, 1, 0, 0])
    site = _Site(Path("/nowhere"), {"test": ds, "train": "untouched"})
    dense, fatty = claims.DENSITY_GROUPS["c"], claims.DENSITY_GROUPS["a"]
    monkeypatch.setattr(claims, "exam_density_groups", lambda _d: {"e1": dense, "e2": fatty, "e3": fatty, "e5": dense})
    seen: list[list[str]] = []

    def score(part: _Site) -> tuple[np.ndarray, np.ndarray]:
        assert part.datasets["train"] == "untouched" and site.datasets["test"] is ds  # a copy, the site unchanged
        items = [part.datasets["test"][i] for i in range(len(part.datasets["test"]))]
        seen.append([e for e, _ in items])
        return np.array([y for _, y in items]), np.array([0.1 * int(e[1]) for e, _ in items])

    y, p, group = claims.by_density(site, "test", score)
    assert sorted(sum(seen, [])) == ds.exams  # every exam once
    by = {g: sorted(e for e, gg in zip(sum(seen, []), group) if gg == g) for g in set(group.tolist())}
    assert by == {dense: ["e1", "e5"], fatty: ["e2", "e3"], claims.NO_DENSITY: ["e4"]}
    order = sum(seen, [])
    assert y.tolist() == [ds.y[ds.exams.index(e)] for e in order]
    assert np.allclose(p, [0.1 * int(e[1]) for e in order])


def test_a_dataset_without_exam_keys_is_one_unknown_group() -> None:
    site = _Site(Path("/nowhere"), {"test": [1, 2, 3]})
    y, p, group = claims.by_density(site, "test", lambda s: (np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9])))
    assert group.tolist() == [claims.NO_DENSITY] * 3 and y.tolist() == [0, 1, 1]


def _run(seed: int, fused: float, ffdm: float, synth: float, dense_gap: float) -> dict[str, Any]:
    arms = {a for c in virtual_cesm.SEED_004_CLAIMS for a in c[2:4]}
    auc = dict.fromkeys(arms, 0.7) | {"FFDM + real CESM": fused, "FFDM alone": ffdm, "FFDM + synthetic CESM": synth}
    dense, fatty = virtual_cesm.GROUPS[1], virtual_cesm.GROUPS[0]
    by = {a: {fatty: {"auc": v, "units": [10, 3]}, dense: {"auc": v, "units": [10, 3]}} for a, v in auc.items()}
    by["FFDM + synthetic CESM"][dense]["auc"] += dense_gap
    by["FFDM + real CESM"][fatty]["auc"] = float("nan")  # one class only in this group
    units = {a: [20, 6] for a in auc}
    quality = {"test_pooled_synth_psnr": 20.0 + seed, "test_pooled_synth_ssim": 0.6}
    return {
        "seed": seed,
        "classifier": "multiview",
        "start": "public",
        "auc": auc,
        "by_density": by,
        "units": units,
        "quality": quality,
    }


def test_seed_004_claims_from_paired_differences_over_seeds() -> None:
    runs = [_run(0, 0.80, 0.70, 0.75, 0.10), _run(1, 0.82, 0.71, 0.70, 0.12), _run(2, 0.79, 0.70, 0.72, 0.08)]
    assert virtual_cesm.verdict([0.10, 0.11, 0.09]) == "holds"
    assert virtual_cesm.verdict([-0.10, -0.11, -0.09]) == "reversed"
    assert virtual_cesm.verdict([0.10, -0.11, 0.02]).startswith("inconclusive (within")
    assert virtual_cesm.verdict([0.1, float("nan")]).startswith("inconclusive (fewer")
    text = virtual_cesm.claims_section(runs, "virtual_cesm.py --seeds 0,1,2")
    row = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| 9")}
    assert row["9a"].endswith("+0.100 ± 0.010 | holds |")
    assert "| n/a, n/a, n/a |" in row["9b"] and "inconclusive (fewer" in row["9b"]  # arm A: no AUC there
    assert row["9d"].endswith("inconclusive (within noise) |")  # +0.05, -0.01, +0.02
    assert "+0.100, +0.120, +0.080" in row["9e"]  # the dense gap minus the non-dense gap
    table = virtual_cesm.table(runs, "cmd")
    assert "| FFDM + real CESM | 0.803 ± 0.015 | 20 (6.0) |" in table and "PSNR 21.000 ± 1.000 dB" in table


def test_claims_rewrite_keeps_the_virtual_cesm_section(tmp_path: Path) -> None:
    doc = tmp_path / "claims.md"
    doc.write_text("# claims\nold table\n")
    claims.write_block(doc, "virtual_cesm.py", "## seed 004\nfirst")
    claims.write_block(doc, "virtual_cesm.py", "## seed 004\nsecond")  # replaced, not appended twice
    text = doc.read_text()
    assert text.count("## seed 004") == 1 and "second" in text and text.startswith("# claims\nold table\n")
    kept = claims.kept_blocks(doc)  # what claims.py appends to its fresh table
    assert "second" in kept and "old table" not in kept and claims.kept_blocks(tmp_path / "none.md") == ""


def test_the_psnr_ceiling_varies_only_what_le_does_not_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/gan_ceiling.py: every redraw renders the same anatomy, so with the invisible
    variables and the detector noise held the variance is zero; with them drawn it is not."""
    import gan_ceiling

    from fedbreast.shared.data import generate as gen

    prof = gen.default_profiles(1, 2)[0]
    drawn = gan_ceiling.view_variances(prof, 0, 1, draws=3, sizes=(32,))[32]
    assert len(drawn) == 4 and all(
        sse > 0 and px > 50 and 0 < s < 1 for sse, px, s in drawn
    )  # four views, a floor above 0
    store = gen._to_stored
    monkeypatch.setattr(gan_ceiling, "_invisible", lambda _rng, d: d)
    monkeypatch.setattr(gen, "_to_stored", lambda s, p, _rng, g: store(s, p, np.random.default_rng(0), g))
    held = gan_ceiling.view_variances(prof, 0, 1, draws=3, sizes=(32,))[32]
    assert [v[0] for v in held] == [0.0] * 4 and all(v[2] > 0.999 for v in held)
    assert all(abs(a[1] - b[1]) <= 0.01 * b[1] for a, b in zip(held, drawn))  # the same breasts (LE noise aside)
