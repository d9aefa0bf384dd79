"""The cross-site evaluation matrix: each site's personalised model and the global model,
evaluated on every site's test split, run once after the last round (``cross-site = true``).

Two waves over the run's exchange (server/exchange.py; timeouts, "unable" replies and failures are
handled and recorded like any round's):

1. ``query.personal`` carries the final global weights; each site answers with its
   personalised model (reused from its disk, or fine-tuned now). Model weights are the
   only thing that leaves, as in training.
2. ``evaluate.cross_site`` carries every model (global first) in one message per site;
   each site evaluates them on its own test split and answers with aggregate metrics per
   model, so no image or score leaves any site.

The result goes to metrics.jsonl (phase "cross-site", one row per evaluating site and
model) and to ``cross_site.md`` / ``cross_site.csv`` (test site x model AUC).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedbreast.server.exchange import RoundOutcome, to_record
from fedbreast.server.metric_store import MetricStore
from fedbreast.server.phases import RunState
from fedbreast.server.validation import check_update
from fedbreast.shared import protocol
from fedbreast.shared.csv_cells import write_csv
from fedbreast.shared.training.personalise import CROSS_SITE_KEYS, model_slot

COLLECT_TYPE = "query.personal"
EVALUATE_TYPE = "evaluate.cross_site"
PHASE = "cross-site"
MATRIX_KEYS = CROSS_SITE_KEYS  # per model, a site's cross_site reply carries m{i}_{key}
GLOBAL = "global"


def personal_name(site: str) -> str:
    return f"{site} personal"


class CrossSite:
    """The phase after the last round (``cross-site = true``): collect the personalised models,
    evaluate every model at every site, write the table."""

    def __call__(self, state: RunState, server_round: int, outcome: RoundOutcome) -> None:
        run_cross_site(state, server_round, outcome)


def run_cross_site(state: RunState, server_round: int, outcome: RoundOutcome) -> dict[str, Path]:
    exchange = state.exchange
    nodes = list(exchange.grid.get_node_ids())
    content = protocol.instruction(server_round, to_record(state.arrays))
    ask = [Message(content, dst_node_id=n, message_type=COLLECT_TYPE) for n in nodes]
    models: list[tuple[str, dict[str, np.ndarray]]] = [(GLOBAL, state.arrays)]
    collected = exchange.wave(ask, "cross-site collect", server_round, outcome, carries_model=True)
    for r in sorted(collected, key=lambda r: r.site):
        problem = check_update(r.site, r.arrays, state.arrays) if r.arrays is not None else None
        if r.arrays is None or problem is not None:
            why = problem.reason if problem is not None else "reply carried no model arrays"
            exchange.record_failure(
                outcome, server_round, "cross-site collect", r.node_id, f"personal model dropped: {why}"
            )
            continue
        models.append((personal_name(r.site), r.arrays))
    names = [name for name, _ in models]
    state.echo(f"cross-site: evaluating {len(models)} models ({', '.join(names)}) on {len(nodes)} sites")
    records: dict[str, Any] = {model_slot(i): to_record(a) for i, (_, a) in enumerate(models)}
    records[protocol.CONFIG] = ConfigRecord({protocol.SERVER_ROUND: server_round, "models": names})
    payload = RecordDict(records)
    send = [Message(payload, dst_node_id=n, message_type=EVALUATE_TYPE) for n in nodes]
    # A reply holds MATRIX_KEYS per model on top of the usual metrics (checked on arrival).
    matrix_values = len(names) * len(MATRIX_KEYS)
    for r in exchange.wave(send, "cross-site evaluate", server_round, outcome, extra_values=matrix_values):
        for i, name in enumerate(names):
            values = {k: r.metrics.get(f"m{i}_{k}") for k in MATRIX_KEYS}
            state.store.append(server_round, PHASE, r.site, {"model": name, **values})
    run_dir = state.store.run_dir
    paths = write_cross_site(run_dir)
    state.echo(f"cross-site matrix: {paths['markdown']}")
    return paths


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def cross_site_table(run_dir: Path) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """(test sites, models with the global first, (site, model) -> metrics) from metrics.jsonl."""
    rows = MetricStore(Path(run_dir)).rows(PHASE)
    if rows:
        last = max(r["round"] for r in rows)
        rows = [r for r in rows if r["round"] == last]
    cells = {(r["site"], r["model"]): r for r in rows}
    sites = sorted({r["site"] for r in rows})
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != GLOBAL, m))
    return sites, models, cells


def write_cross_site(run_dir: Path) -> dict[str, Path]:
    """cross_site.csv (one row per test site, one AUC column per model) and cross_site.md."""
    run_dir = Path(run_dir)
    sites, models, cells = cross_site_table(run_dir)
    paths = {"csv": run_dir / "cross_site.csv", "markdown": run_dir / "cross_site.md"}
    # Site and model names come from the sites: write_csv neutralises one a spreadsheet would run.
    table: list[list[Any]] = [["test_site", "test_n"] + [f"auc[{m}]" for m in models]]
    for s in sites:
        n = next((cells[(s, m)].get("test_n") for m in models if (s, m) in cells), None)
        table.append([s, n] + [cells.get((s, m), {}).get("test_auc") for m in models])
    write_csv(paths["csv"], table)
    paths["markdown"].write_text("\n".join(matrix_markdown(sites, models, cells)) + "\n")
    return paths


def matrix_markdown(sites: list[str], models: list[str], cells: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    if not sites:
        return ["No cross-site evaluation results."]
    lines = [
        "## Cross-site evaluation (test AUC; rows: the site whose test split, columns: the model)",
        "",
        "| test site | breasts | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for s in sites:
        n = next((cells[(s, m)].get("test_n") for m in models if (s, m) in cells), None)
        own = personal_name(s)
        row = []
        for m in models:
            v = _f(cells.get((s, m), {}).get("test_auc"))
            row.append(f"**{v}**" if m == own else v)
        lines.append(f"| {s} | {n if n is not None else 'n/a'} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Bold: a site's personalised model on its own test split. Each site evaluated every model on its own data; "
        "only these aggregate metrics left the sites.",
        "",
    ]
    return lines
