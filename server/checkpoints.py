"""Global-model checkpoints: latest (every round), best (by the key metric) and final.
Which of them a run reports (and `predict`, `export`, `evaluate RUN_DIR` use) is the run
config's ``model-selection``: :func:`reported_kinds`.

Each checkpoint carries the run config, the round, the metrics that put it there, the
model signature (what fixes tensor shapes) and a content hash of its tensors, so a
resume can refuse a checkpoint from another model and detect a corrupted file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbreast.shared.durable import atomic_write, atomic_write_json
from fedbreast.shared.errors import FedbreastError

KINDS = ("latest", "best", "final")


class CheckpointError(FedbreastError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


@dataclass
class Checkpoint:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.meta["round"])


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.require(arrays[key], requirements="C")
        h.update(key.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, kind: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Atomically and durably write ``checkpoints/<kind>.pt`` plus a readable ``<kind>.json`` sidecar."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    full_meta = {**meta, "kind": kind, "sha256": content_hash(arrays)}
    payload = {
        "arrays": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()},
        "meta": full_meta,
    }
    path = folder / f"{kind}.pt"
    # Durable (fsync, rename, fsync the folder): a resume after a power cut finds this round's
    # checkpoint or the previous one, never a torn file. The .pt is the checkpoint; the .json
    # beside it is a copy of its meta for people, written second: after a crash between the
    # two, its sha256 names the previous .pt's content, so a stale sidecar is recognisable.
    atomic_write(path, lambda fh: torch.save(payload, fh))
    atomic_write_json(folder / f"{kind}.json", full_meta, default=str)
    return path


def checkpoint_meta(run_dir: Path, kind: str) -> dict[str, Any]:
    """``checkpoints/<kind>.json`` (the meta copy written beside each .pt), or {} when there is
    none or it cannot be read: cheap, no tensors loaded, no hash checked."""
    import json

    try:
        doc = json.loads((Path(run_dir) / "checkpoints" / f"{kind}.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def run_model_selection(run_dir: Path) -> str:
    """The run's ``model-selection``: from its ``config.json`` (written when the run starts),
    else from a checkpoint's meta (a run folder shipped without it). A run made before the key
    existed reported its best checkpoint: ``best-val``. A config that cannot be read, or a value
    that is not one of the two, is an error naming the file, not a silent pick."""
    import json

    from fedbreast.shared.config import MODEL_SELECTIONS

    path = Path(run_dir) / "config.json"
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read the run's config ({exc})") from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{path}: the run's config is not a JSON object")
    else:
        doc = next(
            (c for c in (checkpoint_meta(run_dir, k).get("config") for k in ("final", "latest", "best")) if c), {}
        )
    selection = doc.get("model-selection", "best-val") if isinstance(doc, dict) else "best-val"
    if selection not in MODEL_SELECTIONS:
        raise CheckpointError(f"{path}: model-selection {selection!r} must be one of {', '.join(MODEL_SELECTIONS)}")
    return str(selection)


def reported_kinds(run_dir: Path) -> list[str]:
    """The checkpoint kinds of the model a run reports, in order of preference, for those that
    exist. ``model-selection = last-round`` (the default): the newer of final and latest (a
    finished run resumed for more rounds and stopped again has a final older than its latest),
    then best; ``best-val``: best, then final, then latest (a run whose key metric was never
    defined has no best)."""
    folder = Path(run_dir) / "checkpoints"
    if run_model_selection(run_dir) == "last-round":
        newest = sorted(("final", "latest"), key=lambda k: -int(checkpoint_meta(run_dir, k).get("round") or 0))
        order: tuple[str, ...] = (*newest, "best")
    else:
        order = ("best", "final", "latest")
    return [k for k in order if (folder / f"{k}.pt").exists()]


def load_checkpoint(run_dir: Path, kind: str = "latest") -> Checkpoint | None:
    """Load a checkpoint, or None if there is none; raises CheckpointError if it is damaged."""
    path = Path(run_dir) / "checkpoints" / f"{kind}.pt"
    if not path.exists():
        return None
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint file, its content hash checked; CheckpointError names the file and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        arrays = {k: v.numpy() for k, v in payload["arrays"].items()}
        meta = dict(payload["meta"])
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if content_hash(arrays) != meta.get("sha256"):
        raise CheckpointError(f"{path}: content hash does not match; the file is damaged")
    return Checkpoint(arrays, meta)


RESUME_ADVICE = "refusing to resume. Use a new run directory, or the original model settings."


def check_resumable(
    ckpt: Checkpoint, signature: str, path_hint: str = "checkpoints/latest.pt", advice: str = RESUME_ADVICE
) -> None:
    """Refuse a checkpoint whose model differs from the configured one."""
    theirs = ckpt.meta.get("model_signature")
    if theirs != signature:
        cfg = ckpt.meta.get("config", {})
        described = ", ".join(
            f"{k}={cfg.get(k)}"
            for k in ("model", "backbone", "view-fusion", "head", "in-channels", "image-h", "image-w")
        )
        raise CheckpointError(f"{path_hint}: was written by a different model ({described}); {advice}")


def initial_checkpoint(path: Path, signature: str) -> Checkpoint:
    """A finished model given as a run's initial model (run config ``init-checkpoint``): read,
    its sha256 checked against its content, and its model signature held to the configured one."""
    ckpt = read_checkpoint(path)
    check_resumable(ckpt, signature, str(path), "not this run's; give the run the checkpoint's own model settings")
    return ckpt
