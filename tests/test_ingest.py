"""Ingest and site check on real DICOM files written with pydicom, including every bad-input case."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dicom_cases import JPEG_LS_SOURCE, edit, graft_compressed, write_exam, write_jpeg_baseline, write_one

from fedbreast.cli import main as cli
from fedbreast.shared.data import ingest as ingest_mod
from fedbreast.shared.data.check import check_site
from fedbreast.shared.data.ingest import IngestError, ingest
from fedbreast.shared.data.manifest import load_manifest, read_jsonl
from fedbreast.shared.data.rules import ConfigError

HEADER = "patient_id,accession_number,laterality,view,energy,label,roi_shape,roi,mass_shape,mass_margin,internal_enhancement,bpe,density,birads\n"


def rejections(site: Path) -> dict[str, dict]:
    return {Path(r["path"]).name if "/" in r["path"] else r["path"]: r for r in read_jsonl(site / "rejected.jsonl")}


@pytest.fixture()
def clean_site(tmp_path: Path) -> tuple[Path, Path]:
    dicom = tmp_path / "dicom"
    for i in range(6):
        write_exam(dicom, f"PAT{i}", seed=i)
    write_exam(dicom, "FFDM1", energies=("FFDM",))
    ann = tmp_path / "ann.csv"
    ann.write_text(
        HEADER
        + "PAT0,,L,CC,,malignant,ellipse,30 48 8 6,Irregular,Speculated,Heterogenous,mild,C,4B\n"
        + "PAT0,,L,MLO,,malignant,polygon,20 40;40 40;30 60,,,,,,\n"
        + "PAT1,,R,,,benign,,,Oval,circumscribed,homogeneous,minimal,b,3\n"
        + "PAT2,,L,,,malignant,,,,,,,,\n"
        + "PAT3,,R,,,benign,,,,,,,,\n"
        + "PAT4,,L,,,malignant,,,,,,,,\n"
        + "FFDM1,,R,CC,FFDM,benign,box,10 10 30 30,,,,,,\n"
    )
    return dicom, ann


def test_ingest_builds_manifest_with_labels_lesions_and_pseudonyms(tmp_path, clean_site):
    dicom, ann = clean_site
    site = tmp_path / "site"
    report = ingest(dicom, site, annotations=ann, site="hospital-a")
    records = load_manifest(site)
    assert report.images == len(records) == 6 * 8 + 4
    assert report.rejected == 0 and report.exams == 7 and report.patients == 7
    # Raw ids are never written (file paths are the site's own and may hold them: PACS exports do).
    for name in ("manifest.jsonl", "ingest_state.jsonl"):
        for row in read_jsonl(site / name):
            row = {k: v for k, v in row.get("record", row).items() if k != "path"}
            assert "PAT0" not in json.dumps(row) and "FFDM1" not in json.dumps(row), name
    pat0 = [r for r in records if r.lesions and r.view.value == "CC" and r.energy.value != "FFDM"]
    assert {r.energy.value for r in pat0} == {"LE", "DES"}  # blank energy -> both energies
    cc = pat0[0]
    assert cc.label.value == "malignant" and cc.lesions[0].kind.value == "ellipse"
    assert cc.birads.mass_margin == ("spiculated",) and cc.birads.internal_enhancement == ("heterogeneous",)
    assert cc.birads.assessment == ("4b",) and cc.birads.density == ("c",)
    # Contralateral breast of an annotated exam is normal; patient 5 has no rows -> unlabelled.
    right_pat0 = [r for r in records if r.patient == cc.patient and r.laterality.value == "R"]
    assert {r.label.value for r in right_pat0} == {"normal"}
    assert report.unlabelled_images == 8
    ffdm = [r for r in records if r.energy.value == "FFDM"]
    assert len(ffdm) == 4 and sum(bool(r.lesions) for r in ffdm) == 1
    # Splits are patient-grouped.
    splits = {}
    for r in records:
        splits.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    assert all(r.site == "hospital-a" and r.window == (2200.0, 1200.0) for r in records)


def test_reingest_is_idempotent_and_incremental(tmp_path, clean_site):
    dicom, ann = clean_site
    site = tmp_path / "site"
    ingest(dicom, site, annotations=ann)
    before = {
        n: (site / n).read_bytes() for n in ("manifest.jsonl", "site.json", "ingest_state.jsonl", "rejected.jsonl")
    }
    again = ingest(dicom, site, annotations=ann)
    assert again.processed == 0 and again.reused == 52
    assert {n: (site / n).read_bytes() for n in before} == before
    # A new exam and a changed file are the only files read.
    write_exam(dicom, "PAT9", seed=9)
    changed = dicom / "PAT1" / "LCC_LE.dcm"
    edit(changed, Manufacturer="OTHER")
    third = ingest(dicom, site, annotations=ann)
    assert third.processed == 9 and third.reused == 51 and third.images == 60
    assert any(r.manufacturer == "OTHER" for r in load_manifest(site))


def test_interrupted_ingest_is_completed_by_a_rerun(tmp_path, clean_site, monkeypatch):
    dicom, ann = clean_site
    site = tmp_path / "site"
    real = ingest_mod.ingest_file
    calls = {"n": 0}

    def dies_after_ten(*args):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ingest_mod, "ingest_file", dies_after_ten)
    with pytest.raises(KeyboardInterrupt):
        ingest(dicom, site, annotations=ann, workers=1)
    assert len(read_jsonl(site / "ingest_state.partial.jsonl")) == 10
    monkeypatch.setattr(ingest_mod, "ingest_file", real)
    report = ingest(dicom, site, annotations=ann)
    assert report.reused == 10 and report.processed == 42 and report.images == 52
    assert not (site / "ingest_state.partial.jsonl").exists()
    clean = tmp_path / "clean"
    ingest(dicom, clean, annotations=ann)
    # Same content as an uninterrupted run (pseudonyms differ: each site dir has its own key).
    assert len(load_manifest(clean)) == len(load_manifest(site))


def test_bad_files_are_rejected_with_file_and_reason(tmp_path):
    dicom = tmp_path / "dicom"
    write_exam(dicom, "GOOD")
    bad = dicom / "bad"
    bad.mkdir()
    (bad / "garbage.dcm").write_bytes(os.urandom(2000))
    truncated = write_one(bad / "truncated.dcm", laterality="L", view="CC")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    edit(write_one(bad / "nopixels.dcm"), PixelData=None)
    edit(write_one(bad / "nolat.dcm", laterality="", series_description="CC"), ImageLaterality=None)
    edit(write_one(bad / "noview.dcm", view=""), ViewCodeSequence=None)
    edit(write_one(bad / "conflict_lat.dcm", laterality="L"), Laterality="R")
    edit(write_one(bad / "conflict_view.dcm", view="CC"), ViewPosition="MLO")
    edit(write_one(bad / "conflict_energy.dcm", energy="LE", series_description="L-CC DES"))
    write_one(bad / "ct.dcm", modality="CT")
    mpeg = write_one(bad / "mpeg.dcm")
    ds_path = edit(mpeg)
    import pydicom

    ds = pydicom.dcmread(ds_path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel-data plugin decodes it
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(ds_path, enforce_file_format=True)

    site = tmp_path / "site"
    report = ingest(dicom, site)
    assert report.images == 8  # the good exam is intact
    rej = rejections(site)
    expected_fields = {
        "garbage.dcm": "file",
        "nopixels.dcm": "PixelData",
        "nolat.dcm": "ImageLaterality",
        "noview.dcm": "ViewPosition",
        "conflict_lat.dcm": "ImageLaterality/Laterality",
        "conflict_view.dcm": "ViewPosition/ViewCodeSequence",
        "conflict_energy.dcm": "ImageType/SeriesDescription",
        "ct.dcm": "Modality",
        "mpeg.dcm": "PixelData",
    }
    for name, field in expected_fields.items():
        assert rej[name]["field"] == field, (name, rej[name])
        assert rej[name]["reason"]
    assert rej["truncated.dcm"]["field"] in ("file", "PixelData")
    assert "MPEG2" in rej["mpeg.dcm"]["reason"]
    assert "conflicting laterality" in rej["conflict_lat.dcm"]["reason"]
    txt = (site / "rejected.txt").read_text()
    assert "10 rejected" in txt and "garbage.dcm" in txt


def test_compressed_transfer_syntaxes_decode(tmp_path):
    dicom = tmp_path / "dicom"
    write_exam(dicom, "J2K", energies=("FFDM",), transfer_syntax="jpeg2000")
    write_exam(dicom, "RLE", energies=("FFDM",), transfer_syntax="rle")
    graft_compressed(dicom / "jls.dcm", JPEG_LS_SOURCE[0], patient_id="JLS")
    write_jpeg_baseline(dicom / "jpeg.dcm", patient_id="JPG")
    site = tmp_path / "site"
    report = ingest(dicom, site)
    assert report.rejected == 0, (site / "rejected.txt").read_text()
    assert report.images == 10


def test_annotation_rows_bad_values_and_unmatched(tmp_path):
    dicom = tmp_path / "dicom"
    write_exam(dicom, "P1")
    ann = tmp_path / "ann.csv"
    ann.write_text(
        HEADER
        + "P1,,L,CC,,maybe,,,,,,,,\n"  # bad label
        + "P1,,X,CC,,benign,,,,,,,,\n"  # bad laterality
        + "P1,,L,CC,,benign,polygon,1 2;three 4,,,,,,\n"  # bad roi
        + "P1,,L,,,benign,ellipse,1 2 3 4,,,,,,\n"  # roi without a view
        + "NOPE,,L,CC,,malignant,,,,,,,,\n"  # no such image
        + "P1,,R,MLO,,malignant,circle,30 40 5,Blobby,,,,,\n"  # good, with an unknown descriptor
    )
    site = tmp_path / "site"
    report = ingest(dicom, site, annotations=ann)
    rej = rejections(site)
    assert rej["ann.csv:2"]["field"] == "label"
    assert rej["ann.csv:3"]["field"] == "laterality"
    assert rej["ann.csv:4"]["field"] == "roi"
    assert rej["ann.csv:5"]["field"] == "view"
    assert report.annotation_rows_rejected == 4 and report.annotation_rows_unmatched == 1
    meta = json.loads((site / "site.json").read_text())
    assert meta["annotations"]["unmatched"] == ["ann.csv:6"]
    assert meta["annotations"]["unknown_descriptors"] == {"mass_shape=blobby": 1}
    right = [r for r in load_manifest(site) if r.laterality.value == "R"]
    assert {r.label.value for r in right} == {"malignant"}


def test_site_check_reports_problems_and_exit_code(tmp_path, clean_site, capsys):
    dicom, ann = clean_site
    (dicom / "PAT3" / "RMLO_DES.dcm").unlink()  # incomplete exam
    dup = dicom / "PAT5" / "copy.dcm"
    dup.write_bytes((dicom / "PAT5" / "LCC_LE.dcm").read_bytes())  # duplicate image
    site = tmp_path / "site"
    ingest(dicom, site, annotations=Path(ann))
    result = check_site(site)
    assert any(missing == ["RMLO-DES"] for missing in result.incomplete_exams.values())
    assert len(result.duplicates) == 1 and len(result.duplicates[0]) == 2
    assert result.unlabelled_images == 9
    assert sum(sum(v.values()) for v in result.balance.values()) == 14  # 7 exams x 2 breasts
    code = cli(["site", "check", str(site)])
    out = capsys.readouterr().out
    assert "incomplete exams: 1" in out and "duplicate images: 1" in out
    assert code == (0 if result.can_train else 1)

    # A site with no labels cannot train: exit code 1 and the reason.
    unlabelled = tmp_path / "unlabelled"
    ingest(dicom, unlabelled)
    assert cli(["site", "check", str(unlabelled)]) == 1
    assert "no malignant breast in the train split" in capsys.readouterr().out


def test_operator_errors_are_one_clear_line(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    write_exam(dicom, "P1", energies=("FFDM",))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(IngestError, match="cannot write to output folder"):
        ingest(dicom, blocker / "site")
    assert cli(["site", "ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["site", "check", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err

    cfg = tmp_path / "site.toml"
    cfg.write_text("[ingest]\nview_positoins = {}\n")
    with pytest.raises(ConfigError, match="view_positoins"):
        ingest(dicom, tmp_path / "s2", config=cfg)
    cfg.write_text("[ingest.view_positions]\nCC = 'SIDEWAYS'\n")
    with pytest.raises(ConfigError, match="SIDEWAYS"):
        ingest(dicom, tmp_path / "s3", config=cfg)


def test_site_config_overrides_vendor_rules(tmp_path):
    dicom = tmp_path / "dicom"
    # A vendor that writes "SPOT" in ViewPosition for CC views and no ViewCodeSequence.
    edit(write_one(dicom / "a.dcm", view="CC"), ViewPosition="SPOT", ViewCodeSequence=None)
    site = tmp_path / "site"
    assert ingest(dicom, site).rejected == 1
    cfg = tmp_path / "site.toml"
    cfg.write_text("[ingest.view_positions]\nSPOT = 'CC'\n")
    report = ingest(dicom, tmp_path / "site2", config=cfg)
    assert report.rejected == 0 and load_manifest(tmp_path / "site2")[0].view.value == "CC"


def test_a_manifest_row_that_is_not_an_object_is_refused_naming_its_line(tmp_path):
    from fedbreast.shared.data.manifest import ManifestError, read_jsonl

    path = tmp_path / "manifest.jsonl"
    path.write_text('{"patient": "p1"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"manifest.jsonl:3: a row must be a JSON object, not list"):
        read_jsonl(path)
