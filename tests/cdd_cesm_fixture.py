"""A tiny CDD-CESM release in the published layout, quirks included, for the importer tests.

Layout and column names follow the TCIA release (Khaled et al., Sci Data 2022)::

    Low energy images of CDD-CESM/P{id}_{L|R}_DM_{CC|MLO}.jpg
    Subtracted images of CDD-CESM/P{id}_{L|R}_CM_{CC|MLO}.jpg
    Radiology manual annotations.xlsx   (sheet "all", one row per image)
    Radiology_hand_drawn_segmentations_v2.csv   (VGG Image Annotator export)

Quirks planted (each is checked by tests/test_cdd_cesm.py):
- P1: malignant left breast; "Speculated" and "Heterogenous" misspellings; density only on
  DM rows ("_" on CESM rows); an ellipse drawn on DM MLO only (copied to CM MLO).
- P2: "$"-joined findings ("4$2", "Malignant$Benign"); its CM MLO file is saved as
  "P2_L_CM_MLO (2).jpg"; a circle drawn on that file only and a point on "P2_L_DM_CC"
  (no ".jpg" in the VIA file name).
- P3: file "P3_R_DM_CC .jpg" (stray space) and Image_name "P3_R_DM_CC " in the workbook;
  a polyline outline; "Round - Oval".
- P4: an unknown descriptor ("Galactocele"); a VIA row with malformed JSON and a "{}" row.
- P5: a workbook row (P5_R_CM_MLO) whose image file does not exist.
- P6: an image (P6_L_DM_CC) with no workbook row, and a truncated JPEG (P6_R_CM_CC).
- A VIA row for P99, who is not in the release.
Odd patients are on one machine, even patients on another.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLUMNS = [
    "Image_name",
    "Patient_ID",
    "Side",
    "Type",
    "Age",
    "Breast density (ACR)",
    "BIRADS",
    "Findings",
    "View",
    "Tags",
    "Machine",
    "Pathology Classification/ Follow up",
]
VIA_HEADER = [
    "#filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
]
MACHINES = ("GE Senographe DS", "Hologic Selenia Dimensions")
SIZE = (64, 48)  # (cols, rows)

# Per breast: pathology, density, BIRADS, Findings and Tags for the DM and the CESM rows.
_BREASTS: dict[tuple[int, str], dict[str, str]] = {
    (1, "L"): dict(
        path="Malignant",
        density="C",
        birads="5",
        dm_find="Irregular speculated mass",
        dm_tags="mass, irregular, Speculated",
        cm_find="Irregular mass with rim enhancement",
        cm_tags="mass enhancement, Heterogenous enhancement",
    ),
    (1, "R"): dict(path="Normal", density="C", birads="1", dm_find="", dm_tags="", cm_find="", cm_tags=""),
    (2, "L"): dict(
        path="Malignant$Benign",
        density="B",
        birads="4$2",
        dm_find="mass$calcifications",
        dm_tags="mass, oval, circumscribed$calcifications, punctate",
        cm_find="non mass enhancement$no enhancement",
        cm_tags="Heterogenous non mass enhancement$",
    ),
    (2, "R"): dict(
        path="Benign",
        density="B",
        birads="3",
        dm_find="Oval circumscribed mass",
        dm_tags="Oval, circumscribed",
        cm_find="mild BPE, homogeneous enhancing mass",
        cm_tags="mass enhancement, homogenous",
    ),
    (3, "L"): dict(path="Normal", density="A", birads="1", dm_find="", dm_tags="", cm_find="", cm_tags=""),
    (3, "R"): dict(
        path="Benign", density="A", birads="2", dm_find="mass", dm_tags="Round - Oval", cm_find="", cm_tags=""
    ),
    (4, "L"): dict(
        path="Benign",
        density="D",
        birads="3",
        dm_find="mass",
        dm_tags="Galactocele",
        cm_find="",
        cm_tags="Moderate BPE",
    ),
    (4, "R"): dict(path="Normal", density="D", birads="1", dm_find="", dm_tags="", cm_find="", cm_tags=""),
}
_DEFAULT = {
    "normal": dict(path="Normal", density="B", birads="1", dm_find="", dm_tags="", cm_find="", cm_tags=""),
    "benign": dict(
        path="Benign",
        density="C",
        birads="2",
        dm_find="mass",
        dm_tags="oval, circumscribed",
        cm_find="",
        cm_tags="homogeneous enhancement",
    ),
}

MISSING_IMAGE = "P5_R_CM_MLO"  # has a workbook row, no file
ORPHAN_IMAGE = "P6_L_DM_CC"  # has a file, no workbook row
CORRUPT_IMAGE = "P6_R_CM_CC"  # truncated JPEG


def breast_plan(pid: int, side: str) -> dict[str, str]:
    if (pid, side) in _BREASTS:
        return _BREASTS[(pid, side)]
    return _DEFAULT["benign" if (pid + (side == "R")) % 3 == 0 else "normal"]


def _file_name(name: str) -> str:
    if name == "P2_L_CM_MLO":
        return "P2_L_CM_MLO (2).jpg"
    if name == "P3_R_DM_CC":
        return "P3_R_DM_CC .jpg"
    return name + ".jpg"


def _jpeg(pid: int, side: str, view: str, code: str) -> bytes:
    """A 64x48 grey image with a bright blob; content differs per image so hashes differ."""
    im = Image.new("L", SIZE, 20 + pid % 7 * 5 + (code == "CM") * 3)
    cx = 20 + (side == "R") * 20 + (view == "MLO") * 4
    cy = 18 + pid % 4 * 3
    ImageDraw.Draw(im).ellipse((cx - 6, cy - 5, cx + 6, cy + 5), fill=200 + (code == "CM") * 40)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _via_rows(images: dict[str, Path]) -> list[list[Any]]:
    def shape(filename: str, attrs: dict[str, Any] | str, region_id: int = 0, count: int = 1) -> list[Any]:
        on_disk = images.get(filename.replace(".jpg", "").strip())
        size = on_disk.stat().st_size if on_disk else 0
        text = attrs if isinstance(attrs, str) else json.dumps(attrs, separators=(",", ":"))
        return [filename, size, "{}", count, region_id, text, "{}"]

    return [
        shape(
            "P1_L_DM_CC.jpg", {"name": "polygon", "all_points_x": [14, 26, 26, 14], "all_points_y": [16, 16, 26, 26]}
        ),
        shape("P1_L_CM_CC.jpg", {"name": "polygon", "all_points_x": [15, 27, 25], "all_points_y": [15, 17, 27]}),
        shape("P1_L_DM_MLO.jpg", {"name": "ellipse", "cx": 24, "cy": 21, "rx": 7, "ry": 5, "theta": 0.5}),
        shape("P2_L_CM_MLO (2).jpg", {"name": "circle", "cx": 24, "cy": 24, "r": 6}),
        shape("P2_L_DM_CC", {"name": "point", "cx": 20, "cy": 24}),
        shape(
            "P3_R_DM_CC.jpg", {"name": "polyline", "all_points_x": [34, 46, 46, 34], "all_points_y": [16, 16, 26, 26]}
        ),
        shape("P4_R_DM_CC.jpg", "{}", count=0),
        shape("P4_L_CM_CC.jpg", '{"name":"polygon","all_points_x":[1,2,3],"all_points_y":[4,5'),
        shape("P99_L_DM_CC.jpg", {"name": "circle", "cx": 10, "cy": 10, "r": 3}),
    ]


def build_cdd_cesm_fixture(root: Path, n_patients: int = 6) -> dict[str, Any]:
    """Write the release under ``root``; return what the tests need to know about it."""
    if n_patients < 6:
        raise ValueError("the fixture needs at least 6 patients to plant every quirk")
    from openpyxl import Workbook

    root = Path(root)
    le_dir = root / "Low energy images of CDD-CESM"
    cm_dir = root / "Subtracted images of CDD-CESM"
    le_dir.mkdir(parents=True, exist_ok=True)
    cm_dir.mkdir(parents=True, exist_ok=True)

    rows: list[list[Any]] = []
    images: dict[str, Path] = {}
    labels: dict[tuple[int, str], str] = {}
    for pid in range(1, n_patients + 1):
        machine = MACHINES[(pid + 1) % 2]
        for side in ("L", "R"):
            plan = breast_plan(pid, side)
            worst = max(plan["path"].split("$"), key=["Normal", "Benign", "Malignant"].index)
            labels[(pid, side)] = worst.lower()
            for code in ("DM", "CM"):
                for view in ("CC", "MLO"):
                    name = f"P{pid}_{side}_{code}_{view}"
                    if name != MISSING_IMAGE:
                        path = (le_dir if code == "DM" else cm_dir) / _file_name(name)
                        data = _jpeg(pid, side, view, code)
                        path.write_bytes(data[: len(data) // 2] if name == CORRUPT_IMAGE else data)
                        images[name] = path
                    if name == ORPHAN_IMAGE:
                        continue
                    cell_name = "P3_R_DM_CC " if name == "P3_R_DM_CC" else name
                    dm = code == "DM"
                    birads: Any = int(plan["birads"]) if plan["birads"].isdigit() else plan["birads"]
                    rows.append(
                        [
                            cell_name,
                            pid,
                            side,
                            "DM" if dm else "CESM",
                            40 + pid,
                            plan["density"] if dm else "_",
                            birads,
                            plan["dm_find" if dm else "cm_find"] or None,
                            view,
                            plan["dm_tags" if dm else "cm_tags"] or None,
                            machine,
                            plan["path"],
                        ]
                    )

    wb = Workbook()
    ws = wb.active
    ws.title = "all"
    ws.append(COLUMNS)
    for r in rows:
        ws.append(r)
    other = wb.create_sheet("mass_description")  # the release has per-finding sheets after "all"
    other.append(["Image_name", "Mass shape", "Mass margin"])
    xlsx = root / "Radiology manual annotations.xlsx"
    wb.save(xlsx)

    via = root / "Radiology_hand_drawn_segmentations_v2.csv"
    via_rows = _via_rows(images)
    with open(via, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(VIA_HEADER)
        w.writerows(via_rows)

    return {
        "root": root,
        "xlsx": xlsx,
        "via": via,
        "n_patients": n_patients,
        "machines": {m: [p for p in range(1, n_patients + 1) if MACHINES[(p + 1) % 2] == m] for m in MACHINES},
        "images": images,  # canonical name -> file written
        "xlsx_rows": len(rows),
        "expected_images": len(images) - 2,  # less the orphan and the corrupt file
        "labels": labels,  # (patient, side) -> most severe label
        "via_lines": {"malformed": 9, "unknown_patient": 10},  # CSV line numbers (header is line 1)
    }
