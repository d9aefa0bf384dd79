"""The seeds' claims, checked on one generated federation (issue 4, item 9; issue 17, item 3).

Trains every arm of eight comparisons on the same generated sites and scores each on all
sites' test splits, pooled (the predictions themselves, which a real federation never
sees: a measurement tool, not a product path):

1. multiview  seed 001: multi-view fusion (``view_fusion=average``) beats single view (``single``)
              and left-right fusion (``left-right``), which beats single view
2. cem        seed 001: CEM (LE + DES, ``in_channels=2``) beats LE only (``in_channels=1``)
3. birads     seed 000: BI-RADS feature fusion beats pixels only (``birads_fusion=none``)
4. psft       seed 000: patient-specific fine-tuning beats the same model without it
5. federation federated beats local-only, and comes close to pooled (same budget)
6. mgus       seed 002: MG + US fusion beats MG alone and US alone (the branches of the same model,
              on the lesions with both); two-step training beats end-to-end; the loss (BCE or the
              large margin cosine loss) makes no difference (equivalence)
7. dualmode   seed 003: the dual-mode network (LE + DES) beats LE only and DES only (``dualmode_modes``)
8. latefusion seed 004: MCC-weighted late fusion beats FFDM alone, CESM alone (the same model's
              view-fused modalities) and plain averaging (the same slot networks, equal weights)

Federated arms use the in-process FedAvg of ``bench_families.py`` (the real family tasks
and server hooks); local-only and pooled use ``simulation/baselines.py``. Arms shared by
several claims (the federated CEM multiview model, the BI-RADS feature model) train once, and
``branch:NAME`` arms score a branch of such a model (``task.branch_predictions``) without retraining.
Writes a Markdown table and the raw numbers:

    .venv/bin/python benchmarks/claims.py --data /tmp/claims-data --out docs/claims.md \\
        --json benchmarks/results/claims.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_families import federate, open_sites

from fedbreast.client.personal import psft_split
from fedbreast.server.checkpoints import read_checkpoint
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.site_data import site_records
from fedbreast.shared.metrics import binary_metrics, bootstrap_ci, delong_test
from fedbreast.shared.training.patient_finetune import PSFTConfig
from fedbreast.shared.training.tasks import task_for
from fedbreast.simulation.baselines import train_local_only, train_pooled
from fedbreast.simulation.public_start import pretraining_key, public_checkpoint, public_seed_for
from fedbreast.simulation.simulate import PRESET, PRESETS, prepare_federation

N_BOOT = 2000
NON_INFERIORITY_MARGIN = 0.05  # claim 5b: federated "comes close to" pooled = within 0.05 AUC
EQUIVALENCE_MARGIN = 0.05  # claim 6d: "no significant difference" = within +-0.05 AUC either way
CPU = torch.device("cpu")
# The families of claims 6-8 and the settings of theirs the report names (beyond the common ones).
NEW_FAMILIES: dict[str, tuple[str, ...]] = {
    "mgus": ("crop_size", "mgus_training", "mgus_modality_rounds", "mgus_loss", "mgus_fusion_layers"),
    "dualmode": ("box_size", "dualmode_modes"),
    "latefusion": ("square_resize", "latefusion_weights"),
}
# Each arm: (family, run-config overrides, how it trains). Everything else is the family's
# `fedbreast simulate` preset, so the arms are the product's models, not tuned variants.
ARMS: dict[str, tuple[str, dict[str, Any], str]] = {
    "multiview CEM, federated": ("multiview", {}, "federated"),
    "multiview CEM, local-only": ("multiview", {}, "local"),
    "multiview CEM, pooled": ("multiview", {}, "pooled"),
    "single view CEM, federated": ("multiview", {"view_fusion": "single"}, "federated"),
    "left-right fusion CEM, federated": ("multiview", {"view_fusion": "left-right"}, "federated"),
    "multiview LE only, federated": ("multiview", {"in_channels": 1}, "federated"),
    "birads feature fusion": ("birads", {"birads_fusion": "feature"}, "federated"),
    "birads feature fusion + PSFT": ("birads", {"birads_fusion": "feature", "patient_finetune": True}, "psft"),
    "birads pixels only": ("birads", {"birads_fusion": "none"}, "federated"),
    # seed 002: one federated model scored three ways on the lesions with MG and US ("branch:")
    "mgus fused, MG+US lesions": ("mgus", {}, "branch:fused"),
    "mgus MG branch, MG+US lesions": ("mgus", {}, "branch:mg"),
    "mgus US branch, MG+US lesions": ("mgus", {}, "branch:us"),
    "mgus end-to-end fused, MG+US lesions": ("mgus", {"mgus_training": "end-to-end"}, "branch:fused"),
    "mgus cosface fused, MG+US lesions": ("mgus", {"mgus_loss": "cosface"}, "branch:fused"),
    "dualmode LE + DES, federated": ("dualmode", {}, "federated"),
    "dualmode LE only, federated": ("dualmode", {"dualmode_modes": "le"}, "federated"),
    "dualmode DES only, federated": ("dualmode", {"dualmode_modes": "des"}, "federated"),
    # seed 004: one federated model scored four ways on the breasts with both modalities
    "latefusion MCC fusion, CEM breasts": ("latefusion", {}, "branch:fused"),
    "latefusion plain mean, CEM breasts": ("latefusion", {}, "branch:mean"),
    "latefusion FFDM alone, CEM breasts": ("latefusion", {}, "branch:ffdm"),
    "latefusion CESM alone, CEM breasts": ("latefusion", {}, "branch:cesm"),
}


@dataclass(frozen=True)
class Comparison:
    """Claim: arm ``a`` scores a higher pooled test AUC than arm ``b`` (or, with
    ``non_inferior``, is no worse than it by more than the margin; with ``equivalent``, differs
    from it by less than :data:`EQUIVALENCE_MARGIN` either way)."""

    claim: str
    number: str
    statement: str
    a: str
    b: str
    non_inferior: bool = False
    cem_sites_only_too: bool = False  # also report the claim on the CEM sites' units alone
    equivalent: bool = False


CLAIMS: dict[str, list[Comparison]] = {
    "multiview": [
        Comparison(
            "multiview",
            "1",
            "multi-view fusion beats single view (seed 001)",
            "multiview CEM, federated",
            "single view CEM, federated",
        ),
        Comparison(
            "multiview",
            "1b",
            "multi-view fusion beats left-right fusion (seed 001)",
            "multiview CEM, federated",
            "left-right fusion CEM, federated",
        ),
        Comparison(
            "multiview",
            "1c",
            "left-right fusion beats single view (seed 001: AUC 0.93 -> 0.95 on CEM)",
            "left-right fusion CEM, federated",
            "single view CEM, federated",
        ),
    ],
    "cem": [
        Comparison(
            "cem",
            "2",
            "CEM (LE + DES) beats LE only (seed 001)",
            "multiview CEM, federated",
            "multiview LE only, federated",
            cem_sites_only_too=True,
        )
    ],
    "birads": [
        Comparison(
            "birads",
            "3",
            "BI-RADS feature fusion beats pixels only (seed 000)",
            "birads feature fusion",
            "birads pixels only",
        )
    ],
    "psft": [
        Comparison(
            "psft",
            "4",
            "patient-specific fine-tuning improves the BI-RADS model (seed 000)",
            "birads feature fusion + PSFT",
            "birads feature fusion",
        )
    ],
    "federation": [
        Comparison(
            "federation", "5a", "federated beats local-only", "multiview CEM, federated", "multiview CEM, local-only"
        ),
        Comparison(
            "federation",
            "5b",
            f"federated comes within {NON_INFERIORITY_MARGIN} AUC of pooled",
            "multiview CEM, federated",
            "multiview CEM, pooled",
            non_inferior=True,
        ),
    ],
    "mgus": [
        Comparison(
            "mgus",
            "6a",
            "MG + US fusion beats MG alone (seed 002)",
            "mgus fused, MG+US lesions",
            "mgus MG branch, MG+US lesions",
        ),
        Comparison(
            "mgus",
            "6b",
            "MG + US fusion beats US alone (seed 002)",
            "mgus fused, MG+US lesions",
            "mgus US branch, MG+US lesions",
        ),
        Comparison(
            "mgus",
            "6c",
            "two-step training beats end-to-end (seed 002)",
            "mgus fused, MG+US lesions",
            "mgus end-to-end fused, MG+US lesions",
        ),
        Comparison(
            "mgus",
            "6d",
            f"the loss makes no difference: large margin cosine within {EQUIVALENCE_MARGIN} AUC of BCE (seed 002)",
            "mgus cosface fused, MG+US lesions",
            "mgus fused, MG+US lesions",
            equivalent=True,
        ),
    ],
    "dualmode": [
        Comparison(
            "dualmode",
            "7a",
            "dual-mode (LE + DES) beats LE only (seed 003)",
            "dualmode LE + DES, federated",
            "dualmode LE only, federated",
        ),
        Comparison(
            "dualmode",
            "7b",
            "dual-mode (LE + DES) beats DES only (seed 003)",
            "dualmode LE + DES, federated",
            "dualmode DES only, federated",
        ),
    ],
    "latefusion": [
        Comparison(
            "latefusion",
            "8a",
            "FFDM + CESM late fusion beats FFDM alone (seed 004)",
            "latefusion MCC fusion, CEM breasts",
            "latefusion FFDM alone, CEM breasts",
        ),
        Comparison(
            "latefusion",
            "8b",
            "FFDM + CESM late fusion beats CESM alone (seed 004)",
            "latefusion MCC fusion, CEM breasts",
            "latefusion CESM alone, CEM breasts",
        ),
        Comparison(
            "latefusion",
            "8c",
            "MCC-weighted fusion beats plain averaging (seed 004's design)",
            "latefusion MCC fusion, CEM breasts",
            "latefusion plain mean, CEM breasts",
        ),
    ],
}


@dataclass
class ArmResult:
    """Test-split labels and scores of one arm, all sites' units concatenated in site order."""

    name: str
    y: np.ndarray
    p: np.ndarray
    site: np.ndarray  # site name of each unit
    unit: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    group: np.ndarray | None = None  # each unit's breast-density group (DENSITY_GROUPS), if scored by group


