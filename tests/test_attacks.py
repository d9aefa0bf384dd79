"""The attack suite (issue 15): each attack is refused, clamped or survived, with nothing lost.

Each section is one kind of attack and keeps its own helpers, so sections stay independent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dicom_cases import breast_pixels, edit, write_exam, write_one

from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.manifest import load_manifest, read_jsonl
from fedbreast.shared.data.rules import ConfigError, load_rules

# ---- hostile files ----
#
# A folder of files built to stall or exhaust ingest: headers declaring gigapixels or
# thousands of frames over a payload of a few bytes, a FIFO, a link to /dev/zero, a socket,
# a link looping back up the tree, a broken link, a file over the size limit. Ingest must
# finish, reject each by name with the limit it broke, never decode a refused header, and
# ingest every good file beside them.

ANN_HEADER = "patient_id,accession_number,laterality,view,energy,label,roi_shape,roi\n"

# The hostile ingest runs in a child process: a regression that blocks on the FIFO is then
# killed by the timeout instead of hanging the suite, and one that reads /dev/zero or
# decodes 65535x65535 hits the child's address-space limit instead of the machine's memory.
CHILD_TIMEOUT_S = 60
CHILD_ADDRESS_SPACE = 4 << 30
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from fedbreast.shared.data import ingest as ingest_mod

    dicom, site, config, out = sys.argv[1:]
    decoded = []
    real = ingest_mod.dicom_pixels

    def spy(ds, path="<dataset>"):
        decoded.append(str(path))
        return real(ds, path)

    ingest_mod.dicom_pixels = spy
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = ingest_mod.ingest(dicom, site, config=config)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    with open(out, "w") as fh:
        json.dump({"decoded": decoded, "grown_kib": grown_kib, "images": report.images}, fh)
    """
)


