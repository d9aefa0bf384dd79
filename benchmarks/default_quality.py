"""Quality of the default run against its baselines, over data seeds (issue 17 item 5).

For each data seed: ``fedbreast simulate`` with its defaults and ``--baselines`` (local-only
models and a pooled model, same budget, same start), plus each site's personalised model
(``personal-epochs``: the global model fine-tuned on the site's train split, kept at the site).
Then the issue's three criteria, each on the mean over seeds:

1. federated pooled test AUC >= 0.98 x the pooled-centralised model's (all test units together);
2. federated beats local-only at the smallest site (fewest training exams);
3. at no site does federated fall more than 0.05 below that site's local-only model
   (checked for the global model and for the site's personalised one).

    .venv/bin/python benchmarks/default_quality.py --seeds 0,1,2 --out runs/quality \\
        --json benchmarks/results/default_quality.json --md docs/default-quality.md

``--set KEY=VALUE`` changes a setting of every run (and its baselines), e.g. to measure what
moves the result; ``--init-checkpoint CKPT`` starts every run and baseline from it.
``--start`` is simulate's (default ``auto``, as the CLI: the run's network pretrained on a public
generated federation, made once under OUT/public and shared by every seed's run and baselines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedbreast.server.metric_store import MetricStore
from fedbreast.server.report import final_site_rows
from fedbreast.shared.config import RunConfig
from fedbreast.simulation.baselines import ALL_SITES
from fedbreast.simulation.simulate import simulate


def one_seed(
    out: Path,
    seed: int,
    overrides: dict[str, Any],
    engine: str,
    init: Path | None,
    patients: int,
    reuse: dict[str, Any] | None = None,
    start: str = "auto",
) -> dict[str, Any]:
    """One data seed; ``reuse``: that seed's entry of an earlier measurement whose baselines are
    the same models (settings that only change the federated run, e.g. fedbn or personal-epochs:
    the local-only and pooled models train one network each, without them), not trained again."""
    run_dir = out / f"seed-{seed}"
    t = time.perf_counter()
    res = simulate(
        run_dir,
        patients=patients,
        seed=seed,
        baselines=reuse is None,
        overrides=overrides,
        data_dir=out / f"data-{seed}",
        engine=engine,
        init_checkpoint=init,
        start=start,
        public_cache=out / "public",
    )
    if reuse is None:
        base = res["baselines"]
    else:
        base = {s: {"local": v["local"], "pooled": v["pooled"]} for s, v in reuse["sites"].items()}
        base[ALL_SITES] = {"local": reuse["pooled"]["local"], "pooled": reuse["pooled"]["pooled"]}
    return score_run(run_dir, seed, base, time.perf_counter() - t)


def score_run(run_dir: Path, seed: int, base: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One finished run's figures beside its baselines, at two rounds: ``federated`` /
    ``personalised`` at the best-validation round (checkpoints/best.json: what a run reports with
    ``model-selection = best-val``), ``federated_last`` / ``personalised_last`` at the last round
    (what a run reports by default, ``last-round``; like for like with the baselines, which train
    the same budget and keep their last model)."""
    store = MetricStore(run_dir)
    last, _ = final_site_rows(store)
    best = run_dir / "checkpoints" / "best.json"  # the best-validation round (model-selection = best-val)
    chosen = int(json.loads(best.read_text())["round"]) if best.exists() else last

    def at(round_: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        rows = {r["site"]: r for r in store.rows("evaluate") if r["round"] == round_}
        agg: dict[str, Any] = next((r for r in reversed(store.rows("aggregate")) if r["round"] == round_), {})
        return rows, agg

    (rows, agg), (last_rows, last_agg) = at(chosen), at(last)
    train = {r["site"]: r.get("num-examples") for r in store.rows("train")}  # what each site trained on
    return {
        "seed": seed,
        "round": chosen,
        "last_round": last,
        "seconds": seconds,
        "pooled": {
            "federated": agg.get("test_pooled_auc"),
            "federated_last": last_agg.get("test_pooled_auc"),
            "local": base[ALL_SITES]["local"],
            "pooled": base[ALL_SITES]["pooled"],
        },
        "sites": {
            s: {
                "train_exams": train.get(s),
                "federated": r.get("test_auc"),
                "federated_last": last_rows.get(s, {}).get("test_auc"),
                "personalised": r.get("test_auc_personal"),
                "personalised_last": last_rows.get(s, {}).get("test_auc_personal"),
                "local": base[s]["local"],
                "pooled": base[s]["pooled"],
            }
            for s, r in sorted(rows.items())
        },
    }


def _ms(values: list[float | None]) -> tuple[float, float]:
    v = [float(x) for x in values if x is not None]
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (float("nan"), 0.0)


ARMS = ("federated", "federated_last", "personalised", "personalised_last", "local", "pooled")
GLOBAL = {"federated": "global, best-validation round", "federated_last": "global, last round"}
PERSONAL = {"personalised": "personalised, best-validation round", "personalised_last": "personalised, last round"}


def verdicts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three criteria on the means over seeds, for the global model at the
    best-validation round and at the last round (what a default run reports; like for like with
    the baselines, which keep their last model) and, where measured, each site's personalised
    model at each of the two rounds."""
    pooled, _ = _ms([r["pooled"]["pooled"] for r in runs])
    sites = sorted(runs[0]["sites"])
    smallest = min(sites, key=lambda s: statistics.fmean(r["sites"][s]["train_exams"] or 0 for r in runs))
    mean = {(s, arm): _ms([r["sites"][s].get(arm) for r in runs])[0] for s in sites for arm in ARMS}
    out: dict[str, Any] = {"smallest_site": smallest}
    for arm, name in GLOBAL.items():
        values = [r["pooled"].get(arm) for r in runs]
        if any(v is None for v in values):
            continue
        fed, _ = _ms(values)
        out[f"1 pooled ratio ({name})"] = fed / pooled
        out[f"1 pooled >= 0.98 x pooled-centralised ({name})"] = fed >= 0.98 * pooled
    for arm in ("federated", "federated_last", "personalised", "personalised_last"):
        if not all(r["sites"][s].get(arm) is not None for r in runs for s in sites):
            continue
        name = GLOBAL.get(arm) or PERSONAL[arm]
        out[f"2 beats local-only at the smallest site ({name})"] = mean[(smallest, arm)] > mean[(smallest, "local")]
        out[f"3 no site more than 0.05 below local-only ({name})"] = all(
            mean[(s, arm)] >= mean[(s, "local")] - 0.05 for s in sites
        )
    return out


def markdown(runs: list[dict[str, Any]], v: dict[str, Any], command: str) -> str:
    def cell(values: list[float | None]) -> str:
        if all(x is None for x in values):
            return "-"
        m, sd = _ms(values)
        return f"{m:.3f} ± {sd:.3f}"

    sites = sorted(runs[0]["sites"])
    lines = [
        f"Test AUC, mean ± SD over data seeds {', '.join(str(r['seed']) for r in runs)} (`{command}`).",
        "",
        "| | federated (global, best-val round) | federated (global, last round) | personalised (best-val round) "
        "| personalised (last round) | local-only | pooled-centralised |",
        "|---|---|---|---|---|---|---|",
        "| all test units pooled | "
        + " | ".join(
            [
                cell([r["pooled"].get("federated") for r in runs]),
                cell([r["pooled"].get("federated_last") for r in runs]),
            ]
            + ["-", "-"]
            + [cell([r["pooled"][a] for r in runs]) for a in ("local", "pooled")]
        )
        + " |",
    ]
    for s in sites:
        exams = statistics.fmean(r["sites"][s]["train_exams"] or 0 for r in runs)
        lines.append(
            f"| {s} ({exams:.0f} train exams) | "
            + " | ".join(cell([r["sites"][s].get(a) for r in runs]) for a in ARMS)
            + " |"
        )
    lines += [
        "",
        "`model-selection` picks which round a run reports, not how it trains: a default run (`last-round`) "
        "reports the last-round columns, `--set model-selection=best-val` (seed 001's early stopping) the "
        "best-val ones.",
    ]
    lines += ["", "| criterion (on the means) | result |", "|---|---|"]
    lines += [f"| {k} | {val if isinstance(val, (bool, str)) else f'{val:.3f}'} |" for k, val in v.items()]
    return "\n".join(lines) + "\n"


def rescore(json_paths: list[Path], out: Path) -> list[dict[str, Any]]:
    """The runs of earlier ``--json`` files (e.g. seeds 0-2 and, later, seeds 3-4) scored again
    from their run folders (``OUT/seed-N``), their baselines as recorded: a change of what is
    reported needs no new training. A seed in two files is an error, not a silent pick."""
    runs: list[dict[str, Any]] = []
    for json_path in json_paths:
        for r in json.loads(Path(json_path).read_text())["runs"]:
            if any(r["seed"] == x["seed"] for x in runs):
                raise SystemExit(f"--rescore: seed {r['seed']} is in more than one file ({json_path})")
            base = {s: {"local": v["local"], "pooled": v["pooled"]} for s, v in r["sites"].items()}
            base[ALL_SITES] = {"local": r["pooled"]["local"], "pooled": r["pooled"]["pooled"]}
            runs.append(score_run(Path(out) / f"seed-{r['seed']}", r["seed"], base, r["seconds"]))
    return sorted(runs, key=lambda r: r["seed"])


def paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """Per seed, this measurement's federated figures minus a reference measurement's on the same
    seed and data (e.g. update-encoding int8 against fp32): the pooled test AUC and each site's,
    with the mean and SD of the differences. Paired by seed, so the split's luck cancels."""
    ref = {r["seed"]: r for r in reference}
    both = [r for r in runs if r["seed"] in ref]
    if not both:
        raise SystemExit("--against: no seed in common")
    rows = [("all test units pooled", lambda r: r["pooled"])] + [
        (s, lambda r, s=s: r["sites"][s]) for s in sorted(both[0]["sites"])
    ]
    seeds = [r["seed"] for r in both]
    lines = [
        f"Differences against the reference, per seed ({', '.join(map(str, seeds))}), then mean ± SD:",
        "",
        "| | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± SD |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for name, get in rows:
        for arm in ("federated", "federated_last"):
            d = [
                None
                if get(r).get(arm) is None or get(ref[r["seed"]]).get(arm) is None
                else float(get(r)[arm]) - float(get(ref[r["seed"]])[arm])
                for r in both
            ]
            m, sd = _ms(d)
            cells = ["-" if x is None else f"{x:+.3f}" for x in d]
            lines.append(f"| {name} | {GLOBAL[arm]} | " + " | ".join(cells) + f" | {m:+.3f} ± {sd:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--engine", default="inprocess", help="inprocess (the same apps, sites in turn) or ray")
    ap.add_argument("--personal-epochs", type=int, default=1)
    ap.add_argument("--patients", type=int, default=80, help="per site (simulate's default: 80)")
    ap.add_argument("--init-checkpoint", type=Path)
    ap.add_argument("--start", default="auto", choices=("auto", "public", "scratch"), help="simulate --start")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--baselines-from",
        type=Path,
        help="an earlier --json of the same seeds and data: its local-only and pooled figures, not retrained "
        "(only valid when --set changes nothing those single-network baselines use, e.g. fedbn, personal-epochs)",
    )
    ap.add_argument(
        "--rescore",
        type=Path,
        action="append",
        metavar="JSON",
        help="score the runs of this earlier --json again from their folders under --out (no training); "
        "repeat it to merge measurements of other seeds",
    )
    ap.add_argument(
        "--against",
        type=Path,
        metavar="JSON",
        help="an earlier --json of the same seeds: print each seed's federated AUC minus its (paired by seed)",
    )
    args = ap.parse_args()
    raw = dict(item.split("=", 1) for item in args.set)
    parsed = RunConfig.from_flower(raw)  # validates keys and values, as `fedbreast simulate --set` does
    overrides = {"personal_epochs": args.personal_epochs} | {
        k.replace("-", "_"): getattr(parsed, k.replace("-", "_")) for k in raw
    }
    if args.rescore:
        runs = rescore(args.rescore, args.out)
        given = " ".join(f"--rescore {j}" for j in args.rescore)
        text = markdown(runs, verdicts(runs), f"benchmarks/default_quality.py {given} --out {args.out}")
        if args.against:
            text += "\n" + paired(runs, json.loads(args.against.read_text())["runs"])
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "verdicts": verdicts(runs)}, indent=1))
        if args.md:
            args.md.write_text(text)
        return
    earlier = {r["seed"]: r for r in json.loads(args.baselines_from.read_text())["runs"]} if args.baselines_from else {}
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        reuse = earlier.get(seed) if args.baselines_from else None
        if args.baselines_from and reuse is None:
            raise SystemExit(f"--baselines-from {args.baselines_from}: no seed {seed} in it")
        runs.append(
            one_seed(args.out, seed, overrides, args.engine, args.init_checkpoint, args.patients, reuse, args.start)
        )
        print(json.dumps(runs[-1], indent=1))
        if args.json:  # after every seed: a long measurement keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"overrides": overrides, "runs": runs}, indent=1))
    v = verdicts(runs)
    command = "benchmarks/default_quality.py " + " ".join(
        [
            f"--seeds {args.seeds}",
            f"--patients {args.patients}",
            f"--engine {args.engine}",
            f"--personal-epochs {args.personal_epochs}",
            f"--start {args.start}",
        ]
        + [f"--set {s}" for s in args.set]
        + ([f"--init-checkpoint {args.init_checkpoint}"] if args.init_checkpoint else [])
        + ([f"--baselines-from {args.baselines_from}"] if args.baselines_from else [])
    )
    text = markdown(runs, v, command)
    if args.against:
        text += "\n" + paired(runs, json.loads(args.against.read_text())["runs"])
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "runs": runs, "verdicts": v}, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)


if __name__ == "__main__":
    main()
