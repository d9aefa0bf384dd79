"""The attack suite (issue 15): each attack is refused, clamped or survived, with nothing lost.

Each section is one kind of attack and keeps its own helpers, so sections stay independent:
hostile files at ingest; a malicious coordinator against one site's policy (the real
ClientApp with all its mods); app bundles a site did not approve; a malicious site against
the real round loop. The attacks that need a running federation (a real `flwr run` of a
hostile bundle against four TLS site daemons) are in tests/test_deploy.py, beside the
federation they use; the coordinator's reply checks one by one in tests/test_server_robustness.py.
docs/security.md maps every attack to its defence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from clientapp_messages import as_task, request, site_context
from dicom_cases import breast_pixels, edit, graft_compressed, write_exam, write_one

from fedbreast.client.audit import read_audit
from fedbreast.client.policy import SitePolicy
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.manifest import load_manifest, read_jsonl
from fedbreast.shared.data.rules import ConfigError, load_rules
from fedbreast.shared.training.dp import lifetime_epsilon

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


def _child_json(script: str, args: list[str], out: Path, timeout: float, what: str, **popen) -> dict:
    """Run ``script`` in a child (it writes JSON to ``out``, its last argument); fail if it blocks."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", script, *args, str(out)], capture_output=True, text=True, timeout=timeout, **popen
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout} s: a hostile file blocked it")
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(out.read_text())


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
    # A 64x64 header over a codestream whose own header (JPEG-LS SOF, JPEG 2000 SIZ) declares
    # gigapixels: the decoder allocates what the codestream says (65535x65535: 8 GiB).
    _grow_codestream(graft_compressed(dicom / "jls.dcm", "MR_small_jpeg_ls_lossless.dcm"), b"\xff\xf7", 5, ">HH")
    _grow_codestream(graft_compressed(dicom / "j2k.dcm", "MR_small_jp2klossless.dcm"), b"\xff\x51", 6, ">II")

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
        "jls.dcm": ("PixelData", "the JPEG-LS codestream declares 65535x65535 x 1 samples, more than"),
        "j2k.dcm": ("PixelData", "the JPEG 2000 codestream declares 65535x65535 x 1 samples, more than"),
        "pipe.dcm": ("file", "not a regular file (FIFO)"),
        "zero.dcm": ("file", "symbolic link to a character device, /dev/zero; not followed"),
        "loop": ("file", "symbolic link to a folder"),
        "dangling.dcm": ("file", "cannot be followed (No such file or directory)"),
        "s.sock": ("file", "not a regular file (socket)"),
    }
    return good, hostile


def _grow_codestream(path: Path, marker: bytes, offset: int, fmt: str) -> None:
    """Make the frame header at ``marker`` declare 65535x65535 (height and width, or, in a
    JPEG 2000 SIZ, width and height; for SIZ the tile size too, so it stays one tile)."""
    ds = pydicom.dcmread(path)
    data = bytearray(ds.PixelData)
    at = data.index(marker) + offset
    size = struct.pack(fmt, 65535, 65535)
    data[at : at + len(size)] = size
    if marker == b"\xff\x51":
        data[at + 16 : at + 24] = size
    ds.PixelData = bytes(data)
    ds.save_as(path, enforce_file_format=True)


def test_hostile_files_are_rejected_before_reading_or_decoding_and_good_files_ingested(tmp_path):
    dicom, site = tmp_path / "in", tmp_path / "site"
    good, hostile = _hostile_folder(dicom)
    config = tmp_path / "site.toml"
    config.write_text("[ingest]\nmax_file_mib = 0.25\n")
    args = [str(dicom), str(site), str(config)]
    out = tmp_path / "child.json"
    result = _child_json(CHILD, args, out, CHILD_TIMEOUT_S, "ingest", preexec_fn=_limit_address_space)

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


# ---- files swapped after ingest ----
#
# The preprocessing cache reads every source file again for each new configuration (a
# coordinator asks for a new image size), long after ingest checked it. Between the two,
# whoever can write the DICOM folder swaps files: other pixels under the same name, a FIFO,
# a link to /dev/zero, a file over the site's size limit. Each must be a failure naming it,
# nothing may be cached under the hash ingest recorded, and every other image is built.
# The build runs in a child (`_child_json`, above): a read that blocks fails the test.

