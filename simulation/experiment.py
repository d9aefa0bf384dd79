"""``fedbreast experiment``: repeated federated runs of arms that differ in one run setting,
with the mean and spread of each arm and paired tests between them.

A repeat is one (data seed, fold): the generated federation of that seed, with the splits of
one fold of a patient-grouped, label-stratified k-fold cross-validation (``--folds K``; every
patient is tested once over the K folds), or the ingest's own split (``--folds 0``). Every arm
runs on the same repeat's sites, so the arms' test units are the same and the tests are paired:

* per repeat: each arm's AUC on the test units of all sites, pooled (the predictions
  themselves, which a real federation never sees: this is a simulation harness, like
  benchmarks/claims.py), and DeLong's paired test of the first arm against each other arm;
* across repeats: mean and standard deviation per arm; the mean paired difference with a
  95 % bootstrap CI over repeats (the repeat is the resampling unit), the paired t-test, and
  the verdict: "holds" / "refuted" when the CI excludes 0, else "inconclusive", with the
  smallest difference the repeats could have detected (80 % power, two-sided 5 %).

The model scored is the one each run's summary.md reports: its ``model-selection``
(server/checkpoints.py reported_kinds; the last round's by default, the best-validation
round's with ``--set model-selection=best-val``). Each fold's site folders are copies of the
ingested sites' manifests with the fold's splits (the preprocessed-image cache is shared
through a symbolic link).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbreast.shared.config import RunConfig
from fedbreast.shared.durable import atomic_write_json, atomic_write_text

Echo = Callable[[str], None]


@dataclass
class Repeat:
    seed: int
    fold: int | None  # None: the ingest's split
    auc: dict[str, float] = field(default_factory=dict)  # arm -> pooled test AUC
    units: int = 0
    delong: dict[str, tuple[float, float]] = field(default_factory=dict)  # other arm -> (difference, p)
    runs: dict[str, str] = field(default_factory=dict)  # arm -> run directory

    @property
    def name(self) -> str:
        return f"seed {self.seed}" + ("" if self.fold is None else f", fold {self.fold}")


def fold_sites(site_dirs: Sequence[Path], root: Path, k: int, fold: int, seed: int) -> Path:
    """Copies of ``site_dirs`` under ``root/fold-F`` whose manifests carry fold ``fold`` of a
    ``k``-fold split (seeded by ``seed``); their caches link to the originals'."""
    from fedbreast.shared.data.manifest import load_manifest, read_site_meta, write_manifest
    from fedbreast.shared.data.pseudonym import KEY_FILE
    from fedbreast.shared.data.splits import assign_folds

    out = root / f"fold-{fold}"
    for src in site_dirs:
        src = Path(src).resolve()
        dst = out / src.name
        dst.mkdir(parents=True, exist_ok=True)
        if (src / KEY_FILE).exists():
            shutil.copy2(src / KEY_FILE, dst / KEY_FILE)
        if not (dst / "cache").exists():  # one cache for all folds: made on first use, through any of them
            (src / "cache").mkdir(exist_ok=True)
            (dst / "cache").symlink_to(src / "cache", target_is_directory=True)
        meta = {**read_site_meta(src), "cv": {"k": k, "fold": fold, "seed": seed, "source": str(src)}}
        write_manifest(dst, assign_folds(load_manifest(src), k, fold, seed), meta)
    return out


