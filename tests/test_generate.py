"""`fedbreast site generate`: simulated hospitals written as real DICOM + annotation CSV."""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import tomllib
from collections import defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from fedbreast.shared.data import phantom
from fedbreast.shared.data.birads import parse_birads_cell
from fedbreast.shared.data.generate import (
    ANNOTATION_COLUMNS,
    SiteProfile,
    _draw_descriptors,
    default_profiles,
    generate_federation,
    generate_site,
    oracle_auc,
    site_intercept,
)

SEED = 7
# Small images, same field of view in mm as the defaults, so the test stays fast but
# the anatomy and lesions keep their physical sizes.
SMALL = {"site-1": ((200, 136), 1.35), "site-2": ((210, 160), 1.2), "site-3": ((176, 132), 1.45)}


def small_profiles() -> list[SiteProfile]:
    out = []
    for p in default_profiles(3, 4):
        hw, sp = SMALL[p.name]
        p = dataclasses.replace(p, image_hw=hw, pixel_spacing_mm=sp, us_hw=(120, 160), us_spacing_mm=0.36)
        if p.modalities == "ffdm":  # exercise the compressed decode paths on a few files
            p = dataclasses.replace(p, transfer_syntax={"explicit": 0.4, "rle": 0.3, "jpeg2000": 0.3})
        out.append(p)
    return out


def read_site(site: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted((site / "dicom").rglob("*.dcm"))]


def energy_of(ds: pydicom.Dataset) -> str:
    it = list(ds.ImageType)
    return {"LOW_ENERGY": "LE", "RECOMBINED": "DES"}.get(it[3] if len(it) > 3 else "", "FFDM")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def parse_outline(row: dict[str, str]) -> phantom.Outline:
    nums = [float(v) for v in row["roi"].replace(";", " ").split()]
    if row["roi_shape"] == "ellipse":
        return phantom.Outline("ellipse", ((nums[0], nums[1]), (nums[2], nums[3])), nums[4])
    return phantom.Outline("polygon", tuple(zip(nums[0::2], nums[1::2])))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("fed")
    return out, generate_federation(out, seed=SEED, profiles=small_profiles(), workers=1)


@pytest.fixture(scope="module")
def images(fed) -> dict[str, list[pydicom.Dataset]]:
    out, summaries = fed
    return {s.name: read_site(s.path) for s in summaries}


def test_files_are_dicom_with_the_tags_ingest_reads(fed, images) -> None:
    rules = tomllib.loads(resources.files("fedbreast.shared.data").joinpath("ingest_rules.toml").read_text())["ingest"]
    us_patterns = {k: re.compile(v, re.I) for k, v in rules["us_view_patterns"].items()}
    out, summaries = fed
    for s in summaries:
        by_patient: dict[str, set] = defaultdict(set)
        us_views = []
        for ds in images[s.name]:
            assert ds.ImageLaterality in ("L", "R")
            if ds.Modality == "MG":
                assert ds.ViewPosition in ("CC", "MLO")
                by_patient[ds.PatientID].add((ds.ImageLaterality, ds.ViewPosition, energy_of(ds)))
            else:
                assert ds.Modality == "US" and s.modalities == "ffdm+us"
                views = [v for v, pat in us_patterns.items() if pat.search(ds.SeriesDescription)]
                assert len(views) == 1, ds.SeriesDescription
                us_views.append(views[0])
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        energies = ("LE", "DES") if s.modalities == "cem" else ("FFDM",)
        expected = {(lat, v, e) for lat in "LR" for v in ("CC", "MLO") for e in energies}
        assert len(by_patient) == s.n_patients
        assert all(got == expected for got in by_patient.values())
        if s.modalities == "ffdm+us":
            assert "US_TRANS" in us_views
        assert s.n_images == len(images[s.name])


def test_compressed_files_decode_to_the_written_bit_depth(images) -> None:
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in images["site-2"]}
    assert {pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless} <= syntaxes
    for ds in images["site-2"]:
        assert int(ds.pixel_array.max()) <= 2**ds.BitsStored - 1