def _save_arm(r: ArmResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    meta = json.dumps({"unit": r.unit, "seconds": r.seconds, "extra": r.extra}, default=float)
    groups = {} if r.group is None else {"group": r.group.astype(str)}
    np.savez(tmp, y=r.y, p=r.p, site=r.site.astype(str), meta=np.array(meta), **groups)
    tmp.replace(path)  # a killed run leaves no half-written arm behind


def _load_arm(name: str, path: Path) -> ArmResult:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        group = z["group"] if "group" in z.files else None
        return ArmResult(name, z["y"], z["p"], z["site"], meta["unit"], meta["seconds"], meta["extra"], group)


def _config(family: str, overrides: dict[str, Any], seed: int) -> RunConfig:
    return RunConfig(**{**PRESET, **PRESETS[family], "workers": 0, "bootstrap": 0, "seed": seed, **overrides})


def _concat(name: str, per_site: list[tuple[str, np.ndarray, np.ndarray]], unit: str, seconds: float) -> ArmResult:
    y = np.concatenate([y for _, y, _ in per_site]).astype(np.int64)
    p = np.concatenate([p for _, _, p in per_site]).astype(np.float64)
    site = np.concatenate([np.full(len(y), n) for n, y, _ in per_site])
    return ArmResult(name, y, p, site, unit, seconds)


# Seed 004 groups its test images by BI-RADS breast density. With 10-40 test breasts a site, one
# AUC per ACR category is mostly undefined, so the four categories pool into the usual two.
DENSITY_GROUPS = {
    "a": "non-dense (ACR a-b)",
    "b": "non-dense (ACR a-b)",
    "c": "dense (ACR c-d)",
    "d": "dense (ACR c-d)",
}
NO_DENSITY = "density not annotated"


def exam_density_groups(site_dir: Path) -> dict[str, str]:
    """Each exam's density group from the site's own annotations (the reader's ACR density, as a
    hospital holds it; the first breast that has one)."""
    out: dict[str, str] = {}
    for r in site_records(Path(site_dir)):
        if r.birads.density and r.exam not in out:
            out[r.exam] = DENSITY_GROUPS.get(r.birads.density[0], NO_DENSITY)
    return out


def _unit_exams(ds: Any) -> list[str] | None:
    """The exam of each sample of a family dataset, in order (exams or breasts); None if unknown."""
    if hasattr(ds, "exams") and isinstance(ds.exams, list):
        return list(ds.exams)
    if hasattr(ds, "breasts"):
        return [b[1] for b in ds.breasts]
    return None


def by_density(site: Any, split: str, score: Callable[[Any], tuple[np.ndarray, np.ndarray]]):
    """``score(site)``'s (labels, scores) on each density group's part of ``split`` in turn:
    the same model and code on a subset of the dataset (a torch Subset), so the scoring's own
    unit rules (labelled breasts, modalities present) stay the task's. Returns (y, p, group)."""
    ds = site.datasets[split]
    exams = _unit_exams(ds)
    if exams is None:
        y, p = score(site)
        return y, p, np.full(len(y), NO_DENSITY)
    density = exam_density_groups(site.site_dir)
    ys, ps, gs = [], [], []
    for g in sorted(set(DENSITY_GROUPS.values())) + [NO_DENSITY]:
        idx = [i for i, e in enumerate(exams) if density.get(e, NO_DENSITY) == g]
        if not idx:
            continue
        part = dataclasses.replace(site, datasets={**site.datasets, split: torch.utils.data.Subset(ds, idx)})
        y, p = score(part)
        ys.append(y)
        ps.append(p)
        gs.append(np.full(len(y), g))
    if not ys:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, str)
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(gs)