def pooled_test_predictions(run_dir: Path, site_dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of every site's test units under the run's reported checkpoint."""
    import torch

    from fedbreast.server.checkpoints import load_checkpoint, reported_kinds
    from fedbreast.shared.data.site_data import SiteUnavailable
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.tasks import task_for

    kinds = reported_kinds(run_dir)  # the model the run's report scores (its model-selection)
    ckpt = load_checkpoint(run_dir, kinds[0]) if kinds else None
    if ckpt is None:
        raise RuntimeError(f"{run_dir}: the run wrote no final, best or latest checkpoint")
    cfg = RunConfig.from_flower(dict(ckpt.meta["config"]))
    model = build_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()})
    task, dev = task_for(cfg), torch.device("cpu")
    ys, ps = [], []
    for d in site_dirs:
        try:
            site = task.open(d, cfg)
        except SiteUnavailable:
            continue
        y, p, _ = task.predict(model, site, "test", cfg, dev)
        ys.append(np.asarray(y))
        ps.append(np.asarray(p))
    if not ys:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(ys).astype(np.int64), np.concatenate(ps).astype(np.float64)


def summarise(arms: Sequence[str], repeats: Sequence[Repeat]) -> dict[str, Any]:
    """Per arm mean and SD; per other arm the paired difference (first arm minus it) across repeats."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_rel

    out: dict[str, Any] = {"arms": {}, "comparisons": {}}
    for arm in arms:
        v = np.array([r.auc[arm] for r in repeats if math.isfinite(r.auc.get(arm, math.nan))])
        out["arms"][arm] = {"n": len(v), "mean": _f(v.mean()), "sd": _f(v.std(ddof=1)) if len(v) > 1 else None}
    first = arms[0]
    for arm in arms[1:]:
        pairs = [(r.auc[first], r.auc[arm]) for r in repeats if _finite(r.auc.get(first), r.auc.get(arm))]
        d = np.array([a - b for a, b in pairs])
        row: dict[str, Any] = {"n": len(d)}
        if len(d) >= 2:
            # A Student-t interval, not a bootstrap: resampling 3 repeats gives a CI about as
            # wide as their range, far below 95 % coverage; t with n - 1 degrees of freedom is exact
            # for normal differences and honest about how little n = 3 says.
            n, sd = len(d), float(d.std(ddof=1))
            half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
            lo, hi = float(d.mean()) - half, float(d.mean()) + half
            t = ttest_rel([a for a, _ in pairs], [b for _, b in pairs]) if sd > 0 else None
            row.update(
                mean_difference=_f(d.mean()),
                sd=_f(sd),
                ci=[_f(lo), _f(hi)],
                t_test_p=_f(float(t.pvalue)) if t is not None else None,
                # The paired t-test's 80 %-power difference at this n (two-sided 5 %).
                detectable=_f(
                    (float(student_t.ppf(0.975, n - 1)) + float(student_t.ppf(0.80, n - 1))) * sd / math.sqrt(n)
                ),
            )
            row["verdict"] = "holds" if lo > 0 else "refuted" if hi < 0 else "inconclusive"
        else:
            row["verdict"] = "inconclusive"
        pvals = [r.delong[arm][1] for r in repeats if arm in r.delong]
        row["delong_significant"] = {
            "better": sum(1 for r in repeats if arm in r.delong and r.delong[arm][1] < 0.05 and r.delong[arm][0] > 0),
            "worse": sum(1 for r in repeats if arm in r.delong and r.delong[arm][1] < 0.05 and r.delong[arm][0] < 0),
            "of": len(pvals),
        }
        out["comparisons"][f"{first} vs {arm}"] = row
    return out


def _finite(*values: Any) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def _f(v: Any) -> float | None:
    v = float(v)
    return round(v, 4) if math.isfinite(v) else None


def render(
    key: str, arms: Sequence[str], repeats: Sequence[Repeat], summary: dict[str, Any], command: str, wall_s: float
) -> str:
    lines = [
        f"# Experiment: {key} = {' vs '.join(arms)}",
        "",
        f"`{command}` ({len(repeats)} repeats, {wall_s / 60:.0f} min). Each repeat trains every arm on the same "
        "sites and splits; AUC over all sites' test units pooled; the model each run reports (its model-selection: "
        "the last round's unless set to best-val).",
        "",
        "| arm | repeats | mean AUC | SD |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        a = summary["arms"][arm]
        lines.append(f"| {key}={arm} | {a['n']} | {_s(a['mean'])} | {_s(a['sd'])} |")
    lines += [
        "",
        "| comparison | mean difference [95 % CI over repeats] | SD | paired t p | DeLong p < 0.05 (better / worse) | detectable at 80 % power | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["comparisons"].items():
        ci = c.get("ci") or [None, None]
        ds = c["delong_significant"]
        lines.append(
            f"| {name} | {_s(c.get('mean_difference'), True)} [{_s(ci[0], True)}, {_s(ci[1], True)}] | {_s(c.get('sd'))} | "
            f"{_s(c.get('t_test_p'))} | {ds['better']} / {ds['worse']} of {ds['of']} | {_s(c.get('detectable'))} | "
            f"**{c['verdict']}** |"
        )
    lines += [
        "",
        "| repeat | " + " | ".join(f"{key}={a}" for a in arms) + " | test units |",
        "|---" * (len(arms) + 2) + "|",
    ]
    for r in repeats:
        lines.append(f"| {r.name} | " + " | ".join(_s(r.auc.get(a)) for a in arms) + f" | {r.units} |")
    return "\n".join(lines) + "\n"


def _s(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def run_experiment(
    out: Path,
    key: str,
    values: Sequence[str],
    overrides: dict[str, Any],
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 0,
    sites: int = 3,
    patients: int = 40,
    data_dir: Path | None = None,
    engine: str = "inprocess",
    echo: Echo = print,
    command: str = "fedbreast experiment",
) -> dict[str, Any]:
    """Every arm (``key`` = each of ``values``) on every repeat; writes ``out/experiment.md`` and ``.json``."""
    from fedbreast.shared.metrics import binary_metrics, delong_test
    from fedbreast.simulation.simulate import prepare_federation, simulate

    if len(values) < 2:
        raise ValueError(f"--compare {key}: needs at least two values, got {list(values)}")
    key = RunConfig.flower_key(key)
    field_name = key.replace("-", "_")
    arms = [str(v) for v in values]
    typed: dict[str, Any] = {}
    for v in arms:  # every arm's config must be valid before hours of training (ConfigError naming the key)
        cfg = RunConfig.from_flower({**{RunConfig.flower_key(k): x for k, x in overrides.items()}, key: v})
        typed[v] = getattr(cfg, field_name)
    out = Path(out).resolve()
    data = Path(data_dir).resolve() if data_dir else out / "data"
    t0 = time.perf_counter()
    repeats: list[Repeat] = []
    for seed in seeds:
        site_dirs = prepare_federation(data / f"seed-{seed}", sites, patients, seed, echo=lambda *_: None)
        for fold in range(folds) if folds else [None]:
            sites_dir = (
                site_dirs[0].parent
                if fold is None
                else fold_sites(site_dirs, data / f"seed-{seed}" / "cv", folds, fold, seed)
            )
            rep = Repeat(seed, fold)
            scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for arm in arms:
                run_dir = out / "runs" / f"seed-{seed}" / ("split" if fold is None else f"fold-{fold}") / f"{key}={arm}"
                simulate(
                    run_dir,
                    sites=sites,
                    seed=seed,
                    overrides={**overrides, field_name: typed[arm]},
                    sites_dir=sites_dir,
                    echo=lambda *_: None,
                    engine=engine,
                )
                y, p = pooled_test_predictions(run_dir, sorted(d for d in sites_dir.iterdir() if d.is_dir()))
                scores[arm] = (y, p)
                rep.runs[arm] = str(run_dir)
                rep.auc[arm] = float(binary_metrics(y, p)["auc"]) if len(set(y.tolist())) == 2 else math.nan
            y0, p0 = scores[arms[0]]
            rep.units = len(y0)
            for arm in arms[1:]:
                y1, p1 = scores[arm]
                if len(y1) == len(y0) and np.array_equal(y0, y1) and len(set(y0.tolist())) == 2:
                    auc0, auc1, _, pval = delong_test(y0, p0, p1)
                    rep.delong[arm] = (float(auc0 - auc1), float(pval))
            repeats.append(rep)
            echo(f"{rep.name}: " + ", ".join(f"{key}={a} AUC {rep.auc[a]:.3f}" for a in arms) + f" ({rep.units} units)")
    summary = summarise(arms, repeats)
    wall = time.perf_counter() - t0
    report = {
        "command": command,
        "key": key,
        "arms": arms,
        "overrides": overrides,
        "seeds": list(seeds),
        "folds": folds,
        "wall_s": round(wall, 1),
        "repeats": [
            {"seed": r.seed, "fold": r.fold, "auc": r.auc, "units": r.units, "delong": r.delong, "runs": r.runs}
            for r in repeats
        ],
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "experiment.json", report, mode=0o644)
    atomic_write_text(out / "experiment.md", render(key, arms, repeats, summary, command, wall), mode=0o644)
    return report


__all__ = ["Repeat", "fold_sites", "pooled_test_predictions", "render", "run_experiment", "summarise"]
