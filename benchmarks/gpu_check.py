"""The GPU check (issue 19 item 6): one run, one markdown table, under 8 minutes on one GPU.

    benchmarks/gpu_check.sh                      # on a GPU machine (timeout 480 s around it)
    benchmarks/gpu_check.sh --small --json out.json   # CPU / CI: tiny sizes, same table, < 1 min
    .venv/bin/python benchmarks/gpu_check.py --peak-tflops 989

Rows (each measured on its own: a failing row reads "failed: <type>: <message>" and the exit
code is 1, the other rows still run):

* ``train``: training images/s of the multiview network (``build_model``, channels_last) under
  bf16 autocast through the product's step (``SGDSteps`` + ``run_steps``, shared/training/local.py),
  eager and with ``torch.compile``: resnet18 (pooled head) at 256x128 and the paper's
  vgg16_bn + ``head = "vgg_fc"`` at 512x256, at the run config's batch (8 exams = 32 images).
  FLOP per step: ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward + backward
  (counted once; the optimiser's update is not counted). MFU = FLOP per step x steps/s / the
  GPU's dense bf16 peak (:data:`PEAK_TFLOPS` by device name, or ``--peak-tflops``).
* ``dp``: a DP-SGD step / a non-DP step at the same trainable scope (the DP model: GroupNorm,
  the same frozen blocks), resnet18 multiview, run config defaults: benchmarks/bench_dp.py's
  configurations ``dp-<default mode>`` and ``nondp-gn-frozen``, through ``train_local``.
* ``predict``: ``predict_site`` (what ``fedbreast site predict`` runs) on a generated site,
  end to end (cache read, model, CSV), exams/s; a random-initialised checkpoint
  (benchmarks/bench_predict.py's ``make_site`` and ``checkpoint``).
* ``psft``: patient-specific fine-tuning seconds per patient, seed 000 (birads family, RawNet,
  whole network, seed sizes: 800 normal and 400 lesion 227-px patches, batch 200):
  benchmarks/bench_patient_finetune.py's ``bench``.

``--small`` shrinks everything for a CPU: 64x32 images, batch 2, 2 timed steps, smallcnn for
DP, a 4-patient site, 1 patient of 8 patches a image for PSFT, and ``torch.compile`` with the
``aot_eager`` backend (dynamo + AOT autograd, no code generation: inductor's C++ build takes
minutes on a CPU). Its figures check that every row runs, not the hardware.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# in this order as substrings of torch.cuda.get_device_name(): the specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),  # also GH200: the H100 SXM's tensor cores
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)
MFU_GOAL = 0.35  # vgg16_bn 512x256 under bf16


def peak_for(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(
    backbone: str, head: str, hw: tuple[int, int], compiled: bool, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Images/s and FLOP per step of the multiview network's bf16 channels_last training step."""
    from bench_dp import SyntheticExams
    from torch.utils.flop_counter import FlopCounterMode

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.models.multiview import use_channels_last
    from fedbreast.shared.training.local import SGDSteps, autocast, masked_bce, run_steps

    cfg = RunConfig(backbone=backbone, head=head, image_h=hw[0], image_w=hw[1])
    batch_size = args.batch or cfg.batch_size
    torch.manual_seed(0)
    model = use_channels_last(build_model(cfg)).to(device).train()
    data = SyntheticExams(batch_size, cfg.in_channels, *hw)
    batch = {k: v.to(device) for k, v in data.__getitems__(list(range(batch_size))).items()}
    with FlopCounterMode(display=False) as counter, autocast(device, "bf16"):
        loss = masked_bce(model(batch["x"]), batch["y"], batch["y_mask"])
    with FlopCounterMode(display=False) as back:
        loss.backward()
    flops = counter.get_total_flops() + back.get_total_flops()
    model.zero_grad(set_to_none=True)
    rule = SGDSteps(model, lr=1e-4, momentum=0.9, weight_decay=5e-4, proximal_mu=0.0)
    if compiled:
        rule.model = torch.compile(model, backend=args.compile_backend)

    def steps(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        stats = run_steps(
            rule,
            [batch],
            epochs=1,
            steps=n,
            device=device,
            amp="bf16",
            augment=None,
            loss_fn=None,
            in_channels=cfg.in_channels,
        )
        sync(device)
        if stats.steps != n:
            raise RuntimeError(f"expected {n} steps, ran {stats.steps}")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    steps(args.warmup)  # cuDNN's autotuning; with compile, the compilation
    warm = time.perf_counter() - t0
    seconds = steps(args.steps)
    step_s = seconds / args.steps
    achieved = flops / step_s
    return {
        "images_per_s": 4 * batch_size / step_s,
        "step_s": step_s,
        "flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak * 1e12) if args.peak else None,
        "batch_exams": batch_size,
        "compiled": compiled,
        "warmup_s": warm,
    }


def dp_row(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """bench_dp.py's default DP configuration over its non-DP run at the same trainable scope."""
    from bench_dp import child

    from fedbreast.shared.config import RunConfig

    mode = RunConfig(dp="local").dp_grad_sample_mode
    ns = argparse.Namespace(small=args.small, threads=0, device=device.type, warmup=args.dp_warmup, steps=args.dp_steps)
    base = child("nondp-gn-frozen", ns)
    dp = child(f"dp-{mode}", ns)
    if base["trainable_params"] != dp["trainable_params"]:
        raise RuntimeError(
            f"trainable scopes differ: {base['trainable_params']} vs {dp['trainable_params']} parameters"
        )
    return {
        "dp_ratio": dp["step_s"] / base["step_s"],
        "dp_step_s": dp["step_s"],
        "nondp_step_s": base["step_s"],
        "grad_sample_mode": mode,
        "trainable_params": dp["trainable_params"],
        "model": "smallcnn 64x32" if args.small else "resnet18 256x128",
    }


def predict_row(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``predict_site`` on a generated site, after one warm-up call that builds its cache."""
    import shutil

    from bench_predict import checkpoint, make_site

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.predict import predict_site
    from fedbreast.simulation.simulate import PRESET, PRESETS

    size = dict(image_h=64, image_w=32) if args.small else {}
    cfg = RunConfig(**{**PRESET, **PRESETS["multiview"], "workers": 0, **size})
    site_dir = make_site(root, args.patients, seed=0)
    ckpt = checkpoint(cfg)
    out = root / "predict"
    times = []
    for _ in range(1 + args.predict_repeats):
        shutil.rmtree(out, ignore_errors=True)
        result = predict_site(site_dir, ckpt, None, out, threshold=0.5)
        times.append(result.seconds)
    exams = result.scored // 2  # one row per breast
    if exams == 0:
        raise RuntimeError("the generated site had no scorable exam")
    seconds = min(times[1:])
    return {
        "exams_per_s": exams / seconds,
        "exams": exams,
        "seconds": seconds,
        "device": result.device,
        "model": f"{cfg.backbone} {cfg.image_h}x{cfg.image_w}",
    }


def psft_row(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from bench_patient_finetune import bench

    ns = argparse.Namespace(
        patients=args.psft_patients,
        per_image=8 if args.small else 200,
        patch=64 if args.small else 227,
        batch=16 if args.small else 200,
        amp="auto",
    )
    row = bench("rawnet", "all", device, ns)
    return {
        "seconds_per_patient": row["seconds_per_patient"],
        "patients": row["patients"],
        "normal_patches_per_patient": row["normal_patches_per_patient"],
        "steps_per_patient": row["steps_per_patient"],
        "patch": ns.patch,
    }


def measure(name: str, setting: str, fn: Callable[[], dict[str, Any]], threads: int) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "setting": setting}
    if threads:
        torch.set_num_threads(threads)  # again for every row: predict_site sets its own
    t0 = time.perf_counter()
    try:
        row.update(fn())
        row["ok"] = True
    except Exception as exc:  # one failing part must not lose the others
        traceback.print_exc(file=sys.stderr)
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    row["wall_s"] = time.perf_counter() - t0
    print(f"# {name} [{setting}]: {'ok' if row['ok'] else row['error']} ({row['wall_s']:.1f} s)", file=sys.stderr)
    return row


def result_cell(row: dict[str, Any]) -> str:
    if not row["ok"]:
        return f"failed: {row['error']}".replace("|", "/")
    if "images_per_s" in row:
        return f"{row['images_per_s']:.1f} images/s"
    if "dp_ratio" in row:
        return f"{row['dp_ratio']:.2f}x ({row['dp_step_s'] * 1e3:.1f} / {row['nondp_step_s'] * 1e3:.1f} ms)"
    if "exams_per_s" in row:
        return f"{row['exams_per_s']:.2f} exams/s ({row['exams']} exams)"
    return f"{row['seconds_per_patient']:.3f} s/patient"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| measurement | setting | result | GFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = r["ok"] and "flops_per_step" in r
        gflop = f"{r['flops_per_step'] / 1e9:.1f}" if train else "-"
        tflops = f"{r['achieved_tflops']:.3g}" if train else "-"
        mfu = (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a") if train else "-"
        lines.append(f"| {r['name']} | {r['setting']} | {result_cell(r)} | {gflop} | {tflops} | {mfu} |")
    return "\n".join(lines)


def goal_line(rows: list[dict[str, Any]], device: torch.device) -> str:
    if device.type != "cuda":
        return "vgg16_bn 512x256 bf16 MFU: not measured (no GPU here; the goal >= 35% is a GPU goal)"
    vgg = [r for r in rows if r["ok"] and r["name"].startswith("train vgg16_bn")]
    if not vgg:
        return "vgg16_bn 512x256 bf16 MFU: n/a (goal >= 35%; its rows failed)"
    if vgg[0]["mfu"] is None:
        return "vgg16_bn 512x256 bf16 MFU: n/a (goal >= 35%; no peak known for this GPU: pass --peak-tflops)"
    best = max(vgg, key=lambda r: r["mfu"])
    verdict = "met" if best["mfu"] >= MFU_GOAL else "NOT met"
    return f"vgg16_bn 512x256 bf16 MFU: {100 * best['mfu']:.1f}% (goal >= 35%) -- {verdict}, {best['setting']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes for a CPU / CI: checks the rows run")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by GPU name)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=0, help="training rows' exams per step (0: the run config's, 8)")
    ap.add_argument("--steps", type=int, help="timed training steps per row (default 20; --small 2)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's; --small: 1)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default inductor; --small on CPU: aot_eager)")
    args = ap.parse_args(argv)

    from fedbreast.shared.training.local import pick_device

    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    args.peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    args.steps = args.steps or (2 if args.small else 20)
    args.warmup = 1 if args.small else 3
    # One thread for --small: on a busy 2-core machine two threads ran a resnet18 step 10x slower
    # (each waits for the other to be scheduled).
    threads = args.threads if args.threads is not None else (1 if args.small else 0)
    args.batch = args.batch or (2 if args.small else 0)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.small and device.type == "cpu" else "inductor")
    args.dp_warmup, args.dp_steps = (1, 2) if args.small else (2, 5)
    args.patients = 4 if args.small else 16
    args.predict_repeats = 1 if args.small else 3
    args.psft_patients = 1 if args.small else 3
    small_hw = (64, 32)
    models = [
        ("resnet18", "pooled", small_hw if args.small else (256, 128)),
        ("vgg16_bn", "vgg_fc", small_hw if args.small else (512, 256)),
    ]
    print(
        f"# device: {device} ({name}), bf16 peak: {f'{args.peak:g} TFLOP/s' if args.peak else 'unknown'}, "
        f"torch {torch.__version__}{', --small' if args.small else ''}",
        file=sys.stderr,
        flush=True,
    )
    t_start = time.perf_counter()
    rows = []
    for backbone, head, hw in models:
        for compiled in (False, True):
            label = f"train {backbone}{' + vgg_fc' if head == 'vgg_fc' else ''} {hw[0]}x{hw[1]}"
            how = f"torch.compile ({args.compile_backend})" if compiled else "eager"
            setting = f"bf16, channels_last, {how}, batch {args.batch or 8}x4 images"
            rows.append(
                measure(
                    label,
                    setting,
                    lambda b=backbone, h=head, s=hw, c=compiled: train_row(b, h, s, c, device, args),
                    threads,
                )
            )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows.append(
            measure(
                "DP step ratio",
                f"DP-SGD / non-DP step, same trainable scope, {'smallcnn 64x32' if args.small else 'resnet18 256x128'}",
                lambda: dp_row(device, args),
                threads,
            )
        )
        rows.append(
            measure(
                "site predict",
                f"predict_site, {args.patients}-patient generated site, multiview",
                lambda: predict_row(args, Path(tmp)),
                threads,
            )
        )
    psft_size = "1 patient x 8 patches/image, 64 px" if args.small else "seed sizes: 200 patches/image, 227 px"
    rows.append(
        measure(
            "patient fine-tuning", f"birads RawNet, scope all, {psft_size}", lambda: psft_row(device, args), threads
        )
    )
    print(table(rows))
    print()
    print(goal_line(rows, device))
    failed = [r["name"] for r in rows if not r["ok"]]
    total = time.perf_counter() - t_start
    print(f"# {len(rows) - len(failed)}/{len(rows)} rows ok in {total:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "device_name": name,
                    "peak_tflops": args.peak,
                    "small": args.small,
                    "compile_backend": args.compile_backend,
                    "torch": torch.__version__,
                    "rows": rows,
                    "goal": goal_line(rows, device),
                    "seconds": total,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
