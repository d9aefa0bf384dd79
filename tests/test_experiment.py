"""``fedbreast experiment`` (issue 17 item 3): patient-grouped, stratified k-fold splits; the
summary's means, paired CIs, verdicts and DeLong counts; and a real run of two arms over two
folds of a generated federation (in-process engine, tiny models)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedbreast.cli import main
from fedbreast.shared.data.manifest import load_manifest
from fedbreast.shared.data.schema import ImageRecord, Split
from fedbreast.shared.data.splits import assign_folds, patient_strata
from fedbreast.simulation.experiment import Repeat, summarise


def _records(n_patients: int) -> list[ImageRecord]:
    from fedbreast.shared.data.schema import Energy, Label, Laterality, Modality, View

    rng = np.random.default_rng(0)
    out = []
    for i in range(n_patients):
        label = Label("malignant") if rng.random() < 0.3 else Label("normal")
        for view in ("CC", "MLO"):
            out.append(
                ImageRecord(
                    site="s",
                    patient=f"p{i:03d}",
                    exam=f"e{i}",
                    laterality=Laterality("L"),
                    view=View(view),
                    modality=Modality("MG"),
                    energy=Energy("FFDM"),
                    path="/x",
                    sha256=f"{i}{view}",
                    rows=1,
                    cols=1,
                    label=label,
                )  # fmt: skip
            )
    return out


def test_k_fold_splits_test_every_patient_once_grouped_and_stratified() -> None:
    records = _records(60)
    k = 5
    tested: Counter[str] = Counter()
    strata = patient_strata(records)
    for fold in range(k):
        split = {}
        for r in assign_folds(records, k, fold, seed=3):
            assert split.setdefault(r.patient, r.split) == r.split  # every image of a patient together
        test = [p for p, s in split.items() if s is Split.TEST]
        tested.update(test)
        malignant = sum(strata[p] == max(strata.values()) for p in test)
        assert abs(malignant - sum(v == max(strata.values()) for v in strata.values()) / k) <= 1  # stratified
        rest = [s for s in split.values() if s is not Split.TEST]
        assert 0.08 <= rest.count(Split.VAL) / len(rest) <= 0.17  # about an eighth of the others
    assert set(tested) == set(strata) and set(tested.values()) == {1}
    assert assign_folds(records, k, 0, seed=3) == assign_folds(records, k, 0, seed=3)
    with pytest.raises(ValueError, match="k >= 2"):
        assign_folds(records, 1, 0)


def test_summary_gives_means_paired_ci_verdict_and_delong_counts() -> None:
    reps = []
    for i, d in enumerate([0.05, 0.07, 0.06, 0.04]):
        r = Repeat(seed=i, fold=None, auc={"a": 0.8 + d, "b": 0.8})
        r.delong = {"b": (d, 0.01 if d > 0.05 else 0.2)}
        reps.append(r)
    s = summarise(["a", "b"], reps)
    assert s["arms"]["a"]["mean"] == pytest.approx(0.855) and s["arms"]["b"]["sd"] == 0.0
    c = s["comparisons"]["a vs b"]
    assert c["verdict"] == "holds" and c["mean_difference"] == pytest.approx(0.055)
    sd = np.std([0.05, 0.07, 0.06, 0.04], ddof=1)
    # A Student-t interval with 3 degrees of freedom (t = 3.182), wider than the four values' range.
    assert c["ci"] == pytest.approx([0.055 - 3.1824 * sd / 2, 0.055 + 3.1824 * sd / 2], abs=1e-4)
    assert c["ci"][0] < 0.04 and c["ci"][1] > 0.07
    assert c["delong_significant"] == {"better": 2, "worse": 0, "of": 4}
    assert c["detectable"] == pytest.approx((3.1824 + 0.9785) * sd / 2, abs=1e-3)  # t(0.975, 3) + t(0.80, 3)
    noisy = [Repeat(seed=i, fold=None, auc={"a": 0.8 + d, "b": 0.8}) for i, d in enumerate([0.1, -0.1, 0.05, -0.04])]
    assert summarise(["a", "b"], noisy)["comparisons"]["a vs b"]["verdict"] == "inconclusive"


def test_an_experiment_runs_every_arm_on_every_fold_with_the_same_test_units(tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp"
    argv = ["experiment", "--compare", "view-fusion=average,single", "--out", str(out), "--seeds", "0"]
    argv += ["--folds", "2", "--sites", "2", "--patients", "8", "--rounds", "1", "--backbone", "smallcnn"]
    argv += ["--image-size", "64x32", "--set", "bootstrap=20", "--set", "workers=0", "--set", "amp=off"]
    assert main(argv) == 0
    assert "average vs single" in capsys.readouterr().out
    report = json.loads((out / "experiment.json").read_text())
    assert [(r["seed"], r["fold"]) for r in report["repeats"]] == [(0, 0), (0, 1)]
    for r in report["repeats"]:
        assert set(r["auc"]) == {"average", "single"} and r["units"] > 0
        assert all(0.0 <= v <= 1.0 or math.isnan(v) for v in r["auc"].values())
        for run in r["runs"].values():
            assert (Path(run) / "summary.md").exists()
    md = (out / "experiment.md").read_text()
    assert "view-fusion = average vs single" in md and "| seed 0, fold 1 |" in md
    # The folds: each site's patients tested once over the two folds, the cache shared.
    cv = out / "data" / "seed-0" / "cv"
    for site in ("site-1", "site-2"):
        tests = [{r.patient for r in load_manifest(cv / f"fold-{f}" / site) if r.split is Split.TEST} for f in (0, 1)]
        everyone = {r.patient for r in load_manifest(out / "data" / "seed-0" / "sites" / site)}
        assert not tests[0] & tests[1] and tests[0] | tests[1] == everyone
        assert (cv / "fold-0" / site / "cache").is_symlink()
