"""DP-SGD step time against the non-DP step, for each Opacus grad-sample mode, with peak memory.

    .venv/bin/python benchmarks/bench_dp.py --out dp_bench.json          # the default model
    .venv/bin/python benchmarks/bench_dp.py --small                      # smallcnn 64x32, seconds

The default model is the run config's (multi-view resnet18, 2 channels, 4 views of 256x128,
batch 8, amp "auto": bf16 where the CPU has it). Every configuration runs in its own
subprocess, one after the other in the same invocation, so its peak resident memory
(``ru_maxrss``; ``torch.cuda.max_memory_allocated`` on a GPU) is its own. Each trains through
the product's code path: ``train_local`` for non-DP, ``train_local(dp=LocalDP)`` for DP-SGD
(Poisson sampling at rate 1 over 8 exams, so every step has exactly 8 exams and all modes see
the same work). Each subprocess makes a warm-up call, then one timed call of ``--steps`` steps
(so DP's per-round work is included); the configurations run interleaved ``--repeats`` times and
the table reports the fastest repeat (the least disturbed by other processes on a shared
machine; medians and every repeat are in the JSON), as wall time and as CPU time (all threads).

Configurations:
  nondp            the run's default non-DP training (BatchNorm model, all layers)   = baseline
  nondp-gn-frozen  the DP model (GroupNorm, same frozen blocks) trained without DP    (reference)
  opacus-default   DP-SGD as Opacus documents it: hooks mode, every layer trained, Opacus' own
                   grad samplers (which need an NCHW model: its unfold2d is wrong on
                   channels_last) and one backbone call per view (per-exam gradients)
  dp-hooks-unfrozen  our hooks engine (views folded in the samplers), every layer trained
  dp-<mode>        DP-SGD with the run's default DP settings in each mode (hooks, ew,
                   functorch, ghost); dp-<run default mode> is the default DP configuration
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

MODES = ("hooks", "ew", "functorch", "ghost")


def configs() -> list[str]:
    return ["nondp", "nondp-gn-frozen", "opacus-default", "dp-hooks-unfrozen", *(f"dp-{m}" for m in MODES)]


class SyntheticExams:
    """``n`` random exams, fetched as whole batches like the product's datasets."""

    def __init__(self, n: int, channels: int, h: int, w: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, channels, h, w, generator=g)
        self.y = torch.randint(0, 2, (n, 2), generator=g).float()
        self.mask = torch.ones(n, 2, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: list[int]) -> dict:
        return {"x": self.x[idx], "y": self.y[idx], "y_mask": self.mask[idx]}


