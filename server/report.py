"""The run report: per-site summary (Markdown + CSV), ROC curves per site, learning curves.

Everything is computed from metrics.jsonl, so a report can be rebuilt for any run
directory after the fact (``write_report``), including one written by an interrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedbreast.server.checkpoints import checkpoint_meta
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.synthesis_report import SYNTHESIS_CSV, synthesis_section
from fedbreast.shared.config import RunConfig
from fedbreast.shared.csv_cells import write_csv
from fedbreast.shared.families import family_of
from fedbreast.shared.metrics import default_bin_edges, pooled_roc_from_histograms

log = logging.getLogger("fedbreast.server")

COLUMNS = (
    ("test_auc", "AUC"),
    ("test_accuracy", "ACC"),
    ("test_sensitivity", "SEN"),
    ("test_specificity", "SPE"),
    ("test_ppv", "PPV"),
    ("test_npv", "NPV"),
    ("test_f1", "F1"),
    ("test_mcc", "MCC"),
    ("test_gmean", "G-mean"),
    ("test_spec_at_sens100", "SPE@SEN100"),
    ("test_brier", "Brier"),
)


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _with_ci(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if lo is None or hi is None:
        return _f(row.get(key))
    return f"{_f(row.get(key))} ({_f(lo)}-{_f(hi)})"


def final_site_rows(store: MetricStore) -> tuple[int, list[dict]]:
    rows = store.rows("evaluate")
    if not rows:
        return 0, []
    last = max(r["round"] for r in rows)
    return last, sorted((r for r in rows if r["round"] == last), key=lambda r: r["site"])


CI_KEYS = ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy", "test_mcc", "test_spec_at_sens100")


def site_table(rows: list[dict], external: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The per-site Markdown table (a held-out site's name marked "(external)")."""
    lines = ["| site | exams | breasts | " + " | ".join(label for _, label in COLUMNS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [_with_ci(r, k) if k in CI_KEYS else _f(r.get(k)) for k, _ in COLUMNS]
        name = f"{r['site']} (external)" if r["site"] in external else r["site"]
        lines.append(f"| {name} | {r.get('test_exams')} | {r.get('test_n')} | " + " | ".join(cells) + " |")
    return lines


def run_mode_of(run_dir: Path) -> dict[str, Any]:
    """What the ServerApp wrote to run_mode.json (evaluation only, held-out sites), or nothing."""
    try:
        mode = json.loads((Path(run_dir) / "run_mode.json").read_text())
    except (OSError, ValueError):
        return {}
    return mode if isinstance(mode, dict) else {}


def chosen_round(run_dir: Path, store: MetricStore, cfg: RunConfig, mode: dict[str, Any], last: int) -> tuple[int, str]:
    """The round whose model the report scores, and the sentence that says which: the evaluated
    checkpoint in an evaluation-only run; else, with ``model-selection = last-round`` (the
    default), the last round; with ``best-val``, the best-validation checkpoint (checkpoints/best,
    chosen by the key metric: seed 001's early stopping) when its round's rows are in
    metrics.jsonl, else the last round, saying why."""
    if mode.get("evaluate_only"):
        ck = mode.get("checkpoint") or {}
        return last, (
            f"Evaluation only of {ck.get('path')} (round {ck.get('round')} of run {ck.get('run_dir')}, "
            f"sha256 {str(ck.get('sha256'))[:16]}): no site trained, no update left a site."
        )
    best = checkpoint_meta(run_dir, "best")
    try:
        best_round: int | None = int(best["round"])
    except (KeyError, TypeError, ValueError):
        best_round = None
    if cfg.model_selection == "last-round":
        beside = (
            f"; the best-validation round, {best_round} ({best.get('key_metric')} = {_f(best.get('key_value'), 4)}), "
            "is in checkpoints/best.pt"
            if best_round is not None and best_round != last
            else ""
        )
        # the model predict / export use; a final round whose evaluation failed has no rows
        final_round = int(checkpoint_meta(run_dir, "final").get("round") or last)
        if final_round != last:
            return last, (
                f"Scores of round {last}'s model: the last round's ({final_round}, checkpoints/final.pt, the model "
                f"the run gives predict and export) has no evaluate rows in metrics.jsonl{beside}."
            )
        return last, (
            f"Scores of the last round's model, round {last} (model-selection = last-round: the model after the "
            f"whole training budget){beside}."
        )
    if best_round is None:
        return last, (
            f"Scores of the last round's model, round {last}: there is no best-validation checkpoint "
            f"({cfg.key_metric} was never defined)."
        )
    if not any(r["round"] == best_round for r in store.rows("evaluate")):
        return last, (
            f"Scores of the last round's model, round {last}: the best-validation checkpoint's round "
            f"{best_round} has no evaluate rows in metrics.jsonl."
        )
    return best_round, (
        f"Scores of the best-validation model, round {best_round} (key metric {best.get('key_metric')} = "
        f"{_f(best.get('key_value'), 4)}; checkpoints/best.pt)"
        + (f"; the last round ({last}) is reported beside it." if best_round != last else ", which is the last round.")
    )


def write_report(
    run_dir: Path, cfg: RunConfig, baselines: dict[str, dict[str, float]] | None = None
) -> dict[str, Path]:
    """Write summary.md, summary.csv, roc.png and learning_curves.png; return their paths."""
    run_dir = Path(run_dir)
    store = MetricStore(run_dir)
    last, last_sites = final_site_rows(store)
    mode = run_mode_of(run_dir)
    chosen, heading = chosen_round(run_dir, store, cfg, mode, last)
    sites = sorted((r for r in store.rows("evaluate") if r["round"] == chosen), key=lambda r: r["site"])
    aggregate: dict[str, Any] = next((r for r in reversed(store.rows("aggregate")) if r["round"] == chosen), {})
    holdout = set(mode.get("holdout_sites") or ())
    failures = [r for r in store.rows("failure")]
    paths = {"markdown": run_dir / "summary.md", "csv": run_dir / "summary.csv"}

    # Site names come from the sites: write_csv neutralises a name that a spreadsheet would run.
    header = (
        ["site", "round", "test_exams", "test_n"] + [k for k, _ in COLUMNS] + [f"test_auc_{b}" for b in ("lo", "hi")]
    )
    if baselines:
        header += ["local_only_test_auc", "pooled_test_auc"]
    extra = [k for k in SIDE_BY_SIDE_CSV if any(k in r for r in sites)]  # personalised / PSFT columns when run
    extra += [k for k in SYNTHESIS_CSV if any(k in r for r in sites)]  # a translator's image quality
    header += extra + ["model", "external"]
    with_op = any("fed_threshold_source" in r for r in sites)  # runs before the federated cut-off have none
    if with_op:  # last, so the columns before keep their places
        header += OPERATING_POINT_CSV
    table: list[list[Any]] = [header]
    scored = [(r, "chosen") for r in sites] + ([(r, "last") for r in last_sites] if last != chosen else [])
    for r, which in scored:
        row = [r["site"], r["round"], r.get("test_exams"), r.get("test_n")] + [r.get(k) for k, _ in COLUMNS]
        row += [r.get("test_auc_lo"), r.get("test_auc_hi")]
        if baselines:
            b = baselines.get(r["site"], {})
            row += [b.get("local"), b.get("pooled")]
        row += [r.get(k) for k in extra]
        row += [which, "yes" if r["site"] in holdout else ""]
        if with_op:
            row += operating_point_cells(r)
        table.append(row)
    write_csv(paths["csv"], table)

    lines = [
        "# fedbreast run report",
        "",
        f"Model {family_of(cfg.model).describe(cfg)}"
        + (f", {cfg.view_fusion} view fusion, " if cfg.model == "multiview" else ", ")
        + (
            "evaluation only (no training)."
            if mode.get("evaluate_only")
            else f"strategy {cfg.strategy}, {last} of {cfg.rounds} rounds."
        ),
        "",
    ]
    lines += [f"**Flag:** {note}." for note in cfg.notes] + ([""] if cfg.notes else [])
    lines += [heading, ""]
    if family_of(cfg.model).synthesises:  # a translator (cyclegan): image quality, no class scores
        lines += synthesis_section(sites, aggregate)
        return _finish(lines, run_dir, store, sites, cfg, failures, paths)
    lines += ["## Global model on each site's test split (95% bootstrap CI)", ""]
    lines += site_table([r for r in sites if r["site"] not in holdout])
    if holdout:
        lines += [
            "",
            f"## External validation: {', '.join(sorted(holdout))} (held out of training, evaluated every round)",
            "",
        ]
        lines += site_table([r for r in sites if r["site"] in holdout])
    thresholds = ", ".join(f"{r['site']} {_f(r.get('test_threshold'))}" for r in sites)
    lines += [
        "",
        f"Weighted mean test AUC {_f(aggregate.get('test_auc'))}; pooled test AUC across sites from score histograms "
        f"{_f(aggregate.get('test_pooled_auc'))} (binning error bound {_f(aggregate.get('test_pooled_auc_binning_bound'), 4)}); "
        f"no per-patient score left any site. Accuracy, SEN, SPE, PPV, NPV, F1, MCC and G-mean are at each site's "
        f"operating point, the score cut-off that maximises Youden's J on its own validation split "
        f"({thresholds}).",
        "",
    ]
    lines += operating_point_section(sites, aggregate, cfg)
    if last != chosen and last_sites:
        last_agg: dict[str, Any] = next((r for r in reversed(store.rows("aggregate")) if r["round"] == last), {})
        lines += [f"## Last round ({last}), for comparison", ""]
        lines += site_table(last_sites, external=holdout)
        lines += [
            "",
            f"Last round: {cfg.key_metric} {_f(last_agg.get(cfg.key_metric))}, weighted mean test AUC "
            f"{_f(last_agg.get('test_auc'))}, pooled test AUC {_f(last_agg.get('test_pooled_auc'))}.",
            "",
        ]
    if baselines:
        lines += [
            "## Federated vs local-only vs pooled (test AUC, same budget)",
            "",
            "| site | federated | local-only | pooled |",
            "|---|---|---|---|",
        ]
        for r in sites:
            b = baselines.get(r["site"], {})
            lines.append(f"| {r['site']} | {_f(r.get('test_auc'))} | {_f(b.get('local'))} | {_f(b.get('pooled'))} |")
        everyone = next((v for k, v in baselines.items() if k not in {r["site"] for r in sites}), None)
        if everyone:  # simulation/baselines.py ALL_SITES: every site's test units together
            lines.append(
                f"| all test units pooled | {_f(aggregate.get('test_pooled_auc'))} | {_f(everyone.get('local'))} "
                f"| {_f(everyone.get('pooled'))} |"
            )
        lines.append("")
    lines += personal_sections(run_dir, sites)
    return _finish(lines, run_dir, store, sites, cfg, failures, paths)


def _finish(
    lines: list[str],
    run_dir: Path,
    store: MetricStore,
    sites: list[dict],
    cfg: RunConfig,
    failures: list[dict],
    paths: dict[str, Path],
) -> dict[str, Path]:
    """The report's end, whatever the family: sites left out, the file list, the plots."""
    if failures:
        lines += ["## Sites left out of a round", "", "| round | site | stage | reason |", "|---|---|---|---|"]
        # A reason may quote a site's own words (its "unable" reason): a '|' would split the row.
        lines += [
            f"| {f['round']} | {f['site']} | {f.get('stage')} | {str(f.get('reason')).replace('|', chr(92) + '|')} |"
            for f in failures
        ]
        lines.append("")
    lines += round_time_section(store)
    lines += [
        "Files: `metrics.jsonl` (round x site), `summary.csv`, `roc.png`, `learning_curves.png`, `checkpoints/`.",
        "",
    ]
    paths["markdown"].write_text("\n".join(lines))
    paths.update(_plots(run_dir, store, sites, cfg))
    return paths


def round_time_section(store: MetricStore) -> list[str]:
    """Per round: the wall time, the slowest site's train and evaluate (each site's own measure),
    and the overhead, the rest of the wall time. Rows of runs before the overhead was recorded
    are left out."""
    rows = [r for r in store.rows("round") if isinstance(r.get("overhead_seconds"), (int, float))]
    if not rows:
        return []
    lines = [
        "## Round time",
        "",
        "| round | wall s | slowest train s | slowest evaluate s | overhead s | overhead | load (1 min) / CPUs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {_f(r.get('seconds'), 2)} | {_f(r.get('slowest_train_seconds'), 2)} "
            f"| {_f(r.get('slowest_evaluate_seconds'), 2)} | {_f(r.get('overhead_seconds'), 2)} "
            f"| {_pct(r.get('overhead_fraction'))} | {_f(r.get('load_1m'), 1)} / {r.get('cpus', 'n/a')} |"
        )
    wall = sum(float(r.get("seconds") or 0.0) for r in rows)
    overhead = sum(float(r.get("overhead_seconds") or 0.0) for r in rows)
    lines += [
        "",
        f"All rounds: {wall:.1f} s, overhead {overhead:.1f} s ({_pct(overhead / wall if wall > 0 else None)}). "
        "The overhead is the round's wall time less the slowest site's train and the slowest site's "
        "evaluate: messages, serialisation, aggregation, the checkpoint hand-off, and any site that waited "
        "for a worker. Sites work at once on the Ray engine and in a deployment; with `--engine inprocess` "
        "they take turns, so there the overhead also holds the other sites' time. The load is the coordinator "
        "machine's (in a simulation, the sites' too): above its CPU count, the sites' own times grow with it.",
        "",
    ]
    return lines


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.1f}%"


def _plots(run_dir: Path, store: MetricStore, sites: list[dict], cfg: RunConfig) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in sites:
        pos, neg = r.get("test_hist_pos"), r.get("test_hist_neg")
        if pos and neg and sum(pos) and sum(neg):
            # A site may send fewer bins than hist-bins (a divisor: its policy caps them): the
            # default edges of its own resolution (shared/metrics/histogram.py coarsen).
            try:
                edges = list(default_bin_edges(len(pos)))
                fpr, tpr = pooled_roc_from_histograms([{"hist_edges": edges, "hist_pos": pos, "hist_neg": neg}])
            except ValueError as exc:  # a one-bin histogram, or rows of an older run: no curve, said so
                log.warning("report: no ROC curve for site %s: %s", r["site"], exc)
                continue
            ax.plot(fpr, tpr, label=f"{r['site']} (AUC {_f(r.get('test_auc'))})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Test ROC per site (global model)")
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = run_dir / "roc.png"
    fig.savefig(out["roc"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    by_site: dict[str, list[dict]] = {}
    for r in store.rows("evaluate"):
        by_site.setdefault(r["site"], []).append(r)
    for site, rows in sorted(by_site.items()):
        a1.plot(
            [r["round"] for r in rows],
            [r.get("val_auc") if r.get("val_auc") is not None else float("nan") for r in rows],
            marker="o",
            label=site,
        )
    train: dict[str, list[dict]] = {}
    for r in store.rows("train"):
        train.setdefault(r["site"], []).append(r)
    for site, rows in sorted(train.items()):
        a2.plot([r["round"] for r in rows], [r.get("train_loss") for r in rows], marker="o", label=site)
    a1.set(xlabel="round", ylabel="validation AUC", title="Validation AUC per site")
    a2.set(xlabel="round", ylabel="training loss", title="Local training loss per site")
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:  # an evaluation-only run has no training curve
            a.legend(fontsize=8)
    out["learning_curves"] = run_dir / "learning_curves.png"
    fig.savefig(out["learning_curves"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# ---- operating points: each site's own cut-off or the federated one (issue 17 item 6) ----------

OP_METRICS = (
    ("sensitivity", "SEN"),
    ("specificity", "SPE"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("accuracy", "ACC"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("gmean", "G-mean"),
)
OPERATING_POINT_CSV = [
    "threshold_source",
    "threshold_used",
    *(f"used_test_{k}" for k, _ in OP_METRICS),
    "local_threshold",
    "federated_threshold",
    "threshold_reason",
]


def used_metrics(r: dict) -> dict[str, Any]:
    """A site's thresholded test metrics at the cut-off the report uses for it: its own (the
    site's ``test_*``) or the federated one (the coordinator's ``fed_test_*``, server/phases.py)."""
    federated = r.get("fed_threshold_source") == "federated"
    return {k: r.get(f"fed_test_{k}" if federated else f"test_{k}") for k, _ in OP_METRICS}


def operating_point_cells(r: dict) -> list[Any]:
    used = used_metrics(r)
    return [
        r.get("fed_threshold_source"),
        r.get("fed_threshold_used"),
        *(used[k] for k, _ in OP_METRICS),
        r.get("test_threshold"),
        r.get("fed_threshold"),
        r.get("fed_threshold_reason"),
    ]


def operating_point_section(sites: list[dict], aggregate: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Per site: which cut-off was used (its own, or the federated one), its value and the test
    metrics at it; then the federated cut-off and how it was chosen. Nothing for an older run."""
    rows = [r for r in sites if "fed_threshold_source" in r]
    if not rows:
        return []
    head = " | ".join(label for _, label in OP_METRICS)
    lines = [
        "## Operating point per site (test split)",
        "",
        f"| site | cut-off used | value | {head} | own cut-off | federated cut-off | why |",
        "|---|---|---|" + "---|" * len(OP_METRICS) + "---|---|---|",
    ]
    for r in rows:
        used = used_metrics(r)
        cells = " | ".join(_f(used[k]) for k, _ in OP_METRICS)
        why = str(r.get("fed_threshold_reason") or "").replace("|", chr(92) + "|")
        lines.append(
            f"| {r['site']} | {r.get('fed_threshold_source')} | {_f(r.get('fed_threshold_used'), 4)} | {cells} | "
            f"{_f(r.get('test_threshold'), 4)} | {_f(r.get('fed_threshold'), 4)} | {why} |"
        )
    lines.append("")
    if aggregate.get("fed_threshold") is not None:
        lines.append(
            f"Federated cut-off {_f(aggregate.get('fed_threshold'), 4)}: the bin edge that maximises Youden's J "
            f"({_f(aggregate.get('fed_threshold_youden_j'))}) on the validation histograms of "
            f"{aggregate.get('fed_threshold_val_sites')} site(s) summed by the coordinator "
            f"({aggregate.get('fed_threshold_val_n_pos')} malignant, {aggregate.get('fed_threshold_val_n_neg')} benign "
            f"units, {aggregate.get('fed_threshold_bins')} bins); each site's metrics at it come from its own test "
            "histogram, exact at a bin edge. No per-patient score left any site."
        )
    else:
        why = aggregate.get("fed_threshold_unavailable") or "no validation histograms"
        lines.append(f"No federated cut-off this round: {str(why).replace('|', chr(92) + '|')}.")
    n = cfg.min_val_for_local_threshold
    lines += [
        f"A site's own cut-off (Youden's J on its validation split) is used when that split holds at least {n} "
        f"units and {-(-n // 4)} of each class (min-val-for-local-threshold); else the federated one.",
        "",
    ]
    return lines


# ---- personalisation, patient-specific fine-tuning, cross-site (issue 4) ----------------------

SIDE_BY_SIDE = (
    ("auc", "AUC"),
    ("spec_at_sens100", "SPE@SEN100"),
    ("sensitivity", "SEN"),
    ("specificity", "SPE"),
    ("mcc", "MCC"),
)
SIDE_BY_SIDE_CSV = tuple(f"test_{k}{s}" for s in ("_personal", "_psft") for k, _ in SIDE_BY_SIDE) + (
    "test_psft_patients",
    "test_psft_skipped_patients",
    "test_psft_seconds_per_patient",
)


def personal_sections(run_dir: Path, sites: list[dict]) -> list[str]:
    """Global vs personalised model and without vs with patient-specific fine-tuning, per site,
    side by side; then the cross-site matrix when the run wrote one."""
    lines: list[str] = []
    for suffix, title, names in (
        ("_personal", "Global vs personalised model on each site's test split", ("global", "personalised")),
        ("_psft", "Without vs with patient-specific fine-tuning (test split)", ("without", "with")),
    ):
        rows = [r for r in sites if f"test_auc{suffix}" in r]
        if not rows:
            continue
        head = " | ".join(f"{label} {n}" for _, label in SIDE_BY_SIDE for n in names)
        lines += [f"## {title}", "", f"| site | {head} |", "|---|" + "---|" * (2 * len(SIDE_BY_SIDE))]
        for r in rows:
            cells = " | ".join(f"{_f(r.get(f'test_{k}'))} | {_f(r.get(f'test_{k}{suffix}'))}" for k, _ in SIDE_BY_SIDE)
            lines.append(f"| {r['site']} | {cells} |")
        if suffix == "_psft":
            lines += [
                "",
                "Patients fine-tuned / skipped (no normal tissue), s per patient: "
                + "; ".join(
                    f"{r['site']} {r.get('test_psft_patients')} / {r.get('test_psft_skipped_patients')}, "
                    f"{_f(r.get('test_psft_seconds_per_patient'))} s"
                    for r in rows
                ),
            ]
        lines.append("")
    matrix = Path(run_dir) / "cross_site.md"
    if matrix.exists():
        lines += matrix.read_text().splitlines() + [""]
    return lines