SWAP_TIMEOUT_S = 120
SWAP_CHILD = textwrap.dedent(
    """
    import json, sys
    from fedbreast.shared.data.cache import build_cache, open_cache
    from fedbreast.shared.data.manifest import load_manifest
    from fedbreast.shared.data.preprocess import PreprocessConfig

    site, out = sys.argv[1:]
    cfg = PreprocessConfig(window="dicom", crop_breast=True, pad="aspect", size=(32, 16), orientation="chest_left")
    stats = build_cache(site, load_manifest(site), cfg)
    cache = open_cache(site, cfg)
    failures = {f.path: [f.sha256, f.reason] for f in stats.failures}
    with open(out, "w") as fh:
        json.dump({"built": stats.built, "failures": failures, "cached": sorted(cache.shas())}, fh)
    """
)


def test_files_swapped_after_ingest_are_named_failures_of_the_next_cache_build(tmp_path):
    from fedbreast.shared.data.cache import CHANGED, build_cache
    from fedbreast.shared.data.preprocess import PreprocessConfig

    dicom, site = tmp_path / "in", tmp_path / "site"
    paths = write_exam(dicom, "P1") + write_exam(dicom, "P2", seed=1)
    config = tmp_path / "site.toml"
    config.write_text("[ingest]\nmax_file_mib = 0.25\n")  # stored with the site; the cache reads under it
    ingest(dicom, site, config=config)
    records = {r.path: r for r in load_manifest(site)}
    assert set(records) == {str(p) for p in paths}
    first = PreprocessConfig(window="dicom", crop_breast=True, pad="aspect", size=(48, 24), orientation="chest_left")
    assert build_cache(site, list(records.values()), first).failed == 0

    swapped, fifo, zero, big = (str(p) for p in paths[:4])
    write_one(Path(swapped), patient_id="OTHER")  # a valid DICOM file, other content
    os.unlink(fifo)
    os.mkfifo(fifo)  # opened for reading, it would wait for a writer forever
    os.unlink(zero)
    os.symlink("/dev/zero", zero)  # read, it never ends
    meta = DicomMeta(patient_id="BIG", study_uid=new_study_uid(), energy="FFDM")
    write_dicom(Path(big), np.tile(breast_pixels(), (6, 8))[:512, :512], meta)  # 512 KiB > 0.25 MiB

    result = _child_json(SWAP_CHILD, [str(site)], tmp_path / "child.json", SWAP_TIMEOUT_S, "the cache build")

    expected = {
        swapped: CHANGED,
        fifo: f"not a regular file (FIFO); {CHANGED}",
        zero: f"not a regular file (symbolic link to a character device, /dev/zero; not followed); {CHANGED}",
        big: f"exceeds the limit of 0.25 MiB (ingest rules max_file_mib); {CHANGED}",
    }
    assert set(result["failures"]) == set(expected), result["failures"]
    for path, words in expected.items():
        sha, reason = result["failures"][path]
        assert sha == records[path].sha256 and reason.endswith(words), (path, reason)
    # Nothing is cached under the hashes ingest recorded for them; every other image is built.
    assert result["built"] == len(records) - len(expected)
    assert set(result["cached"]) == {r.sha256 for p, r in records.items() if p not in expected}


# ---- a malicious coordinator against one site's policy (in process: the real ClientApp) ----
#
# Every message a hostile ServerApp could send, with the run config it chooses, goes to the
# real ClientApp (all its mods: audit, policy, SecAgg+) of one generated, ingested hospital.
# What comes back is what the coordinator would get; the site's disk shows what was spent.

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, bootstrap=50, hist_bins=64, rounds=1, batch_size=4, workers=0)
POLICY = {
    "min-batch-size": 4,
    "max-local-epochs": 3,
    "max-image-pixels": 64 * 64,
    "max-bootstrap": 200,
    "max-workers": 1,
    "max-hist-bins": 16,
}


@pytest.fixture(autouse=True)
def task_identity():
    as_task()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    from fedbreast.simulation.simulate import prepare_federation

    root = tmp_path_factory.mktemp("attacked")
    return prepare_federation(root / "data", sites=1, patients=8, seed=5, echo=lambda line: None)[0]


