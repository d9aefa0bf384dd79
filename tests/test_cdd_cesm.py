"""The CDD-CESM importer against a tiny release in the published layout (tests/cdd_cesm_fixture.py)."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from cdd_cesm_fixture import MACHINES, build_cdd_cesm_fixture
from openpyxl import load_workbook

from fedbreast.shared.data.cdd_cesm import (
    CddCesmError,
    descriptors_from_text,
    find_layout,
    import_cdd_cesm,
    lesion_from_via,
    parse_image_name,
    parse_pathology,
)
from fedbreast.shared.data.check import check_site
from fedbreast.shared.data.manifest import load_manifest, read_jsonl, read_site_meta
from fedbreast.shared.data.pseudonym import load_or_create_key, pseudonymise
from fedbreast.shared.data.schema import Energy, ImageRecord, Label, Modality, ShapeKind


def _name(r: ImageRecord) -> str:
    """Canonical image name of a record, from its file (the manifest holds no raw ids)."""
    key = parse_image_name(Path(r.path).name)
    assert key is not None
    return f"P{key[0]}_{key[1]}_{key[2]}_{key[3]}"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_cdd_cesm_fixture(tmp_path_factory.mktemp("cdd") / "CDD-CESM")


@pytest.fixture(scope="module")
def imported(release: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("site") / "cdd-cesm"
    report = import_cdd_cesm(release["root"], out)
    return report, out, {_name(r): r for r in load_manifest(out)}


def test_site_directory_and_records(release: dict, imported) -> None:
    report, out, by_name = imported
    for f in ("manifest.jsonl", "site.json", "rejected.jsonl", "rejected.txt", "secret.key"):
        assert (out / f).is_file(), f
    assert report.images == len(by_name) == release["expected_images"] == 45
    assert report.sites == [out]
    meta = read_site_meta(out)
    assert meta["site"] == "cdd-cesm" and meta["source"] == "CDD-CESM" and meta["images"] == 45
    assert meta["patients"] == meta["exams"] == 6  # one study per patient

    key = load_or_create_key(out)
    for name, r in by_name.items():
        raw = name.split("_")[0][1:]
        assert (r.patient, r.exam) == (pseudonymise(key, "patient", raw), pseudonymise(key, "exam", raw))
        assert r.modality is Modality.MG
        assert r.energy is (Energy.LE if "_DM_" in name else Energy.DES)
        assert (r.rows, r.cols) == (48, 64)
        assert Path(r.path).is_absolute() and Path(r.path).is_file()
        assert r.sha256 == hashlib.sha256(Path(r.path).read_bytes()).hexdigest()
        assert r.manufacturer == MACHINES[(int(raw) + 1) % 2]
    # Quirky file names are kept in place, under their real names.
    assert Path(by_name["P2_L_CM_MLO"].path).name == "P2_L_CM_MLO (2).jpg"
    assert Path(by_name["P3_R_DM_CC"].path).name == "P3_R_DM_CC .jpg"
    # One exam per patient, and every image of a patient in one split.
    per_patient = defaultdict(set)
    for r in by_name.values():
        per_patient[r.patient].add((r.exam, r.split))
    assert all(len(v) == 1 for v in per_patient.values()) and len(per_patient) == 6


def test_labels_are_the_most_severe_per_breast(release: dict, imported) -> None:
    _, _, by_name = imported
    for name, r in by_name.items():
        pid, side = int(name.split("_")[0][1:]), name.split("_")[1]
        assert r.label is Label(release["labels"][(pid, side)]), name
    assert by_name["P2_L_DM_CC"].label is Label.MALIGNANT  # "Malignant$Benign"
    assert by_name["P1_R_CM_MLO"].label is Label.NORMAL


def test_lesions_land_on_the_right_image(imported) -> None:
    report, _, by_name = imported

    def kinds(name: str) -> list[ShapeKind]:
        return [les.kind for les in by_name[name].lesions]

    # Drawn on both energies of P1 L CC: each keeps its own outline.
    assert kinds("P1_L_DM_CC") == kinds("P1_L_CM_CC") == [ShapeKind.POLYGON]
    assert by_name["P1_L_DM_CC"].lesions != by_name["P1_L_CM_CC"].lesions
    # Drawn on one energy only: copied to the co-registered other energy.
    ellipse = by_name["P1_L_DM_MLO"].lesions[0]
    assert ellipse.kind is ShapeKind.ELLIPSE and ellipse.points == ((24, 21), (7, 5))
    assert ellipse.angle_deg == pytest.approx(math.degrees(0.5))
    assert by_name["P1_L_CM_MLO"].lesions == (ellipse,)
    assert kinds("P2_L_CM_MLO") == kinds("P2_L_DM_MLO") == [ShapeKind.CIRCLE]  # from "P2_L_CM_MLO (2).jpg"
    assert kinds("P2_L_DM_CC") == kinds("P2_L_CM_CC") == [ShapeKind.POINT]  # "P2_L_DM_CC" without .jpg
    assert kinds("P3_R_DM_CC") == [ShapeKind.POLYGON]  # a polyline, read as closed; file has a stray space
    assert by_name["P4_R_DM_CC"].lesions == ()  # "{}" means no region
    assert report.outlines_copied == 4
    assert report.lesions == sum(len(r.lesions) for r in by_name.values()) == 10


def test_birads_density_and_misspellings(imported) -> None:
    report, _, by_name = imported
    p1 = by_name["P1_L_CM_CC"].birads
    assert p1.density == ("c",)  # given on the DM rows only ("_" on CESM rows), carried to CM
    assert all(by_name[n].birads.density == ("c",) for n in ("P1_L_DM_CC", "P1_L_CM_MLO", "P1_R_CM_CC"))
    assert p1.mass_margin == ("spiculated",)  # "Speculated"
    assert p1.mass_shape == ("irregular",)
    assert set(p1.internal_enhancement) == {"rim", "heterogeneous"}  # "rim enhancement", "Heterogenous enhancement"
    assert p1.assessment == ("5",)
    p2 = by_name["P2_L_DM_MLO"].birads
    assert p2.assessment == ("4", "2")  # "4$2"
    assert (p2.mass_shape, p2.mass_margin) == (("oval",), ("circumscribed",))
    assert by_name["P2_R_CM_CC"].birads.bpe == ("mild",)
    assert by_name["P2_R_CM_CC"].birads.internal_enhancement == ("homogeneous",)  # "homogenous"
    assert by_name["P3_R_DM_MLO"].birads.mass_shape == ("round", "oval")  # "Round - Oval"
    assert by_name["P4_L_DM_CC"].birads.bpe == ("moderate",)
    assert report.unknown_descriptors == {"Tags=galactocele": 2}  # both DM rows of P4 L


def test_rejections_are_reported_with_reasons(release: dict, imported) -> None:
    report, out, _ = imported
    root = release["root"]
    got = {(r["path"], r["field"]): r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    le, cm = root / "Low energy images of CDD-CESM", root / "Subtracted images of CDD-CESM"
    xlsx_rows = release["xlsx_rows"]
    via = "Radiology_hand_drawn_segmentations_v2.csv"
    expected = {
        (str(le / "P6_L_DM_CC.jpg"), "Image_name"): "no row in sheet 'all'",
        (str(cm / "P6_R_CM_CC.jpg"), "read"): "cannot decode",
        (
            f"Radiology manual annotations.xlsx:all:{_row_of(release, 'P5_R_CM_MLO')}",
            "Image_name",
        ): "no image file P5_R_CM_MLO.jpg",
        (f"{via}:{release['via_lines']['malformed']}", "region_shape_attributes"): "not valid JSON",
        (f"{via}:{release['via_lines']['unknown_patient']}", "#filename"): "no image file P99_L_DM_CC.jpg",
    }
    assert set(got) == set(expected)
    for k, fragment in expected.items():
        assert fragment in got[k], (k, got[k])
    assert report.rejected == 5 and {(r.path, r.field) for r in report.rejections} == set(expected)
    meta = read_site_meta(out)
    assert meta["rejected_files"] == 2
    assert meta["annotations"]["rows"] == xlsx_rows
    assert meta["annotations"]["unmatched"] == [
        f"Radiology manual annotations.xlsx:all:{_row_of(release, 'P5_R_CM_MLO')}"
    ]
    assert "5 rejected" in (out / "rejected.txt").read_text()


def _row_of(release: dict, name: str) -> int:
    ws = load_workbook(release["xlsx"], read_only=True)["all"]
    for n, row in enumerate(ws.iter_rows(values_only=True), start=1):
        if str(row[0]).strip() == name:
            return n
    raise AssertionError(name)


def test_downstream_reads_it_like_an_ingested_site(imported) -> None:
    _, out, by_name = imported
    result = check_site(out)
    assert result.images == len(by_name) and not result.leaking_patients and not result.duplicates
    assert result.rejected_files == 2


def test_split_by_machine(release: dict, tmp_path: Path) -> None:
    report = import_cdd_cesm(release["root"], tmp_path / "fed", split_by_machine=True)
    assert sorted(p.name for p in report.sites) == ["ge-senographe-ds", "hologic-selenia-dimensions"]
    site_of_patient: dict[int, str] = {}
    keys = set()
    for site_dir in report.sites:
        records = load_manifest(site_dir)
        machine = read_site_meta(site_dir)["machine"]
        assert {r.manufacturer for r in records} == {machine} and {r.site for r in records} == {site_dir.name}
        keys.add((site_dir / "secret.key").read_text())
        splits = defaultdict(set)
        for r in records:
            pid = parse_image_name(Path(r.path).name)[0]
            assert site_of_patient.setdefault(pid, site_dir.name) == site_dir.name  # a patient in one site only
            splits[r.patient].add(r.split)
        assert all(len(s) == 1 for s in splits.values())  # patient-grouped splits within the site
        assert sorted({parse_image_name(Path(r.path).name)[0] for r in records}) == release["machines"][machine]
    assert len(keys) == 2  # each site pseudonymises with its own key
    assert report.images == release["expected_images"]
    # The import-level record keeps every rejection; each site keeps those of its patients.
    assert len(read_jsonl(tmp_path / "fed" / "rejected.jsonl")) == 5
    hologic = read_jsonl(tmp_path / "fed" / "hologic-selenia-dimensions" / "rejected.jsonl")
    assert {Path(r["path"]).name for r in hologic if r["path"].endswith(".jpg")} == {"P6_L_DM_CC.jpg", "P6_R_CM_CC.jpg"}
    with pytest.raises(CddCesmError, match="per-machine"):
        import_cdd_cesm(release["root"], tmp_path / "fed")


def test_rerun_gives_byte_identical_outputs(release: dict, tmp_path: Path) -> None:
    out = tmp_path / "site"
    import_cdd_cesm(release["root"], out, seed=3)
    first = {f: (out / f).read_bytes() for f in ("manifest.jsonl", "site.json", "rejected.jsonl", "rejected.txt")}
    import_cdd_cesm(release["root"], out, seed=3)
    assert first == {f: (out / f).read_bytes() for f in first}


def test_configuration_errors_name_the_path_or_sheet(tmp_path: Path) -> None:
    with pytest.raises(CddCesmError, match="no-such-folder"):
        import_cdd_cesm(tmp_path / "no-such-folder", tmp_path / "out")

    root = tmp_path / "raw"
    fx = build_cdd_cesm_fixture(root)
    wb = load_workbook(fx["xlsx"])
    wb["all"].title = "Sheet1"
    wb.save(fx["xlsx"])
    with pytest.raises(CddCesmError, match="no sheet 'all'"):
        import_cdd_cesm(root, tmp_path / "out")

    fx["xlsx"].unlink()
    with pytest.raises(CddCesmError, match="Radiology manual annotations.xlsx") as err:
        import_cdd_cesm(root, tmp_path / "out")
    assert str(root) in str(err.value)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()

    fx["xlsx"].write_bytes(b"not a zip")
    with pytest.raises(CddCesmError, match="not a readable .xlsx"):
        import_cdd_cesm(root, tmp_path / "out")


def test_layout_is_found_one_level_down_with_tcia_hyphenated_names(tmp_path: Path) -> None:
    fx = build_cdd_cesm_fixture(tmp_path / "download" / "CDD-CESM")
    fx["xlsx"].rename(fx["root"].parent / "Radiology-manual-annotations.xlsx")
    fx["via"].unlink()  # outlines are optional: the import goes on without them
    layout = find_layout(tmp_path / "download")
    assert layout.annotations.name == "Radiology-manual-annotations.xlsx" and layout.segmentations is None
    report = import_cdd_cesm(tmp_path / "download", tmp_path / "site")
    assert report.images == fx["expected_images"] and report.lesions == 0
    assert any("without outlines" in w for w in report.warnings)


def test_rows_contradicting_their_image_name_are_rejected(tmp_path: Path) -> None:
    fx = build_cdd_cesm_fixture(tmp_path / "raw")
    wb = load_workbook(fx["xlsx"])
    ws = wb["all"]
    header = [c.value for c in ws[1]]
    for row in ws.iter_rows(min_row=2):
        if row[0].value == "P1_L_DM_CC":
            row[header.index("Side")].value = "R"
        if row[0].value == "P1_L_CM_CC":
            row[header.index("Type")].value = "DM"  # a CM file name says CESM
    wb.save(fx["xlsx"])
    report = import_cdd_cesm(fx["root"], tmp_path / "site")
    fields = {r.field for r in report.rejections}
    assert {"Side", "Type"} <= fields
    # Without a usable row those images have no row at all, so they are not imported.
    names = {_name(r) for r in load_manifest(tmp_path / "site")}
    assert "P1_L_DM_CC" not in names and "P1_L_CM_CC" not in names


def test_parse_image_name_quirks() -> None:
    assert parse_image_name("P10_R_DM_CC .jpg") == (10, "R", "DM", "CC")
    assert parse_image_name("P2_L_CM_MLO (2).jpg") == (2, "L", "CM", "MLO")
    assert parse_image_name("P2_L_DM_CC") == (2, "L", "DM", "CC")
    assert parse_image_name(" p3_l_cm_mlo.JPG ") == (3, "L", "CM", "MLO")
    for bad in ("P1_L_XX_CC.jpg", "P1_L_DM.jpg", "notes.txt", "P1_B_DM_CC.jpg", ""):
        assert parse_image_name(bad) is None, bad


def test_lesion_from_via_shapes_and_errors() -> None:
    assert lesion_from_via({}) is None
    poly = lesion_from_via({"name": "polygon", "all_points_x": [0, 10, 10, 0], "all_points_y": [0, 0, 5, 0]})
    assert poly.kind is ShapeKind.POLYGON and len(poly.points) == 3  # repeated first vertex dropped
    assert lesion_from_via({"name": "circle", "cx": 5, "cy": 6, "r": 2}).points == ((5, 6), (2, 2))
    assert lesion_from_via({"name": "point", "cx": 5, "cy": 6}).kind is ShapeKind.POINT
    assert lesion_from_via({"name": "ellipse", "cx": 5, "cy": 6, "rx": 3, "ry": 2}).angle_deg == 0.0  # VIA 1.x
    assert lesion_from_via({"name": "rect", "x": 1, "y": 2, "width": 3, "height": 4}).points == ((1, 2), (4, 6))
    for bad, why in (
        ({"name": "polygon", "all_points_x": [0, 1], "all_points_y": [0, 1]}, "no area"),
        ({"name": "circle", "cx": 5, "cy": 6, "r": -1}, "positive"),
        ({"name": "ellipse", "cx": "5", "cy": 6, "rx": 3, "ry": 2}, "not a number"),
        ({"name": "star"}, "unknown VIA shape"),
        ([1, 2], "JSON object"),
    ):
        with pytest.raises(ValueError, match=why):
            lesion_from_via(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Irregular speculated mass", {"mass_shape": ["irregular"], "mass_margin": ["spiculated"]}),
        ("well-defined ovoid mass", {"mass_shape": ["oval"], "mass_margin": ["circumscribed"]}),
        ("not circumscribed mass", {"mass_margin": ["not_circumscribed"]}),
        ("irregular margins", {"mass_margin": ["irregular"]}),
        ("rim enhancement", {"internal_enhancement": ["rim"]}),
        ("Heterogenously enhancing mass", {"internal_enhancement": ["heterogeneous"]}),
        ("Irregular heterogeneous non mass enhancement", {"internal_enhancement": ["heterogeneous"]}),
        ("coarse heterogeneous calcifications", {}),  # a calcification morphology, not enhancement
        ("Heterogenously dense breast", {}),  # density words, not enhancement
        ("BPE: marked", {"bpe": ["marked"]}),
        ("mild background parenchymal enhancement", {"bpe": ["mild"]}),
        ("Oval", {"mass_shape": ["oval"]}),
        ("mass without spiculations, no enhancement", {}),  # negated descriptors are not findings
        ("Speculated", {"mass_margin": ["spiculated"]}),
    ],
)
def test_descriptors_from_text(text: str, expected: dict) -> None:
    found, unknown = descriptors_from_text(text)
    assert found == expected and unknown == []


def test_unknown_descriptors_are_returned_not_raised() -> None:
    found, unknown = descriptors_from_text("mass, a Galactocele, xyzzy 3")
    assert found == {} and unknown == ["a Galactocele", "xyzzy 3"]
    assert parse_pathology("Malignant$Benign") == ([Label.MALIGNANT, Label.BENIGN], [])
    assert parse_pathology("Benign$Suspicious") == ([Label.BENIGN], ["Suspicious"])


def test_import_survives_unknown_cells(tmp_path: Path) -> None:
    fx = build_cdd_cesm_fixture(tmp_path / "raw")
    wb = load_workbook(fx["xlsx"])
    ws = wb["all"]
    header = [c.value for c in ws[1]]
    for row in ws.iter_rows(min_row=2):
        if row[0].value == "P3_L_DM_CC":
            row[header.index("BIRADS")].value = "7"
            row[header.index("Breast density (ACR)")].value = "E"
            row[header.index("Pathology Classification/ Follow up")].value = "Pending"
    wb.save(fx["xlsx"])
    report = import_cdd_cesm(fx["root"], tmp_path / "site")
    assert {"BIRADS=7", "Breast density (ACR)=e", "Pathology=pending"} <= set(report.unknown_descriptors)
    records = {_name(r): r for r in load_manifest(tmp_path / "site")}
    assert records["P3_L_DM_CC"].label is Label.NORMAL  # the other rows of the breast still say Normal


def test_duplicate_copies_and_stray_files_are_rejected(tmp_path: Path) -> None:
    fx = build_cdd_cesm_fixture(tmp_path / "raw")
    le = fx["root"] / "Low energy images of CDD-CESM"
    shutil.copy(le / "P1_L_DM_CC.jpg", le / "P1_L_DM_CC (2).jpg")  # a browser's second download
    shutil.copy(le / "P1_L_DM_MLO.jpg", le / "P1_L_CM_MLO.jpg")  # a CM file in the DM folder
    (le / "Thumbs.db").write_bytes(b"\0")
    report = import_cdd_cesm(fx["root"], tmp_path / "site")
    got = {Path(r.path).name: r.reason for r in report.rejections if r.field == "filename"}
    assert set(got) == {"P1_L_DM_CC (2).jpg", "P1_L_CM_MLO.jpg", "Thumbs.db"}
    assert "kept P1_L_DM_CC.jpg" in got["P1_L_DM_CC (2).jpg"]
    records = {_name(r): r for r in load_manifest(tmp_path / "site")}
    assert Path(records["P1_L_DM_CC"].path).name == "P1_L_DM_CC.jpg"
    assert Path(records["P1_L_CM_MLO"].path).parent.name == "Subtracted images of CDD-CESM"
    assert report.images == fx["expected_images"]
