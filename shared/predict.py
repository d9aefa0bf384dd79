"""``fedbreast site predict``: score every unit (a breast, or a breast's outlined lesion) of
every exam at a site with a trained model and write ``predictions.csv``, which holds the site's
own local pseudonymous ids and never leaves the site.

The input is an ingested site directory, or a DICOM folder of new studies, ingested first into
``OUT/site`` with the normal ingest (same rules, its rejected-file report stays there; an
annotation CSV, when given, brings lesion outlines and BI-RADS descriptors, which the lesion
families need). The operating point is ``--threshold``, else the site's own validation threshold
at the checkpoint's round from the run's ``metrics.jsonl``, else 0.5 (and the summary says which).

``--personal`` scores with the site's personalised model of this checkpoint (the one the site
fine-tuned from exactly these global weights); a FedBN run always uses the site's own
normalisation layers. ``--explain`` writes a heatmap per view of every scored unit (PNG
overlays, ``heatmaps.csv``, and with ``--dicom`` a DICOM Secondary Capture each) and, where the
annotations outline lesions, how often the heatmaps point at them (``explain_summary.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbreast.shared.errors import FedbreastError

HEATMAP_COLUMNS = (
    "patient",
    "exam",
    "laterality",
    "unit",
    "view",
    "method",
    "score",
    "peak_row",
    "peak_col",
    "png",
    "dicom",
)
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
    model_source: str = "global model"
    heatmaps: int = 0
    pointing: dict[str, Any] | None = None
    explain_seconds: float = 0.0

    def summary(self) -> str:
        unscored = self.rows - self.scored
        return "\n".join(
            [
                f"site: {self.site_dir}",
                f"threshold {self.threshold:g} ({self.threshold_source})",
                f"{self.rows} rows ({self.scored} scored" + (f", {unscored} not scored" if unscored else "") + ")"
                f", {self.positives} positive at the threshold, {self.seconds:.1f} s on {self.device}",
                f"model: {self.model_source}",
                f"predictions: {self.csv}",
            ]
            + (
                [f"heatmaps: {self.heatmaps} in {self.csv.parent / 'heatmaps'} ({self.explain_seconds:.1f} s)"]
                if self.heatmaps
                else []
            )
            + ([_pointing_line(self.pointing)] if self.pointing and self.pointing.get("images") else [])
        )


def _pointing_line(p: dict[str, Any]) -> str:
    return (
        f"pointing game on {p['images']} outlined lesion images: hit rate {p['hit_rate']:.2f} "
        f"(random heatmap {p['random_hit_rate']:.2f}), energy inside {p['energy_inside']:.2f} "
        f"(random {p['random_energy_inside']:.2f})"
    )


def site_threshold(run_dir: Path | None, site: str, server_round: int) -> float | None:
    """The site's operating point at the latest evaluate round up to ``server_round`` in the
    run's metrics.jsonl, the one the run's report used for it: the federated cut-off where the
    site's validation split was too small for its own (``fed_threshold_used``, docs/evaluate.md
    "Operating points"), else its own validation threshold; None when the run recorded neither."""
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
        rnd, t = row.get("round"), row.get("fed_threshold_used", row.get("val_threshold"))
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
    annotations: Path | None = None,
    personal: bool = False,
    explain: bool = False,
    dicom: bool = False,
) -> PredictResult:
    """Score ``input_dir`` (site dir or DICOM folder) with checkpoint ``ckpt``; write ``out/predictions.csv``."""
    import torch

    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.csv_cells import write_csv
    from fedbreast.shared.training.local import pick_device
    from fedbreast.shared.training.tasks import read_meta, task_for

    t0 = time.perf_counter()
    cfg = RunConfig.from_flower(dict(ckpt.meta.get("config", {})))
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise PredictError(f"--threshold must be in [0, 1], got {threshold}")
    if dicom and not explain:
        raise PredictError("--dicom writes the heatmaps as DICOM: it needs --explain")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PredictError(f"{input_dir}: no such site directory or DICOM folder")
    if annotations is not None and not Path(annotations).is_file():
        raise PredictError(f"--annotations {annotations}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    if (input_dir / "manifest.jsonl").exists() or (input_dir / "site.json").exists():
        if annotations is not None:
            raise PredictError(f"{input_dir} is an ingested site: its annotations were joined at ingest")
        site_dir = input_dir
    else:
        from fedbreast.shared.data.ingest import ingest

        site_dir = out / "site"
        ingest(input_dir, site_dir, annotations=annotations, site=site, workers=workers, progress=progress)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model, model_source = _site_model(ckpt, cfg, site_dir, personal)
    task = task_for(cfg)
    try:
        rows = task.score(model, site_dir, cfg, device)
    except NotImplementedError as exc:  # a family that has not written its score() yet
        raise PredictError(str(exc)) from exc

    name = str(read_meta(site_dir).get("site") or site_dir.name)
    source = "--threshold"
    if threshold is None:
        threshold = site_threshold(run_dir, name, ckpt.round)
        source = f"site {name}'s operating point at round {ckpt.round}, as the run's report used it"
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
    result = PredictResult(
        csv=csv,
        site_dir=site_dir,
        rows=len(rows),
        scored=scored,
        positives=positives,
        threshold=threshold,
        threshold_source=source,
        seconds=0.0,
        device=str(device),
        model_source=model_source,
    )
    if explain:
        t1 = time.perf_counter()
        # A heatmap carries its unit's score as predictions.csv has it (the CAM's own forward pass
        # runs in float32, the scoring pass in the run's precision, which may be bf16).
        by_unit = {(r.patient, r.exam, r.laterality): r.score for r in rows}
        try:
            heatmaps = (
                dataclasses.replace(hm, score=by_unit.get((hm.patient, hm.exam, hm.laterality), hm.score))
                for hm in task.explain(model, site_dir, cfg, device)
            )
            result.heatmaps, result.pointing = write_heatmaps(heatmaps, out, dicom)
        except NotImplementedError as exc:  # a family that has not written its explain() yet
            raise PredictError(str(exc)) from exc
        result.explain_seconds = time.perf_counter() - t1
    result.seconds = time.perf_counter() - t0
    return result


def _site_model(ckpt: Any, cfg: Any, site_dir: Path, personal: bool) -> tuple[Any, str]:
    """The checkpoint's model as this site uses it: the global weights; under FedBN with the
    site's own normalisation layers; with ``personal`` the site's personalised model."""
    import numpy as np
    import torch

    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.personalise import find_personal_state, norm_state_keys, state_digest

    # Built on the meta device and given the checkpoint's tensors: no random initialisation to
    # throw away (a tenth of a second for a ResNet-18, a fixed cost on every predict).
    with torch.device("meta"):
        model = build_model(cfg)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    if not (personal or cfg.fedbn):
        return model, f"global model, round {ckpt.round}"
    found = find_personal_state(site_dir, state_digest(model.state_dict()))
    why = "--personal" if personal else "this FedBN run keeps normalisation layers at the sites, so"
    if found is None:
        raise PredictError(
            f"{why} needs this site's personal state made from this checkpoint's weights (round {ckpt.round}); "
            f"none under {site_dir / 'state' / 'personal'} matches. The site stores one per run, from the last "
            "global model it evaluated: use that run's final checkpoint, or train with personal-epochs > 0"
        )
    path, state = found
    try:
        if personal:
            if "personal" not in state:
                raise PredictError(f"--personal: {path} holds no personal model (the run had personal-epochs = 0)")
            model.load_state_dict(state["personal"], strict=True)
            return model, f"personal model of this site ({path.name}, fine-tuned from round {ckpt.round})"
        keys = set(norm_state_keys(model))
        model.load_state_dict({**model.state_dict(), **{k: v for k, v in state.get("norms", {}).items() if k in keys}})
        return model, f"global model, round {ckpt.round}, with this site's normalisation layers (FedBN, {path.name})"
    except (RuntimeError, ValueError) as exc:
        raise PredictError(f"{path}: the stored model does not fit this checkpoint's network: {exc}") from exc


def write_heatmaps(heatmaps: Iterable[Any], out: Path, dicom: bool) -> tuple[int, dict[str, Any]]:
    """PNG overlays (and DICOM Secondary Captures) under ``out``, an index ``heatmaps.csv``, and
    the pointing game over the outlined lesions in ``explain_summary.json``; all 0600, all local."""
    from pydicom.uid import generate_uid

    from fedbreast.shared.csv_cells import write_csv
    from fedbreast.shared.durable import atomic_write_json
    from fedbreast.shared.explain.pointing import PointingScore, peak
    from fedbreast.shared.explain.render import overlay_rgb, write_png, write_secondary_capture

    table: list[list[object]] = [list(HEATMAP_COLUMNS)]
    score, n = PointingScore(), 0
    series: dict[str, str] = {}
    methods: dict[str, int] = {}
    for hm in heatmaps:
        n += 1
        rgb = overlay_rgb(hm)
        png = write_png(hm, out / "heatmaps" / f"{hm.name}.png", rgb)
        dcm = ""
        if dicom:  # one series per study, so a viewer shows a study's heatmaps together
            uid = series.setdefault(hm.exam, generate_uid())
            path = write_secondary_capture(hm, out / "heatmaps-dicom" / f"{hm.name}.dcm", uid, rgb, number=n)
            dcm = str(path.relative_to(out))
        row, col = peak(hm.heat)
        table.append(
            [hm.patient, hm.exam, hm.laterality, hm.unit, hm.view, hm.method,
             "" if hm.score is None else f"{hm.score:.6f}", int(row), int(col), str(png.relative_to(out)), dcm]
        )  # fmt: skip
        score.add(hm)
        methods[hm.method] = methods.get(hm.method, 0) + 1
    write_csv(out / "heatmaps.csv", table, mode=0o600)
    pointing = score.as_dict()
    atomic_write_json(out / "explain_summary.json", {"heatmaps": n, "methods": methods, "pointing": pointing})
    return n, pointing


__all__: list[str] = [
    "COLUMNS",
    "HEATMAP_COLUMNS",
    "PredictError",
    "PredictResult",
    "predict_site",
    "site_threshold",
    "write_heatmaps",
]