def send(site: Path, kind: str, policy: dict | None = None, run_id: int = 42, arrays: bool = True, **run):
    """One message of a hostile coordinator; returns (status, reason, reply)."""
    from fedbreast.client.app import app
    from fedbreast.server.app import initial_arrays

    cfg_keys = {**TINY, **run}
    raw = RunConfig(**{k: v for k, v in cfg_keys.items() if k in RunConfig.__dataclass_fields__}).to_flower()
    raw.update({RunConfig.flower_key(k): v for k, v in run.items() if k not in RunConfig.__dataclass_fields__})
    node = {"policy": json.dumps(policy)} if policy is not None else {}
    ctx = site_context(site, raw, run_id=run_id, policy=node)
    weights = initial_arrays(
        RunConfig(**{k: v for k, v in cfg_keys.items() if k in RunConfig.__dataclass_fields__}).replace(weights_path="")
    )
    server_round = 0 if kind == "query" else 1
    reply = app(request(kind, server_round, weights if arrays and kind != "query" else None), ctx)
    site_rec = reply.content["site"]
    return str(site_rec["status"]), str(site_rec["reason"]), reply


def test_a_batch_of_one_is_refused_naming_the_key(hospital):
    status, reason, reply = send(hospital, "train", POLICY, batch_size=1, local_steps=1, augment=False)
    assert status == "unable" and "min-batch-size = 4" in reason and "batch-size = 1" in reason
    assert len(reply.content.array_records) == 0  # no update left
    assert read_audit(hospital)[-1]["status"] == "unable"  # the refusal is on the site's record


@pytest.mark.parametrize(
    "run, key",
    [
        (dict(local_epochs=1000), "max-local-epochs"),
        (dict(image_h=4096, image_w=4096), "max-image-pixels"),
        (dict(model="birads", n_patches=100_000), "max-patches"),
    ],
)
def test_resource_exhaustion_is_refused_before_data_is_read(hospital, run, key):
    status, reason, _ = send(hospital, "train", POLICY, **run)
    assert status == "unable" and key in reason, reason


