"""Every site's metrics for every round, written as they arrive (``metrics.jsonl``).

Flower's strategies keep only per-round means; a coordinator needs to see each site,
so each reply becomes one line: round, phase (train / evaluate / failure), site, values.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedbreast.shared.durable import atomic_write_text


def _clean(value: Any) -> Any:
    # JSON has no NaN: store it as null so every tool can read the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricStore:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, server_round: int, phase: str, site: str, values: Mapping[str, Any]) -> None:
        row = {"round": server_round, "phase": phase, "site": site, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()

    def rows(self, phase: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if phase is None or row.get("phase") == phase:
                out.append(row)
        return out

    def truncate_after(self, server_round: int) -> int:
        """Drop rows of rounds after ``server_round`` (a round cut short by a crash); return how many."""
        rows = self.rows()
        keep = [r for r in rows if r.get("round", 0) <= server_round]
        if len(keep) != len(rows):
            # A new file renamed over the old one, not a rewrite in place: a crash mid-truncation
            # leaves the whole old file (the resume truncates again), never a cut one. The
            # exporter sees the new inode and re-reads from the top.
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), mode=0o666)
        return len(rows) - len(keep)
