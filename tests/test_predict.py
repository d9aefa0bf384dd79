"""``fedbreast site predict`` (issue 16, multiview): a tiny model trained in simulation scores a
freshly generated DICOM folder that was never ingested (with lesion outlines, no labels), one row
per breast of every exam, the same scores as a plain forward pass, a missing view named in its
exam's rows; ``--explain --dicom`` writes a Grad-CAM++ heatmap per view as PNG and DICOM
Secondary Capture; the same model is then evaluated without training and exported, and the
export runs in a fresh interpreter without fedbreast. The other families' scoring and
explanations: tests/test_predict_birads.py, tests/test_predict_lesion_families.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from fedbreast.cli import main
from fedbreast.server.checkpoints import load_checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.cache import open_cache
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.manifest import MAMMO_VIEWS, group_exams, load_manifest
from fedbreast.shared.data.site_data import preprocess_for
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.predict import site_threshold
from fedbreast.simulation.simulate import simulate

# personal-epochs: each site also keeps a personalised model of the last global model (--personal)
TINY = dict(
    rounds=1, backbone="smallcnn", image_h=64, image_w=32, bootstrap=20, workers=0, amp="off", personal_epochs=1
)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    run = root / "run"
    simulate(run, sites=2, patients=8, overrides=TINY, engine="inprocess", echo=lambda *_: None)
    # A fresh hospital, never ingested, another seed: its annotation CSV keeps the outlines (the
    # pointing game needs them) and loses every label (new studies have none).
    generate_federation(root / "new", profiles=[SiteProfile(name="new", n_patients=4)], seed=1234, workers=1)
    dicom = root / "new" / "new" / "dicom"
    with open(root / "new" / "new" / "annotations.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    annotations = root / "outlines.csv"
    with open(annotations, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows({**r, "label": ""} for r in table)
    # One exam loses its right CC view (every energy of it).
    files = sorted(dicom.rglob("*.dcm"))
    first_exam = files[0].parent
    for f in sorted(first_exam.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.ImageLaterality == "R" and ds.ViewPosition == "CC":
            f.unlink()
    out = root / "out"
    argv = ["site", "predict", str(dicom), "--checkpoint", str(run), "--out", str(out)]
    assert main([*argv, "--annotations", str(annotations), "--explain", "--dicom"]) == 0
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
    assert "site site-1's operating point at round 1" in text and "positive at the threshold" in text
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 2 * len(group_exams(load_manifest(site1)))  # every split, every exam
    assert {float(r["threshold"]) for r in rows} == {recorded}
    out2 = root / "out-t"
    assert main(["site", "predict", str(site1), "--checkpoint", str(run), "--out", str(out2), "--threshold", "0"]) == 0
    assert {r["decision"] for r in read_rows(out2 / "predictions.csv")} == {"1"}


def test_explain_writes_a_grad_cam_plus_plus_heatmap_per_view_as_png_and_dicom(predicted) -> None:
    out = predicted["out"]
    site = out / "site"
    exams = group_exams(load_manifest(site))
    assert any(r.lesions for ex in exams.values() for r in ex.images.values())  # the outlines came in
    views = {(key, r.laterality.value, r.view.value) for key, ex in exams.items() for r in ex.images.values()}
    index = read_rows(out / "heatmaps.csv")
    assert {(r["exam"], r["laterality"], r["view"]) for r in index} == views  # every present view, none blank
    assert len(index) == len(views) and {r["method"] for r in index} == {"Grad-CAM++"}
    scores = {(r["exam"], r["laterality"]): r["score"] for r in read_rows(out / "predictions.csv")}
    for r in index:
        assert r["score"] == scores[(r["exam"], r["laterality"])]
        png = out / r["png"]
        assert png.stat().st_mode & 0o777 == 0o600
        img = np.asarray(Image.open(png))
        assert img.shape == (64, 32, 3) and img.std() > 0  # the overlay on the 64x32 input
        ds = pydicom.dcmread(out / r["dicom"])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.pixel_array.shape == (64, 32, 3)
        assert "not for diagnosis" in ds.SeriesDescription
    # The capture sits in the source study, so a PACS viewer files it with the exam.
    source = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in predicted["dicom"].rglob("*.dcm")}
    assert {pydicom.dcmread(out / r["dicom"]).StudyInstanceUID for r in index} <= source
    summary = json.loads((out / "explain_summary.json").read_text())
    pointing = summary["pointing"]
    assert summary["heatmaps"] == len(index) and pointing["images"] > 0  # the outlines reached the pointing game
    assert 0.0 <= pointing["hit_rate"] <= 1.0 and 0.0 < pointing["random_hit_rate"] < 0.5


def test_the_predicted_model_evaluates_without_training_and_exports_to_run_without_fedbreast(
    predicted, tmp_path
) -> None:
    run = predicted["run"]
    sites = predicted["root"] / "data" / "sites"
    rc = main(["evaluate", str(run), "--sites-dir", str(sites), "--engine", "inprocess", "--out", str(tmp_path / "ev")])
    assert rc == 0
    summary = (tmp_path / "ev" / "summary.md").read_text()
    assert "Evaluation only" in summary and "site-1" in summary
    assert not (tmp_path / "ev" / "checkpoints").exists() or not list((tmp_path / "ev" / "checkpoints").glob("*.pt"))
    assert main(["export", str(run), "--out", str(tmp_path / "ts"), "--format", "torchscript"]) == 0
    card = json.loads((tmp_path / "ts" / "model_card.json").read_text())
    x = np.random.default_rng(0).random((3, 4, card["inputs"][0]["shape"][2], 64, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, torch; "
        f"y = torch.jit.load({str(tmp_path / 'ts' / card['model']['file'])!r})(torch.from_numpy(np.load(sys.argv[1]))); "
        "assert not [m for m in sys.modules if m.startswith('fedbreast')]; print(y.shape[0], y.shape[1])"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "2"]


def test_personal_scores_with_the_sites_personalised_model_of_that_checkpoint(predicted, tmp_path, capsys) -> None:
    site1 = predicted["root"] / "data" / "sites" / "site-1"
    final = str(predicted["run"] / "checkpoints" / "final.pt")
    argv = ["site", "predict", str(site1), "--checkpoint", final, "--threshold", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "global")]) == 0
    assert main([*argv, "--out", str(tmp_path / "personal"), "--personal"]) == 0
    assert "personal model of this site" in capsys.readouterr().out
    plain = read_rows(tmp_path / "global" / "predictions.csv")
    personal = read_rows(tmp_path / "personal" / "predictions.csv")
    assert [(r["exam"], r["laterality"]) for r in plain] == [(r["exam"], r["laterality"]) for r in personal]
    assert any(abs(float(a["score"]) - float(b["score"])) > 1e-6 for a, b in zip(plain, personal))
    # A site without a personal model of this checkpoint is refused, saying why.
    new = predicted["out"] / "site"
    rc = main(["site", "predict", str(new), "--checkpoint", final, "--out", str(tmp_path / "x"), "--personal"])
    assert rc == 2
    assert "--personal needs this site's personal state" in capsys.readouterr().err
    assert not (tmp_path / "x" / "predictions.csv").exists()


def test_a_family_without_score_or_explain_is_refused_naming_it(predicted, tmp_path, capsys, monkeypatch) -> None:
    from fedbreast.shared.families.multiview.task import MultiviewTask
    from fedbreast.shared.training.tasks import Task

    site1 = predicted["root"] / "data" / "sites" / "site-1"
    argv = ["site", "predict", str(site1), "--checkpoint", str(predicted["run"])]
    monkeypatch.setattr(MultiviewTask, "explain", Task.explain)
    assert main([*argv, "--out", str(tmp_path / "a"), "--explain"]) == 2
    assert "--explain does not cover the 'multiview' family" in capsys.readouterr().err
    monkeypatch.setattr(MultiviewTask, "score", Task.score)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert "predict does not cover the 'multiview' family" in capsys.readouterr().err