def test_what_only_costs_the_site_time_is_clamped_and_said(hospital):
    status, _, reply = send(hospital, "evaluate", POLICY, bootstrap=50_000, workers=64, hist_bins=4096)
    assert status == "ok"
    notes = str(reply.content["site"]["notes"])
    assert "bootstrap 50000 -> 200 (policy max-bootstrap)" in notes and "workers 64 -> 1" in notes
    metrics = reply.content["metrics"]
    n_test = int(metrics["test_n"])
    bins = len(metrics["test_hist_pos"])
    # Coarse: at most max-hist-bins and two scores per bin, and a divisor of the run's bins.
    assert bins <= min(16, max(2, n_test // 2)) and 4096 % bins == 0, (bins, n_test)


def test_nan_learning_rate_and_huge_histograms_are_refused_by_the_site(hospital):
    from fedbreast.client.app import app

    for key, value, why in (("lr", float("nan"), "must be a finite number"), ("hist-bins", 10**6, "at most 4096")):
        raw = {**RunConfig(**TINY).to_flower(), key: value}  # what a hostile ServerApp can put in a run
        reply = app(request("evaluate", 1), site_context(hospital, raw, policy={"policy": json.dumps(POLICY)}))
        assert reply.content["site"]["status"] == "unable", key
        assert f"{key} = " in reply.content["site"]["reason"] and why in reply.content["site"]["reason"]


@pytest.mark.parametrize(
    "run, key",
    [
        (dict(bootstrap="50000"), "bootstrap 50000 -> 200"),  # a string parses as an int: clamped all the same
        (dict(workers=64.0), "workers 64 -> 1"),
    ],
)
def test_clamps_hold_whatever_type_the_value_comes_in(hospital, run, key):
    from fedbreast.client.app import app

    raw = {**RunConfig(**TINY).to_flower(), **{RunConfig.flower_key(k): v for k, v in run.items()}}
    reply = app(request("evaluate", 1, _weights()), site_context(hospital, raw, policy={"policy": json.dumps(POLICY)}))
    assert reply.content["site"]["status"] == "ok" and key in str(reply.content["site"]["notes"])


@pytest.mark.parametrize(
    "run, key",
    [
        (dict(model="dualmode", box_size=30_000), "max-crop-size"),
        (dict(model="mgus", crop_size=50_000), "max-crop-size"),
        (dict(batch_size=10**9), "max-batch-size"),
    ],
)
def test_sizes_that_would_exhaust_memory_are_refused(hospital, run, key):
    status, reason, _ = send(hospital, "train", POLICY, **run)
    assert status == "unable" and key in reason, reason


def test_the_coordinator_cannot_make_a_site_open_its_files(hospital, tmp_path):
    # weights-path names a file on the site; the site never opens it (the weights come in the message).
    status, reason, _ = send(hospital, "evaluate", POLICY, weights_path="/etc/shadow")
    assert status == "ok", reason
    status, reason, _ = send(hospital, "evaluate", POLICY, weights_path=str(tmp_path / "no-such-file.pt"))
    assert status == "ok", reason


def test_a_site_answers_only_so_many_evaluations_per_run(tmp_path, hospital):
    site = tmp_path / "site"
    shutil.copytree(hospital, site, ignore=shutil.ignore_patterns("audit", "state"))
    policy = {**POLICY, "max-evaluations": 2}
    assert [send(site, "evaluate", policy)[0] for _ in range(3)] == ["ok", "ok", "unable"]
    assert "max-evaluations = 2" in send(site, "evaluate", policy)[1]
    assert send(site, "evaluate", policy, run_id=43)[0] == "ok"  # another run has its own count


def test_the_reported_threshold_is_not_a_patients_score(hospital):
    from fedbreast.shared.metrics.histogram import default_bin_edges

    _, _, reply = send(hospital, "evaluate", POLICY)
    edges = set(default_bin_edges(16).tolist())  # the policy's max-hist-bins: the released resolution
    for split in ("val", "test"):
        assert float(reply.content["metrics"][f"{split}_threshold"]) in edges | {0.5}


def test_dp_on_patches_or_lesions_is_refused_under_a_per_patient_ceiling(hospital):
    status, reason, _ = send(
        hospital,
        "train",
        {**POLICY, "require-dp": True, "max-epsilon": 8.0},
        model="birads",
        dp="local",
        dp_epsilon=4.0,
        patch_size=32,
        n_patches=8,
    )
    assert status == "unable" and "bounds epsilon per patient" in reason and "'birads'" in reason


def test_concurrent_runs_cannot_each_spend_the_whole_budget(tmp_path, hospital):
    import threading

    site = tmp_path / "site"
    shutil.copytree(hospital, site, ignore=shutil.ignore_patterns("audit", "state"))
    policy = {**POLICY, "require-dp": True, "max-epsilon": 2.6}
    dp = dict(dp="local", dp_epsilon=2.0, dp_delta=1e-5, rounds=1)
    results: dict[int, str] = {}

    def run(run_id: int) -> None:
        as_task()
        results[run_id] = send(site, "train", policy, run_id=run_id, run_dir=f"run-{run_id}", **dp)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results.values()) == ["ok", "unable"], results  # one spends, the other is refused
    assert lifetime_epsilon(site) <= 2.6


def test_secure_aggregation_parameters_that_unmask_a_site_are_refused(hospital):
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

    from fedbreast.client.secure_aggregation import SecureAggregationRefused, check_stage_request

    ctx = site_context(hospital, RunConfig(**TINY).to_flower(), policy={"policy": json.dumps(POLICY)})

    def stage(**configs):
        msg = request("train", 1)
        msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        return msg

    # share_num = threshold = 1: the site's one share of its mask seed is the seed itself.
    with pytest.raises(SecureAggregationRefused, match="share_num = 1, threshold = 1"):
        check_stage_request(stage(stage="setup", share_num=1, threshold=1), ctx)
    strict = site_context(hospital, {}, policy={"policy": json.dumps({"require-secure-aggregation": True})})
    with pytest.raises(SecureAggregationRefused, match="not a majority"):
        check_stage_request(stage(stage="setup", share_num=4, threshold=2), strict)
    check_stage_request(stage(stage="setup", share_num=5, threshold=3), strict)  # a majority: accepted
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"share_num": 3})
    with pytest.raises(SecureAggregationRefused, match="the setup agreed 3"):
        check_stage_request(stage(stage="share_keys", **{"7": [b"a", b"b"]}), ctx)  # itself as its only peer
    with pytest.raises(SecureAggregationRefused, match="both active and dead"):
        check_stage_request(stage(stage="unmask", active_nids=[7, 8, 9], dead_nids=[9]), ctx)


def _weights():
    from fedbreast.server.app import initial_arrays

    return initial_arrays(RunConfig(**TINY))


