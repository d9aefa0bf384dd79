"""Data pipeline throughput: preprocessing per core, and four-view exams per second from the cache.

    .venv/bin/python benchmarks/bench_data.py --json runs/bench_data.json

Measured in one run on generated DICOM files (no ingest step; ImageRecords are built
directly):

* resize: torch ``interpolate(antialias=True)`` vs Pillow on one full-size image;
* preprocessing, one process: images/s for decode alone, the "multiview" pipeline alone
  (at ``--size``) and both, on full-size CEM images (default 2294x1914, the GE
  Senographe Essential CESM matrix);
* cache build with 2 worker processes (images/s);
* the cached ``ExamDataset`` (2 channels, 4 views at ``--size``) through a DataLoader
  (2 workers, batch 32, pin_memory when CUDA is present), float32 and float16 output;
* batched augmentation alone (on the GPU when present, else CPU) and loader + augmentation;
* baseline: the naive path, decoding the 8 DICOMs of an exam and preprocessing them per
  item, through the same DataLoader; the cached/naive ratio is reported.

The loader runs on ``--loader-exams`` smaller exams (``--loader-rows`` x ``--loader-cols``)
so the cache holds many distinct exams without hours of preprocessing; what it delivers is
independent of the stored size, since the cache holds ``--size`` arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from fedbreast.shared.data.augment import AUGMENT_PRESETS, augment
from fedbreast.shared.data.cache import build_cache, open_cache
from fedbreast.shared.data.datasets import ExamDataset, make_loader
from fedbreast.shared.data.dicom_writer import DicomMeta, new_study_uid, write_dicom
from fedbreast.shared.data.manifest import MAMMO_VIEWS, group_exams
from fedbreast.shared.data.pixels import read_pixels
from fedbreast.shared.data.preprocess import PRESETS, PreprocessConfig, preprocess_image
from fedbreast.shared.data.schema import Energy, ImageRecord, Label, Laterality, Modality, Split, View


def synthetic_breast(rows: int, cols: int, chest_left: bool, rng: np.random.Generator) -> np.ndarray:
    """uint16 breast in GE-like raw values: background ~200, tissue 1800-2600, a lesion ~3000."""
    yy, xx = np.ogrid[0:rows, 0:cols]
    cx = 0 if chest_left else cols - 1
    inside = ((xx - cx) / (0.8 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 < 1
    tissue = 1800 + 800 * rng.random((rows, cols), dtype=np.float32)
    img = np.where(inside, tissue, 200.0)
    ly, lx, lr = rows * rng.uniform(0.35, 0.65), cols * (0.3 if chest_left else 0.7), rows * 0.04
    img = np.where(inside & (((xx - lx) ** 2 + (yy - ly) ** 2) < lr**2), 3000.0, img)
    return img.astype(np.uint16)


def write_site(root: Path, n_exams: int, rows: int, cols: int, seed: int = 0) -> list[ImageRecord]:
    """n complete CEM exams (8 images each) as DICOM files, and their manifest records."""
    rng = np.random.default_rng(seed)
    records = []
    for e in range(n_exams):
        study = new_study_uid()
        for lat in ("L", "R"):
            for view in ("CC", "MLO"):
                for energy in ("LE", "DES"):
                    pixels = synthetic_breast(rows, cols, chest_left=lat == "L", rng=rng)
                    path = write_dicom(
                        root / f"P{e}" / f"{lat}{view}_{energy}.dcm",
                        pixels,
                        DicomMeta(
                            patient_id=f"P{e}",
                            study_uid=study,
                            laterality=lat,
                            view=view,
                            energy=energy,
                            window=(2200, 1200),
                        ),
                    )
                    records.append(
                        ImageRecord(
                            site="bench",
                            patient=f"P{e}",
                            exam=f"E{e}",
                            laterality=Laterality(lat),
                            view=View(view),
                            modality=Modality.MG,
                            energy=Energy(energy),
                            path=str(path),
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                            rows=rows,
                            cols=cols,
                            window=(2200.0, 1200.0),
                            label=Label.MALIGNANT if (e + (lat == "R")) % 3 == 0 else Label.BENIGN,
                            split=Split.TRAIN,
                        )
                    )
    return records


class NaiveExamDataset(Dataset):
    """The baseline: decode and preprocess the 8 DICOMs of an exam on every access, no cache."""

    def __init__(self, records: list[ImageRecord], cfg: PreprocessConfig) -> None:
        exams = group_exams(records)
        self.exams = [exams[k] for k in sorted(exams)]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.exams)

    def __getitem__(self, i: int) -> torch.Tensor:
        ex = self.exams[i]
        views = []
        for v in MAMMO_VIEWS:
            le = ex.images[(v[0], v[1:], "LE")]
            des = ex.images[(v[0], v[1:], "DES")]
            a, g = preprocess_image(read_pixels(le.path), le, self.cfg)
            b, _ = preprocess_image(read_pixels(des.path), des, self.cfg, reference=g)
            views.append(np.stack([a, b]))
        return torch.from_numpy(np.stack(views))


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def timed(fn, repeat: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def loader_rate(loader, device: torch.device, aug_gen: torch.Generator | None = None, warm: bool = True) -> float:
    """Exams/s over one full pass; with ``warm`` a first untimed pass starts the (persistent) workers."""
    if warm:
        for _ in loader:
            pass
    count, t = 0, time.perf_counter()
    for batch in loader:
        x = batch["x"] if isinstance(batch, dict) else batch
        x = x.to(device, non_blocking=True)
        if aug_gen is not None:
            x = augment(x.float(), AUGMENT_PRESETS["multiview"], aug_gen)
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rate(count, time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exams", type=int, default=4, help="full-size exams for the preprocessing and naive runs")
    ap.add_argument("--rows", type=int, default=2294)
    ap.add_argument("--cols", type=int, default=1914)
    ap.add_argument("--loader-exams", type=int, default=256)
    ap.add_argument("--loader-rows", type=int, default=512)
    ap.add_argument("--loader-cols", type=int, default=384)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per loader measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(PRESETS["multiview"], size=tuple(args.size))
    tmp = Path(tempfile.mkdtemp(prefix="fedbreast-bench-data-"))
    res: dict[str, object] = {
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
        },
        "args": vars(args),
        "config": cfg.to_dict(),
    }
    try:
        # --- full-size images: preprocessing per core ------------------------------------------
        torch.set_num_threads(1)
        t = time.perf_counter()
        big = write_site(tmp / "big", args.exams, args.rows, args.cols)
        res["generate_s"] = time.perf_counter() - t
        raw = read_pixels(big[0].path)
        for name, fn in {
            "resize_torch_ms": lambda: F.interpolate(
                torch.from_numpy(raw)[None, None], size=tuple(args.size), mode="bilinear", antialias=True
            ),
            "resize_pil_ms": lambda: __import__("PIL.Image").Image.fromarray(raw, mode="F").resize(args.size[::-1], 2),
        }.items():
            fn()
            res[name] = 1000 * timed(fn, 5)
        decode_s = timed(lambda: [read_pixels(r.path) for r in big])
        pixels = [read_pixels(r.path) for r in big]
        prep_s = timed(lambda: [preprocess_image(p, r, cfg) for p, r in zip(pixels, big)])
        res["decode_img_per_s"] = rate(len(big), decode_s)
        res["preprocess_img_per_s"] = rate(len(big), prep_s)
        res["decode_preprocess_img_per_s_per_core"] = rate(len(big), decode_s + prep_s)
        stats = build_cache(tmp / "site_big", big, cfg, workers=args.workers)
        res["build_cache_img_per_s"] = rate(stats.built, stats.seconds)
        torch.set_num_threads(os.cpu_count() or 1)

        # --- the cached loader -----------------------------------------------------------------
        t = time.perf_counter()
        small = write_site(tmp / "small", args.loader_exams, args.loader_rows, args.loader_cols, seed=1)
        res["generate_loader_s"] = time.perf_counter() - t
        stats = build_cache(tmp / "site", small, cfg, workers=args.workers)
        res["build_cache_loader_s"] = stats.seconds
        cache = open_cache(tmp / "site", cfg)
        n = args.batch * args.batches
        for label, dtype in (("float32", torch.float32), ("float16", torch.float16)):
            ds = ExamDataset(small, cache, channels="cem", dtype=dtype)
            sampler = RandomSampler(ds, replacement=True, num_samples=n, generator=torch.Generator().manual_seed(0))
            loader = make_loader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers)
            res[f"loader_{label}_exams_per_s"] = loader_rate(loader, device)
            if label == "float16":
                res["loader_aug_float16_exams_per_s"] = loader_rate(
                    loader, device, torch.Generator().manual_seed(0), warm=False
                )
            del loader
        x = ExamDataset(small, cache).__getitems__(list(range(args.batch)))["x"].to(device)
        g = torch.Generator().manual_seed(0)
        augment(x, AUGMENT_PRESETS["multiview"], g)
        reps = 10
        s = timed(lambda: augment(x, AUGMENT_PRESETS["multiview"], g), reps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res["augment_exams_per_s"] = rate(args.batch, s)

        # --- baseline: no cache ----------------------------------------------------------------
        naive = NaiveExamDataset(big, cfg)
        # Two batches, timed cold: start-up is small next to decoding 512 full-size images.
        sampler = RandomSampler(
            naive, replacement=True, num_samples=args.batch * 2, generator=torch.Generator().manual_seed(0)
        )
        loader = DataLoader(
            naive, batch_size=args.batch, sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda"
        )
        res["naive_exams_per_s"] = loader_rate(loader, device, warm=False)
        res["cached_over_naive"] = res["loader_float32_exams_per_s"] / res["naive_exams_per_s"]  # type: ignore[operator]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("resize 1 image, torch antialias (ms)", res["resize_torch_ms"]),
        ("resize 1 image, Pillow (ms)", res["resize_pil_ms"]),
        ("decode, img/s/core", res["decode_img_per_s"]),
        ("preprocess, img/s/core", res["preprocess_img_per_s"]),
        ("decode + preprocess, img/s/core", res["decode_preprocess_img_per_s_per_core"]),
        (f"build_cache, {args.workers} workers, img/s", res["build_cache_img_per_s"]),
        ("cached ExamDataset float32, exams/s", res["loader_float32_exams_per_s"]),
        ("cached ExamDataset float16, exams/s", res["loader_float16_exams_per_s"]),
        (f"augment alone ({device.type}), exams/s", res["augment_exams_per_s"]),
        ("cached float16 + augment, exams/s", res["loader_aug_float16_exams_per_s"]),
        ("naive decode+preprocess per item, exams/s", res["naive_exams_per_s"]),
        ("cached / naive", res["cached_over_naive"]),
    ]
    print(
        f"fedbreast data bench: {args.rows}x{args.cols} stored, {args.size[0]}x{args.size[1]} x 4 views x 2 channels, "
        f"batch {args.batch}, {args.workers} loader workers, {os.cpu_count()} cpus, device {device}"
    )
    for name, value in rows:
        print(f"  {name:<46} {value:>10.1f}")  # type: ignore[str-format]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
