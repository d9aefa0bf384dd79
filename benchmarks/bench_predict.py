"""Speed of ``fedbreast site predict`` against a plain PyTorch forward loop, in the same run.

    .venv/bin/python benchmarks/bench_predict.py                         # multiview, birads + PSFT, CPU
    .venv/bin/python benchmarks/bench_predict.py --patients 40 --families multiview,birads,dualmode,mgus,latefusion

One generated CEM site (``--patients``), ingested with its annotation CSV (outlines for the
lesion families); random-initialised models of each family's ``simulate`` preset (the weights
do not change the cost). Per family, after one warm-up call that builds the site's
preprocessing cache (as any trained site already has it):

* ``plain``: the multiview network over the same exams' input tensors, preloaded in memory,
  batch by batch under ``no_grad`` and the run's autocast (bf16 where ``amp = auto`` picks it,
  as predict does): the floor any predict can reach (multiview only);
* ``predict``: ``predict_site`` on the ingested site, end to end (cache read, model, CSV);
* ``explain``: the same with ``explain=True`` (heatmaps, PNGs, heatmaps.csv, pointing game);
* birads: ``predict`` with patient-specific fine-tuning on and off; the difference per
  patient is the fine-tuning's cost.

Each figure is the median of ``--repeats`` runs. Goals (issue 16): predict within 1.2x of the
plain loop; explain at most 3x predict. Ratios, not absolute times, are the result: on a
shared 2-core machine the absolute numbers move from run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedbreast.server.checkpoints import Checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.predict import predict_site
from fedbreast.shared.training.local import autocast
from fedbreast.simulation.simulate import PRESET, PRESETS


def make_site(root: Path, patients: int, seed: int) -> Path:
    site_dir = root / "site"
    if not (site_dir / "manifest.jsonl").exists():
        generate_federation(
            root / "gen", profiles=[SiteProfile(name="bench", n_patients=patients)], seed=seed, workers=2
        )
        src = root / "gen" / "bench"
        ingest(src / "dicom", site_dir, annotations=src / "annotations.csv", site="bench", workers=2)
    return site_dir


def checkpoint(cfg: RunConfig) -> Checkpoint:
    torch.manual_seed(cfg.seed)
    arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    return Checkpoint(arrays=arrays, meta={"round": 1, "config": cfg.to_flower()})


def plain_multiview(cfg: RunConfig, ckpt: Checkpoint, site_dir: Path) -> tuple[Any, int]:
    """(one timed call of the loop, exams): the network alone over the site's exams, inputs
    already in memory, batch by batch under no_grad, in the precision predict uses."""
    from fedbreast.shared.data.datasets import ExamDataset
    from fedbreast.shared.families.multiview.task import MultiviewTask

    model = build_model(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.arrays.items()})
    model.eval()
    _, _, ds = MultiviewTask()._scoring_set(site_dir, cfg)
    assert isinstance(ds, ExamDataset)
    batches = [
        ds.__getitems__(list(range(i, min(len(ds), i + cfg.batch_size))))["x"]
        for i in range(0, len(ds), cfg.batch_size)
    ]

    precision = autocast(torch.device("cpu"), cfg.amp)  # the same as predict's (bf16 where "auto" picks it)

    def loop() -> None:
        with torch.no_grad(), precision:
            for x in batches:
                model(x)

    loop()  # warm-up: oneDNN picks its kernels on the first call
    return loop, len(ds)


def bench_family(family: str, site_dir: Path, out: Path, repeats: int, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = RunConfig(**{**PRESET, **PRESETS[family], "workers": 0, **overrides})
    ckpt = checkpoint(cfg)
    psft_cfg = dataclasses.replace(cfg, patient_finetune=True) if family == "birads" else None

    def predict(explain: bool = False, run_cfg: RunConfig = cfg) -> Any:
        shutil.rmtree(out, ignore_errors=True)
        c = ckpt if run_cfg is cfg else Checkpoint(ckpt.arrays, {**ckpt.meta, "config": run_cfg.to_flower()})
        return predict_site(site_dir, c, None, out, threshold=0.5, explain=explain)

    first = predict()  # warm-up: builds the site's cache for this family's preprocessing
    result = predict(explain=True)  # warm-up: imports the CAM library once
    calls: dict[str, Any] = {"predict": predict, "explain": lambda: predict(explain=True)}
    exams = 0
    if family == "multiview":
        calls["plain"], exams = plain_multiview(cfg, ckpt, site_dir)
    if psft_cfg is not None:
        predict(run_cfg=psft_cfg)
        calls["psft_predict"] = lambda: predict(run_cfg=psft_cfg)
    # Interleaved: each repeat times every variant once, so a busy spell on a shared machine
    # slows all of them rather than one.
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = {"family": family, "units": first.rows, "scored": first.scored, "heatmaps": result.heatmaps}
    row.update({f"{k}_s": v for k, v in sec.items()})
    row["explain_over_predict"] = sec["explain"] / sec["predict"]
    if exams:
        row.update(
            exams=exams,
            plain_exams_per_s=exams / sec["plain"],
            predict_exams_per_s=exams / sec["predict"],
            explain_exams_per_s=exams / sec["explain"],
            predict_over_plain=sec["predict"] / sec["plain"],
        )
    if psft_cfg is not None:
        patients = _patients_with_lesions(site_dir)
        row["psft_patients"] = patients
        row["psft_s_per_patient"] = (sec["psft_predict"] - sec["predict"]) / max(patients, 1)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def _patients_with_lesions(site_dir: Path) -> int:
    from fedbreast.shared.data.site_data import site_records

    return len({r.patient for r in site_records(site_dir) if r.lesions})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="multiview,birads")
    ap.add_argument("--backbone", help="override every family's backbone (default: each preset's)")
    ap.add_argument("--data", help="where the generated site lives (default: a temporary folder)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    overrides = {"backbone": args.backbone} if args.backbone else {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-predict-")
    root = Path(args.data) if args.data else Path(tmp.name)
    site_dir = make_site(root, args.patients, args.seed)
    rows = [
        bench_family(f, site_dir, root / f"out-{f}", args.repeats, overrides) for f in args.families.split(",") if f
    ]
    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "torch": torch.__version__,
        "patients": args.patients,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
