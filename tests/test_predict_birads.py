"""``site predict`` for the birads family (seed 000): one row per breast of every exam, the
lesion breasts scored (any split, labelled or not) as ``BiradsTask.predict`` scores them, the
others with a note; patient-specific fine-tuning per patient at prediction time; a patch score
map per lesion image (``explain``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.manifest import group_exams, load_manifest
from fedbreast.shared.data.schema import Modality
from fedbreast.shared.explain.pointing import pointing_score
from fedbreast.shared.families.birads.task import NO_LESION, BiradsTask
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training import tasks
from fedbreast.simulation.simulate import PRESET, PRESETS

CPU = torch.device("cpu")
SMALL = dict(
    backbone="smallcnn",
    patch_size=32,
    n_patches=6,
    batch_size=64,
    workers=0,
    amp="off",
    bootstrap=0,
    seed=3,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict_birads")
    profile = SiteProfile(name="a", n_patients=6, image_hw=(240, 160))
    generate_federation(root / "gen", profiles=[profile], seed=3, workers=1)
    src = root / "gen" / "a"
    site_dir = root / "site"
    ingest(src / "dicom", site_dir, annotations=src / "annotations.csv", site="a", workers=1)
    cfg = RunConfig(**{**PRESET, **PRESETS["birads"], **SMALL})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    task = BiradsTask()
    t0 = time.perf_counter()
    rows = task.score(model, site_dir, cfg, CPU)
    plain_s = time.perf_counter() - t0
    return {"site_dir": site_dir, "cfg": cfg, "model": model, "task": task, "rows": rows, "plain_s": plain_s}


def _lesion_breasts(site_dir: Path, cfg: RunConfig) -> set[tuple[str, str, str]]:
    energies = cfg.patch_energy_list
    return {
        r.breast_key
        for r in load_manifest(site_dir)
        if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies and r.lesions
    }


def test_every_breast_of_every_exam_and_only_lesion_breasts_scored(site) -> None:
    rows, site_dir = site["rows"], site["site_dir"]
    exams = group_exams(load_manifest(site_dir))
    assert len(rows) == 2 * len(exams)
    assert {(r.patient, r.exam, r.laterality) for r in rows} == {
        (ex.patient, key, side) for key, ex in exams.items() for side in "LR"
    }
    assert {r.unit for r in rows} == {"lesion"}
    scored = {(r.patient, r.exam, r.laterality) for r in rows if r.score is not None}
    lesion = _lesion_breasts(site_dir, site["cfg"])
    assert scored == lesion and 0 < len(scored) < len(rows)
    assert all(0.0 <= r.score <= 1.0 and r.note == "" for r in rows if r.score is not None)
    unscored = [r for r in rows if r.score is None]
    assert unscored and all(r.note == NO_LESION for r in unscored)  # generated: outlines on every energy


def test_test_split_scores_equal_predict(site) -> None:
    task, cfg, model = site["task"], site["cfg"], site["model"]
    tasks._open_family.cache_clear()
    fs = task.open(site["site_dir"], cfg)
    rows = {(r.patient, r.exam, r.laterality): r.score for r in site["rows"]}
    checked = 0
    for split in ("train", "val", "test"):
        y, p, _ = task.predict(model, fs, split, cfg, CPU)
        ds = fs.datasets[split]
        keys = list(dict.fromkeys(r.breast_key for r in ds.images))  # predict's unit order
        labelled = [k for k in keys if any(r.label is not None for r in ds.images if r.breast_key == k)]
        assert len(labelled) == len(p)
        np.testing.assert_allclose([rows[k] for k in labelled], p, rtol=1e-5, atol=1e-6)
        checked += len(p)
    assert checked >= 3


def psft_cfg(site: dict):
    return site["cfg"].replace(patient_finetune=True, psft_lr=1e-2, psft_batch_size=32)


def psft_rows(site: dict) -> list:
    """The rows with patient-specific fine-tuning: the fine-tuning test's, or made here when this
    test runs without it (another worker, or alone)."""
    if "psft_rows" not in site:
        site["psft_rows"] = site["task"].score(site["model"], site["site_dir"], psft_cfg(site), CPU)
    return site["psft_rows"]


def test_patient_finetuning_changes_scores_not_the_model(site) -> None:
    task, model = site["task"], site["model"]
    cfg = psft_cfg(site)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    rows = task.score(model, site["site_dir"], cfg, CPU)
    psft_s = time.perf_counter() - t0
    tuning = task.last_tuning
    print(
        f"psft: {tuning.patients} patients fine-tuned, {tuning.seconds_per_patient:.3f} s/patient; "
        f"score {psft_s:.2f} s with PSFT, {site['plain_s']:.2f} s without"
    )
    assert tuning.patients >= 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    plain = {(r.patient, r.exam, r.laterality): r for r in site["rows"]}
    assert [(r.patient, r.exam, r.laterality) for r in rows] == list(plain)
    tuned = [r for r in rows if r.score is not None and not r.note]
    assert tuned and all(r.score != plain[(r.patient, r.exam, r.laterality)].score for r in tuned)
    # fine-tuning on benign tissue lowers the lesion scores on the whole
    assert np.mean([r.score for r in tuned]) < np.mean([plain[(r.patient, r.exam, r.laterality)].score for r in tuned])
    assert all(
        r.note.startswith("scored without patient-specific fine-tuning") for r in rows if r.score is not None and r.note
    )
    # deterministic per patient: a second pass gives the same scores
    again = task.score(model, site["site_dir"], cfg, CPU)
    assert [r.score for r in again] == [r.score for r in rows]
    site["psft_rows"] = rows


def test_heatmaps_one_per_lesion_image_on_the_cached_grid(site) -> None:
    task, cfg, model = site["task"], site["cfg"], site["model"]
    rows = [r for r in site["rows"] if r.score is not None]
    maps = list(task.explain(model, site["site_dir"], cfg, CPU))
    energies = cfg.patch_energy_list
    lesion_images = {
        (r.breast_key, r.view.value, r.energy.value)
        for r in load_manifest(site["site_dir"])
        if r.modality is Modality.MG and r.view.is_mammo and r.energy.value in energies and r.lesions
    }
    got = [((h.patient, h.exam, h.laterality), *h.view.split("-")) for h in maps]
    assert sorted(got) == sorted(lesion_images) and len(got) == len(set(got))
    # the units in score's order
    order = list(dict.fromkeys(k for k, *_ in got))
    assert order == [(r.patient, r.exam, r.laterality) for r in rows]
    score = {(r.patient, r.exam, r.laterality): r.score for r in rows}
    for h in maps:
        assert h.method == "patch score map" and h.heat.shape == h.image.shape
        assert h.heat.min() >= 0.0 and h.heat.max() <= 1.0 and h.heat.std() > 0
        assert h.lesion is not None and h.lesion.any() and h.record is not None
        assert h.score == score[(h.patient, h.exam, h.laterality)]
    assert pointing_score(maps).images == len(maps)


def test_heatmaps_with_patient_finetuning_use_the_patients_weights(site) -> None:
    task, model, cfg = site["task"], site["model"], psft_cfg(site)
    maps = list(task.explain(model, site["site_dir"], cfg, CPU))
    score = {(r.patient, r.exam, r.laterality): r.score for r in psft_rows(site) if r.score is not None}
    assert maps and all(h.score == score[(h.patient, h.exam, h.laterality)] for h in maps)


def test_unlabelled_lesions_are_scored_with_and_without_finetuning(site, monkeypatch) -> None:
    """A site whose labels are gone (a new hospital's lesions): the same rows and scores."""
    import dataclasses

    from fedbreast.shared.families.birads import task as task_mod

    real = task_mod.read_records

    def unlabelled(site_dir, cfg=None):
        records, name = real(site_dir, cfg)
        return [dataclasses.replace(r, label=None) for r in records], name

    with_psft = psft_rows(site)  # with the labels: made before the labels go
    monkeypatch.setattr(task_mod, "read_records", unlabelled)
    task, model = site["task"], site["model"]
    rows = task.score(model, site["site_dir"], site["cfg"], CPU)
    assert [(r.patient, r.exam, r.laterality, r.score) for r in rows] == [
        (r.patient, r.exam, r.laterality, r.score) for r in site["rows"]
    ]
    rows = task.score(model, site["site_dir"], psft_cfg(site), CPU)
    assert [r.score for r in rows] == [r.score for r in with_psft]


def test_a_patient_without_normal_tissue_is_scored_without_finetuning(site, monkeypatch) -> None:
    from fedbreast.shared.families.birads import psft

    real = psft.normal_patch_dataset
    first = sorted(r.patient for r in site["rows"] if r.score is not None)[0]

    def without_first(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds._by_patient[first] = np.zeros(0, np.int64)
        ds.patient_skipped[first] = "no normal tissue: every patch overlaps a lesion"
        return ds

    monkeypatch.setattr(psft, "normal_patch_dataset", without_first)
    cfg = site["cfg"].replace(patient_finetune=True, psft_lr=1e-2, psft_batch_size=32)
    rows = site["task"].score(site["model"], site["site_dir"], cfg, CPU)
    plain = {(r.patient, r.exam, r.laterality): r.score for r in site["rows"]}
    mine = [r for r in rows if r.patient == first and r.score is not None]
    assert mine and all(
        r.note == "scored without patient-specific fine-tuning: no normal tissue: every patch overlaps a lesion"
        and r.score == plain[(r.patient, r.exam, r.laterality)]
        for r in mine
    )
    assert site["task"].last_tuning.skipped == 1


def test_images_outside_the_patch_energies_are_named(site) -> None:
    cfg = site["cfg"].replace(patch_energies="FFDM")  # a CEM site: LE and DES images only
    rows = site["task"].score(site["model"], site["site_dir"], cfg, CPU)
    assert len(rows) == len(site["rows"]) and all(r.score is None for r in rows)
    lesion = _lesion_breasts(site["site_dir"], site["cfg"])
    for r in rows:
        if (r.patient, r.exam, r.laterality) in lesion:
            assert r.note.startswith("lesion outlined only on ") and "patch-energies=FFDM" in r.note, r.note
        else:
            assert r.note == NO_LESION
    assert list(site["task"].explain(site["model"], site["site_dir"], cfg, CPU)) == []