def _concat_groups(
    name: str, per_site: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], unit: str, seconds: float
) -> ArmResult:
    out = _concat(name, [(n, y, p) for n, y, p, _ in per_site], unit, seconds)
    out.group = np.concatenate([g for *_, g in per_site]).astype(str)
    return out


class Experiment:
    """Trains each arm once on one federation, on demand, and keeps its test predictions."""

    def __init__(
        self,
        site_dirs: list[Path],
        seed: int,
        echo: Callable[[str], None],
        cache: Path | None = None,
        *,
        public_cache: Path | None = None,
        groups: bool = False,
    ) -> None:
        """``public_cache``: federated arms start from the network pretrained on the public
        generated federation (``fedbreast simulate``'s public start, cached there) instead of a
        fresh one. ``groups``: score the test split by breast-density group (ArmResult.group)."""
        self.site_dirs, self.seed, self.echo, self.cache = site_dirs, seed, echo, cache
        self.public_cache, self.groups = public_cache, groups
        self.results: dict[str, ArmResult] = {}
        self.federated: dict[
            str, tuple[torch.nn.Module, list, RunConfig, float]
        ] = {}  # cache key -> model, sites, cfg, s
        self.cem_sites: set[str] = set()

    def arm(self, name: str) -> ArmResult:
        if name not in self.results:
            family, overrides, how = ARMS[name]
            cached = self._cache_path(name)
            if cached is not None and cached.exists():
                result = _load_arm(name, cached)
                self.echo(f"{name}: pooled test AUC {_auc(result.y, result.p):.3f} (cached {cached.name})")
            else:
                t = time.perf_counter()
                kind, _, branch = how.partition(":")  # "branch:NAME": a branch of the federated model
                result = getattr(self, f"_{kind}")(name, family, overrides, *([branch] if branch else []))
                self.echo(
                    f"{name}: pooled test AUC {_auc(result.y, result.p):.3f} on {len(result.y)} {result.unit}s "
                    f"({time.perf_counter() - t:.0f} s)"
                )
                if cached is not None:
                    _save_arm(result, cached)
            self.results[name] = result
        return self.results[name]

    def _cache_path(self, name: str) -> Path | None:
        """Where this arm's test predictions are kept between runs: named by a hash of everything
        that decides them (the arm's full run config and how it trains), so a changed preset or
        override retrains it. Code changes are not in the key: ``--fresh`` retrains every arm."""
        if self.cache is None:
            return None
        family, overrides, how = ARMS[name]
        cfg = _config(family, overrides, self.seed)
        # Only the settings that differ from RunConfig's defaults: a setting added later (at its
        # default) leaves the key, and the arms already kept, as they were.
        default = RunConfig()
        changed = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)
        }
        parts: list[Any] = [how, changed, [str(d) for d in self.site_dirs]]
        if self.public_cache is not None or self.groups:  # the earlier arms' keys stay as they were
            # which public network: a changed pretraining recipe retrains the arm
            start = "scratch" if self.public_cache is None else pretraining_key(cfg, public_seed_for(self.seed))
            parts.append({"start": start, "groups": self.groups})
        key = json.dumps(parts, sort_keys=True, default=str)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return self.cache / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"

    def _open(self, family: str, overrides: dict[str, Any]) -> tuple[Any, list, RunConfig]:
        cfg = _config(family, overrides, self.seed)
        task = task_for(cfg)
        sites = open_sites(task, self.site_dirs, cfg)
        if family == "multiview":
            self.cem_sites |= {s.name for s in sites if {"LE", "DES"} <= {r.energy.value for r in s.records}}
        return task, sites, cfg

    def _trained(self, family: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, list, RunConfig, float]:
        """The federated model of these settings (PSFT only changes evaluation: it reuses the model)."""
        key = json.dumps([family, {k: v for k, v in overrides.items() if k != "patient_finetune"}], sort_keys=True)
        if key not in self.federated:
            t = time.perf_counter()
            task, sites, cfg = self._open(family, overrides)
            init = None
            if self.public_cache is not None:
                init = read_checkpoint(public_checkpoint(self.public_cache, cfg, self.seed, self.echo)).arrays
            model = federate(
                task, cfg, sites, lambda rnd, _m, _e: self.echo(f"  {family} {overrides}: round {rnd} done"), init
            )
            self.federated[key] = (model, sites, cfg, time.perf_counter() - t)
        return self.federated[key]

    def _scored(self, name: str, sites: list, score: Callable[[Any], Any], unit: str, seconds: float) -> ArmResult:
        """Every site's test split scored by ``score(site)`` -> (labels, scores); by breast-density
        group when the experiment scores by group."""
        if self.groups:
            return _concat_groups(name, [(s.name, *by_density(s, "test", score)) for s in sites], unit, seconds)
        return _concat(name, [(s.name, *score(s)) for s in sites], unit, seconds)

    def _federated(self, name: str, family: str, overrides: dict[str, Any]) -> ArmResult:
        model, sites, cfg, seconds = self._trained(family, overrides)
        task = task_for(cfg)
        return self._scored(name, sites, lambda s: task.predict(model, s, "test", cfg, CPU)[:2], task.unit, seconds)

    def _branch(self, name: str, family: str, overrides: dict[str, Any], branch: str) -> ArmResult:
        """One branch of the federated model of these settings (``task.branch_predictions``: the
        same units for each of its branches), without retraining it. Its seconds: the model's
        training and this scoring (the model is shared with the other branch arms)."""
        model, sites, cfg, seconds = self._trained(family, overrides)
        task = task_for(cfg)
        t = time.perf_counter()
        out = self._scored(
            name, sites, lambda s: task.branch_predictions(model, s, "test", cfg, CPU)[branch], task.unit, seconds
        )
        out.seconds += time.perf_counter() - t
        if hasattr(model, "fusion_mcc"):  # late fusion: the weights its fused score used
            out.extra = {"fusion_mcc": [float(w) for w in model.fusion_mcc]}
        return out

    def _psft(self, name: str, family: str, overrides: dict[str, Any]) -> ArmResult:
        model, sites, _, _ = self._trained(family, overrides)
        cfg = _config(family, overrides, self.seed)
        pcfg = PSFTConfig.from_run(cfg)
        t = time.perf_counter()
        runs = [(s.name, psft_split(s, model, cfg, pcfg, CPU, "test")) for s in sites]
        out = _concat(name, [(n, r.y, r.p_psft) for n, r in runs], task_for(cfg).unit, time.perf_counter() - t)
        base = np.concatenate([r.p_base for _, r in runs])
        out.extra = {
            "patients_finetuned": sum(r.patients for _, r in runs),
            "patients_skipped": sum(sum(r.skipped.values()) for _, r in runs),
            "mean_abs_score_change": float(np.mean(np.abs(out.p - base))) if len(base) else float("nan"),
        }
        return out

    def _local(self, name: str, family: str, overrides: dict[str, Any]) -> ArmResult:
        task, sites, cfg = self._open(family, overrides)
        t = time.perf_counter()
        per_site = []
        for s in sites:  # each site's own model on its own test split
            per_site.append((s.name, *task.predict(train_local_only(s, cfg), s, "test", cfg, CPU)[:2]))
        return _concat(name, per_site, task.unit, time.perf_counter() - t)

    def _pooled(self, name: str, family: str, overrides: dict[str, Any]) -> ArmResult:
        task, sites, cfg = self._open(family, overrides)
        t = time.perf_counter()
        model = train_pooled(sites, cfg)
        per_site = [(s.name, *task.predict(model, s, "test", cfg, CPU)[:2]) for s in sites]
        return _concat(name, per_site, task.unit, time.perf_counter() - t)


