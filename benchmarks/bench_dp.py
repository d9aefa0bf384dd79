"""DP-SGD step time against the non-DP step at the same trainable scope, for each grad-sample mode, with peak memory.

    .venv/bin/python benchmarks/bench_dp.py --out dp_bench.json          # the default model
    .venv/bin/python benchmarks/bench_dp.py --small                      # smallcnn 64x32, seconds

The default model is the run config's (multi-view resnet18, 2 channels, 4 views of 256x128,
batch 8, amp "auto": bf16 where the CPU has it). Every configuration runs in its own
subprocess, one after the other in the same invocation, so its peak resident memory
(``ru_maxrss``; ``torch.cuda.max_memory_allocated`` on a GPU) is its own. Each trains through
the product's code path: ``train_local`` for non-DP, ``train_local(dp=LocalDP)`` for DP-SGD
(Poisson sampling at rate 1 over 8 exams, so every step has exactly 8 exams and all modes see
the same work). Each subprocess makes a warm-up call, then one timed call of ``--steps`` steps
(so DP's per-round work is included); the configurations run interleaved ``--repeats`` times
(ABAB...), as wall time and as CPU time (all threads).

The ratio that counts compares DP with non-DP at the SAME trainable scope: every DP
configuration is divided by the non-DP arm that trains the same parameters of the same
(GroupNorm) model, repeat by repeat (both timed in the same interleaved pass), and the table
gives the median of those per-repeat ratios. The ratio to the run's default non-DP training
(BatchNorm, every layer) is listed beside it, as before.

Configurations:
  nondp            the run's default non-DP training (BatchNorm model, all layers)
  nondp-gn-frozen  the DP model (GroupNorm, the default dp-freeze-blocks frozen) without DP:
                   the same-scope baseline of every DP configuration with frozen blocks
  nondp-gn-all     the DP model, every layer trained, without DP: the same-scope baseline of
                   the unfrozen DP configurations
  opacus-default   DP-SGD as Opacus documents it: hooks mode, every layer trained, Opacus' own
                   grad samplers (which need an NCHW model: its unfold2d is wrong on
                   channels_last) and one backbone call per view (per-exam gradients)
  dp-hooks-unfrozen, dp-fused-unfrozen   our hooks / fused engines, every layer trained
  dp-<mode>        DP-SGD with the run's default DP settings in each mode (hooks, ew,
                   functorch, ghost, fused); dp-<run default mode> is the default DP configuration
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

MODES = ("hooks", "ew", "functorch", "ghost", "fused")
GOAL = 1.3  # issue 19: the default DP step at most 1.3x the non-DP step at the same trainable scope


def configs() -> list[str]:
    return [
        "nondp",
        "nondp-gn-frozen",
        "nondp-gn-all",
        "opacus-default",
        "dp-hooks-unfrozen",
        "dp-fused-unfrozen",
        *(f"dp-{m}" for m in MODES),
    ]


def same_scope(row: dict) -> str | None:
    """The non-DP arm that trains what this configuration trains (None for non-DP arms)."""
    if row["grad_sample_mode"] is None:
        return None
    return "nondp-gn-frozen" if row["frozen_blocks"] else "nondp-gn-all"


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
    elif name == "nondp-gn-all":
        cfg, dp_on, mode, freeze = dp_default, False, None, 0
    elif name == "opacus-default":
        cfg, dp_on, mode, freeze = dp_default.replace(dp_grad_sample_mode="hooks", dp_freeze_blocks=0), True, "hooks", 0
    elif name.endswith("-unfrozen"):
        mode = name.removeprefix("dp-").removesuffix("-unfrozen")
        cfg, dp_on, freeze = dp_default.replace(dp_grad_sample_mode=mode, dp_freeze_blocks=0), True, 0
    else:
        mode = name.removeprefix("dp-")
        cfg, dp_on, freeze = dp_default.replace(dp_grad_sample_mode=mode), True, dp_default.dp_freeze_blocks
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if name.startswith("nondp-gn"):
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


def json_safe(value: object) -> object:
    """NaN (a ratio whose baseline did not run) as null, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="smallcnn at 64x32: a quick check, not the goal's model")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians of per-repeat ratios)")
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

    def ratio(r: dict, base_name: str | None, key: str) -> tuple[float, list[float]]:
        """Median over repeats of (this config / the base config), each repeat's pair timed in the same pass."""
        base = ok.get(base_name or "")
        if base is None:
            return float("nan"), []
        pairs = [a / b for a, b in zip(r[f"{key}_all"], base[f"{key}_all"])]
        return statistics.median(pairs), pairs

    default_name = f"dp-{default.dp_grad_sample_mode}"
    print(
        f"\nmodel: {'smallcnn 64x32' if args.small else f'{default.model}/{default.backbone} {default.in_channels}ch 4x{default.image_h}x{default.image_w}'}, "
        f"batch {default.batch_size}; default DP: mode {default.dp_grad_sample_mode}, {default.dp_freeze_blocks} frozen backbone blocks"
    )
    print("medians over repeats; 'x same scope': DP / the non-DP arm training the same parameters, per repeat")
    print(
        f"{'config':18s}{'mode':>10s}{'frozen':>7s}{'trainable':>11s}{'s/step':>9s}{'x same scope':>14s}"
        f"{'(CPU)':>7s}{'x nondp':>9s}{'peak MiB':>10s}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['config']:18s}  failed: {r['error']}")
            continue
        r["same_scope_baseline"] = same_scope(r)
        r["ratio_same_scope"], r["ratio_same_scope_all"] = ratio(r, same_scope(r), "step_s")
        r["cpu_ratio_same_scope"], r["cpu_ratio_same_scope_all"] = ratio(r, same_scope(r), "cpu_s")
        r["ratio_vs_nondp"], _ = ratio(r, "nondp", "step_s")
        r["cpu_ratio_vs_nondp"], _ = ratio(r, "nondp", "cpu_s")
        mark = "  <- default DP" if r["config"] == default_name else ""
        same = (
            f"{r['ratio_same_scope']:>14.2f}{r['cpu_ratio_same_scope']:>7.2f}"
            if same_scope(r)
            else f"{'-':>14s}{'-':>7s}"
        )
        print(
            f"{r['config']:18s}{str(r['grad_sample_mode'] or '-'):>10s}{r['frozen_blocks']:>7d}{r['trainable_params']:>11,d}"
            f"{r['step_s_median']:>9.3f}{same}{r['ratio_vs_nondp']:>9.2f}{r['peak_rss_mib']:>10.0f}{mark}"
        )
    verdict: dict = {}
    if default_name in ok and same_scope(ok[default_name]) in ok:
        d = ok[default_name]
        verdict["default_dp"] = default_name
        verdict["default_dp_ratio_same_scope"] = d["ratio_same_scope"]
        verdict["default_dp_cpu_ratio_same_scope"] = d["cpu_ratio_same_scope"]
        # Both clocks: on a machine shared with other jobs the wall clock also counts waiting for a
        # core, the CPU clock (this process's threads) does not.
        verdict[f"goal_same_scope_le_{GOAL}"] = d["ratio_same_scope"] <= GOAL and d["cpu_ratio_same_scope"] <= GOAL
        verdict["default_dp_ratio_vs_nondp_batchnorm_all_layers"] = d["ratio_vs_nondp"]
    for name, r in ok.items():
        if same_scope(r) in ok:
            verdict[f"{name}_ratio_same_scope"] = r["ratio_same_scope"]
    if verdict:
        print("\n" + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}" for k, v in verdict.items()))
    if args.out:
        args.out.write_text(
            json.dumps(
                json_safe(
                    {
                        "small": args.small,
                        "results": results,
                        "verdict": verdict,
                        "default": {"mode": default.dp_grad_sample_mode, "freeze_blocks": default.dp_freeze_blocks},
                        "repeats": args.repeats,
                        "steps": args.steps,
                        "threads": args.threads,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                ),
                indent=2,
            )
        )
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