def test_annotation_csv_matches_docs_and_images(fed, images) -> None:
    out, summaries = fed
    for s in summaries:
        rows = read_csv(s.path / "annotations.csv")
        assert tuple(rows[0].keys()) == ANNOTATION_COLUMNS
        shape_of = {
            (ds.PatientID, ds.ImageLaterality, ds.ViewPosition if ds.Modality == "MG" else None): ds.pixel_array.shape
            for ds in images[s.name]
        }
        us_shape = next((ds.pixel_array.shape for ds in images[s.name] if ds.Modality == "US"), None)
        patients = {ds.PatientID for ds in images[s.name]}
        assert {r["patient_id"] for r in rows} == patients  # every patient is labelled
        outlined = defaultdict(set)
        for r in rows:
            assert r["label"] in ("normal", "benign", "malignant") and r["laterality"] in "LR"
            for column, group in (
                ("mass_shape", "mass_shape"),
                ("mass_margin", "mass_margin"),
                ("internal_enhancement", "internal_enhancement"),
                ("bpe", "bpe"),
                ("density", "density"),
                ("birads", "assessment"),
            ):
                tokens, unknown = parse_birads_cell(group, r[column])
                assert not unknown, (column, r[column])
            if not r["roi"]:
                continue
            assert r["label"] != "normal"
            o = parse_outline(r)
            hw = us_shape if r["view"].startswith("US_") else shape_of[(r["patient_id"], r["laterality"], r["view"])]
            x0, y0, x1, y1 = (
                min(p[0] for p in o.points),
                min(p[1] for p in o.points),
                max(p[0] for p in o.points),
                max(p[1] for p in o.points),
            )
            if o.kind == "ellipse":
                (cx, cy), (rx, ry) = o.points
                x0, y0, x1, y1 = cx - max(rx, ry), cy - max(rx, ry), cx + max(rx, ry), cy + max(rx, ry)
            assert 0 <= x0 and x1 < hw[1] and 0 <= y0 and y1 < hw[0], (r, hw)
            assert o.mask(hw).sum() > 5
            outlined[(r["patient_id"], r["laterality"])].add(r["view"])
        lesion_breasts = {(r["patient_id"], r["laterality"]) for r in rows if r["label"] != "normal"}
        assert lesion_breasts and set(outlined) == lesion_breasts
        assert all({"CC", "MLO"} <= views for views in outlined.values())