# A section of docs/claims.md that another benchmark writes (between these markers, with its
# name after BLOCK_START): kept as it is when this benchmark rewrites the file.
BLOCK_START, BLOCK_END = "<!-- section written by benchmarks/", "<!-- end of section -->"


def kept_blocks(path: Path) -> str:
    """The other benchmarks' sections of an existing ``path``, each with its markers ("" if none)."""
    if not path.exists():
        return ""
    text, out = path.read_text(), []
    start = text.find(BLOCK_START)
    while start >= 0:
        end = text.find(BLOCK_END, start)
        if end < 0:
            break
        out.append(text[start : end + len(BLOCK_END)])
        start = text.find(BLOCK_START, end)
    return "".join(f"\n{b}\n" for b in out)


def write_block(path: Path, owner: str, body: str) -> None:
    """Put ``owner``'s section into ``path`` (replacing its earlier one, else at the end)."""
    start = f"{BLOCK_START}{owner} -->"
    block = f"{start}\n{body.rstrip()}\n{BLOCK_END}"
    text = path.read_text() if path.exists() else ""
    a = text.find(start)
    if a >= 0:
        b = text.find(BLOCK_END, a)
        text = text[:a] + block + text[b + len(BLOCK_END) :] if b >= 0 else text[:a] + block + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# ---- statistics -------------------------------------------------------------------------------------


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return binary_metrics(y, p)["auc"] if len(set(y.tolist())) == 2 else float("nan")


def _spec100(y: np.ndarray, p: np.ndarray) -> float:
    """Specificity at 100 % sensitivity: seed 000's headline (benign biopsies avoided)."""
    return binary_metrics(y, p)["spec_at_sens100"] if len(set(y.tolist())) == 2 else float("nan")