def test_plain_train_is_refused_where_the_site_requires_secure_aggregation(hospital):
    status, reason, reply = send(hospital, "train", {**POLICY, "require-secure-aggregation": True})
    assert status == "unable" and "require-secure-aggregation" in reason
    assert len(reply.content.array_records) == 0


def test_families_and_message_types_outside_the_policy_are_refused(hospital):
    status, reason, _ = send(hospital, "train", {**POLICY, "families": ["dualmode"]})
    assert status == "unable" and "families" in reason and "'multiview'" in reason
    status, reason, _ = send(hospital, "evaluate", {**POLICY, "messages": ["hello", "train"]})
    assert status == "unable" and "does not answer 'evaluate'" in reason


def test_delta_near_one_is_refused(hospital):
    status, reason, _ = send(
        hospital, "train", {**POLICY, "require-dp": True}, dp="local", dp_epsilon=8.0, dp_delta=0.5
    )
    assert status == "unable" and "dp-delta = 0.5 is above this site's limit" in reason


def test_dp_bypass_through_the_personal_query_is_refused(hospital):
    status, reason, reply = send(
        hospital, "query.personal", {**POLICY, "require-dp": True, "max-epsilon": 8.0}, personal_epochs=2
    )
    assert status == "unable" and "fine-tune" in reason
    assert len(reply.content.array_records) == 0


def test_a_fresh_run_does_not_reset_epsilon(tmp_path, hospital):

    site = tmp_path / "site"
    shutil.copytree(hospital, site, ignore=shutil.ignore_patterns("audit", "state"))
    policy = {**POLICY, "require-dp": True, "max-epsilon": 2.6, "hist-noise-epsilon": 0.5}
    dp = dict(dp="local", dp_epsilon=2.0, dp_delta=1e-5, rounds=1)
    status, reason, _ = send(site, "train", policy, run_id=1, run_dir="run-a", **dp)
    assert status == "ok", reason
    spent = lifetime_epsilon(site)
    assert 1.5 < spent <= 2.0 + 1e-6
    # A new run (new run id, new run directory) asks for the same budget: over the lifetime ceiling.
    status, reason, _ = send(site, "train", policy, run_id=2, run_dir="run-b", **dp)
    assert status == "unable" and "lifetime epsilon" in reason and "dp-max-epsilon = 2.6" in reason
    # Histogram releases are charged to the same ledger, and withheld once it is spent.
    status, _, reply = send(site, "evaluate", policy, run_id=2, run_dir="run-b", **dp)
    assert status == "ok" and "test_hist_pos" in reply.content["metrics"]
    assert lifetime_epsilon(site) == pytest.approx(spent + 0.5)
    status, _, reply = send(site, "evaluate", policy, run_id=3, run_dir="run-c", **dp)
    assert status == "ok" and "test_hist_pos" not in reply.content["metrics"]  # 2.6 would be passed
    assert lifetime_epsilon(site) == pytest.approx(spent + 0.5)


def test_an_unreadable_policy_refuses_everything(hospital):
    from fedbreast.client.app import app

    ctx = site_context(hospital, RunConfig(**TINY).to_flower(), policy={"policy": "{not json"})
    reply = app(request("query", 0), ctx)
    assert reply.content["site"]["status"] == "unable" and "policy cannot be read" in reply.content["site"]["reason"]


