"""Seed 004's missing-modality experiments with the federated virtual CESM (issue 18 item 4).

Per data seed, on one generated federation of four hospitals (site-1 and site-4 CEM, site-2
FFDM only, site-3 FFDM + ultrasound):

1. the translator: `fedbreast simulate --model cyclegan` (in-process engine) over all four
   sites; the two CEM sites train it, the others answer "unable";
2. synthesis at every site (`site synthesize --all-views`): virtual DES for every view;
3. the classifier in arms, each a federated model over every site that can train it: FFDM +
   real CESM (no virtual image anywhere), FFDM alone (`in-channels = 1`), CESM alone
   (`single-channel = des`), synthetic CESM alone, FFDM + synthetic CESM, and real CESM
   replaced by virtual for 0, 10, 25, 50, 75 and 100 % of the CEM sites' patients
   (`virtual-des-replace`, with virtual DES wherever a site has none). Scored on the CEM sites'
   test breasts, overall and by breast-density group (the reader's ACR density: a-b, c-d);
4. the federated question: test AUC at the FFDM-only site with a zero DES channel against
   virtual DES (`virtual-des = true`).

The classifier is the multiview family (seed 001's network; the product's default) started
from the public pretraining, as `fedbreast simulate` starts by default (`--start public`;
cached under DATA/public). Seed 004's own classifier, the late-fusion family, is at chance at
these sizes from a fresh start (docs/claims.md); `--classifier latefusion` runs its arms, from a
fresh start, as the first version of this benchmark did.

    .venv/bin/python benchmarks/virtual_cesm.py --seeds 0,1,2 --patients 40 --data /tmp/vcesm \\
        --json benchmarks/results/virtual_cesm.json --claims docs/claims.md

Arms are kept under DATA/seed-N/arms (claims.py's cache), so a rerun adds what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import claims
import numpy as np
from scipy.stats import t as student_t

from fedbreast.client.synthesize import synthesize_site
from fedbreast.server.checkpoints import load_checkpoint
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.data.generate import default_profiles
from fedbreast.simulation.simulate import prepare_sites, simulate

REPLACE = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
CEM_SITES = ("site-1", "site-4")
FFDM_SITE = "site-2"


def _arms(
    classifier: str = "multiview", replace: tuple[float, ...] = REPLACE
) -> dict[str, tuple[str, dict[str, Any], str]]:
    virtual = {"virtual_des": True}
    if classifier == "latefusion":  # seed 004's network: the modalities are branches of one model
        arms: dict[str, tuple[str, dict[str, Any], str]] = {
            "FFDM + real CESM": ("latefusion", {}, "branch:fused"),
            "FFDM alone": ("latefusion", {}, "branch:ffdm"),
            "CESM alone (real)": ("latefusion", {}, "branch:cesm"),
            "synthetic CESM alone": ("latefusion", {**virtual, "virtual_des_replace": 1.0}, "branch:cesm"),
            "FFDM + synthetic CESM": ("latefusion", {**virtual, "virtual_des_replace": 1.0}, "branch:fused"),
        }
        replaced = ("latefusion", "branch:fused")
    elif classifier == "multiview":  # one network per input, each trained federated
        des_only = {"in_channels": 1, "single_channel": "des"}
        arms = {
            "FFDM + real CESM": ("multiview", {}, "federated"),
            "FFDM alone": ("multiview", {"in_channels": 1}, "federated"),
            "CESM alone (real)": ("multiview", des_only, "federated"),
            "synthetic CESM alone": ("multiview", {**des_only, **virtual, "virtual_des_replace": 1.0}, "federated"),
            "FFDM + synthetic CESM": ("multiview", {**virtual, "virtual_des_replace": 1.0}, "federated"),
        }
        replaced = ("multiview", "federated")
    else:
        raise SystemExit(f"--classifier {classifier!r}: multiview or latefusion")
    arms["multiview, FFDM site: zero DES"] = ("multiview", {}, "federated")
    # the same model as "replaced 0 %" (virtual DES where a site has none, real DES kept)
    arms["multiview, FFDM site: virtual DES"] = ("multiview", {**virtual, "virtual_des_replace": 0.0}, "federated")
    for p in replace:
        arms[f"replaced {p:.0%}"] = (replaced[0], {**virtual, "virtual_des_replace": p}, replaced[1])
    return arms


def _keep(result: Any, sites: tuple[str, ...], group: str | None) -> np.ndarray:
    keep = np.isin(result.site, sites)
    return keep if group is None else keep & (result.group == group)


def _auc_at(result: Any, sites: tuple[str, ...], group: str | None = None) -> float:
    keep = _keep(result, sites, group)
    return claims._auc(result.y[keep], result.p[keep])


def _units_at(result: Any, sites: tuple[str, ...], group: str | None = None) -> list[int]:
    """[units, malignant] scored at ``sites`` (in ``group``)."""
    keep = _keep(result, sites, group)
    return [int(keep.sum()), int(result.y[keep].sum())]


GROUPS = ("non-dense (ACR a-b)", "dense (ACR c-d)")


def one_seed(
    data: Path,
    seed: int,
    patients: int,
    gan_rounds: int,
    echo,
    replace: tuple[float, ...] = REPLACE,
    classifier: str = "multiview",
) -> dict[str, Any]:
    root = data / f"seed-{seed}"
    profiles = default_profiles(4, patients)
    site_dirs = prepare_sites(root / "data", profiles, seed, echo)
    t = time.perf_counter()
    gan_dir = root / "cyclegan"
    if not (gan_dir / "checkpoints" / "best.pt").exists():
        simulate(
            gan_dir,
            sites_dir=site_dirs[0].parent,
            overrides={"model": "cyclegan", "rounds": gan_rounds, "seed": seed},
            engine="inprocess",
            echo=echo,
        )
    ckpt = load_checkpoint(gan_dir, "best")
    if ckpt is None:
        raise SystemExit(f"{gan_dir}: the cyclegan run left no best checkpoint")
    best = json.loads((gan_dir / "checkpoints" / "best.json").read_text())["round"]
    aggregate = next(r for r in MetricStore(gan_dir).rows("aggregate") if r["round"] == best)
    quality = {k: v for k, v in aggregate.items() if k.startswith("test_pooled_synth")}
    for d in site_dirs:
        echo(synthesize_site(d, ckpt, all_views=True).summary())
    gan_seconds = time.perf_counter() - t
    arms = _arms(classifier, replace)
    claims.ARMS.update(arms)
    public = data / "public" if classifier == "multiview" else None  # shared by every data seed
    ex = claims.Experiment(site_dirs, seed, echo, cache=root / "arms", public_cache=public, groups=True)
    out: dict[str, Any] = {
        "seed": seed,
        "classifier": classifier,
        "start": "public" if public is not None else "scratch",
        "gan_seconds": gan_seconds,
        "quality": quality,
        "auc": {},
        "units": {},
        "by_density": {},
        "seconds": {},
    }
    for name in arms:
        r = ex.arm(name)
        at = (FFDM_SITE,) if name.startswith("multiview") else CEM_SITES
        out["auc"][name] = _auc_at(r, at)
        out["units"][name] = _units_at(r, at)
        out["seconds"][name] = r.seconds
        out["by_density"][name] = {g: {"auc": _auc_at(r, at, g), "units": _units_at(r, at, g)} for g in GROUPS}
    return out


def _cell(values: list[float]) -> str:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "n/a"
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(runs: list[dict[str, Any]], command: str) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    first = runs[0]
    lines = [
        f"Test AUC, mean ± SD over data seeds {seeds} (`{command}`): the {first['classifier']} classifier "
        f'({first["start"]} start); arms on the CEM sites\' test breasts, the two "multiview, FFDM site" '
        "arms at the FFDM-only site. Test breasts (malignant): the mean over seeds. By density: the "
        "reader's ACR density, a seed's group AUC left out where the group has one class only.",
        "",
        "| arm | test AUC | test breasts (malignant) | " + " | ".join(GROUPS) + " |",
        "|---|---|---|" + "---|" * len(GROUPS),
    ]
    for name in first["auc"]:
        units = np.mean([r["units"][name] for r in runs], axis=0)
        dens = [_cell([r["by_density"][name][g]["auc"] for r in runs]) for g in GROUPS]
        n_g = [np.mean([r["by_density"][name][g]["units"] for r in runs], axis=0) for g in GROUPS]
        cells = [f"{d} ({u[0]:.0f}, {u[1]:.1f})" for d, u in zip(dens, n_g)]
        lines.append(
            f"| {name} | {_cell([r['auc'][name] for r in runs])} | {units[0]:.0f} ({units[1]:.1f}) | "
            + " | ".join(cells)
            + " |"
        )
    q = [r["quality"] for r in runs]
    lines += [
        "",
        "Translator quality (pooled over the CEM sites' test views): PSNR "
        + _cell([x.get("test_pooled_synth_psnr", float("nan")) for x in q])
        + " dB, SSIM "
        + _cell([x.get("test_pooled_synth_ssim", float("nan")) for x in q])
        + ".",
    ]
    return "\n".join(lines) + "\n"


# Seed 004's claims, each a paired difference (arm A minus arm B, the same test breasts) per
# data seed: (number, statement, A, B, density group or None; "gap" compares the gap A - B in
# dense breasts with the gap in non-dense ones).
SEED_004_CLAIMS = (
    ("9a", "FFDM + real CESM beats FFDM alone", "FFDM + real CESM", "FFDM alone", None),
    ("9b", "... in non-dense breasts (ACR a-b)", "FFDM + real CESM", "FFDM alone", GROUPS[0]),
    ("9c", "... in dense breasts (ACR c-d)", "FFDM + real CESM", "FFDM alone", GROUPS[1]),
    ("9d", "FFDM + synthetic CESM beats FFDM alone", "FFDM + synthetic CESM", "FFDM alone", None),
    ("9e", "synthetic CESM helps more in dense breasts", "FFDM + synthetic CESM", "FFDM alone", "gap"),
    ("9f", "replacing real CESM by synthetic lowers AUC (0 % above 100 %)", "replaced 0%", "replaced 100%", None),
    (
        "9g",
        "virtual DES from the federation raises an FFDM-only site's AUC over a zero DES channel",
        "multiview, FFDM site: virtual DES",
        "multiview, FFDM site: zero DES",
        None,
    ),
)


def _diff(run: dict[str, Any], a: str, b: str, group: str | None) -> float:
    if group is None:
        return run["auc"][a] - run["auc"][b]
    if group == "gap":
        return _diff(run, a, b, GROUPS[1]) - _diff(run, a, b, GROUPS[0])
    d = run["by_density"]
    return d[a][group]["auc"] - d[b][group]["auc"]


def verdict(diffs: list[float]) -> str:
    """Holds when the two-sided 95 % t interval of the mean paired difference over seeds lies
    above 0, reversed when below, else inconclusive (also with fewer than two seeds)."""
    v = [x for x in diffs if np.isfinite(x)]
    if len(v) < 2:
        return "inconclusive (fewer than 2 seeds with both classes)"
    m = statistics.fmean(v)
    half = float(student_t.ppf(0.975, len(v) - 1)) * statistics.stdev(v) / len(v) ** 0.5
    return "holds" if m - half > 0 else "reversed" if m + half < 0 else "inconclusive (within noise)"


def claims_section(runs: list[dict[str, Any]], command: str) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    first = runs[0]
    lines = [
        "## Seed 004's virtual-CESM claims (issue 18)",
        "",
        f"Written by `{command}` (`docs/virtual-cesm.md` has the arms). Data seeds {seeds}: one generated "
        f"federation each (two CEM, one FFDM, one FFDM + ultrasound hospital), the {first['classifier']} "
        f"classifier from the {first['start']} start, the federated translator's virtual DES. ΔAUC: arm A minus "
        "arm B on the same test breasts, mean ± SD over seeds; holds / reversed when the 95 % t interval "
        "of the mean (seeds with both classes in the group) excludes 0.",
        "",
        "| # | claim (seed 004) | arm A | arm B | ΔAUC per seed | ΔAUC mean ± SD | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, statement, a, b, group in SEED_004_CLAIMS:
        diffs = [_diff(r, a, b, group) for r in runs]
        per = ", ".join("n/a" if not np.isfinite(d) else f"{d:+.3f}" for d in diffs)
        where = " (dense minus non-dense)" if group == "gap" else ""  # a group's claim names it
        v = [d for d in diffs if np.isfinite(d)]
        mean = (
            "n/a" if not v else f"{statistics.fmean(v):+.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
        )
        lines.append(f"| {number} | {statement}{where} | {a} | {b} | {per} | {mean} | {verdict(diffs)} |")
    return "\n".join(lines) + "\n"


def saved_command(runs: list[dict[str, Any]]) -> str:
    return str(runs[0].get("command", "benchmarks/virtual_cesm.py"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--gan-rounds", type=int, default=8)
    ap.add_argument("--data", type=Path, default=Path("runs/virtual-cesm"))
    ap.add_argument("--replace", default=",".join(f"{p:g}" for p in REPLACE), help="replacement fractions")
    ap.add_argument("--classifier", default="multiview", choices=("multiview", "latefusion"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of a saved --json, run nothing")
    ap.add_argument("--claims", type=Path, metavar="MD", help="write seed 004's claims into this file (docs/claims.md)")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(table(saved, f"--table-from {args.table_from}"))
        if args.claims:
            claims.write_block(args.claims, "virtual_cesm.py", claims_section(saved, saved_command(saved)))
        return
    command = (
        f"benchmarks/virtual_cesm.py --seeds {args.seeds} --patients {args.patients} --gan-rounds {args.gan_rounds}"
        f" --classifier {args.classifier}"
    )
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        fractions = tuple(float(p) for p in args.replace.split(","))
        runs.append(one_seed(args.data, seed, args.patients, args.gan_rounds, print, fractions, args.classifier))
        runs[-1]["command"] = command
        if args.json:  # after every seed: a long measurement keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(runs, indent=1, default=float))
    text = table(runs, command)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.claims:
        claims.write_block(args.claims, "virtual_cesm.py", claims_section(runs, command))


if __name__ == "__main__":
    main()