def _limit_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def _hostile_folder(dicom: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Write good files and hostile ones; return (good paths, {hostile name: (field, words in the reason)})."""
    good = {str(p) for p in write_exam(dicom, "GOOD")}
    alias = dicom / "alias.dcm"  # a link to a regular file inside the walk: read like the file
    alias.symlink_to(dicom / "GOOD" / "LCC_LE.dcm")
    good.add(str(alias))

    # 65535x65535 16-bit declares 8 GiB; the RLE payload is the 12 KB of a 96x64 image.
    edit(write_one(dicom / "gigapixel.dcm", transfer_syntax="rle"), Rows=65535, Columns=65535)
    edit(write_one(dicom / "frames.dcm"), NumberOfFrames=5000)
    edit(write_one(dicom / "samples.dcm"), SamplesPerPixel=7)
    # Under the per-frame pixel limit and the US frame limit, but 900 frames of 8000x8000
    # colour decode to 165 GiB.
    us = write_one(dicom / "cine.dcm", modality="US", view="TRANS")
    edit(us, Rows=8000, Columns=8000, NumberOfFrames=900, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    # 512x512 16-bit: 512 KiB, over the test config's 0.25 MiB (a real file, not a huge one).
    meta = DicomMeta(patient_id="BIG", study_uid=new_study_uid(), energy="FFDM")
    write_dicom(dicom / "big.dcm", np.tile(breast_pixels(), (6, 8))[:512, :512], meta)

    os.mkfifo(dicom / "pipe.dcm")
    (dicom / "zero.dcm").symlink_to("/dev/zero")
    (dicom / "loop").symlink_to(dicom)  # followed, the walk would never end
    (dicom / "dangling.dcm").symlink_to(dicom / "nowhere.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dicom / "s.sock"))
    sock.close()
    hostile = {
        "gigapixel.dcm": ("Rows/Columns", "exceeds the limit of 100 megapixels (ingest rules max_megapixels)"),
        "frames.dcm": ("NumberOfFrames", "5000 frames exceeds the limit of 1 for MG (ingest rules max_frames.MG)"),
        "samples.dcm": ("SamplesPerPixel", "unsupported SamplesPerPixel 7"),
        "cine.dcm": ("Rows/Columns/NumberOfFrames", "ingest rules max_decoded_mib"),
        "big.dcm": ("file", "exceeds the limit of 0.25 MiB (ingest rules max_file_mib)"),
        "pipe.dcm": ("file", "not a regular file (FIFO)"),
        "zero.dcm": ("file", "symbolic link to a character device, /dev/zero; not followed"),
        "loop": ("file", "symbolic link to a folder"),
        "dangling.dcm": ("file", "cannot be followed (No such file or directory)"),
        "s.sock": ("file", "not a regular file (socket)"),
    }
    return good, hostile


def test_hostile_files_are_rejected_before_reading_or_decoding_and_good_files_ingested(tmp_path):
    dicom, site = tmp_path / "in", tmp_path / "site"
    good, hostile = _hostile_folder(dicom)
    config = tmp_path / "site.toml"
    config.write_text("[ingest]\nmax_file_mib = 0.25\n")
    out = tmp_path / "child.json"
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(dicom), str(site), str(config), str(out)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            preexec_fn=_limit_address_space,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ingest did not finish in {CHILD_TIMEOUT_S} s: a hostile file blocked it")
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(out.read_text())

    rejected = {Path(r["path"]).name: r for r in read_jsonl(site / "rejected.jsonl")}
    assert set(rejected) == set(hostile), sorted(rejected)
    for name, (field, words) in hostile.items():
        assert rejected[name]["field"] == field, rejected[name]
        assert words in rejected[name]["reason"], rejected[name]
    # Every good file, and only the good files, reached the decoder; all are in the manifest.
    assert set(result["decoded"]) == good
    assert result["images"] == len(good) == 9
    assert {r.path for r in load_manifest(site)} == good
    assert result["grown_kib"] < 256 * 1024, result  # nothing was allocated for a declared 8 GiB

    # A re-run judges the same files the same way without reading them again; raising the
    # limit the report names re-reads the file it refused (the rules changed) and takes it.
    again = ingest(dicom, site, config=config)
    assert again.processed == 0 and again.rejected == len(hostile)
    config.write_text("[ingest]\nmax_file_mib = 1\n")
    raised = ingest(dicom, site, config=config)
    assert raised.rejected == len(hostile) - 1 and raised.images == 10


def test_hostile_annotation_coordinates_are_rejected_with_file_and_row(tmp_path):
    dicom = tmp_path / "in"
    write_exam(dicom, "P1", energies=("FFDM",))  # 96 rows x 64 columns
    ann = tmp_path / "ann.csv"
    rows = [
        "P1,,L,CC,,malignant,ellipse,nan 40 5 5",
        "P1,,L,CC,,malignant,box,10 10 inf 30",
        "P1,,L,CC,,malignant,polygon,10 10;-inf 20;30 30",
        "P1,,L,CC,,malignant,circle,30 40 -5",
        "P1,,L,CC,,malignant,point,-3 40",
        "P1,,L,CC,,malignant,box,10 10 5000 30",  # parses; outside the 64x96 image
        "P1,,L,CC,,malignant,polygon,10 10;20 10;20 1e300",
        "P1,,L,MLO,,malignant,ellipse,30 48 40 40 -30",  # centre inside: an outline may run past the edge
    ]
    ann.write_text(ANN_HEADER + "\n".join(rows) + "\n")
    site = tmp_path / "site"
    report = ingest(dicom, site, annotations=ann)

    rejected = {r["path"]: r for r in read_jsonl(site / "rejected.jsonl")}
    expected = {
        "ann.csv:2": "'nan' is not a finite number",
        "ann.csv:3": "'inf' is not a finite number",
        "ann.csv:4": "'-inf' is not a finite number",
        "ann.csv:5": "negative coordinate -5",
        "ann.csv:6": "negative coordinate -3",
        "ann.csv:7": "point (5000, 30) lies outside the LCC FFDM image it outlines (64x96 pixels)",
        "ann.csv:8": "point (20, 1e+300) lies outside the LCC FFDM image",
    }
    assert set(rejected) == set(expected), sorted(rejected)
    for where, words in expected.items():
        assert rejected[where]["field"] == "roi" and words in rejected[where]["reason"], rejected[where]
    assert report.annotation_rows_rejected == len(expected)
    assert report.annotation_rows == 1 and report.annotation_rows_unmatched == 0
    outlined = [r for r in load_manifest(site) if r.lesions]
    assert [(r.view.value, r.lesions[0].angle_deg) for r in outlined] == [("MLO", -30.0)]
    # A rejected row carries no label either: the only label is the MLO row's.
    assert {r.label.value for r in load_manifest(site) if r.laterality.value == "L"} == {"malignant"}


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[ingest]\nmax_megapixels = -1\n", "max_megapixels"),
        ("[ingest]\nmax_file_mib = true\n", "max_file_mib"),
        ("[ingest]\nmax_decoded_mib = 'lots'\n", "max_decoded_mib"),
        ("[ingest]\nmax_file_mib = nan\n", "max_file_mib"),
        ("[ingest.max_frames]\nUS = 2.5\n", "max_frames.US"),
        ("[ingest.max_frames]\nCT = 3\n", "max_frames.CT"),
        ("[ingest]\nmax_frames = 3\n", "max_frames"),
    ],
)
def test_a_bad_limit_is_refused_by_name(tmp_path, toml, named):
    config = tmp_path / "site.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_rules(config)


def test_a_site_raises_one_frame_limit_and_keeps_the_others(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text("[ingest.max_frames]\nMG = 60\n")
    limits = load_rules(config).limits
    assert limits.max_frames == {"MG": 60, "US": 1000}
    assert limits.max_pixels == 100_000_000 and limits.max_file_bytes == 512 << 20
    assert load_rules(config).fingerprint != load_rules().fingerprint