def child(name: str, args: argparse.Namespace) -> dict:
    """Run one configuration in this process; returns its timings and peak memory."""
    import torch

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.data.datasets import passthrough_collate
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.dp import local_dp_for
    from fedbreast.shared.training.local import bf16_supported, pick_device, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(backbone="smallcnn", image_h=64, image_w=32) if args.small else {}
    cfg0 = RunConfig(**base)
    device = pick_device(args.device)
    dp_default = RunConfig(**base, dp="local")
    if name == "nondp":
        cfg, dp_on, mode, freeze = cfg0, False, None, 0
    elif name == "nondp-gn-frozen":
        cfg, dp_on, mode, freeze = dp_default, False, None, dp_default.dp_freeze_blocks
    elif name == "opacus-default":
        cfg, dp_on, mode, freeze = dp_default.replace(dp_grad_sample_mode="hooks", dp_freeze_blocks=0), True, "hooks", 0
    elif name == "dp-hooks-unfrozen":
        cfg, dp_on, mode, freeze = dp_default.replace(dp_grad_sample_mode="hooks", dp_freeze_blocks=0), True, "hooks", 0
    else:
        mode = name.removeprefix("dp-")
        cfg, dp_on, freeze = dp_default.replace(dp_grad_sample_mode=mode), True, dp_default.dp_freeze_blocks
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if name == "nondp-gn-frozen":
        from fedbreast.shared.training.dp import freeze_leading_blocks

        freeze_leading_blocks(model, freeze)
    data = SyntheticExams(cfg.batch_size, cfg.in_channels, cfg.image_h, cfg.image_w)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, collate_fn=passthrough_collate)
    ctx = SimpleNamespace(node_config={}, run_config={"run-dir": f"bench-{name}"}, run_id=0)
    wall = cpu = 0.0
    with tempfile.TemporaryDirectory() as site_dir:
        # A warm-up call, then one timed call of ``steps`` steps, as a round runs them (DP's
        # per-round work, wrapping the model and writing the ledger, is included).
        for i, steps in enumerate((args.warmup, args.steps)):
            run_cfg = cfg.replace(local_steps=steps, rounds=2)
            dp = local_dp_for(ctx, run_cfg, Path(site_dir), len(data), i + 1) if dp_on else None
            if dp is not None and name == "opacus-default":
                dp.optimized = False  # Opacus as documented: per-view backbone calls, its own samplers, NCHW
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            stats = train_local(model, loader, lr=1e-3, steps=steps, device=device, amp=cfg.amp, dp=dp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if stats.steps != steps or stats.examples != steps * cfg.batch_size:
                raise RuntimeError(f"{name}: expected {steps} steps of {cfg.batch_size} exams, got {stats}")
            wall, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DP's freezing stays on the model
    out = {
        "config": name,
        "grad_sample_mode": mode,
        "frozen_blocks": freeze,
        "trainable_params": trainable,
        "step_s": wall,
        "cpu_s": cpu,  # CPU seconds of all threads per step: robust to other processes on the machine
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "amp_bf16": mode != "ew" and (cfg.amp == "bf16" or (cfg.amp == "auto" and bf16_supported(device))),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="smallcnn at 64x32: a quick check, not the goal's model")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the fastest is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of the untimed first call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--only", nargs="*", help="run only these configurations")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)), flush=True)
        return 0

    from fedbreast.shared.config import RunConfig

    default = RunConfig(dp="local")
    names = args.only or configs()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    # Interleaved: repeat r runs every configuration once, so load from other processes on a
    # shared machine spreads over all of them instead of landing on one.
    for r in range(args.repeats):
        for name in names:
            if name in errors:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ] + (["--small"] if args.small else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                errors[name] = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{name:16s} FAILED: {errors[name]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(
                f"[{r + 1}/{args.repeats}] {name:16s} {row['step_s']:7.3f} s/step  {row['cpu_s']:7.3f} CPU-s/step  "
                f"peak RSS {row['peak_rss_mib']:6.0f} MiB",
                flush=True,
            )
    results: list[dict] = []
    for name in names:
        if name in errors:
            results.append({"config": name, "error": errors[name]})
            continue
        rows = runs[name]
        results.append(
            {
                **{k: v for k, v in rows[0].items() if k not in ("step_s", "cpu_s", "peak_rss_mib")},
                "step_s_min": min(x["step_s"] for x in rows),
                "cpu_s_min": min(x["cpu_s"] for x in rows),
                "step_s_median": statistics.median(x["step_s"] for x in rows),
                "cpu_s_median": statistics.median(x["cpu_s"] for x in rows),
                "step_s_all": [x["step_s"] for x in rows],
                "cpu_s_all": [x["cpu_s"] for x in rows],
                "peak_rss_mib": max(x["peak_rss_mib"] for x in rows),
            }
        )

    ok = {r["config"]: r for r in results if "error" not in r}
    base = ok.get("nondp")
    default_name = f"dp-{default.dp_grad_sample_mode}"
    print(
        f"\nmodel: {'smallcnn 64x32' if args.small else f'{default.model}/{default.backbone} {default.in_channels}ch 4x{default.image_h}x{default.image_w}'}, "
        f"batch {default.batch_size}; default DP: mode {default.dp_grad_sample_mode}, {default.dp_freeze_blocks} frozen backbone blocks"
    )
    print(
        f"{'config':18s}{'mode':>10s}{'frozen':>7s}{'trainable':>11s}{'s/step':>9s}{'x non-DP':>10s}"
        f"{'CPU-s/step':>12s}{'x non-DP':>10s}{'peak MiB':>10s}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['config']:18s}  failed: {r['error']}")
            continue
        r["ratio_vs_nondp"] = r["step_s_min"] / base["step_s_min"] if base else float("nan")
        r["cpu_ratio_vs_nondp"] = r["cpu_s_min"] / base["cpu_s_min"] if base else float("nan")
        mark = "  <- default DP" if r["config"] == default_name else ""
        print(
            f"{r['config']:18s}{str(r['grad_sample_mode'] or '-'):>10s}{r['frozen_blocks']:>7d}{r['trainable_params']:>11,d}"
            f"{r['step_s_min']:>9.3f}{r['ratio_vs_nondp']:>10.2f}{r['cpu_s_min']:>12.3f}{r['cpu_ratio_vs_nondp']:>10.2f}"
            f"{r['peak_rss_mib']:>10.0f}{mark}"
        )
    verdict = {}
    if base and default_name in ok:
        d = ok[default_name]
        verdict["default_dp_ratio"] = d["step_s_min"] / base["step_s_min"]
        verdict["default_dp_cpu_ratio"] = d["cpu_s_min"] / base["cpu_s_min"]
        verdict["goal_ratio_le_1_8"] = verdict["default_dp_ratio"] <= 1.8 and verdict["default_dp_cpu_ratio"] <= 1.8
        for ref in ("opacus-default", "dp-hooks"):
            if ref in ok and ref != default_name:
                verdict[f"beats_{ref}"] = (
                    d["step_s_min"] < ok[ref]["step_s_min"] and d["cpu_s_min"] < ok[ref]["cpu_s_min"]
                )
        print("\n" + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}" for k, v in verdict.items()))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "small": args.small,
                    "results": results,
                    "verdict": verdict,
                    "default": {"mode": default.dp_grad_sample_mode, "freeze_blocks": default.dp_freeze_blocks},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
