"""Site personalisation and FedBN: state a site keeps on its own disk across rounds and restarts.

In deployment every Flower message starts a fresh ClientApp process, so nothing lives in
memory between rounds: one file per run, ``<site_dir>/state/personal/<run-key>.pt``, holds

* ``norms``: the site's own normalisation-layer state (FedBN), updated after every local
  training;
* ``personal``: the personalised model, the global model of ``round`` fine-tuned on the
  site's training split, with ``global_digest`` naming the global weights it came from, so
  a repeated evaluation, a restarted daemon or the cross-site phase reuses it instead of
  training again.

The file holds tensors only and is read with ``weights_only=True``; it never leaves the site
except as the model weights the cross-site phase asks for.

FedBN (``fedbn = true``), the scheme chosen: normalisation layers' trained values never
leave the site. Before training and evaluation the site overwrites the received global
norm entries with its own; after training it stores its norm entries and sends back the
norm entries *it received*, unchanged. Every aggregation rule we offer maps identical
inputs to the same value (FedAvg/FedProx mean, median, trimmed mean, Krum's pick, and a
zero pseudo-gradient for FedAdam/FedYogi), so the global norm entries stay at their
initial values and no server change is needed. The run key mixes the run directory (the
identity a resumed run keeps) with the model signature.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedbreast.shared.durable import atomic_write

log = logging.getLogger("fedbreast.personal")

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
STATE_FORMAT = 1


def norm_state_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every normalisation layer (weights, biases, running statistics)."""
    keys: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in m.state_dict().keys()]
    return keys


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes: which global weights a personal model came from."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        a = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class PersonalStore:
    """The site's state file for one run; written atomically (a crash never leaves half a file)."""

    def __init__(self, site_dir: str | os.PathLike[str], key: str) -> None:
        if not key or any(c in key for c in "/\\."):
            raise ValueError(f"personal state: bad run key {key!r}")
        self.path = Path(site_dir) / "state" / "personal" / f"{key}.pt"

    def load(self) -> dict[str, Any]:
        """The stored state, or an empty one when there is none or it cannot be read."""
        if not self.path.exists():
            return {}
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            log.warning("personal state %s cannot be read (%s); starting afresh", self.path, exc)
            return {}
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            log.warning("personal state %s has an unknown format; starting afresh", self.path)
            return {}
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        # Durable and 0600: the personal model is fitted to this site's patients, and after a
        # power cut the site must find the state of its last reply, not an older one.
        atomic_write(self.path, lambda fh: torch.save({**state, "format": STATE_FORMAT}, fh))


@dataclass(frozen=True)
class PersonalSettings:
    epochs: int = 0  # local epochs on the train split for the personal model (0 with steps 0: off)
    steps: int = 0  # > 0: this many batches instead of epochs
    lr: float = 0.0  # 0: the round's learning rate
    fedbn: bool = False

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.steps > 0


FineTune = Callable[[nn.Module], Any]


class SitePersonaliser:
    """The site's side of personalisation and FedBN for one run (state on disk)."""

    def __init__(self, store: PersonalStore, settings: PersonalSettings) -> None:
        self.store, self.settings = store, settings

    def _state(self, server_round: int) -> dict[str, Any]:
        state = self.store.load()
        if state and int(state.get("round", 0)) > server_round:
            # A new run in a reused run directory: the stored state belongs to an older run.
            log.warning(
                "personal state %s is from round %s, ahead of round %d: discarded",
                self.store.path,
                state.get("round"),
                server_round,
            )
            return {}
        return state

    # ---- FedBN ------------------------------------------------------------------------------
    def use_local_norms(self, model: nn.Module, server_round: int) -> bool:
        """FedBN: overwrite the model's norm layers with the site's own; False if it has none yet."""
        if not self.settings.fedbn:
            return False
        norms = self._state(server_round).get("norms")
        if not norms:
            return False
        keys = set(norm_state_keys(model))
        if set(norms) != keys:
            log.warning(
                "personal state %s: stored norm layers do not match the model; using the global ones", self.store.path
            )
            return False
        own = model.state_dict()
        with torch.no_grad():
            for k, v in norms.items():
                if own[k].shape != v.shape:
                    log.warning(
                        "personal state %s: norm tensor %s has another shape; using the global ones", self.store.path, k
                    )
                    return False
            for k, v in norms.items():
                own[k].copy_(v)
        return True

    def reply_state(self, model: nn.Module, received: Mapping[str, Tensor], server_round: int) -> dict[str, Tensor]:
        """The weights to send after local training. FedBN: keep the trained norm entries on
        disk and send the received (global) ones back unchanged."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not self.settings.fedbn:
            return state
        keys = norm_state_keys(model)
        stored = self._state(server_round)
        stored.update(
            norms=_cpu_state({k: state[k] for k in keys}), round=max(server_round, int(stored.get("round", 0)))
        )
        self.store.save(stored)
        for k in keys:
            state[k] = received[k].detach().cpu()
        return state

    # ---- the personalised model ---------------------------------------------------------------
    def personal_model(
        self, model: nn.Module, global_digest: str, server_round: int, fine_tune: FineTune
    ) -> tuple[nn.Module, bool]:
        """The personalised copy of ``model`` (the global weights, with the site's norms under
        FedBN): reused from disk when it was made from the same global weights, else
        fine-tuned now and stored. Returns (model, reused)."""
        state = self._state(server_round)
        personal = copy.deepcopy(model)
        stored = state.get("personal")
        if stored and state.get("global_digest") == global_digest:
            try:
                personal.load_state_dict(stored, strict=True)
                return personal, True
            except (RuntimeError, ValueError) as exc:
                log.warning("personal state %s does not fit the model (%s); fine-tuning again", self.store.path, exc)
        if self.settings.enabled:
            fine_tune(personal)
        state.update(
            personal=_cpu_state(personal.state_dict()),
            global_digest=global_digest,
            personal_round=server_round,
            round=max(server_round, int(state.get("round", 0))),
        )
        self.store.save(state)
        return personal, False


def find_personal_state(site_dir: str | os.PathLike[str], global_digest: str) -> tuple[Path, dict[str, Any]] | None:
    """The site's personal state made from the global weights with digest ``global_digest``
    (``site predict --personal``): the state files are keyed by run, which a checkpoint does not
    carry, so the match is on the weights themselves; another run's or round's state never fits."""
    folder = Path(site_dir) / "state" / "personal"
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        state = PersonalStore(site_dir, path.stem).load()
        if state.get("global_digest") == global_digest:
            return path, state
    return None


# The cross-site phase's protocol (server/cross_site.py <-> client/app.py): the models travel
# as ArrayRecords "model-0", "model-1", ... (global first); a site answers m{i}_{key} per model.
CROSS_SITE_KEYS = ("test_auc", "test_spec_at_sens100", "test_n", "test_n_pos", "test_n_neg")


def model_slot(i: int) -> str:
    return f"model-{i}"


def suffixed(metrics: Mapping[str, Any], suffix: str, skip: tuple[str, ...] = ("num-examples",)) -> dict[str, Any]:
    """``{split}_{metric}`` -> ``{split}_{metric}{suffix}`` (the personalised model's keys)."""
    return {f"{k}{suffix}": v for k, v in metrics.items() if k not in skip}


__all__ = [
    "CROSS_SITE_KEYS",
    "NORM_TYPES",
    "PersonalSettings",
    "PersonalStore",
    "SitePersonaliser",
    "find_personal_state",
    "model_slot",
    "norm_state_keys",
    "state_digest",
    "suffixed",
]