def test_verbose_site_spells_descriptors_like_a_reporting_system(fed) -> None:
    out, summaries = fed
    rows = read_csv(out / "site-2" / "annotations.csv")
    assert any(r["density"].startswith("ACR ") for r in rows)
    assert all(r["internal_enhancement"] == "" and r["bpe"] == "" for r in rows)  # no contrast at an FFDM site


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(fed, tmp_path: Path) -> None:
    out, summaries = fed
    k = next(i for i, p in enumerate(small_profiles()) if len(p.transfer_syntax) > 1)  # compressed files too
    profile = small_profiles()[k]
    again = generate_site(profile, tmp_path / "again", seed=SEED, workers=2)
    ref = summaries[k].path
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.path) for p in again.path.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "generation.json":  # holds the output path
            assert (ref / rel).read_bytes() == (again.path / rel).read_bytes(), rel
    other = generate_site(profile, tmp_path / "other", seed=SEED + 1, workers=1)
    assert (other.path / "annotations.csv").read_text() != (ref / "annotations.csv").read_text()
    a = pydicom.dcmread(next(iter(sorted(ref.rglob("*.dcm"))))).pixel_array
    b = pydicom.dcmread(next(iter(sorted(other.path.rglob("*.dcm"))))).pixel_array
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_sites_are_heterogeneous(images) -> None:
    def signature(ds_list):
        mg = [ds for ds in ds_list if ds.Modality == "MG"]
        return (
            {ds.Modality for ds in ds_list},
            {(ds.Rows, ds.Columns) for ds in mg},
            {int(ds.BitsStored) for ds in mg},
            {str(ds.Manufacturer) for ds in mg},
        )

    sigs = [signature(images[name]) for name in ("site-1", "site-2", "site-3")]
    assert len({frozenset(s[0]) for s in sigs}) == 2  # MG only vs MG + US
    assert len({next(iter(s[1])) for s in sigs}) == 3
    assert {next(iter(s[2])) for s in sigs} == {12, 14, 16}
    assert len({next(iter(s[3])) for s in sigs}) == 3
    profiles = default_profiles(7, 50)
    assert [p.modalities for p in profiles[:3]] == ["cem", "ffdm", "ffdm+us"]
    assert len({p.name for p in profiles}) == 7 and len({(p.gamma, p.noise, p.vendor) for p in profiles}) == 7
    assert all(0.3 <= p.prevalence <= 0.6 for p in profiles)
    assert sum(p.n_patients for p in profiles[:3]) == 150
    # A consortium of one kind of hospital keeps every other difference between the sites.
    one_kind = default_profiles(7, 50, "cem")
    assert {p.modalities for p in one_kind} == {"cem"}
    for cem, mixed in zip(one_kind, profiles):
        assert {**cem.to_dict(), "modalities": mixed.modalities} == mixed.to_dict()
    with pytest.raises(ValueError, match="modalities must be one of"):
        default_profiles(2, 5, "mri")


def test_simulate_and_site_generate_take_one_kind_of_hospital(tmp_path, monkeypatch, capsys) -> None:
    from fedbreast import cli
    from fedbreast.simulation import simulate as simulate_module

    assert (
        cli.main(
            ["site", "generate", "--out", str(tmp_path), "--sites", "2", "--patients", "2", "--modalities", "ffdm+us"]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("site-")]
    assert len(lines) == 2 and all("modalities ffdm+us" in line for line in lines)
    seen = {}
    monkeypatch.setattr(simulate_module, "simulate", lambda *a, **kw: seen.update(kw))
    assert cli.main(["simulate", "--modalities", "cem", "--sites", "4"]) == 0
    assert seen["modalities"] == "cem" and seen["sites"] == 4
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["simulate", "--modalities", "mri"])


def test_lesion_enhances_in_des_and_is_hypoechoic_in_us(fed, images) -> None:
    out, summaries = fed
    for site, modality, energy in (("site-1", "MG", "DES"), ("site-3", "US", None)):
        rows = read_csv(out / site / "annotations.csv")
        checked = 0
        for ds in images[site]:
            if ds.Modality != modality or (energy and energy_of(ds) != energy):
                continue
            view = ds.ViewPosition if modality == "MG" else "US_" + ds.SeriesDescription.split()[-1]
            for r in rows:
                if (r["patient_id"], r["laterality"], r["view"]) != (ds.PatientID, ds.ImageLaterality, view):
                    continue
                img = ds.pixel_array.astype(float)
                o = parse_outline(r)
                inside = o.mask(img.shape)
                ys, xs = np.nonzero(inside)
                radius = math.sqrt(inside.sum() / math.pi)
                yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
                d = np.hypot(yy - ys.mean(), xx - xs.mean())
                ring = (d > 1.6 * radius) & (d < 2.6 * radius) & ~inside
                if modality == "MG":
                    ring &= img > np.percentile(img, 60)  # stay inside the breast, off the air
                    assert img[inside].mean() > img[ring].mean(), r
                else:
                    ring &= np.abs(yy - ys.mean()) < radius  # beside the mass: same depth, no posterior shadow
                    assert img[inside].mean() < img[ring].mean(), r
                checked += 1
        assert checked >= 2


