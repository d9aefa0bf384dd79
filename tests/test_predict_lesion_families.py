"""``site predict`` for the lesion families and late fusion (issue 16): ``Task.score`` gives one
row per breast of every exam (any split, labelled or not) with ``predict()``'s scores, a note on
every breast it cannot score; ``Task.explain`` one Grad-CAM heatmap per view image of each scored
unit, on the grid the network saw, with the unit's score and its outline cut the same way.

Tiny generated sites (a CEM one, an FFDM + ultrasound one), edited after ingest: a lesion
breast loses its label (unlabelled: scored all the same), another its CC DES image (dualmode
cannot score it; late fusion names the empty slot), another its ultrasound (mgus scores it by
the mammography branch alone). Random-init smallcnn models: the scores' values do not matter."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.manifest import MANIFEST, group_exams, load_manifest
from fedbreast.shared.data.schema import Modality
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.tasks import task_for
from fedbreast.simulation.simulate import PRESET, PRESETS

TINY = dict(backbone="smallcnn", workers=0, amp="off", batch_size=4, box_size=48, crop_size=48, image_h=64, image_w=32)
FAMILY_SITE = {"dualmode": "cem", "mgus": "us", "latefusion": "cem"}
CPU = torch.device("cpu")


def _edit_manifest(site: Path, edit) -> None:
    path = site / MANIFEST
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if edit(r) is not False))


def _lesion_breasts(site: Path, modality: Modality = Modality.MG) -> list[tuple[str, str, str]]:
    """Train-split breasts with an outlined mammography lesion (the test split stays intact)."""
    recs = load_manifest(site)
    return sorted(
        {r.breast_key for r in recs if r.modality is modality and r.lesions and r.split and r.split.value == "train"}
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lesion-predict")
    profiles = [SiteProfile(name="cem", n_patients=6), SiteProfile(name="us", n_patients=6, modalities="ffdm+us")]
    generate_federation(root / "gen", profiles=profiles, seed=3, workers=1)
    out = {}
    for p in profiles:
        src = root / "gen" / p.name
        out[p.name] = site = root / p.name
        ingest(src / "dicom", site, annotations=src / "annotations.csv", site=p.name, workers=1)

    # CEM: one lesion breast unlabelled, another without its CC DES image.
    unlabelled, no_des = _lesion_breasts(out["cem"])[:2]

    def cem_edit(r):
        key = (r["patient"], r["exam"], r["laterality"])
        if key == unlabelled:
            r["label"] = None
            for les in r["lesions"]:
                les.pop("label", None)
        return not (key == no_des and r["view"] == "CC" and r["energy"] == "DES")

    _edit_manifest(out["cem"], cem_edit)
    # FFDM + US: one lesion breast unlabelled, another (US outlined) loses its ultrasound.
    us_breasts = {(p, lat) for p, _, lat in _lesion_breasts(out["us"], Modality.US)}
    mg_breasts = [k for k in _lesion_breasts(out["us"]) if (k[0], k[2]) in us_breasts]
    no_us, unlabelled_us = mg_breasts[:2]

    def us_edit(r):
        key = (r["patient"], r["exam"], r["laterality"])
        if key == unlabelled_us:
            r["label"] = None
            for les in r["lesions"]:
                les.pop("label", None)
        return not (key == no_us and r["modality"] == "US")

    _edit_manifest(out["us"], us_edit)
    out["unlabelled"] = {"cem": unlabelled, "us": unlabelled_us}  # type: ignore[assignment]
    out["no_des"], out["no_us"] = no_des, no_us  # type: ignore[assignment]
    return out


def _setup(family: str):
    cfg = RunConfig(**{**PRESET, **PRESETS[family], **TINY, "seed": 5})
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval(), task_for(cfg)


def _predict_units(family: str, task, site, split: str) -> list[tuple[str, str, str]]:
    """The units predict() reports on a split, in its order (the labelled ones)."""
    ds = site.datasets[split]
    if family == "dualmode":
        return [k for k, m in zip(ds.breasts, ds._ym) if m]
    if family == "latefusion":
        return [k for k, m, a in zip(ds.breasts, ds._ym, ds._avail) if m and a.any()]
    keys, labelled = [], set()
    for (r, _), m in zip(ds.samples, ds._ym):
        if r.breast_key not in keys:
            keys.append(r.breast_key)
        if m:
            labelled.add(r.breast_key)
    return [k for k in keys if k in labelled]


@pytest.mark.parametrize("family", ["dualmode", "mgus", "latefusion"])
def test_score_every_breast_with_predicts_scores_and_explain_each_view(family, sites) -> None:
    site_dir = sites[FAMILY_SITE[family]]
    cfg, model, task = _setup(family)
    rows = task.score(model, site_dir, cfg, CPU)
    recs = load_manifest(site_dir)
    exams = group_exams(recs)

    # one row per breast of every exam, at the family's unit
    assert [(r.exam, r.laterality) for r in rows] == [(e, s) for e in sorted(exams) for s in "LR"]
    assert {r.unit for r in rows} == {task.unit}
    by_key = {(r.patient, r.exam, r.laterality): r for r in rows}
    scored = [r for r in rows if r.score is not None]
    assert scored and all(0.0 <= r.score <= 1.0 for r in scored)
    assert all(r.note for r in rows if r.score is None) and not any(r.note for r in scored)
    lesion = {r.breast_key for r in recs if r.lesions and r.modality is Modality.MG}

    # the same scores as predict() on the same units (deterministic splits: test; train for mgus/latefusion)
    site = task.open(site_dir, cfg)
    for split in ("test",) if family == "dualmode" else ("test", "train"):
        y, p, _ = task.predict(model, site, split, cfg, CPU)
        units = _predict_units(family, task, site, split)
        assert len(units) == len(p) > 0
        np.testing.assert_allclose([by_key[u].score for u in units], p, rtol=1e-5, atol=1e-6)

    # what cannot be scored says why; what was missing and handled is named
    unlabelled = sites["unlabelled"][FAMILY_SITE[family]]
    assert by_key[unlabelled].score is not None  # unlabelled: scored all the same
    if family == "dualmode":
        assert {r.breast_key for r in recs} - lesion  # contralateral breasts: no outline
        for key, r in by_key.items():
            if key not in lesion:
                assert r.score is None and r.note.startswith("no outlined lesion")
        missing = by_key[sites["no_des"]]
        assert missing.score is None and missing.note == f"missing view: {missing.laterality}CC-DES"
        assert missing.missing_views == [f"{missing.laterality}CC-DES"]
        assert len(scored) == len(lesion) - 1
        # a site without CEM: every breast has a note, none a score
        other = task.score(model, sites["us"], cfg, CPU)
        assert other and all(r.score is None and r.note.startswith("no CEM") for r in other)
    elif family == "mgus":
        assert {(r.patient, r.exam, r.laterality) for r in scored} == lesion
        assert by_key[sites["no_us"]].missing_views == ["US"]
        assert sum("US" in r.missing_views for r in scored) >= 1
        for key, r in by_key.items():
            if key not in lesion:
                assert r.note.startswith("no outlined lesion")
    else:
        assert len(scored) == len(rows)  # every breast has mammography
        assert by_key[sites["no_des"]].missing_views == ["CC-DES"]
        assert all(r.missing_views == [] for k, r in by_key.items() if k != sites["no_des"])

    # explain: one heatmap per view image of each scored unit, in score's order
    heatmaps = list(task.explain(model, site_dir, cfg, CPU))
    per_unit = defaultdict(list)
    for hm in heatmaps:
        per_unit[(hm.patient, hm.exam, hm.laterality)].append(hm)
    assert list(per_unit) == [(r.patient, r.exam, r.laterality) for r in scored]
    assert len({(hm.patient, hm.exam, hm.laterality, hm.unit, hm.view) for hm in heatmaps}) == len(heatmaps)
    grid = {"dualmode": (48, 48), "mgus": (48, 48), "latefusion": (64, 32)}[family]
    for key, hms in per_unit.items():
        row = by_key[key]
        if family == "dualmode":
            assert sorted(hm.view for hm in hms) == ["CC-DES", "CC-LE", "MLO-DES", "MLO-LE"]
        elif family == "latefusion":
            assert len(hms) == 4 - len(row.missing_views)
        else:
            appearances = [r for r in recs if r.breast_key == key and r.modality is Modality.MG for _ in r.lesions]
            us = [hm for hm in hms if hm.view.startswith("US")]
            assert len(hms) - len(us) == len(appearances)
            assert len(us) == (0 if "US" in row.missing_views else len(appearances))
        for hm in hms:
            assert hm.method == "Grad-CAM" and hm.score == pytest.approx(row.score, abs=1e-7)
            assert hm.image.shape == hm.heat.shape == grid and hm.image.ndim == 2
            assert np.isfinite(hm.heat).all() and hm.heat.min() >= 0.0 and hm.heat.max() <= 1.0
            assert hm.record is not None and hm.record.breast_key[2] == key[2]
            if hm.record.lesions:
                assert hm.lesion is not None and hm.lesion.shape == grid and hm.lesion.any()
    if family == "dualmode":
        assert all(hm.lesion is not None for hm in heatmaps)