def auc_ci(y: np.ndarray, p: np.ndarray, seed: int) -> tuple[float, float, float]:
    """(AUC, lo, hi): stratified percentile bootstrap, as the site reports compute it."""
    if len(set(y.tolist())) < 2:
        return (float("nan"),) * 3
    return bootstrap_ci(y, p, metrics=("auc",), n_boot=N_BOOT, seed=seed)["auc"]


def paired_auc_difference(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, seed: int) -> tuple[float, float, float]:
    """(AUC_a - AUC_b, lo, hi) by a stratified bootstrap that resamples the same units for both arms.

    A replicate's AUC is c_pos^T W c_neg / (m n), with W the pairwise win matrix
    (1 / 0.5 / 0) and c the resampled multiplicity of each positive and negative unit."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if not m or not n:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    c_pos = np.stack([np.bincount(rng.integers(0, m, m), minlength=m) for _ in range(N_BOOT)]).astype(float)
    c_neg = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(N_BOOT)]).astype(float)

    def replicates(p: np.ndarray) -> np.ndarray:
        d = p[pos][:, None] - p[neg][None, :]
        w = (d > 0) + 0.5 * (d == 0)
        return np.einsum("bi,ij,bj->b", c_pos, w, c_neg) / (m * n)

    diff = replicates(pa) - replicates(pb)
    lo, hi = np.quantile(diff, [0.025, 0.975])
    return _auc(y, pa) - _auc(y, pb), float(lo), float(hi)


def verdict(diff_ci: tuple[float, float, float], non_inferior: bool, equivalent: bool = False) -> str:
    """From the 95 % CI of AUC_a - AUC_b. Superiority: holds above 0; does not hold at or
    below 0 (then no improvement is left inside the CI, e.g. an unchanged ranking).
    Non-inferiority: holds above -margin, does not hold below it. Equivalence: holds inside
    (-margin, margin), does not hold wholly outside it. Otherwise the data cannot tell."""
    _, lo, hi = diff_ci
    if not np.isfinite(lo):
        return "inconclusive (a class is missing)"
    if equivalent:
        return _equivalence(lo, hi, " (within noise)")
    bound = -NON_INFERIORITY_MARGIN if non_inferior else 0.0
    if lo > bound:
        return "holds"
    if hi < bound or (not non_inferior and hi <= 0):
        return "does not hold"
    return "inconclusive (within noise)"


def _equivalence(lo: float, hi: float, noise: str = "") -> str:
    if -EQUIVALENCE_MARGIN < lo and hi < EQUIVALENCE_MARGIN:
        return "holds"
    if lo >= EQUIVALENCE_MARGIN or hi <= -EQUIVALENCE_MARGIN:
        return "does not hold"
    return "inconclusive" + noise


def compare(c: Comparison, a: ArmResult, b: ArmResult, seed: int, sites: set[str] | None = None) -> dict[str, Any]:
    """The claim's numbers on all units, or on those of ``sites`` only."""
    if not (np.array_equal(a.y, b.y) and np.array_equal(a.site, b.site)):
        raise RuntimeError(f"{a.name} and {b.name} scored different test units; a paired comparison needs the same")
    keep = np.ones(len(a.y), bool) if sites is None else np.isin(a.site, sorted(sites))
    y, pa, pb = a.y[keep], a.p[keep], b.p[keep]
    diff = paired_auc_difference(y, pa, pb, seed)
    delong_ok = min(int(y.sum()), int(len(y) - y.sum())) >= 2  # DeLong's variance needs two of each class
    return {
        "claim": c.claim,
        "number": c.number,
        "statement": c.statement,
        "a": a.name,
        "b": b.name,
        "sites": "all" if sites is None else ",".join(sorted(sites)),
        "unit": a.unit,
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "auc_a": auc_ci(y, pa, seed),
        "auc_b": auc_ci(y, pb, seed),
        "spec_at_sens100_a": _spec100(y, pa),
        "spec_at_sens100_b": _spec100(y, pb),
        "diff": diff,
        "delong_p": delong_test(y, pa, pb)[3] if delong_ok else float("nan"),
        "non_inferior": c.non_inferior,
        "equivalent": c.equivalent,
        "verdict": verdict(diff, c.non_inferior, c.equivalent),
    }


# ---- report -----------------------------------------------------------------------------------------


def _ci(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def _diff(t: tuple[float, float, float]) -> str:
    return f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"


def per_site_rows(results: dict[str, ArmResult]) -> list[str]:
    names = sorted({s for r in results.values() for s in r.site.tolist()})
    rows = ["| arm | " + " | ".join(names) + " | seconds |", "|---|" + "---|" * (len(names) + 1)]
    for r in results.values():
        cells = [
            f"{_auc(r.y[r.site == s], r.p[r.site == s]):.3f} ({int((r.site == s).sum())})"
            if (r.site == s).any()
            else "-"
            for s in names
        ]
        rows.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.seconds:.0f} |")
    return rows


