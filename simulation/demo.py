"""``fedbreast demo``: generated hospitals -> DICOM -> ingest -> check, with a per-site report.

It runs the data path exactly as a hospital would (real DICOM files through
``site ingest`` and ``site check``), so a newcomer sees the whole site side work.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedbreast.shared.data.check import check_site
from fedbreast.shared.data.generate import generate_federation
from fedbreast.shared.data.ingest import ingest


def run_demo(out: Path, sites: int = 3, patients: int = 40, seed: int = 0, workers: int = 2) -> list[dict]:
    """Generate, ingest and check ``sites`` simulated hospitals under ``out``; return one row per site."""
    out = Path(out)
    t0 = time.perf_counter()
    summaries = generate_federation(out / "generated", n_sites=sites, patients_per_site=patients, seed=seed)
    print(f"generated {sites} sites in {time.perf_counter() - t0:.1f} s")
    rows = []
    for s in summaries:
        site_dir = out / "sites" / s.name
        report = ingest(
            Path(s.path) / "dicom", site_dir, annotations=Path(s.path) / "annotations.csv", site=s.name, workers=workers
        )
        check = check_site(site_dir)
        train = check.balance.get("train", {})
        rows.append(
            {
                "site": s.name,
                "modalities": s.modalities,
                "images": report.images,
                "exams": report.exams,
                "rejected": report.rejected,
                "train malignant/other": f"{train.get('malignant', 0)}/{train.get('benign', 0) + train.get('normal', 0)}",
                "incomplete exams": len(check.incomplete_exams),
                "can train": "yes" if check.can_train else "no: " + "; ".join(check.problems),
            }
        )
    print(render_table(rows))
    print(f"site directories: {out / 'sites'}  ({time.perf_counter() - t0:.1f} s in all)")
    return rows


def render_table(rows: list[dict]) -> str:
    if not rows:
        return "(no sites)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = " | ".join(c.ljust(widths[c]) for c in cols)
    sep = "-|-".join("-" * widths[c] for c in cols)
    body = [" | ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])
