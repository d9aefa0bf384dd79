"""Privacy accounting both sides share: the RDP accountant, and which run a piece of state belongs to.

Torch-free, so the coordinator's central-DP ledger (server/central_dp.py) and the site's
DP-SGD ledger (shared/training/dp.py) count epsilon the same way without the coordinator
loading the site's training stack. Opacus is imported only when epsilon is computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

ACCOUNTANT = "rdp"
CENTRAL_WEIGHT_KEY = "dp-unit-weight"  # central DP averages sites with equal weight (sensitivity C / k)


@lru_cache(maxsize=64)
def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` after ``steps`` steps (RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=ACCOUNTANT,
        )
    )


def epsilon_of(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Cumulative epsilon of Opacus RDP history entries (noise multiplier, sample rate, steps)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0


def run_key(run_config: Mapping[str, Any], run_id: int, model_signature: str | None = None) -> str:
    """The file name of a run's state at a site: the run directory when the coordinator names
    one (a resumed run keeps it, while Flower's run id changes), else Flower's run id.

    Without ``model_signature``: the DP ledger's key. With it: the personal model's, which
    also depends on the model (another architecture cannot reuse the state). The two forms
    are the names already on sites' disks; changing either would orphan a site's ledger and
    restart its epsilon at 0, so both stay as they are.
    """
    ident = str(run_config.get("run-dir", "") or "") or f"flower-run-{run_id}"
    if model_signature is None:
        return hashlib.sha256(ident.encode()).hexdigest()[:16]
    blob = json.dumps({"run": ident, "model": model_signature}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