def markdown(
    rows: list[dict[str, Any]],
    results: dict[str, ArmResult],
    meta: dict[str, Any],
    over: list[dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
) -> str:
    head = [
        "# The seeds' claims on the generated federation",
        "",
        "Written by `benchmarks/claims.py` (issue 4, item 9); rerun it to refresh every number here:",
        "",
        f"    {meta['command']}",
        "",
        f"Wall time of the invocation that wrote this {meta['wall_s'] / 60:.1f} min on {meta['threads']} CPU thread "
        f"({meta['cpu']}), torch {meta['torch']}; arms kept from an earlier invocation with the same settings "
        "(`DATA/arms`) were reused, each arm's own seconds are in the per-site table. "
        f"{'One generated federation' if not over else 'One generated federation per data seed'} for every claim: "
        f"{meta['sites']} sites of `default_profiles` (cycling CEM, FFDM, "
        f"FFDM + ultrasound) of about {meta['patients']} patients each, data and training seed {meta['seed']}.",
        "",
        "Every arm is the family's `fedbreast simulate` preset (`simulation/simulate.py` `PRESET` + `PRESETS`): "
        f"multiview {meta['multiview']}; birads {meta['birads']}"
        + "".join(f"; {fam} {meta[fam]}" for fam in NEW_FAMILIES if fam in meta)
        + ". Federated arms run the in-process FedAvg of "
        "`benchmarks/bench_families.py` (the real family tasks and server hooks, no Flower); local-only and pooled "
        "arms are `simulation/baselines.py` with the same budget (rounds x local epochs). Each arm's final model "
        "(no model selection) scores every site's test split; AUCs are over the pooled test units of all sites.",
        "",
        "AUC CIs: stratified percentile bootstrap (2000 replicates). ΔAUC CI: paired stratified bootstrap over the "
        "same units. DeLong p: two-sided, paired (the seeds' test). Verdict from the 95 % CI of ΔAUC (claimed "
        "better minus other): **holds** when it lies above 0, **does not hold** when it lies at or below 0, else "
        f"**inconclusive (within noise)**. 5b is a non-inferiority claim with a margin of {NON_INFERIORITY_MARGIN} AUC, "
        f"fixed before the run: holds above -{NON_INFERIORITY_MARGIN}, does not hold below it. 6d is an equivalence "
        f"claim (seed 002: no significant difference between its losses) with a margin of {EQUIVALENCE_MARGIN} AUC: "
        f"holds when the CI lies inside ±{EQUIVALENCE_MARGIN}, does not hold when it lies wholly outside.",
        "",
    ]
    if over:
        head += repeated_markdown(over, seeds or [])
        head += chance_notes(rows)
        head += ["## Each seed", ""]
    head += [
        "| # | claim | arm A (claimed better) | arm B | test units (malignant) | AUC A [95% CI] | AUC B [95% CI] | ΔAUC A-B [95% CI] | DeLong p | spec. at 100 % sens. A / B | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scope = "" if r["sites"] == "all" else f" ({r['sites']} only)"
        scope += f" (seed {r['seed']})" if over else ""
        head.append(
            f"| {r['number']} | {r['statement']}{scope} | {r['a']} | {r['b']} | {r['n']} {r['unit']}s ({r['n_pos']}) | "
            f"{_ci(r['auc_a'])} | {_ci(r['auc_b'])} | {_diff(r['diff'])} | {r['delong_p']:.3f} | "
            f"{r['spec_at_sens100_a']:.2f} / {r['spec_at_sens100_b']:.2f} | {r['verdict']} |"
        )
    head += [
        "",
        "Test AUC per site (test units), and each arm's seconds (training and scoring; the PSFT arm: its "
        "evaluation only, the model is the feature-fusion arm's; a branch arm: its model's training and its "
        "own scoring, the model shared by the arms of one family and settings)"
        + (f", for the last seed ({seeds[-1]}):" if over and seeds else ":"),
        "",
    ]
    head += per_site_rows(results)
    head += _notes(results)
    return "\n".join(head) + "\n"


def _notes(results: dict[str, ArmResult]) -> list[str]:
    out = [
        "",
        "## How the arms differ from the seeds",
        "",
        "- Single view (`view_fusion=single`, seed 001's no-fusion model): one CNN and one linear head score each "
        "view image alone; a breast is the mean of its CC and MLO probabilities. Unlike the seed it is trained "
        "end to end on the breast label through that mean (the seed trained per image), so it is scored at the "
        "same unit as the fusion model.",
        "- Left-right fusion (`view_fusion=left-right`, seed 001's left-right fusion model): one linear layer, "
        "shared by every view image, classifies an image from its features and its contralateral breast's in the "
        "same view; a breast is the mean of its CC and MLO probabilities (no CC-MLO fusion).",
        "- LE only (`in_channels=1`): CEM sites feed their LE images, FFDM sites their FFDM images; the CEM arm "
        "feeds LE + DES at CEM sites and FFDM with a zero DES channel elsewhere. Only CEM sites' units can differ "
        "in input, so claim 2 is also given on them alone.",
        "- Claim 4 scores the same federated BI-RADS feature-fusion model with and without patient-specific "
        "fine-tuning (`client/personal.py: psft_split`, the code behind `test_auc_psft`).",
    ]
    psft = next((r for r in results.values() if "patients_finetuned" in r.extra), None)
    if psft is not None:
        e = psft.extra
        out.append(
            f"  It fine-tuned {e['patients_finetuned']} test patients ({e['patients_skipped']} without normal tissue "
            f"kept their scores); the mean absolute change of a lesion's score was {e['mean_abs_score_change']:.4f}."
        )
    out += [
        "- Backbones: multiview resnet18 at 256 x 128 per view (the spine's model); birads `rawnet` on 64-px "
        "patches (the preset). Seed 000 found patient-specific fine-tuning helpful with FT-AlexNet (specificity "
        "at 100 % sensitivity 0.60 -> 0.66) but harmful with RawNet (AUC down to 0.71); FT-AlexNet needs ImageNet "
        "weights, which this offline run does not have.",
        "- Claim 6 (seed 002): 6a and 6b score one federated mgus model (the preset: two-step, BCE) three ways, "
        "its mammography branch, its ultrasound branch and its fusion network, on the test lesions that have an "
        "ultrasound image (only the FFDM + ultrasound sites have any), each lesion the mean over its mammography "
        "appearances as in the seed (`MgusTask.branch_predictions`; the product scores a lesion without ultrasound "
        "by its mammography branch, left out here). 6c and 6d train the model again end-to-end, or with the large "
        "margin cosine loss, and compare fusion scores on the same lesions. Seed 002 claims no advantage for either "
        'loss ("no significant difference is observed"; its best model uses BCE), so 6d is an equivalence claim, '
        "not that the cosine loss wins. Its backbone was ImageNet GoogleNet on 120 lesions (leave-one-out); here "
        "resnet18 from scratch.",
        "- Claim 7 (seed 003): LE only and DES only (`dualmode_modes=le` / `des`) are one mode's half of the "
        "dual-mode network (backbone on the CC and MLO boxes, abstraction layer, head), trained on the same lesions "
        'with the other mode\'s boxes ignored. Seed 003 itself ablates another way, "simple pooling" (one '
        "backbone for all four boxes), and reports accuracy and sensitivity, not AUC; that ablation is not run here.",
        "- Claim 8 (seed 004): one federated latefusion model scored four ways on the test breasts with both "
        "modalities (the CEM sites; LE counts as FFDM, as in the seed): its MCC-weighted fusion, the plain mean of "
        "the same slot networks (as `latefusion_weights=mean` would fuse them: slot training does not depend on "
        "the weights), and each modality's own MCC-weighted view fusion (`LateFusionTask.branch_predictions`). "
        "Seed 004 reports that real FFDM + CESM beats mammography alone; that MCC weights beat a plain mean is "
        "its design choice, not a result it reports.",
    ]
    lf = next((r for r in results.values() if "fusion_mcc" in r.extra), None)
    if lf is not None:
        w = lf.extra["fusion_mcc"]
        out.append(
            "  The latefusion model's MCC weights (FFDM-CC, FFDM-MLO, CESM-CC, CESM-MLO; FFDM, CESM): "
            + ", ".join(f"{x:.2f}" for x in w)
            + (
                ". All 0: no sub-model called any validation breast malignant at 0.5, so the fusion fell back to "
                "the plain mean and claim 8c compares the model with itself."
                if not any(w)
                else "."
            )
        )
    out += [
        "- Scale: seed 001 tested on 523 patients, seed 000 on 129 lesions (five-fold CV). The gaps seed 001 reports "
        "(AUC 0.93 -> 0.96 from no fusion to multi-view fusion, 0.94 -> 0.96 from LE to CEM) are far smaller than "
        "what test sets of the size above can resolve: read the CIs before the point estimates.",
    ]
    return out


# ---- repeats ------------------------------------------------------------------------------------------


def repeated(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each comparison across the data seeds (``fedbreast experiment``'s statistics): mean and SD of
    each arm's AUC, the mean paired difference with a 95 % Student-t CI over seeds, DeLong per seed,
    the difference the seeds could detect (80 % power), and the verdict over repeats."""
    from fedbreast.simulation.experiment import Repeat, summarise

    keyed: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            keyed.setdefault((r["number"], r["sites"]), []).append((seed, r))
    out = []
    for (number, sites), items in keyed.items():
        reps = []
        for seed, r in items:
            rep = Repeat(seed, None, auc={"A": float(r["auc_a"][0]), "B": float(r["auc_b"][0])}, units=r["n"])
            if np.isfinite(r["delong_p"]):
                rep.delong["B"] = (float(r["diff"][0]), float(r["delong_p"]))
            reps.append(rep)
        s = summarise(["A", "B"], reps)
        c = s["comparisons"]["A vs B"]
        first = items[0][1]
        if first.get("equivalent") and c.get("ci"):  # equivalence: inside the margin either way
            c["verdict"] = _equivalence(*c["ci"])
        elif first["non_inferior"] and c.get("ci"):  # non-inferiority: the margin, not 0, is the bar
            lo, hi = c["ci"]
            c["verdict"] = (
                "holds"
                if lo > -NON_INFERIORITY_MARGIN
                else "does not hold"
                if hi < -NON_INFERIORITY_MARGIN
                else "inconclusive"
            )
        out.append(
            {
                "number": number,
                "statement": first["statement"],
                "sites": sites,
                "a": first["a"],
                "b": first["b"],
                "seeds": [seed for seed, _ in items],
                "units": [r["n"] for _, r in items],
                "arm_a": s["arms"]["A"],
                "arm_b": s["arms"]["B"],
                **c,
            }
        )
    return out


def repeated_markdown(rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    def m(a: dict[str, Any]) -> str:
        return "n/a" if a["mean"] is None else f"{a['mean']:.3f} ± {a['sd'] or 0:.3f}"

    def sg(v: Any) -> str:
        return "n/a" if v is None else f"{v:+.3f}"

    out = [
        f"## Over {len(seeds)} data seeds ({', '.join(map(str, seeds))})",
        "",
        "Each seed is its own generated federation (same profiles, another draw of patients), every arm retrained "
        "on it. Mean ± SD over seeds; the paired ΔAUC's 95 % CI is a Student-t interval over seeds (the seed is the "
        "unit, n - 1 degrees of freedom; a bootstrap over three seeds would be about as wide as their range); "
        "DeLong counts the seeds whose own paired test is significant at 5 %; *detectable* is the difference these "
        "seeds had 80 % power to find (two-sided 5 %): an inconclusive claim with a true effect below it was not "
        "testable here. Verdict from the CI over seeds (5b: against the non-inferiority margin).",
        "",
        "| # | claim | AUC A (mean ± SD) | AUC B | ΔAUC A-B [95% CI over seeds] | paired t p | DeLong p < 0.05 better / worse | detectable | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scope = "" if r["sites"] == "all" else f" ({r['sites']} only)"
        ci = r.get("ci") or [None, None]
        d = r["delong_significant"]
        tp = "n/a" if r.get("t_test_p") is None else f"{r['t_test_p']:.3f}"
        det = "n/a" if r.get("detectable") is None else f"{r['detectable']:.3f}"
        out.append(
            f"| {r['number']} | {r['statement']}{scope} | {m(r['arm_a'])} | {m(r['arm_b'])} | "
            f"{sg(r.get('mean_difference'))} [{sg(ci[0])}, {sg(ci[1])}] | {tp} | {d['better']} / {d['worse']} of {d['of']} | "
            f"{det} | **{r['verdict']}** |"
        )
    return out + [""]


def chance_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The arms whose own 95 % AUC CI contains 0.5 in every seed (``rows``: the per-seed
    comparisons): a claim that compares such an arm tests whether the arm learned at this
    scale, not the seed's idea."""
    cis: dict[str, dict[int, tuple[float, float, float]]] = {}
    for r in rows:
        for side in ("a", "b"):
            cis.setdefault(r[side], {})[r.get("seed", 0)] = r[f"auc_{side}"]
    at_chance = {
        arm: ", ".join(f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" for _, v in sorted(by_seed.items()))
        for arm, by_seed in cis.items()
        if all(np.isfinite(v[1]) and v[1] <= 0.5 <= v[2] for v in by_seed.values())
    }
    if not at_chance:
        return []
    names = "; ".join(f"{name} ({v})" for name, v in at_chance.items())
    return [
        "**Arms not distinguishable from chance in any seed** (0.5 inside the arm's own 95 % AUC CI in every "
        f"seed; AUC [CI] per seed): {names}. A claim that compares one of them says whether the arm learned "
        "at this scale (the family's preset, about 40 patients per site) more than whether the seed's idea holds.",
        "",
    ]


# ---- command line -----------------------------------------------------------------------------------


def run_claims(
    data: Path,
    sites: int,
    patients: int,
    seed: int,
    only: list[str],
    echo: Callable[[str], None] = print,
    fresh: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, ArmResult]]:
    """Train the arms the chosen claims need (or load them from DATA/arms, unless ``fresh``) and
    compare them; returns (table rows, arm results)."""
    torch.set_num_threads(1)
    site_dirs = prepare_federation(data, sites, patients, seed, echo=echo)
    exp = Experiment(site_dirs, seed, echo, None if fresh else data / "arms")
    needed = {name for key in only for c in CLAIMS[key] for name in (c.a, c.b)}
    for name in ARMS:  # ARMS order keeps arms with the same inputs together (sites are memoised per config)
        if name in needed:
            exp.arm(name)
    rows = []
    for key in only:
        for c in CLAIMS[key]:
            a, b = exp.arm(c.a), exp.arm(c.b)
            rows.append(compare(c, a, b, seed))
            if c.cem_sites_only_too and exp.cem_sites:
                rows.append(compare(c, a, b, seed, exp.cem_sites))
    return rows, exp.results


def _jsonable(results: dict[str, ArmResult], rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    arms = {}
    for r in results.values():
        arms[r.name] = {
            "unit": r.unit,
            "n": int(len(r.y)),
            "n_pos": int(r.y.sum()),
            "seconds": r.seconds,
            "auc": _auc(r.y, r.p),
            "extra": r.extra,
            "per_site": {
                s: {"n": int((r.site == s).sum()), "auc": _auc(r.y[r.site == s], r.p[r.site == s])}
                for s in dict.fromkeys(r.site.tolist())
            },
        }
    return {"meta": meta, "comparisons": rows, "arms": arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="where the generated federation lives (made if missing)")
    ap.add_argument("--out", default="docs/claims.md")
    ap.add_argument("--json", default="benchmarks/results/claims.json")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument(
        "--patients", type=int, default=60, help="patients per site; 60 keeps the run near 30 min on one core"
    )
    ap.add_argument("--seed", type=int, default=0, help="one data seed (the federation in --data)")
    ap.add_argument(
        "--seeds",
        help="several data seeds, e.g. 0,1,2: a federation each under DATA/seed-N, every claim repeated on each",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(CLAIMS),
        default=list(CLAIMS),
        metavar="CLAIM",
        help=f"claims to check (default all): {' '.join(CLAIMS)}",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every arm (default: reuse an arm's predictions kept under DATA/arms by an earlier run "
        "with the same settings, so claims can be added or the table rewritten without retraining)",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        data = Path(args.data) if len(seeds) == 1 else Path(args.data) / f"seed-{seed}"
        rows, results = run_claims(data, args.sites, args.patients, seed, args.only, echo, args.fresh)
        per_seed[seed] = [{**r, "seed": seed} for r in rows]
    rows = [r for seed in seeds for r in per_seed[seed]]
    over = repeated(per_seed) if len(seeds) > 1 else []
    keys = ("backbone", "image_h", "image_w", "rounds", "local_epochs", "batch_size", "lr", "augment")
    meta = {
        "command": ".venv/bin/python benchmarks/claims.py " + shlex.join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "sites": args.sites,
        "patients": args.patients,
        "seed": seeds[0] if len(seeds) == 1 else seeds,
        "multiview": ", ".join(f"{k}={getattr(_config('multiview', {}, args.seed), k)}" for k in keys),
        "birads": ", ".join(
            f"{k}={getattr(_config('birads', {}, args.seed), k)}"
            for k in (*keys, "patch_size", "n_patches", "patch_energies", "birads_groups")
        ),
        **{
            fam: ", ".join(f"{k}={getattr(_config(fam, {}, args.seed), k)}" for k in (*keys, *extra))
            for fam, extra in NEW_FAMILIES.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    kept = kept_blocks(Path(args.out))  # sections other benchmarks own (virtual_cesm.py's claims)
    Path(args.out).write_text(markdown(rows, results, meta, over, seeds) + kept)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    payload = {**_jsonable(results, rows, meta), "repeated": over}  # "arms": the last seed's
    Path(args.json).write_text(json.dumps(payload, indent=2, default=float))
    echo(Path(args.out).read_text())


if __name__ == "__main__":
    main()