def test_policy_files_are_validated_naming_the_key(tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text("[policy]\nmin-batch-size = 0\n")
    with pytest.raises(ConfigError, match=r"\[policy\] min-batch-size = 0: expected a positive"):
        SitePolicy.from_file(bad)
    bad.write_text("[policy]\nmessages = ['train', 'steal']\n")
    with pytest.raises(ConfigError, match="unknown message type"):
        SitePolicy.from_file(bad)
    good = tmp_path / "good.toml"
    good.write_text("[policy]\nmin-batch-size = 8\nrequire-dp = true\nmax-epsilon = 4\n")
    p = SitePolicy.from_file(good)
    assert (p.min_batch_size, p.require_dp, p.max_epsilon) == (8, True, 4.0)
    assert SitePolicy.from_mapping(json.loads(p.to_json()), "round trip") == p


# ---- app bundles a site did not approve (the network version: tests/test_deploy.py) ----


def _bundle(tmp_path: Path, clientapp: str, extra: dict[str, str] | None = None) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    from fedbreast.simulation.flower_runner import write_app_dir

    app = write_app_dir(tmp_path / f"app-{abs(hash((clientapp, str(extra))))}")
    text = (app / "pyproject.toml").read_text().replace('"fedbreast.client.app:app"', f'"{clientapp}"')
    (app / "pyproject.toml").write_text(text)
    for name, body in (extra or {}).items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(body)
    return build_fab_from_disk(app)


def test_only_bundles_that_select_the_installed_clientapp_and_are_pinned_are_approved(tmp_path):
    from fedbreast.client.pinned_clientapp import verify_bundle

    ours = _bundle(tmp_path, "fedbreast.client.app:app")
    digest = hashlib.sha256(ours).hexdigest()
    # `fedbreast release hash` publishes exactly the hash of the bundle `fedbreast run` submits.
    published = subprocess.run(
        [sys.executable, "-m", "fedbreast", "release", "hash", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(published.stdout)["sha256"] == digest
    assert verify_bundle(ours, digest, "fedbreast/fedbreast-app", None).approved
    assert verify_bundle(ours, digest, "fedbreast/fedbreast-app", (digest,)).approved

    cases = {
        "another ClientApp": (_bundle(tmp_path, "evil:client"), None, "names the ClientApp 'evil:client'"),
        "a shadowing copy of our package": (
            _bundle(tmp_path, "fedbreast.client.app:app", {"fedbreast/client/app.py": "STEAL = 1\n"}),
            (digest,),
            "not in this site's policy app-hashes",
        ),
        "not a bundle": (b"PK\x03\x04 not a zip", None, "not a readable app bundle"),
        "too large": (b"\0" * (17 * 1024 * 1024), None, "more than"),
    }
    for what, (content, pinned, why) in cases.items():
        verdict = verify_bundle(content, hashlib.sha256(content).hexdigest(), "mallory/x", pinned)
        assert not verdict.approved and why in verdict.refused, (what, verdict.refused)
    lying = verify_bundle(ours, "0" * 64, "fedbreast/fedbreast-app", None)
    assert not lying.approved and "does not match the hash" in lying.refused


def test_simulate_applies_a_site_policy_to_every_simulated_site(tmp_path, hospital, capsys):

    from fedbreast.cli import main
    from fedbreast.server.metric_store import MetricStore

    sites = tmp_path / "sites"
    for name in ("site-1", "site-2"):
        shutil.copytree(hospital, sites / name, ignore=shutil.ignore_patterns("audit", "state"))
        meta = json.loads((sites / name / "site.json").read_text())
        (sites / name / "site.json").write_text(json.dumps({**meta, "site": name}))  # two hospitals, two names
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax-bootstrap = 20\nmax-hist-bins = 8\nmin-scores-per-bin = 1\n")
    run = tmp_path / "run"
    flags = ["--rounds", "1", "--backbone", "smallcnn", "--image-size", "64x32", "--set", "workers=0"]
    args = ["simulate", "--out", str(run), "--sites-dir", str(sites), "--engine", "inprocess", *flags]
    assert main([*args, "--set", "bootstrap=100", "--set", "hist-bins=64", "--site-policy", str(policy)]) == 0
    store = MetricStore(run)
    clamps = store.rows("policy")
    assert {(r["site"], r["stage"]) for r in clamps} == {("site-1", "evaluate"), ("site-2", "evaluate")}
    assert all(r["notes"] == "bootstrap 100 -> 20 (policy max-bootstrap)" for r in clamps)
    for row in store.rows("evaluate"):
        assert len(row["test_hist_pos"]) <= 8 and 64 % len(row["test_hist_pos"]) == 0
    # A bad policy file stops the run before it starts, naming the key.
    policy.write_text("[policy]\nmax-bootstrap = -1\n")
    assert main([*args, "--site-policy", str(policy)]) == 2
    assert "[policy] max-bootstrap = -1: expected a positive" in capsys.readouterr().err


# ---- a malicious site against the real round loop ----
#
# Three hospitals answer the real coordinator (FederatedRun over the in-process grid, the real
# ClientApp behind it); two of them lie in their replies. The run must finish, drop each liar
# for the round with a reason naming the key, and aggregate the honest site alone.

LIES = {
    "site-2": {"train": {"num-examples": 10**12}, "evaluate": {"test_hist_pos": [-5, 3, 2]}},
    "site-3": {"train": {"num-examples": float("nan")}, "evaluate": {"num-examples": float("nan")}},
}


def test_lying_sites_are_dropped_for_the_round_and_the_run_goes_on(tmp_path, hospital):
    from flwr.app import MetricRecord

    from fedbreast.server.app import initial_arrays
    from fedbreast.server.federation import FederatedRun
    from fedbreast.server.metric_store import MetricStore
    from fedbreast.simulation.inprocess import InProcessGrid

    sites = []
    for name in ("site-1", "site-2", "site-3"):
        shutil.copytree(hospital, tmp_path / name, ignore=shutil.ignore_patterns("audit", "state"))
        meta = json.loads((tmp_path / name / "site.json").read_text())
        (tmp_path / name / "site.json").write_text(json.dumps({**meta, "site": name}))
        sites.append(tmp_path / name)

    def lie(site_dir, request_msg, reply):
        told = LIES.get(site_dir.name, {}).get(str(request_msg.metadata.message_type))
        if told and "metrics" in reply.content.metric_records:
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), **told})
        return reply

    cfg = RunConfig(**{**TINY, "rounds": 2, "min_available_sites": 3, "wait_for_sites": 1, "round_timeout": 60})
    grid = InProcessGrid(sites, cfg.to_flower(), lie, site_names=True)
    lines: list[str] = []
    FederatedRun(grid, cfg, tmp_path / "run", initial_arrays(cfg), echo=lines.append).run()
    store = MetricStore(tmp_path / "run")
    assert [r["round"] for r in store.rows("round")] == [1, 2]  # finished, every round
    failures = {(f["round"], f["site"], f["stage"]): f["reason"] for f in store.rows("failure")}
    for rnd in (1, 2):
        assert "num-examples" in failures[(rnd, "site-2", "train")] and "1e+12" in failures[(rnd, "site-2", "train")]
        assert "test_hist_pos" in failures[(rnd, "site-2", "evaluate")]
        assert "num-examples" in failures[(rnd, "site-3", "train")]
        assert "num-examples" in failures[(rnd, "site-3", "evaluate")]
    assert {r["site"] for r in store.rows("train")} == {"site-1"}  # the honest site alone is averaged
    assert all(r["sites"] == 1 for r in store.rows("aggregate"))
    assert any("site-2 left out" in line for line in lines)


