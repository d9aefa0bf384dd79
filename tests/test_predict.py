"""``fedbreast site predict`` (issue 16 part 1, multiview): a tiny model trained in simulation
scores a freshly generated DICOM folder that was never ingested, one row per breast of every
exam, the same scores as a plain forward pass, a missing view named in its exam's rows."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from fedbreast.cli import main
from fedbreast.server.checkpoints import load_checkpoint, save_checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.cache import open_cache
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.manifest import MAMMO_VIEWS, group_exams, load_manifest
from fedbreast.shared.data.site_data import preprocess_for
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.predict import site_threshold
from fedbreast.simulation.simulate import simulate

TINY = dict(rounds=1, backbone="smallcnn", image_h=64, image_w=32, bootstrap=20, workers=0, amp="off")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    run = root / "run"
    simulate(run, sites=2, patients=8, overrides=TINY, engine="inprocess", echo=lambda *_: None)
    # A fresh hospital, never ingested, another seed; its annotations are ignored (unlabelled).
    generate_federation(root / "new", profiles=[SiteProfile(name="new", n_patients=4)], seed=1234, workers=1)
    dicom = root / "new" / "new" / "dicom"
    # One exam loses its right CC view (every energy of it).
    files = sorted(dicom.rglob("*.dcm"))
    first_exam = files[0].parent
    for f in sorted(first_exam.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.ImageLaterality == "R" and ds.ViewPosition == "CC":
            f.unlink()
    out = root / "out"
    assert main(["site", "predict", str(dicom), "--checkpoint", str(run), "--out", str(out)]) == 0
    return {"root": root, "run": run, "out": out, "dicom": dicom}


def test_one_row_per_breast_of_every_exam_with_scores_and_decisions(predicted, capsys) -> None:
    out = predicted["out"]
    site = out / "site"
    assert (site / "manifest.jsonl").exists() and (site / "rejected.txt").exists()  # the normal ingest
    exams = group_exams(load_manifest(site))
    rows = read_rows(out / "predictions.csv")
    assert list(rows[0]) == ["patient", "exam", "laterality", "unit", "score", "decision", "threshold", "missing_views"]
    assert len(exams) == 4 and len(rows) == 2 * len(exams)
    assert {(r["exam"], r["laterality"]) for r in rows} == {(e, s) for e in exams for s in "LR"}
    assert {r["patient"] for r in rows} == {ex.patient for ex in exams.values()}  # the manifest's local ids
    for r in rows:
        score, t = float(r["score"]), float(r["threshold"])
        assert 0.0 <= score <= 1.0
        assert int(r["decision"]) == int(score >= t)
    # The run recorded no validation threshold for a site named "site": 0.5, and it says so.
    assert {float(r["threshold"]) for r in rows} == {0.5}


def test_the_scores_are_a_plain_forward_pass_of_the_checkpoint(predicted) -> None:
    ckpt = load_checkpoint(predicted["run"], "final")
    assert ckpt is not None
    cfg = RunConfig.from_flower(ckpt.meta["config"])
    net = build_model(cfg)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()})
    net.eval()
    site = predicted["out"] / "site"
    exams = group_exams(load_manifest(site))
    cache = open_cache(site, preprocess_for(cfg))
    rows = {(r["exam"], r["laterality"]): r for r in read_rows(predicted["out"] / "predictions.csv")}
    complete = [k for k, ex in sorted(exams.items()) if len(ex.images) == 4 * len(ex.energies)]
    assert len(complete) >= 2
    for key in complete[:2]:
        ex = exams[key]
        energies = ("LE", "DES") if {"LE", "DES"} <= ex.energies else ("FFDM",)
        views = []
        for v in MAMMO_VIEWS:
            planes = [cache.get(ex.images[(v[0], v[1:], e)].sha256) for e in energies]
            planes += [np.zeros_like(planes[0])] * (cfg.in_channels - len(planes))  # FFDM: blank DES
            views.append(np.stack(planes))
        x = torch.from_numpy(np.stack(views)[None].astype(np.float32))
        with torch.no_grad():
            p = torch.sigmoid(net(x)).numpy()[0]
        for j, side in enumerate("LR"):
            assert float(rows[(key, side)]["score"]) == pytest.approx(float(p[j]), abs=1e-5)


def test_a_missing_view_is_named_in_its_exams_rows(predicted) -> None:
    rows = read_rows(predicted["out"] / "predictions.csv")
    named = [r for r in rows if r["missing_views"]]
    assert len(named) == 2 and {r["laterality"] for r in named} == {"L", "R"}
    assert len({r["exam"] for r in named}) == 1
    missing = named[0]["missing_views"].split(";")
    assert missing and all(m.startswith("RCC-") for m in missing)


def test_an_ingested_site_uses_its_validation_threshold_and_threshold_overrides(predicted, capsys) -> None:
    run, root = predicted["run"], predicted["root"]
    site1 = root / "data" / "sites" / "site-1"
    recorded = site_threshold(run, "site-1", 1)
    assert recorded is not None
    out = root / "out-site-1"
    assert (
        main(["site", "predict", str(site1), "--checkpoint", str(run / "checkpoints" / "final.pt"), "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "site site-1's validation threshold" in text and "positive at the threshold" in text
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 2 * len(group_exams(load_manifest(site1)))  # every split, every exam
    assert {float(r["threshold"]) for r in rows} == {recorded}
    out2 = root / "out-t"
    assert main(["site", "predict", str(site1), "--checkpoint", str(run), "--out", str(out2), "--threshold", "0"]) == 0
    assert {r["decision"] for r in read_rows(out2 / "predictions.csv")} == {"1"}


def test_other_families_are_refused_naming_the_family(predicted, tmp_path, capsys) -> None:
    ckpt = load_checkpoint(predicted["run"], "final")
    assert ckpt is not None
    meta = {**ckpt.meta, "config": {**ckpt.meta["config"], "model": "birads"}}
    save_checkpoint(tmp_path / "run", "final", ckpt.arrays, meta)
    rc = main(
        [
            "site",
            "predict",
            str(predicted["dicom"]),
            "--checkpoint",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "not yet: predict supports multiview" in err and "'birads'" in err
