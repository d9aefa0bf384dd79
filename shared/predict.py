"""``fedbreast site predict``: score every unit (breast) of every exam at a site with a trained
model and write ``predictions.csv``, which holds the site's own local pseudonymous ids and never
leaves the site.

The input is an ingested site directory, or a DICOM folder of new studies, ingested first into
``OUT/site`` with the normal ingest (same rules, its rejected-file report stays there). The
operating point is ``--threshold``, else the site's own validation threshold at the checkpoint's
round from the run's ``metrics.jsonl``, else 0.5 (and the summary says which).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbreast.shared.errors import FedbreastError

PREDICT_FAMILIES = ("multiview",)
COLUMNS = ("patient", "exam", "laterality", "unit", "score", "decision", "threshold", "missing_views")


class PredictError(FedbreastError, ValueError):
    """Predict cannot run: an unsupported family, an input that is no site or DICOM folder."""


@dataclass
class PredictResult:
    csv: Path
    site_dir: Path
    rows: int
    scored: int
    positives: int
    threshold: float
    threshold_source: str
    seconds: float
    device: str

    def summary(self) -> str:
        unscored = self.rows - self.scored
        return "\n".join(
            [
                f"site: {self.site_dir}",
                f"threshold {self.threshold:g} ({self.threshold_source})",
                f"{self.rows} rows ({self.scored} scored" + (f", {unscored} not scored" if unscored else "") + ")"
                f", {self.positives} positive at the threshold, {self.seconds:.1f} s on {self.device}",
                f"predictions: {self.csv}",
            ]
        )


def site_threshold(run_dir: Path | None, site: str, server_round: int) -> float | None:
    """The site's validation threshold at the latest evaluate round up to ``server_round`` in
    the run's metrics.jsonl; None when the run did not record one for this site."""
    path = None if run_dir is None else run_dir / "metrics.jsonl"
    if path is None or not path.exists():
        return None
    best: tuple[int, float] | None = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("phase") != "evaluate" or row.get("site") != site:
            continue
        rnd, t = row.get("round"), row.get("val_threshold")
        if not isinstance(rnd, int) or rnd > server_round or not isinstance(t, int | float) or not math.isfinite(t):
            continue
        if best is None or rnd >= best[0]:
            best = (rnd, float(t))
    return None if best is None else best[1]


def predict_site(
    input_dir: Path,
    ckpt: Any,
    run_dir: Path | None,
    out: Path,
    threshold: float | None = None,
    workers: int = 2,
    site: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PredictResult:
    """Score ``input_dir`` (site dir or DICOM folder) with checkpoint ``ckpt``; write ``out/predictions.csv``."""
    import numpy as np
    import torch

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.csv_cells import write_csv
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.local import pick_device
    from fedbreast.shared.training.tasks import read_meta, task_for

    t0 = time.perf_counter()
    cfg = RunConfig.from_flower(dict(ckpt.meta.get("config", {})))
    if cfg.model not in PREDICT_FAMILIES:
        raise PredictError(
            f"not yet: predict supports {', '.join(PREDICT_FAMILIES)}; this checkpoint's family is {cfg.model!r}"
        )
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise PredictError(f"--threshold must be in [0, 1], got {threshold}")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PredictError(f"{input_dir}: no such site directory or DICOM folder")
    out.mkdir(parents=True, exist_ok=True)
    if (input_dir / "manifest.jsonl").exists() or (input_dir / "site.json").exists():
        site_dir = input_dir
    else:
        from fedbreast.shared.data.ingest import ingest

        site_dir = out / "site"
        ingest(input_dir, site_dir, site=site, workers=workers, progress=progress)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()}, strict=True)
    rows = task_for(cfg).score(model, site_dir, cfg, device)

    name = str(read_meta(site_dir).get("site") or site_dir.name)
    source = "--threshold"
    if threshold is None:
        threshold = site_threshold(run_dir, name, ckpt.round)
        source = f"site {name}'s validation threshold at round {ckpt.round}"
        if threshold is None:
            threshold, source = 0.5, f"default 0.5: the run recorded no validation threshold for site {name!r}"
    table: list[list[object]] = [list(COLUMNS)]
    positives = scored = 0
    for r in rows:
        if r.score is None:
            decision: object = f"not scored: {r.note}"
        else:
            scored += 1
            decision = int(r.score >= threshold)
            positives += int(decision)
        score = "" if r.score is None else f"{r.score:.6f}"
        table.append([r.patient, r.exam, r.laterality, r.unit, score, decision, threshold, ";".join(r.missing_views)])
    csv = out / "predictions.csv"
    write_csv(csv, table, mode=0o600)  # local ids: readable by the site's operator only
    return PredictResult(
        csv=csv,
        site_dir=site_dir,
        rows=len(rows),
        scored=scored,
        positives=positives,
        threshold=threshold,
        threshold_source=source,
        seconds=time.perf_counter() - t0,
        device=str(device),
    )


__all__: list[str] = ["COLUMNS", "PredictError", "PredictResult", "predict_site", "site_threshold"]
