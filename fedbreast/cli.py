"""The ``fedbreast`` command line. Heavy imports (torch, flwr) happen inside commands so
``fedbreast --help`` and the site data commands start fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedbreast.shared.config import VIEW_FUSIONS  # light: no torch
from fedbreast.shared.data.schema import MODALITY_SETS
from fedbreast.shared.families import FAMILIES

if TYPE_CHECKING:
    from fedbreast.server.checkpoints import Checkpoint

MODALITIES_HELP = "every generated site acquires this (default: the sites cycle CEM, FFDM, FFDM+US)"


def _progress(label: str):
    def report(done: int, total: int) -> None:
        if total and (done == total or done % max(1, total // 20) == 0):
            print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def cmd_site_ingest(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.ingest import ingest

    report = ingest(
        args.dicom_dir,
        args.out,
        annotations=args.annotations,
        site=args.site,
        config=args.config,
        split_seed=args.split_seed,
        workers=args.workers,
        progress=_progress("reading"),
    )
    print(report.summary())
    print(f"manifest: {Path(args.out) / 'manifest.jsonl'}; rejected: {Path(args.out) / 'rejected.txt'}")
    return 0


def cmd_site_audit(args: argparse.Namespace) -> int:
    from fedbreast.client.audit import audit_path, render_table, scan_audit, verify_audit

    site_dir = Path(args.site_dir)
    if not site_dir.is_dir():
        raise FileNotFoundError(f"{site_dir}: no such site directory")
    if args.verify or args.head:
        result = verify_audit(site_dir, head=args.head)
        print(result.render())
        return 0 if result.ok else 1
    scan = scan_audit(site_dir)
    for n, why in scan.broken[:5]:  # on stderr: --json's output stays JSONL
        print(f"warning: {audit_path(site_dir)} line {n} skipped: {why}", file=sys.stderr)
    if len(scan.broken) > 5:
        print(f"warning: {len(scan.broken) - 5} more unreadable line(s); see --verify", file=sys.stderr)
    lines = scan.records
    if args.run is not None:
        lines = [line for line in lines if str(line.get("run_id")) == args.run]
    if args.last:
        lines = lines[-args.last :]
    if args.json:
        for line in lines:
            print(json.dumps(line, sort_keys=True))
    elif not lines:
        print(f"nothing has left this site yet (no lines in {audit_path(site_dir)})")
    else:
        print(render_table(lines))
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.check import check_site

    result = check_site(args.site_dir)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0 if result.can_train else 1


def cmd_site_generate(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.generate import generate_federation

    summaries = generate_federation(
        Path(args.out), n_sites=args.sites, patients_per_site=args.patients, seed=args.seed, modalities=args.modalities
    )
    for s in summaries:
        print(
            f"{s.name}: {s.n_patients} patients, {s.n_images} images, {s.n_malignant_breasts} malignant breasts, "
            f"modalities {s.modalities}, oracle AUC {s.oracle_auc:.3f} -> {s.path}"
        )
    print(
        f"next: fedbreast site ingest {Path(args.out) / 'site-1' / 'dicom'} --annotations "
        f"{Path(args.out) / 'site-1' / 'annotations.csv'} --out SITE_DIR"
    )
    return 0


def cmd_site_import_cdd_cesm(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.cdd_cesm import import_cdd_cesm

    report = import_cdd_cesm(
        Path(args.root), Path(args.out), split_by_machine=args.split_by_machine, seed=args.split_seed
    )
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedbreast.simulation.demo import run_demo

    rows = run_demo(Path(args.out), sites=args.sites, patients=args.patients, seed=args.seed)
    return 0 if rows else 1


def _parse_overrides(args: argparse.Namespace) -> dict:
    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.data.rules import ConfigError

    raw: dict[str, str] = {}
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a run-config key such as local-epochs=2")
        key, value = item.split("=", 1)
        raw[key.strip()] = value.strip()
    for flag, key in (
        ("model", "model"),
        ("rounds", "rounds"),
        ("backbone", "backbone"),
        ("view_fusion", "view-fusion"),
        ("strategy", "strategy"),
    ):
        if getattr(args, flag, None) is not None:
            raw[key] = getattr(args, flag)
    if args.image_size:
        try:
            h, w = args.image_size.lower().split("x")
        except ValueError:
            raise ConfigError(f"--image-size {args.image_size!r}: expected HxW, e.g. 256x128") from None
        raw["image-h"], raw["image-w"] = h, w
    # Validated on top of the chosen family's preset (a family may check its settings against
    # each other: cyclegan's square images); only the given keys are kept.
    from fedbreast.shared.families import FAMILIES

    family = FAMILIES.get(str(raw.get("model", "")))
    base = {RunConfig.flower_key(k): v for k, v in family.preset.items()} if family is not None else {}
    parsed = RunConfig.from_flower({**base, **raw})
    return {name: getattr(parsed, name) for name in (k.replace("-", "_") for k in raw)}


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbreast.simulation.simulate import simulate

    overrides = _parse_overrides(args)
    simulate(
        Path(args.out),
        sites=args.sites,
        patients=args.patients,
        seed=args.seed,
        baselines=args.baselines,
        overrides=overrides,
        data_dir=Path(args.data) if args.data else None,
        sites_dir=Path(args.sites_dir) if args.sites_dir else None,
        modalities=args.modalities,
        engine=args.engine,
        site_policy=Path(args.site_policy) if args.site_policy else None,
        holdout_site=args.holdout_site,
        init_checkpoint=args.init_checkpoint,
        start=args.start,
        workers=args.site_workers,
        ray_address=args.ray_address,
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Repeated federated runs (data seeds x folds) of arms differing in one run setting."""
    from fedbreast.shared.data.rules import ConfigError
    from fedbreast.simulation.experiment import run_experiment

    key, sep, values = args.compare.partition("=")
    if not sep or "," not in values:
        raise ConfigError(f"--compare {args.compare!r}: expected KEY=V1,V2[,...], e.g. birads-fusion=feature,none")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    report = run_experiment(
        Path(args.out),
        key.strip(),
        [v.strip() for v in values.split(",") if v.strip()],
        _parse_overrides(args),
        seeds=seeds,
        folds=args.folds,
        sites=args.sites,
        patients=args.patients,
        data_dir=Path(args.data) if args.data else None,
        engine=args.engine,
        command="fedbreast " + " ".join(sys.argv[1:]),
    )
    for name, c in report["summary"]["comparisons"].items():
        print(f"{name}: {c['verdict']} (mean difference {c.get('mean_difference')}, 95% CI {c.get('ci')})")
    print(f"report: {Path(args.out).resolve() / 'experiment.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import time

    from fedbreast.simulation.evaluate import evaluate_checkpoint

    # A run directory stands for the model its report scores (model-selection), as for export and predict.
    run_dir_, kind, _ = _checkpoint_arg(args.checkpoint)
    args.checkpoint = str(run_dir_ / "checkpoints" / f"{kind}.pt")
    if args.federation:
        from fedbreast.server.launcher import RunFailed, default_run_dir

        flwr_home = Path(args.flwr_home).resolve() if args.flwr_home else None
        run_dir = (
            Path(args.out)
            if args.out
            else default_run_dir(args.federation, flwr_home, "evaluate-" + time.strftime("%Y%m%d-%H%M%S"))
        )
        try:
            evaluate_checkpoint(
                Path(args.checkpoint),
                run_dir,
                federation=args.federation,
                flwr_home=flwr_home,
                app_dir=Path(args.app) if args.app else None,
            )
        except RunFailed as exc:
            print(f"fedbreast: evaluation run failed: {exc}", file=sys.stderr)
            return 1
        print(f"report: {run_dir.resolve() / 'summary.md'}")
        return 0
    evaluate_checkpoint(
        Path(args.checkpoint),
        Path(args.out or "runs/evaluate"),
        sites_dir=Path(args.sites_dir) if args.sites_dir else None,
        engine=args.engine,
    )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train the family's network centrally (no DP) on public sites; write its backbone for weights-path."""
    from fedbreast.shared.data.rules import ConfigError
    from fedbreast.simulation.pretrain import pretrain

    overrides = _parse_overrides(args)
    if args.epochs is not None:
        if "rounds" in overrides:
            raise ConfigError("--epochs and --rounds: give one (both set the passes over the public data)")
        if args.epochs < 1:
            raise ConfigError(f"--epochs {args.epochs}: must be at least 1")
        overrides.update(rounds=args.epochs, local_epochs=1)
    pretrain(
        args.sites_dir, args.out, overrides, seed=args.seed, norm=args.norm, part=args.part, model_out=args.model_out
    )
    return 0


def cmd_server_start(args: argparse.Namespace) -> int:
    from fedbreast.server.superlink import SuperLinkSettings, run_superlink

    settings = SuperLinkSettings(
        state_dir=Path(args.state_dir).resolve(),
        tls_dir=Path(args.tls_dir).resolve() if args.tls_dir else None,
        host=args.host,
        port=args.port,
        federation=args.federation,
        flwr_home=Path(args.flwr_home).resolve() if args.flwr_home else None,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        insecure=args.insecure,
        connect_address=args.connect_address,
    )
    return run_superlink(settings)


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from fedbreast.server.launcher import RunFailed, default_run_dir, launch

    overrides = {k.replace("_", "-"): v for k, v in _parse_overrides(args).items()}
    flwr_home = Path(args.flwr_home).resolve() if args.flwr_home else None
    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else default_run_dir(args.federation, flwr_home, time.strftime("%Y%m%d-%H%M%S"))
    )
    try:
        launch(args.federation, run_dir, overrides, app_dir=Path(args.app) if args.app else None, flwr_home=flwr_home)
    except RunFailed as exc:
        print(f"fedbreast: run failed: {exc}", file=sys.stderr)
        return 1
    print(f"report: {run_dir.resolve() / 'summary.md'}")
    return 0


