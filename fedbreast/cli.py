"""The ``fedbreast`` command line. Heavy imports (torch, flwr) happen inside commands so
``fedbreast --help`` and the site data commands start fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def cmd_site_check(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.check import check_site

    result = check_site(args.site_dir)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0 if result.can_train else 1


def cmd_site_generate(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.generate import generate_federation

    summaries = generate_federation(Path(args.out), n_sites=args.sites, patients_per_site=args.patients, seed=args.seed)
    for s in summaries:
        print(
            f"{s.name}: {s.n_patients} patients, {s.n_images} images, {s.n_malignant_breasts} malignant breasts, "
            f"modalities {s.modalities}, oracle AUC {s.oracle_auc:.3f} -> {s.path}"
        )
    print(f"next: fedbreast site ingest {Path(args.out) / 'site-1' / 'dicom'} --annotations "
          f"{Path(args.out) / 'site-1' / 'annotations.csv'} --out SITE_DIR")
    return 0


def cmd_site_import_cdd_cesm(args: argparse.Namespace) -> int:
    from fedbreast.shared.data.cdd_cesm import import_cdd_cesm

    report = import_cdd_cesm(Path(args.root), Path(args.out), split_by_machine=args.split_by_machine, seed=args.split_seed)
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
    for flag, key in (("rounds", "rounds"), ("backbone", "backbone"), ("view_fusion", "view-fusion"), ("strategy", "strategy")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    if args.image_size:
        try:
            h, w = args.image_size.lower().split("x")
        except ValueError:
            raise ConfigError(f"--image-size {args.image_size!r}: expected HxW, e.g. 256x128") from None
        raw["image-h"], raw["image-w"] = h, w
    parsed = RunConfig.from_flower(raw)  # validates keys and values; only the given keys are kept
    return {name: getattr(parsed, name) for name in (k.replace("-", "_") for k in raw)}


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbreast.simulation.simulate import simulate

    overrides = _parse_overrides(args)
    simulate(Path(args.out), sites=args.sites, patients=args.patients, seed=args.seed, baselines=args.baselines,
             overrides=overrides, data_dir=Path(args.data) if args.data else None,
             sites_dir=Path(args.sites_dir) if args.sites_dir else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbreast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="the main job: a federated run on generated hospitals, ending in a per-site report")
    p.add_argument("--out", default="runs/simulate", help="run directory (config, metrics.jsonl, report, checkpoints)")
    p.add_argument("--data", help="where generated and ingested sites live (default: next to the run directory)")
    p.add_argument("--sites-dir", help="run on these already-ingested site directories (one folder per site) instead of generated ones")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=80, help="patients per site (sites differ in size around this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int)
    p.add_argument("--backbone")
    p.add_argument("--view-fusion", choices=["average", "concat"])
    p.add_argument("--strategy")
    p.add_argument("--image-size", help="HxW per view, e.g. 256x128")
    p.add_argument("--baselines", action="store_true", help="also train local-only and pooled models with the same budget")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key, e.g. --set local-epochs=2")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="generate simulated hospitals, ingest and check each, print a per-site report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=40, help="patients per site")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    site = sub.add_parser("site", help="hospital-site data commands").add_subparsers(dest="site_command", required=True)

    p = site.add_parser("ingest", help="ingest a DICOM folder into a site manifest")
    p.add_argument("dicom_dir")
    p.add_argument("--annotations", help="annotation CSV (docs/annotations.md)")
    p.add_argument("--out", required=True, help="site directory to write")
    p.add_argument("--site", help="site name (default: the output folder's name)")
    p.add_argument("--config", help="site config TOML with an [ingest] section overriding the header rules")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes reading files (default 2)")
    p.set_defaults(func=cmd_site_ingest)

    p = site.add_parser("check", help="report incomplete exams, label balance, duplicates, leaks; exit 1 if the site cannot train")
    p.add_argument("site_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_site_check)

    p = site.add_parser("generate", help="write simulated hospitals as DICOM files + annotation CSVs")
    p.add_argument("--out", required=True)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=100, help="patients per site")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_site_generate)

    p = site.add_parser("import-cdd-cesm", help="import the public CDD-CESM dataset as a site (or one site per machine)")
    p.add_argument("root")
    p.add_argument("--out", required=True)
    p.add_argument("--split-by-machine", action="store_true")
    p.add_argument("--split-seed", type=int, default=0)
    p.set_defaults(func=cmd_site_import_cdd_cesm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedbreast.shared.data.manifest import ManifestError
    from fedbreast.shared.data.rules import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ManifestError, FileNotFoundError, ValueError, RuntimeError) as exc:
        # Expected operator errors: one clear line, no traceback.
        print(f"fedbreast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
