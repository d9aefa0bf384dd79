"""Test AUC of the federated model with DP-SGD at several epsilons, against no DP (issue 5).

Every variant is a full `fedbreast simulate` run (Flower simulation, default multiview
preset) on one generated federation, so the sites and their splits are identical. The
control `eps=1000` is the DP architecture (GroupNorm, frozen early blocks, per-sample
clipping) with almost no noise: it separates the cost of the architecture from that of
the noise.

    .venv/bin/python benchmarks/dp_accuracy.py --out runs/dp-acc --json benchmarks/results/dp_accuracy.json

With ``--pretrained CKPT`` (issue 17 item 4) it runs the public-pretraining table instead: every
arm starts from the same network pretrained on public data (``fedbreast pretrain
--model-out DIR``: backbone and heads, given to each run as its ``init-checkpoint``; every arm
builds the checkpoint's norm layers, ``norm = batch`` or ``group``: a BatchNorm backbone under DP
stays fixed in eval mode). DP-SGD trains the head only
(``dp-train-scope = head``; the no-DP head arm: ``freeze = backbone``); an evaluation-only run
scores the start itself. On each of ``--seeds`` (a generated federation each); the table gives
mean ± SD over seeds and the paired difference to no DP:

    .venv/bin/python benchmarks/dp_accuracy.py --public-seed 101 --seeds 0,1,2 \\
        --out runs/dp-pre --json benchmarks/results/dp_pretrained.json

(``--public-seed`` makes the start first: a generated federation of that seed, pretrained on;
``--pretrained CKPT`` takes one made by hand.)
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from fedbreast.server.metric_store import MetricStore
from fedbreast.simulation.simulate import simulate

# "no DP, again": the same run twice shows the run-to-run spread (thread timing, bf16) at this size.
VARIANTS = {
    "no DP": {},
    "no DP, again": {},
    "eps=1000 (DP architecture, ~no noise)": {"dp": "local", "dp_epsilon": 1000.0},
}
VARIANTS |= {f"eps={e:g}": {"dp": "local", "dp_epsilon": float(e)} for e in (8, 3, 1)}
# Every layer trained under DP (dp-freeze-blocks = 0): 2.5x slower steps (benchmarks/bench_dp.py),
# but no random frozen features when no ImageNet weights are given.
VARIANTS |= {
    f"{name}+freeze0": {**VARIANTS[name], "dp_freeze_blocks": 0}
    for name in ("eps=1000 (DP architecture, ~no noise)", "eps=8")
}
# A 5x learning rate: clipped per-exam gradients (norm <= 1) make much smaller steps than plain SGD's.
VARIANTS |= {
    f"{name}, lr 0.05": {**VARIANTS[name], "lr": 0.05} for name in ("eps=1000 (DP architecture, ~no noise)", "eps=8")
}
# DP-SGD practice (De et al. 2022 and others): with clip norm 1 the averaged clipped gradient is
# tiny, so the learning rate that works is 1-2 orders of magnitude above plain SGD's.
VARIANTS |= {
    f"{name}, lr {lr:g}": {**VARIANTS[name], "lr": lr}
    for lr in (0.5, 2.0)
    for name in ("eps=1000 (DP architecture, ~no noise)", "eps=8")
}


def pretrained_variants(lr: float, optimizer: str = "sgd", norm: str = "batch") -> dict[str, dict]:
    """The arms of the public-pretraining table: one pretrained start (the run's init-checkpoint,
    heads included), one optimizer and learning rate. An empty dict: the start itself, scored by an evaluation-only run."""
    start = {"norm": norm, "lr": lr, "optimizer": optimizer}
    out: dict[str, dict] = {
        "pretrained, not fine-tuned": {},
        "no DP, head": {**start, "freeze": "backbone"},
        "no DP, all layers": {**start, "freeze": "none"},
    }
    out |= {
        f"eps={e:g}, head": {**start, "dp": "local", "dp_epsilon": float(e), "dp_train_scope": "head"}
        for e in (8, 3, 1)
    }
    return out


def final_row(run_dir: Path) -> dict:
    store = MetricStore(run_dir)
    last = max(r["round"] for r in store.rows("aggregate"))
    agg = next(r for r in store.rows("aggregate") if r["round"] == last)
    train = [r for r in store.rows("aggregate-train") if r["round"] == last]
    sites = {r["site"]: r.get("test_auc") for r in store.rows("evaluate") if r["round"] == last}
    return {
        "rounds": last,
        "pooled_test_auc": agg.get("test_pooled_auc"),
        "val_auc_mean": agg.get("val_auc"),
        "site_test_auc": sites,
        "epsilon_max": train[0].get("dp_epsilon") if train else None,
    }


def noise_table(train_exams: list[int], rounds: int, epsilons: tuple[float, ...] = (1000.0, 8.0, 3.0, 1.0)) -> None:
    """Per-step noise over signal of DP-SGD on the default model, from the run's own DP plan.

    The averaged noisy gradient carries noise of norm ~ sigma * C * sqrt(d) / B against a clipped
    signal of norm <= C, so the ratio is what decides whether a model can learn under DP."""
    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.dp import freeze_leading_blocks, plan_local_round
    from fedbreast.simulation.simulate import PRESET

    base = RunConfig(**{**PRESET, "rounds": rounds, "dp": "local", "dp_delta": 1e-5, "bootstrap": 0})
    model = build_model(base)  # with dp on: the Opacus-ready model the sites train
    freeze_leading_blocks(model, base.dp_freeze_blocks)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trained parameters under DP (dp-freeze-blocks = {base.dp_freeze_blocks}): {d:,}; a linear head: 1,000")
    print("| ε | exams | σ | steps | noise ÷ signal per step | same, d = 1 k |\n|---|---|---|---|---|---|")
    for eps in epsilons:
        for n in train_exams:
            plan = plan_local_round(base.replace(dp_epsilon=eps), n)
            ratio = plan.noise_multiplier * plan.max_grad_norm / plan.expected_batch_size
            print(
                f"| {eps:g} | {n} | {plan.noise_multiplier:.3f} | {plan.planned_steps} | {ratio * d**0.5:.0f} | {ratio * 1000**0.5:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise-table", action="store_true", help="print DP-SGD's per-step noise over signal and exit")
    ap.add_argument(
        "--train-exams",
        type=int,
        nargs="*",
        default=[38, 57, 73],
        help="sites' training exams for --noise-table (default: the 3 x 80 federation's)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/dp-acc"))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--pretrained",
        help="the whole network of fedbreast pretrain --model-out DIR (DIR/checkpoints/final.pt): "
        "run the public-pretraining table from it",
    )
    ap.add_argument(
        "--public-seed",
        type=int,
        help="make the start first: a generated public federation of this seed (--sites x --patients, under "
        "OUT/public) and `fedbreast pretrain --epochs 4 --norm batch --model-out OUT/pretrained` on it "
        "(kept and reused when there)",
    )
    ap.add_argument("--seeds", default="0", help="data seeds for --pretrained, e.g. 0,1,2")
    ap.add_argument("--lr", type=float, default=0.01, help="learning rate of every --pretrained arm")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer of every --pretrained arm")
    args = ap.parse_args()
    if args.noise_table:
        return noise_table(args.train_exams, args.rounds)
    if args.public_seed is not None:
        args.pretrained = str(public_pretraining(args))
    if args.pretrained:
        return pretrained_table(args)
    results = {}
    for name, changes in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        t = time.perf_counter()
        simulate(
            run_dir,
            sites=args.sites,
            patients=args.patients,
            seed=args.seed,
            data_dir=args.out / "data",
            overrides={"rounds": args.rounds, "dp_delta": 1e-5, **changes},
            echo=lambda _line: None,
        )
        results[name] = final_row(run_dir) | {"seconds": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
    if args.json:  # merged with earlier results, so variants can be run in several calls (--only)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = (json.loads(args.json.read_text()) if args.json.exists() else {}) | results
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    base = results.get("no DP", {}).get("pooled_test_auc")
    sites = sorted({s for r in results.values() for s in r["site_test_auc"]})
    print("\n| variant | ε spent (max over sites) | pooled test AUC | Δ vs no DP | " + " | ".join(sites) + " |")
    print("|---|---|---|---|" + "---|" * len(sites))
    for name, r in results.items():
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        delta = "" if base is None or r["pooled_test_auc"] is None else f"{r['pooled_test_auc'] - base:+.3f}"
        cells = " | ".join(f"{r['site_test_auc'].get(s, float('nan')):.3f}" for s in sites)
        print(f"| {name} | {eps} | {r['pooled_test_auc']:.3f} | {delta} | {cells} |")


def _run(run_dir: Path, args: argparse.Namespace, seed: int, data_dir: Path, changes: dict) -> dict:
    t = time.perf_counter()
    ckpt = Path(args.pretrained).resolve()
    if not changes:  # the pretrained network as it is: an evaluation-only run of it
        from fedbreast.simulation.evaluate import evaluate_checkpoint
        from fedbreast.simulation.simulate import prepare_federation

        prepare_federation(data_dir, args.sites, args.patients, seed, echo=lambda *_: None)
        evaluate_checkpoint(ckpt, run_dir, sites_dir=data_dir / "sites", echo=lambda _line: None)
    else:
        simulate(
            run_dir,
            sites=args.sites,
            patients=args.patients,
            seed=seed,
            data_dir=data_dir,
            overrides={"rounds": args.rounds, "dp_delta": 1e-5, **changes},
            init_checkpoint=ckpt,
            echo=lambda _line: None,
        )
    return final_row(run_dir) | {"seconds": round(time.perf_counter() - t, 1)}


def public_pretraining(args: argparse.Namespace) -> Path:
    """The pretrained start of the table, made from a generated federation public to the
    consortium: its own seed, never one of the private ``--seeds``."""
    from fedbreast.simulation.pretrain import pretrain
    from fedbreast.simulation.simulate import prepare_federation

    if args.public_seed in [int(x) for x in str(args.seeds).split(",")]:
        raise SystemExit(f"--public-seed {args.public_seed} is one of the private --seeds: it would not be public data")
    ckpt = args.out / "pretrained" / "checkpoints" / "final.pt"
    if not ckpt.exists():
        sites = prepare_federation(args.out / "public", args.sites, args.patients, args.public_seed, echo=print)
        pretrain(
            sites[0].parent,
            args.out / "pretrained" / "backbone.pt",
            {"rounds": 4, "local_epochs": 1},
            seed=args.public_seed,
            norm="batch",
            model_out=args.out / "pretrained",
        )
    return ckpt


def pretrained_table(args: argparse.Namespace) -> None:
    """Every arm on every seed (results merged into --json as they come, so a long run can be resumed
    with --only), then the table: pooled test AUC mean ± SD over seeds, and the mean paired
    difference to "no DP, head" with its range over seeds."""
    import numpy as np

    seeds = [int(x) for x in str(args.seeds).split(",")]
    results: dict = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    from fedbreast.server.checkpoints import read_checkpoint

    norm = "group" if read_checkpoint(Path(args.pretrained)).meta["config"].get("norm") == "group" else "batch"
    variants = pretrained_variants(args.lr, args.optimizer, norm)
    for seed in seeds:
        for name, changes in variants.items():
            key = f"{name} | seed {seed}"
            if (args.only and name not in args.only) or key in results:
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            results[key] = _run(args.out / f"seed-{seed}" / slug, args, seed, args.out / f"data-{seed}", changes)
            results[key] |= {
                "variant": name,
                "seed": seed,
                "lr": args.lr,
                "optimizer": args.optimizer,
                "changes": changes,
            }
            print(key, json.dumps(results[key]), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    base = {r["seed"]: r["pooled_test_auc"] for r in results.values() if r["variant"] == "no DP, head"}
    print(
        f"\n{args.optimizer} lr {args.lr:g}, {args.rounds} rounds, {args.sites} sites x {args.patients} patients, seeds {seeds}"
    )
    print(
        "| arm | ε spent (max over sites, mean) | pooled test AUC, mean ± SD | Δ vs no DP (head), mean [min, max] | per seed |"
    )
    print("|---|---|---|---|---|")
    for name in variants:
        rows = [r for r in results.values() if r["variant"] == name and r["seed"] in seeds]
        if not rows:
            continue
        auc = np.array([r["pooled_test_auc"] for r in rows], dtype=float)
        eps = [r["epsilon_max"] for r in rows if r["epsilon_max"] is not None]
        d = np.array([r["pooled_test_auc"] - base[r["seed"]] for r in rows if r["seed"] in base], dtype=float)
        delta = f"{d.mean():+.3f} [{d.min():+.3f}, {d.max():+.3f}]" if len(d) else "-"
        per = ", ".join(f"{r['pooled_test_auc']:.3f}" for r in sorted(rows, key=lambda r: r["seed"]))
        sd = auc.std(ddof=1) if len(auc) > 1 else 0.0
        print(f"| {name} | {np.mean(eps) if eps else '-'} | {auc.mean():.3f} ± {sd:.3f} | {delta} | {per} |")


if __name__ == "__main__":
    main()
