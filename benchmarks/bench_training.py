"""Local training speed, round overhead and bytes per round.

    .venv/bin/python benchmarks/bench_training.py --steps 12
    .venv/bin/python benchmarks/bench_training.py --simulate                 # + round overhead of a fresh default run
    .venv/bin/python benchmarks/bench_training.py --run-dir runs/simulate   # + round overhead of a finished run
    .venv/bin/python benchmarks/bench_training.py --loop-only --threads 1 --json benchmarks/results/training_loop_cpu.json
    .venv/bin/python benchmarks/bench_training.py --loop-only --threads 1 --compile inductor  # + the plain step under torch.compile

1. Images/s of the site's training loop (shared/training/local.py: bf16 autocast where the
   CPU/GPU has it, channels_last, batched cached loader) against a plain hand-written
   PyTorch loop (fp32, NCHW, default DataLoader collation) on the same model and the
   same cached exams, measured in the same run.
2. Bytes a round moves per site (global model down + update up, as Flower arrays)
   against the model's fp32 size; and the faithful VGG16 head's figures for comparison.
   --loop-only: only this comparison, in one process on in-memory exams (no generated site),
   interleaved (plain, ours, ours with amp "off"; repeated), medians of the per-repeat ratios,
   wall and CPU clocks: the issue 19 item 7 measurement.
3. With --simulate (runs `fedbreast simulate`'s default preset: resnet18, 3 sites) or
   --run-dir: per round, (round wall time - slowest site's local train+eval time) / round
   wall time, from the run's metrics.jsonl; and the same over all rounds together.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedbreast.server.app import initial_arrays
from fedbreast.server.exchange import to_record
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.site_data import site_for
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.models.multiview import MultiViewFusionNet, faithful_vgg_report
from fedbreast.shared.training.local import bf16_supported, match_channels, train_local
from fedbreast.simulation.simulate import prepare_federation


def plain_loop(model: torch.nn.Module, dataset, steps: int, batch_size: int) -> float:
    """The baseline a user would write: fp32, NCHW, per-item fetch and default collation."""
    loader = torch.utils.data.DataLoader(_PerItem(dataset), batch_size=batch_size, shuffle=True, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen, t0, done = 0, None, 0
    while done < steps:
        for x, y, m in loader:
            if done == 1:  # first step warms caches and allocators, as for ours
                t0, seen = time.perf_counter(), 0
            plain_step(model, opt, x, y, m)
            seen += x.shape[0] * 4
            done += 1
            if done >= steps:
                break
    return seen / (time.perf_counter() - t0)


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x, y, m) -> None:
    """One hand-written fp32 step: masked BCE, backward, SGD."""
    x = match_channels(x, 2)
    loss = (
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none") * m
    ).sum() / m.sum().clamp_min(1)
    opt.zero_grad()
    loss.backward()
    opt.step()


class _PerItem(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        b = self.ds.__getitems__([i])
        return b["x"][0].float(), b["y"][0], b["y_mask"][0].float()


def ours(model: torch.nn.Module, data, steps: int, batch_size: int) -> float:
    loader = data.loader("train", batch_size, shuffle=True, workers=0)
    train_local(model, loader, lr=1e-3, steps=1)  # warm-up step, not timed
    stats = train_local(model, loader, lr=1e-3, steps=steps - 1)
    return stats.images_per_s


def loop_ab(backbone: str, h: int, w: int, batch: int, steps: int, repeats: int, compile_backend: str = "") -> dict:
    """The plain fp32 NCHW loop against train_local (amp "auto", and "off"), same initial model and
    exams, interleaved in this process; each arm's seconds per step, and per-repeat ratios.
    ``compile_backend`` (e.g. inductor): one more arm, the plain step with the model under
    ``torch.compile`` (its compile time, in the warm-up, is reported apart)."""
    import copy
    import statistics

    from bench_dp import SyntheticExams

    from fedbreast.shared.data.datasets import passthrough_collate

    cfg = RunConfig(backbone=backbone, image_h=h, image_w=w, workers=0)
    data = SyntheticExams(batch, 2, h, w)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=passthrough_collate)
    torch.manual_seed(0)
    start = build_model(cfg)
    models = {arm: copy.deepcopy(start) for arm in ("plain", "ours", "ours_fp32")}
    opt = torch.optim.SGD(models["plain"].parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def plain() -> None:
        model = models["plain"].train()
        for _ in range(steps):
            b = data.__getitems__(list(range(batch)))
            plain_step(model, opt, b["x"], b["y"], b["y_mask"].float())

    arms = {
        "plain": plain,
        "ours": lambda: train_local(models["ours"], loader, lr=1e-3, steps=steps),
        "ours_fp32": lambda: train_local(models["ours_fp32"], loader, lr=1e-3, steps=steps, amp="off"),
    }
    compiled_arm: list[str] = []
    if compile_backend:
        eager = copy.deepcopy(start).train()
        compiled = torch.compile(eager, backend=compile_backend)
        opt_c = torch.optim.SGD(eager.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def plain_compiled() -> None:
            for _ in range(steps):
                b = data.__getitems__(list(range(batch)))
                plain_step(compiled, opt_c, b["x"], b["y"], b["y_mask"].float())

        arms["compiled"] = plain_compiled
        compiled_arm.append("compiled")
    warmup: dict[str, float] = {}
    for arm, run in arms.items():  # warm-up (the compiled arm compiles here)
        t = time.perf_counter()
        run()
        warmup[arm] = time.perf_counter() - t
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    for _ in range(repeats):
        for arm, run in arms.items():
            t, c = time.perf_counter(), time.process_time()
            run()
            times[arm].append(((time.perf_counter() - t) / steps, (time.process_time() - c) / steps))
    out: dict = {"steps": steps, "repeats": repeats, "batch_exams": batch, "warmup_s": warmup}
    if compile_backend:
        out["compile_backend"] = compile_backend
    for arm, rows in times.items():
        out[f"{arm}_step_s_all"] = [r[0] for r in rows]
        out[f"{arm}_cpu_s_all"] = [r[1] for r in rows]
    for arm in ("ours", "ours_fp32", *compiled_arm):  # speed-up over the plain loop: plain time / arm's
        for i, clock in enumerate(("wall", "cpu")):
            ratios = [p[i] / o[i] for p, o in zip(times["plain"], times[arm])]
            out[f"{arm}_speedup_{clock}_all"] = ratios
            out[f"{arm}_speedup_{clock}"] = statistics.median(ratios)
    return out


def round_overhead(run_dir: Path) -> list[dict]:
    out = []
    rows = MetricStore(run_dir).rows("round")
    for r in rows:
        wall, slowest = r["seconds"], r["slowest_site_seconds"]
        out.append(
            {"round": r["round"], "wall_s": wall, "slowest_site_s": slowest, "overhead": (wall - slowest) / wall}
        )
    if rows:
        wall, slowest = sum(r["seconds"] for r in rows), sum(r["slowest_site_seconds"] for r in rows)
        out.append({"round": "all", "wall_s": wall, "slowest_site_s": slowest, "overhead": (wall - slowest) / wall})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", default="256x128")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", help="folder for the generated site (default: a temp folder)")
    ap.add_argument("--run-dir", help="a finished run directory, for round overhead")
    ap.add_argument(
        "--simulate", action="store_true", help="run the default `fedbreast simulate` and report its round overhead"
    )
    ap.add_argument("--json")
    ap.add_argument("--loop-only", action="store_true", help="only the loop comparison, in-memory exams, interleaved")
    ap.add_argument("--repeats", type=int, default=3, help="--loop-only: interleaved repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--compile",
        default="",
        metavar="BACKEND",
        help="--loop-only: add the plain step under torch.compile with this backend (inductor, aot_eager)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.image_size.split("x"))
    if args.loop_only:
        res = loop_ab(args.backbone, h, w, args.batch_size, args.steps, args.repeats, args.compile)
        res.update(
            backbone=args.backbone,
            image=args.image_size,
            torch_threads=torch.get_num_threads(),
            bf16_autocast=bf16_supported(torch.device("cpu")),
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        for arm in ("ours", "ours_fp32", *(["compiled"] if args.compile else [])):
            print(
                f"{arm:10s} speed-up over the plain fp32 loop: wall {res[f'{arm}_speedup_wall']:.2f}x, "
                f"CPU {res[f'{arm}_speedup_cpu']:.2f}x (per repeat: "
                f"{', '.join(f'{x:.2f}' for x in res[f'{arm}_speedup_cpu_all'])})"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return
    cfg = RunConfig(backbone=args.backbone, image_h=h, image_w=w, workers=0)
    results: dict = {
        "backbone": args.backbone,
        "image": args.image_size,
        "batch": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "bf16_autocast": bf16_supported(torch.device("cpu")),
    }

    data_dir = Path(args.data or tempfile.mkdtemp(prefix="fedbreast-bench-"))
    site_dir = prepare_federation(data_dir, sites=1, patients=40, seed=0, echo=lambda *_: None)[0]
    data = site_for(site_dir, cfg)
    torch.manual_seed(0)
    plain_model = MultiViewFusionNet(args.backbone, 2, image_hw=(h, w))  # fp32, NCHW
    results["plain_loop_images_per_s"] = plain_loop(plain_model, data.datasets["train"], args.steps, args.batch_size)
    torch.manual_seed(0)
    results["fedbreast_loop_images_per_s"] = ours(build_model(cfg), data, args.steps, args.batch_size)
    results["speedup"] = results["fedbreast_loop_images_per_s"] / results["plain_loop_images_per_s"]

    arrays = initial_arrays(cfg)
    record = to_record(arrays)
    fp32 = sum(v.numel() for v in build_model(cfg).state_dict().values()) * 4
    sent = sum(len(a.data) for a in record.values())
    results["model_fp32_bytes"] = fp32
    results["bytes_per_round_per_site"] = 2 * sent  # global down + update up
    results["bytes_per_round_vs_fp32"] = 2 * sent / fp32
    results["faithful_vgg_512x256"] = faithful_vgg_report((512, 256))
    if args.simulate:
        from fedbreast.simulation.simulate import simulate

        run_dir = data_dir / "simulate-run"
        simulate(run_dir, data_dir=data_dir / "federation", echo=lambda *_: None)
        args.run_dir = str(run_dir)
    if args.run_dir:
        results["round_overhead"] = round_overhead(Path(args.run_dir))

    print(
        f"training, {args.backbone} {args.image_size} x 4 views x 2 channels, batch {args.batch_size}, {torch.get_num_threads()} threads:"
    )
    print(f"  plain PyTorch loop (fp32, NCHW)      {results['plain_loop_images_per_s']:7.1f} images/s")
    print(
        f"  fedbreast loop (bf16={results['bf16_autocast']}, NHWC)   {results['fedbreast_loop_images_per_s']:7.1f} images/s   ({results['speedup']:.2f}x)"
    )
    print(
        f"bytes per round per site: {results['bytes_per_round_per_site'] / 1e6:.1f} MB "
        f"({results['bytes_per_round_vs_fp32']:.2f}x the fp32 model, one copy down + one up)"
    )
    v = results["faithful_vgg_512x256"]
    print(f"faithful VGG16 head at 512x256: {json.dumps(v)}")
    for r in results.get("round_overhead", []):
        print(
            f"round {r['round']}: wall {r['wall_s']:.1f} s, slowest site {r['slowest_site_s']:.1f} s, overhead {100 * r['overhead']:.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
