"""Patient-specific fine-tuning at evaluation time (seed 000, "Patient-specific classification").

For every test patient, the current model is fine-tuned for one epoch on that patient's
normal-tissue patches (outside every lesion contour, labelled benign); only then are the
patient's lesion patches scored, and a lesion's score is the mean over its patches.

Cost matters (it runs per patient, at the site, on every evaluation), so:

* one working copy of the model is made once; each patient starts by copying the base
  weights into it in place (``Tensor.copy_``) and clearing the optimiser's moments, instead
  of a deepcopy plus a new optimiser per patient;
* ``scope="head"`` fine-tunes only the last parameterised layer; when that layer produces
  the model's output (checked once with a hook), the frozen body's features of the normal
  and lesion patches are computed once with no_grad and the epoch runs on the head alone;
* patches are read straight from the datasets' batched ``__getitems__`` in batches of
  ``batch_size`` (the seed's 200), without a DataLoader per patient.

Nothing per patient leaves: :func:`evaluate_patient_finetune` returns per-unit arrays for
the site's own metric computation, and :meth:`PSFTResult.metrics` turns them into the
aggregate metrics a reply may carry. Patients are never named in logs.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import LesionPatchDataset, NormalPatchDataset
from fedbreast.shared.metrics import BINARY_METRIC_KEYS, binary_metrics
from fedbreast.shared.training.local import autocast

log = logging.getLogger("fedbreast.psft")

SCOPES = ("all", "head")
# forward(model, batch on the device) -> logits of shape (B,), (B, 1) or (B, 2) [benign, malignant]
ForwardFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def default_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(batch["x"])


def malignancy_logit(out: Tensor) -> Tensor:
    """(B,) log-odds of malignancy from a (B,), (B, 1) or two-class (B, 2) output.

    For two classes softmax[:, 1] == sigmoid(z1 - z0), so one BCE covers both heads.
    """
    if out.dim() == 1:
        return out
    if out.dim() == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.dim() == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    raise ValueError(f"patch classifier output must be (B,), (B, 1) or (B, 2), got {tuple(out.shape)}")


def benign_loss(out: Tensor) -> Tensor:
    """Mean BCE against the label benign (0) for every patch."""
    z = malignancy_logit(out).float()
    return nn.functional.binary_cross_entropy_with_logits(z, torch.zeros_like(z))


@dataclass(frozen=True)
class PSFTConfig:
    lr: float = 1e-4  # seed 000: Adam, learning rate 1e-4, batch 200, one epoch
    epochs: int = 1
    batch_size: int = 200
    scope: str = "all"  # "all": the whole network, as the seed; "head": the last layer only
    # False: BatchNorm normalises with the trained running statistics and keeps them; the
    # batches are all normal tissue, so updating them would shift every later lesion score.
    update_norm_stats: bool = False
    amp: str = "off"
    seed: int = 0

    @classmethod
    def from_run(cls, cfg: RunConfig) -> PSFTConfig:
        """The run config's psft-* keys (a site's evaluate, and the claims benchmark)."""
        return cls(
            lr=cfg.psft_lr,
            epochs=cfg.psft_epochs,
            batch_size=cfg.psft_batch_size,
            scope=cfg.psft_scope,
            amp=cfg.amp,
            seed=cfg.seed,
        )

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"psft-scope = {self.scope!r}: must be one of {', '.join(SCOPES)}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"patient fine-tuning needs lr > 0, epochs >= 1, batch size >= 1; got {self.lr}, {self.epochs}, {self.batch_size}"
            )


class PatientFinetuner:
    """A reusable working copy of a patch classifier, reset to the base weights per patient."""

    def __init__(
        self,
        model: nn.Module,
        cfg: PSFTConfig = PSFTConfig(),
        device: torch.device | None = None,
        forward: ForwardFn = default_forward,
    ) -> None:
        self.cfg, self.forward = cfg, forward
        self.device = device or next(model.parameters()).device
        self.work = copy.deepcopy(model).to(self.device)
        self.work.eval()
        # The base weights, on the device, copied into the working model per patient.
        self._base = {k: v.detach().clone() for k, v in self.work.state_dict().items()}
        self._live = self.work.state_dict(keep_vars=True)
        self.head_name = ""
        self.head: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.cache_features: bool | None = None  # head scope: decided on the first batch
        if cfg.scope == "all":
            self._optimise([p for p in self.work.parameters() if p.requires_grad])

    def _optimise(self, params: list[nn.Parameter]) -> None:
        if not params:
            raise ValueError("patient fine-tuning: the model has no trainable parameters")
        self.params = params
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)

    @torch.no_grad()
    def select_head(self, batch: Mapping[str, Tensor]) -> None:
        """Head scope: the parameterised module that runs last in a forward pass (execution
        order, not registration order: a decision-fusion branch registered later is skipped)."""
        if self.head is not None or self.cfg.scope != "head":
            return
        order: list[tuple[str, nn.Module]] = []
        hooks = [
            m.register_forward_hook(lambda mod, _i, _o, name=name: order.append((name, mod)))
            for name, m in self.work.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        try:
            self.work.eval()
            self.forward(self.work, batch)
        finally:
            for h in hooks:
                h.remove()
        if not order:
            raise ValueError("patient fine-tuning: no parameterised layer ran in the forward pass")
        self.head_name, self.head = order[-1]
        for p in self.work.parameters():
            p.requires_grad_(False)
        params = list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        self._optimise(params)

    # ---- per patient ----------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the base weights and fresh Adam moments (cheap: in-place copies)."""
        with torch.no_grad():
            for k, v in self._live.items():
                v.copy_(self._base[k])
        if self.opt is not None:
            self.opt.state.clear()

    def _train_mode(self) -> None:
        if self.head is not None:
            self.work.eval()  # frozen body: no dropout, no statistics updates
            self.head.train()
            return
        self.work.train()
        if not self.cfg.update_norm_stats:
            for m in self.work.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()

    def _step(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"patient fine-tuning loss became {loss.item()}; lower psft-lr")
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def finetune(self, batches: Sequence[Mapping[str, Tensor]], generator: torch.Generator) -> int:
        """``epochs`` passes over the patient's normal patches (pre-batched, on the device),
        reshuffled per epoch across batch boundaries; returns the optimiser steps taken."""
        self.select_head(batches[0])
        self._train_mode()
        x = torch.cat([b["x"] for b in batches])
        extra = {
            k: torch.cat([b[k] for b in batches]) for k in batches[0] if k != "x" and isinstance(batches[0][k], Tensor)
        }
        steps, n, bs = 0, x.shape[0], self.cfg.batch_size
        for _ in range(self.cfg.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for s in range(0, n, bs):
                sel = order[s : s + bs]
                batch = {"x": x[sel], **{k: v[sel] for k, v in extra.items()}}
                with autocast(self.device, self.cfg.amp):
                    out = self.forward(self.work, batch)
                self._step(benign_loss(out))
                steps += 1
        self.work.eval()
        return steps

    @torch.no_grad()
    def score(self, batches: Iterable[Mapping[str, Tensor]]) -> np.ndarray:
        """Malignancy probabilities of every patch, in order."""
        self.work.eval()
        out = []
        for b in batches:
            with autocast(self.device, self.cfg.amp):
                z = malignancy_logit(self.forward(self.work, b)).float()
            out.append(torch.sigmoid(z).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0, np.float64)

    # ---- head scope with cached features ----------------------------------------------------
    @torch.no_grad()
    def head_inputs(self, batches: Iterable[Mapping[str, Tensor]]) -> list[tuple[tuple[Tensor, ...], Tensor]]:
        """The head's inputs and the model's outputs per batch (frozen body, computed once)."""
        batches = list(batches)
        if not batches:
            return []
        self.select_head(batches[0])
        assert self.head is not None
        self.work.eval()
        captured: list[tuple[Tensor, ...]] = []
        hook = self.head.register_forward_pre_hook(lambda _m, args: captured.append(tuple(a.detach() for a in args)))
        try:
            outs = []
            for b in batches:
                with autocast(self.device, self.cfg.amp):
                    outs.append(self.forward(self.work, b).detach())
        finally:
            hook.remove()
        if len(captured) != len(outs):
            self.cache_features = False
            return []
        pairs = list(zip(captured, outs))
        if self.cache_features is None and pairs:
            # Cached features are valid only if the head's own output is the model's output.
            args, out = pairs[0]
            with autocast(self.device, self.cfg.amp):
                again = self.head(*args)
            try:
                head_logit, model_logit = malignancy_logit(again).float(), malignancy_logit(out).float()
                self.cache_features = head_logit.shape == model_logit.shape and torch.allclose(
                    head_logit, model_logit, atol=1e-4, rtol=1e-3
                )
            except ValueError:
                self.cache_features = False
            if not self.cache_features:
                log.info(
                    "psft: head %r does not produce the model output; fine-tuning it with full forwards", self.head_name
                )
        return pairs

    def finetune_head(self, normal: list[tuple[tuple[Tensor, ...], Tensor]], generator: torch.Generator) -> int:
        assert self.head is not None
        self.head.train()
        args = [torch.cat([a[i] for a, _ in normal]) for i in range(len(normal[0][0]))]
        n, bs, steps = args[0].shape[0], self.cfg.batch_size, 0
        for _ in range(self.cfg.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for s in range(0, n, bs):
                sel = order[s : s + bs]
                with autocast(self.device, self.cfg.amp):
                    out = self.head(*(a[sel] for a in args))
                self._step(benign_loss(out))
                steps += 1
        self.head.eval()
        return steps

    @torch.no_grad()
    def score_head(self, lesion: list[tuple[tuple[Tensor, ...], Tensor]]) -> np.ndarray:
        assert self.head is not None
        out = []
        for args, _ in lesion:
            with autocast(self.device, self.cfg.amp):
                z = malignancy_logit(self.head(*args)).float()
            out.append(torch.sigmoid(z).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0, np.float64)


# ---- the evaluation -----------------------------------------------------------------------


@dataclass
class PSFTResult:
    """Per-unit labels and scores without / with fine-tuning; stays on the site."""

    y: np.ndarray
    p_base: np.ndarray
    p_psft: np.ndarray
    patients: int = 0  # patients fine-tuned
    skipped: Counter = field(default_factory=Counter)  # reason kind -> patients not fine-tuned
    normal_patches: int = 0
    seconds: float = 0.0  # reset + fetch + fine-tune + re-score, summed over fine-tuned patients
    cpu_seconds: float = 0.0  # the same, this process's CPU time (robust to a busy machine)
    steps: int = 0

    @property
    def seconds_per_patient(self) -> float:
        return self.seconds / self.patients if self.patients else float("nan")

    def metrics(
        self, split: str = "test", include_base: bool = False, threshold: float = 0.5
    ) -> dict[str, float | int]:
        """Fixed key set (NaN where undefined): ``{split}_{k}_psft`` for every binary metric
        (thresholded ones at ``threshold``), optionally ``{split}_{k}`` without fine-tuning,
        and the fine-tuning counts."""
        out: dict[str, float | int] = {}
        arms = [("_psft", self.p_psft)] + ([("", self.p_base)] if include_base else [])
        empty = {k: float("nan") for k in BINARY_METRIC_KEYS} | {"n": 0, "n_pos": 0, "n_neg": 0}
        for suffix, p in arms:
            m = binary_metrics(self.y, p, threshold=threshold) if len(self.y) else empty
            out.update({f"{split}_{k}{suffix}": v for k, v in m.items()})
        out[f"{split}_psft_patients"] = int(self.patients)
        out[f"{split}_psft_skipped_patients"] = int(sum(self.skipped.values()))
        out[f"{split}_psft_normal_patches"] = int(self.normal_patches)
        out[f"{split}_psft_seconds_per_patient"] = self.seconds_per_patient if self.patients else float("nan")
        return out


# extras(patient, "lesion" | "normal", batch) -> more batch entries (e.g. the patient's BI-RADS vectors)
BatchExtras = Callable[[str, str, Mapping[str, Tensor]], Mapping[str, Tensor]]


def _batches(
    ds,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    extras: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> list[dict[str, Tensor]]:
    pin = device.type == "cuda"
    out = []
    for s in range(0, len(indices), batch_size):
        b = dict(ds.__getitems__(indices[s : s + batch_size]))
        if extras is not None:
            b.update(extras(b))
        out.append(
            {
                k: (v.pin_memory() if pin else v).to(device, non_blocking=True)
                for k, v in b.items()
                if isinstance(v, Tensor)
            }
        )
    return out


def unit_means(
    probs: np.ndarray, units: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean patch probability per unit (seed 000 scores a lesion by its patches' mean).

    Returns (unit ids, labels, scores) for labelled units only (a unit's patches share its label)."""
    ids, first, inv = np.unique(units, return_index=True, return_inverse=True)
    sums = np.bincount(inv, weights=probs, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids))
    keep = mask[first].astype(bool)
    return ids[keep], labels[first][keep].astype(np.int64), (sums / np.maximum(counts, 1))[keep]


def _bind(extras: BatchExtras | None, patient: str, kind: str):
    return None if extras is None else (lambda b: extras(patient, kind, b))


def _seed_for(seed: int, patient: str) -> int:
    """A per-patient shuffling seed that does not depend on PYTHONHASHSEED."""
    return int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:15], 16)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


def evaluate_patient_finetune(
    model: nn.Module,
    lesion_ds: LesionPatchDataset,
    normal_ds: NormalPatchDataset,
    cfg: PSFTConfig = PSFTConfig(),
    device: torch.device | None = None,
    forward: ForwardFn = default_forward,
    patients: Sequence[str] | None = None,
    extras: BatchExtras | None = None,
    unit_of: Callable[[np.ndarray], np.ndarray] | None = None,
    fuse: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> PSFTResult:
    """Score every lesion unit without and with patient-specific fine-tuning.

    ``lesion_ds`` and ``normal_ds`` must cover the same split. The reporting unit is the
    image (``unit_of`` maps image ids of ``lesion_ds.images`` to other unit ids, e.g. the
    lesion breast); its score is the mean over its patches, then ``fuse(unit ids, scores)``
    if given (decision fusion with BI-RADS). ``extras`` adds model inputs the patch datasets
    do not carry (BI-RADS vectors for feature fusion). A patient with lesion patches but no
    normal patch keeps the base scores in both arms (both arms score the same units) and is
    counted in ``skipped`` under the reason's kind. ``model`` itself is not changed.
    """
    device = device or next(model.parameters()).device
    tuner = PatientFinetuner(model, cfg, device, forward)
    head_cached = cfg.scope == "head"
    units, labels, masks, pb, pp = [], [], [], [], []
    result = PSFTResult(np.zeros(0), np.zeros(0), np.zeros(0))
    for patient in lesion_ds.patients() if patients is None else patients:
        l_idx = lesion_ds.indices_for_patient(patient)
        if len(l_idx) == 0:
            continue
        lesion = _batches(lesion_ds, l_idx, cfg.batch_size, device, _bind(extras, patient, "lesion"))
        l_lab, l_mask, images = (torch.cat([b[k] for b in lesion]).cpu().numpy() for k in ("y", "y_mask", "image"))
        n_idx = normal_ds.indices_for_patient(patient)
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, patient))
        tuner.reset()
        if head_cached:
            lesion_pairs = tuner.head_inputs(lesion)
            head_cached = bool(tuner.cache_features)
        if head_cached:
            base = (
                torch.sigmoid(torch.cat([malignancy_logit(o).float() for _, o in lesion_pairs]))
                .cpu()
                .numpy()
                .astype(np.float64)
            )
        else:
            base = tuner.score(lesion)
        if len(n_idx) == 0:
            reason = normal_ds.patient_skipped.get(patient, "no normal tissue: no normal patch for this patient")
            result.skipped[_reason_kind(reason)] += 1
            psft = base
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            normal = _batches(normal_ds, n_idx, cfg.batch_size, device, _bind(extras, patient, "normal"))
            if head_cached:
                result.steps += tuner.finetune_head(tuner.head_inputs(normal), gen)
                psft = tuner.score_head(lesion_pairs)
            else:
                result.steps += tuner.finetune(normal, gen)
                psft = tuner.score(lesion)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.seconds += time.perf_counter() - t0
            result.cpu_seconds += time.process_time() - c0
            result.patients += 1
            result.normal_patches += len(n_idx)
        units.append(images if unit_of is None else unit_of(images))
        labels.append(l_lab)
        masks.append(l_mask.astype(bool))
        pb.append(base)
        pp.append(psft)
    if units:
        u, y, m = np.concatenate(units), np.concatenate(labels), np.concatenate(masks)
        ids, result.y, result.p_base = unit_means(np.concatenate(pb), u, y, m)
        _, _, result.p_psft = unit_means(np.concatenate(pp), u, y, m)
        if fuse is not None and len(ids):
            result.p_base, result.p_psft = fuse(ids, result.p_base), fuse(ids, result.p_psft)
    log.info(
        "psft: %d patient(s) fine-tuned (%s per patient, %d normal patches), %d skipped %s",
        result.patients,
        "n/a" if not result.patients else f"{result.seconds_per_patient:.3f} s",
        result.normal_patches,
        sum(result.skipped.values()),
        dict(result.skipped) or "",
    )
    return result


__all__ = [
    "PSFTConfig",
    "PSFTResult",
    "PatientFinetuner",
    "SCOPES",
    "benign_loss",
    "default_forward",
    "evaluate_patient_finetune",
    "unit_means",
    "malignancy_logit",
]
