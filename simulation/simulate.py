"""``fedbreast simulate``: the main job, a federated run on generated hospitals, end to end.

1. Generate the sites as DICOM (once per data seed and size; reused after) and ingest each
   through the same path a hospital uses.
2. Warm each site's preprocessing cache, so rounds measure training, not decoding.
3. Run the ServerApp and ClientApps on Flower's simulation engine (one SuperNode per site, served
   by a bounded pool of Ray actors: ``workers``).
4. Optionally train local-only and pooled baselines with the same budget.
5. Write the report: summary.md / summary.csv, ROC and learning curves, checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from fedbreast.server.report import write_report
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.generate import SiteProfile, default_profiles, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.shared.data.pseudonym import KEY_FILE
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.families import FAMILIES
from fedbreast.shared.training.tasks import task_for
from fedbreast.simulation.flower_runner import SimulationFailed, run_simulation

ENGINES = ("ray", "inprocess")  # Flower's simulation engine, or both apps in this process (simulation/inprocess.py)
# The CPU preset: finishes in a few minutes on 2 cores with a real resnet18.
PRESET = dict(
    backbone="resnet18",
    image_h=256,
    image_w=128,
    rounds=4,
    local_epochs=1,
    batch_size=8,
    lr=0.01,
    lr_decay_rounds="3",
    workers=0,
    bootstrap=1000,
    round_timeout=900.0,
    wait_for_sites=120.0,
)
# Per model family, on top of PRESET (``fedbreast simulate --model FAMILY``): each family's own
# (shared/families). Sizes suit the generated sites (mammograms ~600x400 px at ~0.45 mm, lesions
# ~20 px in radius): the seeds' 227-px patches / 256-px boxes on 3000x2000 images scale to 64 / 96 px.
PRESETS: dict[str, dict[str, Any]] = {name: dict(f.preset) for name, f in FAMILIES.items()}


def _fix_generated_key(site_dir: Path, seed: int, k: int) -> None:
    """Generated (synthetic) sites get a pseudonymisation key derived from the seed: splits
    follow pseudonyms, so a random key would give each fresh run a different test set.
    Real sites keep the random key ``site ingest`` creates."""
    key_file = site_dir / KEY_FILE
    if not key_file.exists():
        site_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(hashlib.sha256(f"fedbreast-generated-{seed}-site-{k}".encode()).hexdigest() + "\n")


def prepare_federation(
    data_dir: Path, sites: int, patients: int, seed: int, echo=print, modalities: str | None = None
) -> list[Path]:
    """Generate (if this exact federation is not there yet) and ingest; return site directories.
    ``modalities`` (cem | ffdm | ffdm+us) makes every site that kind of hospital."""
    return prepare_sites(data_dir, default_profiles(sites, patients, modalities), seed, echo)


def prepare_sites(data_dir: Path, profiles: list[SiteProfile], seed: int, echo=print) -> list[Path]:
    """:func:`prepare_federation` for hand-picked site profiles (e.g. four hospitals of one
    kind): generate once per (profiles, seed), ingest, return the site directories."""
    data_dir = Path(data_dir)
    params = json.loads(json.dumps({"profiles": [p.to_dict() for p in profiles], "seed": seed}))
    stamp = data_dir / "generated" / "params.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != params:
        t = time.perf_counter()
        generate_federation(data_dir / "generated", profiles=profiles, seed=seed)
        stamp.write_text(json.dumps(params))
        n = sum(p.n_patients for p in profiles)
        echo(f"generated {len(profiles)} sites ({n} patients) as DICOM in {time.perf_counter() - t:.0f} s")
    out = []
    for k, name in enumerate((p.name for p in profiles), start=1):
        src = data_dir / "generated" / name
        site_dir = data_dir / "sites" / name
        _fix_generated_key(site_dir, seed, k)
        report = ingest(src / "dicom", site_dir, annotations=src / "annotations.csv", site=name, workers=2)
        if report.processed:
            echo(f"ingested {name}: {report.images} images, {report.exams} exams, {report.rejected} rejected")
        out.append(site_dir)
    return out


def run_on_engine(
    engine: str,
    run_dir: Path,
    run_config: dict[str, Any],
    site_dirs: list[Path],
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The ServerApp and one ClientApp per site folder on ``engine``; Flower's run record.
    ``workers``: Ray's actor pool (flower_runner.run_simulation); the in-process engine has one."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: must be one of {', '.join(ENGINES)}")
    if engine == "inprocess":
        from fedbreast.simulation.inprocess import run_inprocess

        record = run_inprocess(run_config, site_dirs)
        if record["status"] != "finished:completed":
            raise SimulationFailed(f"in-process run ended {record['status']}: {record['status-details']}")
        return record
    return run_simulation(run_dir, run_config, num_sites=len(site_dirs), workers=workers, ray_address=ray_address)


def simulate(
    run_dir: Path,
    sites: int = 3,
    patients: int = 80,
    seed: int = 0,
    baselines: bool = False,
    overrides: dict[str, Any] | None = None,
    data_dir: Path | None = None,
    sites_dir: Path | None = None,
    echo=print,
    modalities: str | None = None,
    engine: str = "ray",
    site_policy: Path | None = None,
    holdout_site: str | None = None,
    init_checkpoint: Path | None = None,
    start: str = "scratch",
    public_cache: Path | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the federation; with ``sites_dir``, on already-ingested site directories
    (one sub-folder per site, e.g. CDD-CESM imported per machine) instead of generated ones.
    ``engine``: ``ray`` (Flower's simulation engine, one SuperNode per site) or ``inprocess``
    (the same apps in this process, sites in turn: simulation/inprocess.py). ``site_policy``:
    a TOML file whose ``[policy]`` every simulated site enforces (client/policy.py).
    ``holdout_site``: that site takes no part in training and is evaluated every round, reported
    as external validation. ``init_checkpoint``: the run's initial model (a run checkpoint, e.g.
    ``fedbreast pretrain --model-out``'s; its model signature must be the run's). ``start``:
    ``public`` starts from the run's network pretrained on a public generated federation of its
    own data seed (simulation/public_start.py; cached under ``public_cache``, default
    DATA/public), ``scratch`` from a fresh network, ``auto`` (the CLI's default) ``public`` for a
    generated multiview run without DP or ``init_checkpoint``. ``workers``
    (Ray engine): at most this many sites train at once, in a pool of that many Ray actors that
    serve every site in turn (default flower_runner.default_workers: up to max(4, CPUs)).
    ``ray_address`` (Ray engine): join that running Ray cluster (``auto`` or the head's HOST:PORT)
    instead of starting Ray on this machine (docs/multi-node.md)."""
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: must be one of {', '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ConfigError(f"--ray-address {ray_address!r}: only the ray engine runs on a Ray cluster, not {engine!r}")
    if ray_address is not None and workers is not None:
        raise ConfigError("--site-workers with --ray-address: the cluster's CPUs size the pool of Ray actors")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers {workers}: must be >= 1 (sites that train at once)")
    run_dir = Path(run_dir).resolve()
    family = str((overrides or {}).get("model", "multiview"))
    if family not in FAMILIES:
        raise ConfigError(f"model {family!r}: not a registered family; one of {', '.join(FAMILIES)}")
    base = {
        **PRESET,
        **FAMILIES[family].preset,
        "min_available_sites": sites,
        "min_train_sites": 1,
        "min_evaluate_sites": 1,
        "seed": seed,
    }
    cfg = RunConfig(**base).replace(**(overrides or {}))
    if baselines and cfg.model != "multiview":
        raise ConfigError(
            f"--baselines: local-only and pooled baselines exist for the multiview family only, not {cfg.model!r}"
        )
    from fedbreast.simulation.public_start import public_checkpoint, resolve_start

    start = resolve_start(start, cfg, generated=sites_dir is None, init_checkpoint=init_checkpoint)
    if sites_dir is not None:
        sites_root = Path(sites_dir).resolve()
        site_dirs = sorted(p for p in sites_root.iterdir() if p.is_dir())
        if not site_dirs:
            raise FileNotFoundError(f"{sites_root}: no site directories in it")
        cfg = cfg.replace(min_available_sites=len(site_dirs))
    else:
        data_dir = Path(data_dir or run_dir.parent / "data").resolve()
        if modalities is None:  # a family may need one kind of hospital (cyclegan: CEM sites train it)
            modalities = FAMILIES[family].simulate_modalities
        site_dirs = prepare_federation(data_dir, sites, patients, seed, echo, modalities)
        sites_root = data_dir / "sites"
    if holdout_site is not None:
        known = [d.name for d in site_dirs]
        if holdout_site not in known:
            raise ConfigError(f"--holdout-site {holdout_site!r}: no such site; the sites are {', '.join(known)}")
        if len(known) < 2:
            raise ConfigError(f"--holdout-site {holdout_site!r}: no other site would train")
    t = time.perf_counter()
    site_data = []  # the opened sites, kept only for the baselines: 100 sites would stay resident otherwise
    counts = []
    for d in site_dirs:
        try:
            s = task_for(cfg).open(d, cfg)
        except SiteUnavailable as exc:  # the federation runs on; that site reports itself unable
            echo(f"warning: {d.name} cannot train: {exc}")
            continue
        counts.append(f"{s.name} {s.exams('train')}/{s.exams('val')}/{s.exams('test')}")
        if baselines:
            site_data.append(s)
    echo(
        f"caches warm in {time.perf_counter() - t:.0f} s: "
        + ", ".join(f"{c} train/val/test {task_for(cfg).count_unit}s" for c in counts)
    )
    initial = None  # the initial model the run, and its baselines, start from: a fresh build without one
    run_config = {**cfg.to_flower(), "sim-sites-dir": str(sites_root), "run-dir": str(run_dir)}
    if holdout_site is not None:
        run_config["holdout-site"] = holdout_site
        echo(f"{holdout_site} is held out of training: evaluated every round as external validation")
    if start == "public":
        cache = Path(public_cache) if public_cache is not None else (data_dir or run_dir.parent / "data") / "public"
        init_checkpoint = public_checkpoint(cache, cfg, seed, echo, patients=patients)
    if init_checkpoint is not None:
        from fedbreast.server.checkpoints import initial_checkpoint

        initial = initial_checkpoint(Path(init_checkpoint), cfg.model_signature()).arrays  # refused here, not per round
        run_config["init-checkpoint"] = str(Path(init_checkpoint).resolve())
        echo(f"the initial model is {init_checkpoint}")
    if site_policy is not None:
        from fedbreast.client.policy import SitePolicy  # the sites' own code reads it again per message

        SitePolicy.from_file(site_policy)  # a bad file stops here, naming the key, not at every site
        run_config["sim-site-policy"] = str(Path(site_policy).resolve())
        echo(f"every site enforces the policy in {site_policy}")
    t = time.perf_counter()
    record = run_on_engine(engine, run_dir, run_config, site_dirs, workers, ray_address)
    federated_s = time.perf_counter() - t
    results: dict[str, Any] = {"run": record, "federated_seconds": federated_s}
    if baselines:
        from fedbreast.simulation.baselines import run_baselines

        t = time.perf_counter()
        results["baselines"] = run_baselines(site_data, cfg, echo, start=initial)
        results["baseline_seconds"] = time.perf_counter() - t
        write_report(run_dir, cfg, results["baselines"])
    results["seconds"] = time.perf_counter() - t0
    (run_dir / "simulate.json").write_text(json.dumps(results, indent=2, default=str))
    echo("")
    echo((run_dir / "summary.md").read_text())
    echo(f"run directory: {run_dir} ({results['seconds']:.0f} s in all, federated part {federated_s:.0f} s)")
    return results