def cmd_release_hash(args: argparse.Namespace) -> int:
    """The sha256 of the app bundle ``fedbreast run`` submits (or of ``--app``), for sites' app-hashes."""
    import hashlib
    import tempfile

    from flwr.cli.build import build_fab_from_disk

    from fedbreast.simulation.flower_runner import write_app_dir

    with tempfile.TemporaryDirectory() as tmp:
        app = Path(args.app) if args.app else write_app_dir(Path(tmp) / "app")
        digest = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    if args.json:
        print(json.dumps({"sha256": digest}))
    else:
        print(digest)
        print(f'# sites that approve this release add it to [policy] in site.toml: app-hashes = ["{digest}"]')
    return 0


def _checkpoint_arg(arg: str) -> tuple[Path, str, Checkpoint]:
    """A checkpoint ``RUN_DIR/checkpoints/KIND.pt`` or a run directory (the model its report
    scores: model-selection's checkpoint, server/checkpoints.py reported_kinds) -> (run dir,
    kind, the checkpoint read and its sha256 checked)."""
    from fedbreast.server.checkpoints import CheckpointError, load_checkpoint, reported_kinds

    path = Path(arg)
    if path.is_dir():
        run_dir, kind = path, (reported_kinds(path) or ["final"])[0]
    else:
        if path.suffix != ".pt" or path.parent.name != "checkpoints" or not path.exists():
            raise CheckpointError(f"{path}: not a run directory or RUN_DIR/checkpoints/{{latest,best,final}}.pt")
        run_dir, kind = path.parent.parent, path.stem
    ckpt = load_checkpoint(run_dir, kind)
    if ckpt is None:
        raise CheckpointError(f"{run_dir / 'checkpoints' / (kind + '.pt')}: no such checkpoint")
    return run_dir, kind, ckpt


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint (or a run directory: the model its report scores) -> a self-contained model + model card."""
    from fedbreast.shared.export import export_model

    run_dir, kind, ckpt = _checkpoint_arg(args.checkpoint)
    source = str(run_dir / "checkpoints" / f"{kind}.pt")
    card = export_model(ckpt.arrays, ckpt.meta, Path(args.out), args.format, run_dir=run_dir, checkpoint=source)
    out = Path(args.out) / card["model"]["file"]
    print(f"{out} ({card['model']['bytes']} bytes; max abs diff to PyTorch {card['verification']['max_abs_diff']})")
    print(f"model card: {Path(args.out) / 'model_card.md'}")
    return 0


def cmd_site_predict(args: argparse.Namespace) -> int:
    """Score every breast of every exam at a site (an ingested site dir, or a DICOM folder
    ingested first into OUT/site) with a trained model; OUT/predictions.csv stays at the site."""
    from fedbreast.shared.predict import predict_site

    run_dir, kind, ckpt = _checkpoint_arg(args.checkpoint)
    result = predict_site(
        Path(args.input),
        ckpt,
        run_dir,
        Path(args.out),
        threshold=args.threshold,
        workers=args.workers,
        site=args.site,
        progress=_progress("reading"),
        annotations=Path(args.annotations) if args.annotations else None,
        personal=args.personal,
        explain=args.explain,
        dicom=args.dicom,
    )
    print(f"checkpoint: {run_dir / 'checkpoints' / (kind + '.pt')} (round {ckpt.round})")
    print(result.summary())
    return 0


def cmd_site_synthesize(args: argparse.Namespace) -> int:
    """Virtual DES for every view of a site that has none, with a trained cyclegan; written to
    SITE_DIR/virtual/ (marked synthetic), used by a run only with --set virtual-des=true."""
    from fedbreast.client.synthesize import synthesize_site

    run_dir, kind, ckpt = _checkpoint_arg(args.checkpoint)
    result = synthesize_site(Path(args.site_dir), ckpt, workers=args.workers, all_views=args.all_views)
    print(f"checkpoint: {run_dir / 'checkpoints' / (kind + '.pt')} (round {ckpt.round})")
    print(result.summary())
    return 0 if not result.failed else 1


def cmd_site_start(args: argparse.Namespace) -> int:
    from fedbreast.client.daemon import run_site

    return run_site(Path(args.config), insecure=args.insecure, max_restarts=args.max_restarts)


def _add_run_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=tuple(FAMILIES), help="model family")
    p.add_argument("--rounds", type=int)
    p.add_argument("--backbone")
    p.add_argument("--view-fusion", choices=VIEW_FUSIONS)
    p.add_argument("--strategy")
    p.add_argument("--image-size", help="HxW per view, e.g. 256x128")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key, e.g. --set local-epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbreast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "simulate", help="the main job: a federated run on generated hospitals, ending in a per-site report"
    )
    p.add_argument("--out", default="runs/simulate", help="run directory (config, metrics.jsonl, report, checkpoints)")
    p.add_argument("--data", help="where generated and ingested sites live (default: next to the run directory)")
    p.add_argument(
        "--sites-dir",
        help="run on these already-ingested site directories (one folder per site) instead of generated ones",
    )
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=80, help="patients per site (sites differ in size around this)")
    p.add_argument("--modalities", choices=MODALITY_SETS, help=MODALITIES_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("ray", "inprocess"),
        default="ray",
        help="ray: Flower's simulation engine, one SuperNode per site (default); inprocess: the same apps "
        "in this process, sites in turn, no Ray (faster for small runs; not the Flower runtime path)",
    )
    p.add_argument(
        "--model",
        choices=tuple(FAMILIES),
        help="model family (seeds 001, 000, 003, 002, 004), each with its own preset; default multiview",
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--backbone")
    p.add_argument("--view-fusion", choices=VIEW_FUSIONS)
    p.add_argument("--strategy")
    p.add_argument("--image-size", help="HxW per view, e.g. 256x128")
    p.add_argument(
        "--baselines", action="store_true", help="also train local-only and pooled models with the same budget"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key, e.g. --set local-epochs=2")
    p.add_argument(
        "--site-policy",
        metavar="FILE",
        help="a TOML file with a [policy] table (as in site.toml) that every simulated site enforces",
    )
    p.add_argument(
        "--holdout-site",
        metavar="NAME",
        help="this site takes no part in training; it is evaluated every round and reported as external validation",
    )
    p.add_argument(
        "--init-checkpoint",
        metavar="CKPT",
        help="the run's initial model: a run checkpoint of the same model settings (e.g. pretrain --model-out's)",
    )
    p.add_argument(
        "--start",
        choices=("auto", "public", "scratch"),
        default="auto",
        help="the initial model. public: the run's network pretrained centrally on a generated public federation "
        "of its own data seed (never the run's data; cached under DATA/public); scratch: a fresh network (the "
        "seeds' setting); auto (default): public for a generated multiview run without DP or --init-checkpoint "
        "(docs/default-quality.md)",
    )
    p.add_argument(
        "--site-workers",
        type=int,
        metavar="N",
        help="ray engine: at most N sites run at once, in a pool of N Ray actors that serve every site in turn "
        "(default: all sites, up to max(4, CPUs)); memory grows with N, not with --sites",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="ray engine: join this running Ray cluster (auto: the last 'ray start --head' here; or HEAD:PORT) "
        "instead of starting Ray on this machine; simulations larger than one box (docs/multi-node.md)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "experiment",
        help="repeated runs (data seeds x k-fold) of arms that differ in one setting: means, SDs, paired tests",
    )
    p.add_argument("--compare", required=True, metavar="KEY=V1,V2", help="the arms, e.g. birads-fusion=feature,none")
    p.add_argument("--out", required=True, help="experiment folder: experiment.md, experiment.json, runs/")
    p.add_argument("--seeds", default="0,1,2", help="data seeds, one generated federation each (default 0,1,2)")
    p.add_argument(
        "--folds", type=int, default=0, help="k-fold cross-validation per seed (default 0: the ingest split)"
    )
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--data", help="where the generated federations live (default OUT/data)")
    p.add_argument("--engine", choices=("ray", "inprocess"), default="inprocess")
    _add_run_config_flags(p)  # for every arm
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "evaluate",
        help="an evaluation-only federated run of a finished model (no training): the per-site and pooled report",
    )
    p.add_argument(
        "checkpoint", help="RUN/checkpoints/KIND.pt, or a run directory (the model its report scores: model-selection)"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--sites-dir", help="simulation: already-ingested site directories (one folder per site)")
    where.add_argument("--federation", help="a deployed federation by name (as for `fedbreast run`)")
    p.add_argument("--out", help="run directory (default runs/evaluate; deployed: as for `fedbreast run`)")
    p.add_argument("--engine", choices=("ray", "inprocess"), default="ray", help="simulation engine (as for simulate)")
    p.add_argument("--app", help="deployed: Flower app folder to submit (default: generated)")
    p.add_argument("--flwr-home", help="deployed: Flower config folder (default $FLWR_HOME or ~/.flwr)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "pretrain",
        help="train a backbone centrally, without DP, on public sites (never the private ones); write it for "
        "weights-path",
    )
    p.add_argument(
        "--sites-dir",
        required=True,
        help="ingested public site folders (one per site: an imported CDD-CESM, a generated federation of its own seed)",
    )
    p.add_argument("--out", required=True, help="the backbone file to write (load it with --set weights-path=FILE)")
    p.add_argument("--epochs", type=int, help="passes over the pooled public data (rounds=N, local-epochs=1)")
    p.add_argument(
        "--norm",
        choices=("batch", "group"),
        default="batch",
        help="batch: the model as built (for runs without DP); group: the DP model's GroupNorm (for dp runs)",
    )
    p.add_argument("--part", help="which backbone of a family with several (e.g. mg.net, des); default the first")
    p.add_argument(
        "--model-out",
        help="also write the whole network, heads included, as MODEL_OUT/checkpoints/final.pt: "
        "start a run from it with simulate --init-checkpoint",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    _add_run_config_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="generate simulated hospitals, ingest and check each, print a per-site report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=40, help="patients per site")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="launch a federated run on a deployed federation and watch it per round and site")
    p.add_argument("federation", help="connection name in $FLWR_HOME/config.toml (written by `fedbreast server start`)")
    p.add_argument(
        "--run-dir", help="run directory on the coordinator (default: the SuperLink's STATE/runs/FEDERATION-TIMESTAMP)"
    )
    p.add_argument("--app", help="Flower app folder to submit (default: generated from the installed fedbreast)")
    p.add_argument("--flwr-home", help="Flower config folder (default $FLWR_HOME or ~/.flwr)")
    _add_run_config_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="write a trained model as TorchScript or ONNX plus a model card")
    p.add_argument(
        "checkpoint",
        help="RUN_DIR/checkpoints/{latest,best,final}.pt, or a run directory (the model its report scores: model-selection)",
    )
    p.add_argument("--out", required=True, help="folder for the model file and model_card.md/.json")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.set_defaults(func=cmd_export)

    release = sub.add_parser("release", help="coordinator: publish what sites approve").add_subparsers(
        dest="release_command", required=True
    )
    p = release.add_parser(
        "hash", help="print the sha256 of the app bundle `fedbreast run` submits; sites pin it in [policy] app-hashes"
    )
    p.add_argument("--app", help="Flower app folder (default: the one generated from the installed fedbreast)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_release_hash)

    server = sub.add_parser("server", help="coordinator commands").add_subparsers(dest="server_command", required=True)
    p = server.add_parser("start", help="start the SuperLink: TLS + site authentication, persistent state, /metrics")
    p.add_argument(
        "--state-dir",
        default="fedbreast-server",
        help="SuperLink database, run directories (default ./fedbreast-server)",
    )
    p.add_argument(
        "--tls-dir", help="folder with ca.crt, server.crt, server.key (deploy/tls/provision.sh; default STATE/tls)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to accept remote sites")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--federation", default="fedbreast", help="connection name written to $FLWR_HOME/config.toml")
    p.add_argument(
        "--connect-address",
        help="HOST:PORT written to that connection (default: this machine's address of the "
        "SuperLink); must be a name in the server certificate",
    )
    p.add_argument("--flwr-home", help="Flower config folder (default $FLWR_HOME or ~/.flwr)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus endpoint port; 0 turns it off")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication: closed test networks only")
    p.set_defaults(func=cmd_server_start)

    site = sub.add_parser("site", help="hospital-site data commands").add_subparsers(dest="site_command", required=True)

    p = site.add_parser(
        "start", help="the site daemon: preflight, then a supervised SuperNode with /metrics and /healthz"
    )
    p.add_argument("config", help="site TOML (deploy/site.example.toml)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site key: closed test networks only")
    p.add_argument("--max-restarts", type=int, help="give up after this many SuperNode restarts (default: never)")
    p.set_defaults(func=cmd_site_start)

    p = site.add_parser("ingest", help="ingest a DICOM folder into a site manifest")
    p.add_argument("dicom_dir")
    p.add_argument("--annotations", help="annotation CSV (docs/annotations.md)")
    p.add_argument("--out", required=True, help="site directory to write")
    p.add_argument("--site", help="site name (default: the output folder's name)")
    p.add_argument("--config", help="site config TOML with an [ingest] section overriding the header rules")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes reading files (default 2)")
    p.set_defaults(func=cmd_site_ingest)

    p = site.add_parser(
        "predict", help="score every breast (or outlined lesion) at a site with a trained model; --explain for heatmaps"
    )
    p.add_argument("input", help="an ingested site directory, or a DICOM folder (ingested first into OUT/site)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="RUN_DIR/checkpoints/KIND.pt, or a run directory (the model its report scores: model-selection)",
    )
    p.add_argument("--out", required=True, help="output folder: predictions.csv (and site/ for a DICOM folder)")
    p.add_argument(
        "--threshold", type=float, help="operating point (default: the site's validation threshold, else 0.5)"
    )
    p.add_argument("--site", help="site name for a DICOM folder's ingest (default: site); picks its threshold")
    p.add_argument("--workers", type=int, default=2, help="processes reading DICOM files (default 2)")
    p.add_argument(
        "--annotations", help="annotation CSV for a DICOM folder: lesion outlines and BI-RADS (the lesion families)"
    )
    p.add_argument("--personal", action="store_true", help="the site's personalised model of this checkpoint")
    p.add_argument(
        "--explain", action="store_true", help="heatmaps per view: OUT/heatmaps/*.png, heatmaps.csv, pointing game"
    )
    p.add_argument("--dicom", action="store_true", help="with --explain: also a DICOM Secondary Capture per heatmap")
    p.set_defaults(func=cmd_site_predict)

    p = site.add_parser(
        "synthesize",
        help="virtual DES (seed 004's CycleGAN) for every view without one, kept at the site under SITE_DIR/virtual/",
    )
    p.add_argument("site_dir")
    p.add_argument("--checkpoint", required=True, help="a cyclegan run directory or RUN_DIR/checkpoints/KIND.pt")
    p.add_argument("--workers", type=int, default=0, help="processes that preprocess the source images")
    p.add_argument(
        "--all-views",
        action="store_true",
        help="also views with an acquired DES (for --set virtual-des-replace=FRACTION experiments)",
    )
    p.set_defaults(func=cmd_site_synthesize)

    p = site.add_parser(
        "check", help="report incomplete exams, label balance, duplicates, leaks; exit 1 if the site cannot train"
    )
    p.add_argument("site_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_site_check)

    p = site.add_parser(
        "audit", help="what left the site: one row per message the ClientApp sent (from SITE_DIR/audit/audit.jsonl)"
    )
    p.add_argument("site_dir")
    p.add_argument("--json", action="store_true", help="print the raw audit lines (JSONL)")
    p.add_argument("--run", help="only this Flower run id")
    p.add_argument("--last", type=int, help="only the last N messages")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the log's hash chain: exit 0 if intact, 1 naming the first edited, deleted, reordered or torn line",
    )
    p.add_argument(
        "--head", metavar="HASH", help="with --verify: a chain head printed earlier, which must still be in the log"
    )
    p.set_defaults(func=cmd_site_audit)

    p = site.add_parser("generate", help="write simulated hospitals as DICOM files + annotation CSVs")
    p.add_argument("--out", required=True)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=100, help="patients per site")
    p.add_argument("--modalities", choices=MODALITY_SETS, help=MODALITIES_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_site_generate)

    p = site.add_parser(
        "import-cdd-cesm", help="import the public CDD-CESM dataset as a site (or one site per machine)"
    )
    p.add_argument("root")
    p.add_argument("--out", required=True)
    p.add_argument("--split-by-machine", action="store_true")
    p.add_argument("--split-seed", type=int, default=0)
    p.set_defaults(func=cmd_site_import_cdd_cesm)
    return parser


# An OSError of these kinds names the file the operator gave: an expected error, one line.
OPERATOR_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedbreast.shared.errors import FedbreastError

    try:
        return int(args.func(args) or 0)
    except (FedbreastError, *OPERATOR_OS_ERRORS) as exc:
        # Expected errors (a bad config, bad data, a refusal, a missing file): one clear line that
        # names the key or file, no traceback; exit 2, which systemd's RestartPreventExitStatus
        # does not restart. Anything else is a bug: it keeps its traceback (exit 1).
        print(f"fedbreast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