def test_no_flower_task_but_the_pinned_clientapp_can_start_at_a_site(tmp_path):
    """A bundle naming an ``agentapp`` makes the SuperNode create an AgentApp task, which Flower's
    own ``flwr-agentapp`` would run from the bundle. The daemon's bin folder (first on the
    SuperNode's PATH) holds a SuperExec that runs ClientApp tasks only, and a refusing stand-in
    for every other task command."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    from fedbreast.client.pinned_clientapp import install_pinned_runtime

    install_pinned_runtime(tmp_path)
    for task_type, command in TASK_TYPE_TO_COMMAND.items():
        if task_type == TaskType.CLIENT_APP:
            continue  # the daemon's flwr-clientapp: the pinned one (tests/test_deploy.py runs it)
        ran = subprocess.run([str(tmp_path / command)], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 1 and "refused" in ran.stderr, command
    restricted = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedbreast.client.pinned_clientapp import restrict_superexec\n"
            "from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin\n"
            "restrict_superexec(); print(sorted(t.value for t in AutoExecPlugin.supported_task_types))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restricted.stdout.strip() == "['flwr-clientapp']", restricted.stdout + restricted.stderr
    assert (tmp_path / "flower-superexec").read_text().endswith("superexec_main()\n")


def test_a_huge_translator_is_refused_before_the_site_builds_it(hospital):
    """A coordinator asking for a cyclegan too large for the site's memory: refused by its
    policy (max-cyclegan-filters / max-cyclegan-blocks), naming the key, before any network is built."""
    from fedbreast.client.app import app

    base = RunConfig(**{**TINY, "model": "cyclegan", "image_h": 64, "image_w": 64}).to_flower()
    for key, value in (("cyclegan-filters", 100_000), ("cyclegan-blocks", 1_000_000)):
        ctx = site_context(hospital, base | {key: value}, policy={"policy": json.dumps(POLICY)})
        reply = app(request("train", 1, None), ctx)
        site = reply.content["site"]
        assert site["status"] == "unable" and f"max-{key}" in site["reason"], site["reason"]
        assert len(reply.content.array_records) == 0
