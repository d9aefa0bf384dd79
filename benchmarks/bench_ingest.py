"""Ingest throughput: headers read per second, and whole files ingested per second.

    .venv/bin/python benchmarks/bench_ingest.py --files 400 --rows 640 --cols 512

Baseline, measured in the same run: pydicom.dcmread of the header alone
(``stop_before_pixels``), i.e. the cost of reading tags with no interpretation. The
header rate is ours (dcmread + tag interpretation); the full-ingest rate adds hashing,
decoding every pixel (to reject undecodable files up front), pseudonymisation and the
journal, with 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom
from fedbreast.shared.data.headers import read_header
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.rules import load_rules


def make_files(root: Path, n: int, rows: int, cols: int) -> list[Path]:
    rng = np.random.default_rng(0)
    pixels = (rng.random((rows, cols)) * 4000).astype(np.uint16)
    paths = []
    for i in range(n):
        lat, view, energy = "LR"[i % 2], ("CC", "MLO")[(i // 2) % 2], ("LE", "DES")[(i // 4) % 2]
        meta = DicomMeta(patient_id=f"P{i // 8}", study_uid=new_study_uid(), laterality=lat, view=view, energy=energy)
        paths.append(write_dicom(root / f"P{i // 8}" / f"{i}.dcm", pixels, meta))
    return paths


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedbreast-bench-"))
    try:
        paths = make_files(tmp / "dicom", args.files, args.rows, args.cols)
        rules = load_rules()

        t = time.perf_counter()
        for p in paths:
            pydicom.dcmread(p, stop_before_pixels=True)
        baseline = rate(len(paths), time.perf_counter() - t)

        t = time.perf_counter()
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            ds.PixelData = b""  # read_header checks presence only
            read_header(ds, rules)
        headers = rate(len(paths), time.perf_counter() - t)

        results = {
            "files": len(paths),
            "image": f"{args.rows}x{args.cols} uint16",
            "dcmread_header_only_per_s": baseline,
            "headers_interpreted_per_s": headers,
        }
        for workers in (1, 2):
            site = tmp / f"site-{workers}"
            report = ingest(tmp / "dicom", site, workers=workers)
            results[f"full_ingest_files_per_s_{workers}w"] = rate(report.processed, report.seconds)
            t = time.perf_counter()
            again = ingest(tmp / "dicom", site, workers=workers)
            results[f"reingest_unchanged_files_per_s_{workers}w"] = rate(again.reused, time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.0f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"{'header interpretation vs bare dcmread':<{width}}  {headers / baseline:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