def test_summary_and_oracle_auc(fed) -> None:
    out, summaries = fed
    for s in summaries:
        truth = read_csv(s.path / "truth.csv")
        assert s.n_breasts == 2 * s.n_patients == len(truth)
        p = np.array([float(t["p_malignant"]) for t in truth])
        y = np.array([t["label"] == "malignant" for t in truth], dtype=int)
        assert s.n_malignant_breasts == y.sum()
        if 0 < y.sum() < len(y):
            assert s.oracle_auc == pytest.approx(roc_auc_score(y, p))
        assert np.all(p[[t["has_lesion"] == "0" for t in truth]] == 0.0)
    rng = np.random.default_rng(0)
    p, y = rng.random(200).round(1), rng.integers(0, 2, 200)  # many ties
    assert oracle_auc(p, y) == pytest.approx(roc_auc_score(y, p))
    assert math.isnan(oracle_auc(np.ones(3), np.ones(3)))


def test_label_model_hits_prevalence_and_is_not_deterministic() -> None:
    rng = np.random.default_rng(3)
    draws = [_draw_descriptors(rng) for _ in range(3000)]
    scores = np.array([d["score"] for d in draws])
    for prevalence in (0.3, 0.6):
        p = 1.0 / (1.0 + np.exp(-(site_intercept(prevalence) + scores)))
        assert p.mean() == pytest.approx(prevalence, abs=0.03)
        assert 0.05 < np.mean((p > 0.1) & (p < 0.9))  # labels stay random for many lesions
    irregular = np.array([d["shape"] == "irregular" and d["margin"] == "spiculated" for d in draws])
    assert scores[irregular].mean() > scores[~irregular].mean() + 1.0


def test_lesion_keeps_its_nipple_distance_and_stays_inside_the_breast() -> None:
    rng = np.random.default_rng(11)
    spec = phantom.LesionSpec(
        "oval", "circumscribed", "homogeneous", 6.0, 1.5, (), (), 0.4, (), 0.15, 0.4, 0.3, -20.0, "parallel", "none"
    )
    for view in ("CC", "MLO"):
        for _ in range(10):
            g = phantom.sample_geometry(rng, view, (600, 400), 0.45, float(rng.random()), 0.0)
            want = 0.5 * g.depth * 0.45
            pl = phantom.place_lesion(rng, g, spec, want, 0.45, 1.0)
            got = math.hypot(g.depth - pl.cx, g.nipple_y - pl.cy) * 0.45
            assert got == pytest.approx(want, rel=0.02) or got < want  # moved towards the nipple only if needed
            assert phantom.point_clearance(g, pl.cx, pl.cy) > 6.0 / 0.45


def test_mirrored_outline_matches_mirrored_mask() -> None:
    for o in (
        phantom.Outline("ellipse", ((30.0, 40.0), (12.0, 6.0)), 30.0),
        phantom.Outline("polygon", ((10.3, 10.2), (40.6, 15.1), (25.2, 50.7))),
    ):
        m = o.mask((80, 64))
        assert np.array_equal(o.mirrored(64).mask((80, 64)), m[:, ::-1])


def test_ingest_reads_generated_site_without_rejections(fed, tmp_path: Path) -> None:
    from fedbreast.shared.data.ingest import ingest
    from fedbreast.shared.data.manifest import load_manifest

    out, summaries = fed
    for s in summaries:
        report = ingest(s.path / "dicom", tmp_path / s.name, annotations=s.path / "annotations.csv", site=s.name)
        assert (report.rejected, report.annotation_rows_rejected, report.annotation_rows_unmatched) == (0, 0, 0)
        assert report.images == s.n_images and report.unlabelled_images == 0
        records = load_manifest(tmp_path / s.name)
        malignant = {r.breast_key for r in records if r.label is not None and r.label.value == "malignant"}
        assert len(malignant) == s.n_malignant_breasts
        for r in records:  # every image of a lesion breast carries its outline (LE and DES alike)
            if r.label is not None and r.label.value != "normal" and r.view.value in ("CC", "MLO", "US_TRANS"):
                assert len(r.lesions) == 1, r
