"""Differential privacy for a federated run: DP-SGD at each site (local) or noise at the server (central).

``dp = "local"``: every site trains with DP-SGD (Opacus): per-exam gradients are clipped to
``dp-max-grad-norm`` and Gaussian noise is added at every step, on Poisson-sampled batches.
The privacy unit is one exam (one patient's four views): the multi-view model calls its
backbone once per view with the exams as the batch, so Opacus' per-sample gradients are
per exam, not per image. The privacy accountant (RDP) lives on the site's disk and is
restored every round, because in deployment each message runs in a fresh process and a new
``PrivacyEngine`` would start again at epsilon 0. A site may cap epsilon with its own node
config key ``dp-max-epsilon``: a round that would exceed it is refused, with the reason.

``dp = "central"``: sites clip their model update (Flower's ``fixedclipping_mod``, attached to
training only) and the coordinator adds Gaussian noise to the average (Flower's
``DifferentialPrivacyClientSideFixedClipping``). Flower's own accountant needs the optional
``dp-accounting`` package, which this project does not install, so the coordinator accounts
with Opacus' RDP analysis of the same mechanism: one Gaussian release per round with no
amplification by site sampling (the setting Flower's accountant requires), which is
conservative when only some sites are sampled.

What DP covers: the model weights a site sends. Evaluation metrics are computed on the
validation and test splits, which DP-SGD does not touch; the training loss is withheld
under local DP because it would be an un-noised statistic of the private training data.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.datasets import passthrough_collate
from fedbreast.shared.durable import atomic_write_json, fsync_dir
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.models.backbones import replace_inplace_relu
from fedbreast.shared.models.multiview import VIEW_ORDER, MultiViewFusionNet
from fedbreast.shared.training.accounting import ACCOUNTANT, CENTRAL_WEIGHT_KEY, epsilon_of, noise_for_budget, run_key
from fedbreast.shared.training.fused_dp import FusedClipper

if TYPE_CHECKING:
    from flwr.app import Context, Message

log = logging.getLogger("fedbreast.dp")

CEILING_KEY = "dp-max-epsilon"  # site node config: the most epsilon this site will spend in one run
VIEWS = len(VIEW_ORDER)

# The first trained layer after frozen ones gets no input gradient; Opacus only needs its output
# gradient, so torch's note about that is noise here.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)


class DPRefused(FedbreastError, RuntimeError):
    """This site will not train this round under its privacy policy; the message says why."""


# ---- the DP-compatible model -------------------------------------------------------------------


def prepare_dp_model(model: nn.Module) -> nn.Module:
    """BatchNorm -> GroupNorm and in-place ops made out-of-place, so Opacus can hook every layer.

    BatchNorm mixes the exams of a batch (no per-exam gradient exists), and in-place ops on
    hooked outputs break Opacus' backward hooks. The coordinator builds the same model
    (``build_model`` with ``dp`` on), so state_dict keys match on both sides.
    """
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)  # a deep copy with GroupNorm(min(32, C), C) for each BatchNorm
    replace_inplace_relu(model)
    _hook_safe_residuals(model)
    ModuleValidator.validate(model, strict=True)
    return model


def _hook_safe_residuals(model: nn.Module) -> None:
    """torchvision's ResNet blocks do ``out += identity``; swap in classes that add out-of-place."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    safe_basic, safe_bottleneck = _block_classes()
    for m in model.modules():
        if type(m) is BasicBlock:
            m.__class__ = safe_basic
        elif type(m) is Bottleneck:
            m.__class__ = safe_bottleneck


def _basic_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


def _bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


@functools.lru_cache(maxsize=1)
def _block_classes() -> tuple[type, type]:
    # Built on first use: torchvision costs every fresh ClientApp process ~1.7 s to import.
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (
        type("BasicBlock", (BasicBlock,), {"forward": _basic_forward, "__module__": __name__}),
        type("Bottleneck", (Bottleneck,), {"forward": _bottleneck_forward, "__module__": __name__}),
    )


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's top-level blocks that hold parameters, in forward order (what
    ``dp-freeze-blocks`` counts): resnet conv1, bn1, layer1..layer4; smallcnn block0..block3."""
    body = getattr(model, "backbone", None)
    body = getattr(body, "body", body)
    if not isinstance(body, nn.Module):
        return []
    return [(n, m) for n, m in body.named_children() if any(True for _ in m.parameters())]


def freeze_leading_blocks(model: nn.Module, n: int) -> list[str]:
    """Keep the first ``n`` backbone blocks fixed under DP-SGD; returns their names.

    The early, high-resolution layers cost most of a DP step (per-exam gradients of large
    activations) and hold few parameters; not training them privately saves that time and
    keeps their weights at the shared initial model.
    """
    blocks = backbone_blocks(model)[: max(0, n)]
    for _, block in blocks:
        for p in block.parameters():
            p.requires_grad_(False)
    return [name for name, _ in blocks]


# ---- the per-exam loss ---------------------------------------------------------------------


def per_exam_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean BCE over each exam's labelled breasts; 0 for an exam with none.

    DP-SGD needs each exam's loss to depend on that exam only (the non-DP loss divides by
    the batch's labelled-breast count, which couples exams).
    """
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    m = mask.float()
    b = per.shape[0]
    return (per * m).reshape(b, -1).sum(1) / m.reshape(b, -1).sum(1).clamp_min(1.0)


class PerExamCriterion(nn.Module):
    """``per_exam_bce`` as a criterion with a ``reduction``, as Opacus' ghost clipping needs.
    ``target`` stacks labels and mask on a last axis."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = per_exam_bce(logits, target[..., 0], target[..., 1])
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


# ---- planning and accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class DPPlan:
    """One site's DP-SGD round: Poisson rate, steps, and the noise for the whole run's budget."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # optimizer steps this round
    planned_steps: int  # steps over the whole run (rounds x steps)
    max_grad_norm: float
    delta: float
    expected_batch_size: int
    target_epsilon: float  # 0: noise multiplier given directly


def plan_local_round(cfg: RunConfig, n_train: int) -> DPPlan:
    """Sample rate = batch / exams; with a target epsilon, the noise that reaches it at the last round."""
    if n_train < 1:
        raise DPRefused("no training exams: DP-SGD needs at least one")
    q = min(1.0, cfg.batch_size / n_train)
    per_epoch = max(1, int(1 / q))
    steps = cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * per_epoch
    planned = cfg.rounds * steps
    if cfg.dp_epsilon > 0:
        try:
            nm = noise_for_budget(cfg.dp_epsilon, cfg.dp_delta, q, planned)
        except ValueError as exc:
            raise DPRefused(f"dp-epsilon = {cfg.dp_epsilon:g} cannot be met over {planned} steps: {exc}") from None
    else:
        nm = cfg.dp_noise_multiplier
    return DPPlan(
        noise_multiplier=nm,
        sample_rate=q,
        steps=steps,
        planned_steps=planned,
        max_grad_norm=cfg.dp_max_grad_norm,
        delta=cfg.dp_delta,
        expected_batch_size=max(1, round(n_train * q)),
        target_epsilon=cfg.dp_epsilon,
    )


class PrivacyLedger:
    """The RDP accountant's history for one run, on disk, so epsilon survives process restarts.

    Written atomically after every round. An unreadable ledger stops the site from training
    (never a silent reset to epsilon 0).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.history: list[tuple[float, float, int]] = []
        self.rounds: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
                if state.get("mechanism") != ACCOUNTANT:
                    raise ValueError(f"mechanism {state.get('mechanism')!r}, expected {ACCOUNTANT!r}")
                self.history = [(float(nm), float(q), int(n)) for nm, q, n in state["history"]]
                self.rounds = list(state.get("rounds", []))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DPRefused(
                    f"privacy ledger {self.path} is unreadable ({exc}); this site will not "
                    "train in this run until it is restored or removed by the site operator"
                ) from None

    @classmethod
    def for_run(cls, site_dir: str | os.PathLike[str], key: str) -> PrivacyLedger:
        return cls(Path(site_dir) / "state" / "dp" / f"{key}.json")

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def projected_epsilon(self, plan: DPPlan) -> float:
        """Epsilon after this round's planned steps, without committing them."""
        return epsilon_of([*self.history, (plan.noise_multiplier, plan.sample_rate, plan.steps)], plan.delta)

    def save(self, history: list[tuple[float, float, int]], round_entry: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in history]  # type: ignore[misc]
        self.rounds.append(round_entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # fsync'd file and folder: a power cut never brings back a smaller epsilon than was spent.
        atomic_write_json(
            self.path, {"mechanism": ACCOUNTANT, "history": self.history, "rounds": self.rounds}, indent=1
        )


def site_ceiling(node_config: Mapping[str, Any]) -> float | None:
    """The site's ``dp-max-epsilon`` (None when unset); a malformed value refuses (fail closed)."""
    raw = node_config.get(CEILING_KEY)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DPRefused(f"node config {CEILING_KEY} = {raw!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise DPRefused(f"node config {CEILING_KEY} = {raw!r} must be a positive, finite epsilon")
    return value


# ---- the site's DP-SGD round -------------------------------------------------------------------


@dataclass
class LocalDP:
    """One round of DP-SGD at one site: built by :func:`local_dp_for`, run by ``train_local(dp=...)``."""

    plan: DPPlan
    ledger: PrivacyLedger
    grad_sample_mode: str = "hooks"
    freeze_blocks: int = 0
    server_round: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    empty_steps: int = 0
    ran: bool = False
    engine: str = ""  # the engine the last round used (fused with a family's own loss: hooks)
    optimized: bool = True  # False: Opacus as documented (per-view calls, stock samplers, NCHW); benchmark reference
    # dp-train-scope: head (the registry backbone stays as loaded, e.g. from `fedbreast pretrain`),
    # last-blocks (the first freeze_blocks backbone blocks stay), all (every parameter trains)
    train_scope: str = "last-blocks"

    def __post_init__(self) -> None:
        self.history = list(self.ledger.history)

    # What leaves with the update. The training loss is withheld (NaN): it is not noised.
    def metrics(self) -> dict[str, float]:
        if not self.ran:  # fail closed: never report a budget for weights DP-SGD did not produce
            raise RuntimeError(
                "dp = local, but this model family's training did not run through DP-SGD "
                "(train_local(dp=...)); its update is not sent"
            )
        return {
            "dp_epsilon": epsilon_of(self.history, self.plan.delta),
            "dp_delta": self.plan.delta,
            "dp_noise_multiplier": self.plan.noise_multiplier,
            "train_loss": math.nan,
        }

    def poisson_loader(self, loader: Any, generator: torch.Generator) -> torch.utils.data.DataLoader:
        """Each exam joins each batch with probability q (the sampling the accountant assumes);
        exactly ``plan.steps`` batches; an empty draw comes out as an empty dict."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        dataset = loader.dataset
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=self.plan.sample_rate, generator=generator, steps=self.plan.steps
        )
        workers = int(getattr(loader, "num_workers", 0))
        return torch.utils.data.DataLoader(
            _EmptySafe(dataset),
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=passthrough_collate,  # _EmptySafe returns whole batches
            pin_memory=bool(getattr(loader, "pin_memory", False)),
        )

    def train(self, model: nn.Module, loader: Any, **kwargs: Any):
        """DP-SGD over the parameters ``train_scope`` leaves trainable (see :meth:`_train`).
        ``head`` freezes the registry backbone through ``freeze = backbone``'s mechanism
        (shared/training/freeze.py: ``requires_grad`` off for the block, restored after), so
        neither DP-SGD's clipping nor its noise touches it and it stays bit-identical."""
        from fedbreast.shared.config import DP_TRAIN_SCOPES
        from fedbreast.shared.training.freeze import frozen_modules, frozen_scope

        if self.train_scope not in DP_TRAIN_SCOPES:
            raise ValueError(f"dp-train-scope must be one of {', '.join(DP_TRAIN_SCOPES)}, got {self.train_scope!r}")
        if self.train_scope != "head":
            return self._train(model, loader, **kwargs)
        try:
            frozen_modules(model, "backbone")
        except ValueError:
            raise ValueError(
                f"dp-train-scope = 'head': {type(model).__name__} has no registry backbone to keep fixed"
            ) from None
        with frozen_scope(model, "backbone") as names:
            stats = self._train(model, loader, **kwargs)
            self.frozen = names
            return stats

    def _train(
        self,
        model: nn.Module,
        loader: Any,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        device: torch.device | None,
        amp: str,
        proximal_mu: float,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]] | None = None,
        optimizer: str = "sgd",
    ):
        """DP-SGD for ``plan.steps`` Poisson batches; commits the spent budget to the ledger.
        ``optimizer = "adam"``: DP-Adam (Opacus clips and noises the gradients, Adam steps on
        them: post-processing, so the accounting is the same).

        ``loss_fn`` (other model families) must return the MEAN over the batch axis of
        per-sample losses, each depending on its own sample only; it gets the plain model,
        which Opacus' hooks watch, so it works with the hooks and functorch modes only.
        """
        from opacus.grad_sample import AbstractGradSampleModule, prepare_module
        from opacus.optimizers import get_optimizer_class
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from fedbreast.shared.training.local import _training_layout, make_optimizer, run_steps

        mode = self.grad_sample_mode
        if mode == "fused" and loss_fn is not None:
            # fused clips per exam of the multi-view model's own loss; another family's per-sample
            # loss goes through Opacus' hooks engine (the same clipping, noise and accounting).
            mode = "hooks"
            log.info("dp-grad-sample-mode = fused: this model family's own loss trains with the hooks engine")
        self.engine = mode
        device = device or next(model.parameters()).device
        model.to(device).train()
        # fused: channels_last while training, as the plain loop (its samplers take any layout); hooks
        # and ghost would copy every conv input back to NCHW (see _ViewFolding).
        layout = _training_layout(model) if mode == "fused" else torch.contiguous_format
        model.to(memory_format=layout)
        # A BatchNorm layer with nothing to train (a BatchNorm backbone under dp-train-scope = head)
        # stays in eval mode: in train mode it would normalise with, and keep, private batch
        # statistics that DP-SGD does not account for.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        self.frozen = freeze_leading_blocks(model, self.freeze_blocks if self.train_scope == "last-blocks" else 0)
        # The privacy unit is the exam, and the multi-view model folds its views into the backbone's
        # batch. hooks/functorch keep that single, fast backbone call and sum each exam's views
        # (hooks: inside the grad samplers, _ViewFolding; functorch: after backward, _fold_views).
        # ew/ghost compute gradients or norms inside backward, so there the backbone is called
        # once per view (split_views), at about twice the cost of the single call on CPU.
        # fused (fused_dp.py) also keeps the single call: each exam's positions are all its views'.
        single_call = ("hooks", "functorch", "fused")
        fold = VIEWS if isinstance(model, MultiViewFusionNet) and mode in single_call else 0
        if not self.optimized:
            fold = 0
            model.to(memory_format=torch.contiguous_format)  # stock unfold2d needs NCHW
            if hasattr(model, "channels_last"):
                model.channels_last = False  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
        if hasattr(model, "split_views") and not fold:
            model.split_views = True  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"dp-train-scope = {self.train_scope!r} (dp-freeze-blocks = {self.freeze_blocks}) leaves no "
                "trainable parameter"
            )
        anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        plan = self.plan
        # Noise and sampling from OS entropy, never from the run's seed: anyone who knows the
        # seed (the coordinator) could otherwise regenerate the noise and subtract it.
        noise_gen = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        sample_gen = torch.Generator().manual_seed(secrets.randbits(63))
        if mode == "ew":
            amp = "off"  # torch's ExpandedWeights fails under bf16 autocast (mixed-dtype matmul)
        if loss_fn is not None and mode not in ("hooks", "functorch"):
            raise ValueError(
                f"dp-grad-sample-mode = {mode!r} needs the multi-view model's own loss; "
                "use hooks or functorch for this model family"
            )
        kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
        if mode == "ghost":
            kwargs["max_grad_norm"] = plan.max_grad_norm
        # fused: no Opacus wrapper; the clipped sum lands in .grad, and Opacus' ghost-mode optimizer
        # (noise, scaling, accounting only) takes it from there, as after ghost clipping.
        gsm = model if mode == "fused" else prepare_module(model, grad_sample_mode=mode, **kwargs)
        # Opacus' own samplers for hooks/ghost, with the conv fix (and per-exam folding for hooks).
        folding = (
            _ViewFolding(model, gsm, fold if mode == "hooks" else 0)
            if mode in ("hooks", "ghost") and self.optimized
            else None
        )
        opt_mode = "ghost" if mode == "fused" else mode
        opt = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=opt_mode)(
            optimizer=make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction="mean",
            generator=noise_gen,
        )
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(self.history)
        opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        criterion = DPLossFastGradientClipping(gsm, opt, PerExamCriterion(), "mean") if mode == "ghost" else None
        # After the optimizer exists: it records its parameters while they still need gradients.
        clipper = FusedClipper(model, params, fold) if mode == "fused" else None
        rule = _DPSteps(
            self, model, gsm, opt, accountant, criterion, params, anchor, proximal_mu, fold, sample_gen, clipper
        )
        try:
            stats = run_steps(
                rule,
                loader,
                epochs=1,  # unused: the plan fixes the steps, drawn by Poisson sampling
                steps=plan.steps,
                device=device,
                amp=amp,
                augment=augment,
                loss_fn=loss_fn,
                in_channels=int(getattr(model, "in_channels", 2)),
            )
        finally:
            if folding is not None:
                folding.close()
            if clipper is not None:
                clipper.close()  # hooks off, the trained parameters need gradients again
                model.to(memory_format=torch.contiguous_format)  # what the site sends, laid out as before
            elif isinstance(gsm, AbstractGradSampleModule):
                gsm.cleanup()  # remove Opacus' hooks and per-sample attributes from the model
            if hasattr(model, "split_views"):
                model.split_views = False  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
        n_steps = stats.steps
        self.ran = True
        self.history = [tuple(h) for h in accountant.history]  # type: ignore[misc]
        epsilon = epsilon_of(self.history, plan.delta)
        self.ledger.save(
            self.history,
            {
                "round": self.server_round,
                "steps": n_steps,
                "empty_steps": self.empty_steps,
                "noise_multiplier": plan.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "epsilon": epsilon,
                "delta": plan.delta,
                "time": round(time.time(), 3),
            },
        )
        log.info(
            "DP-SGD round %d: %d steps, noise %.3f, epsilon %.3f (delta %g)",
            self.server_round,
            n_steps,
            plan.noise_multiplier,
            epsilon,
            plan.delta,
        )
        return stats

    def _noise_step(
        self, opt: Any, accountant: Any, params: list[nn.Parameter], anchor: list[torch.Tensor] | None, mu: float
    ) -> None:
        """What DPOptimizer does for an empty batch: the gradient is pure noise (std sigma*C / E[B])."""
        std = self.plan.noise_multiplier * self.plan.max_grad_norm / self.plan.expected_batch_size
        for p in params:
            p.grad = torch.normal(0.0, std, p.shape, device=p.device, dtype=p.dtype, generator=opt.generator)
        _add_proximal(params, anchor, mu)
        opt.original_optimizer.step()
        opt.original_optimizer.zero_grad(set_to_none=True)
        accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        self.empty_steps += 1


class _DPSteps:
    """DP-SGD as the training loop's step rule (shared/training/local.py ``run_steps``):
    exactly ``plan.steps`` Poisson draws; each batch's per-exam gradients clipped, noised and
    accounted by Opacus' optimizer; an empty draw still a (noise-only) step of the mechanism."""

    skips_unlabelled = False

    def __init__(
        self,
        owner: LocalDP,
        plain_model: nn.Module,
        gsm: nn.Module,
        opt: Any,
        accountant: Any,
        criterion: Any,
        params: list[nn.Parameter],
        anchor: list[torch.Tensor] | None,
        mu: float,
        fold: int,
        sample_gen: torch.Generator,
        clipper: FusedClipper | None = None,
    ) -> None:
        self.owner, self.plain_model, self.model = owner, plain_model, gsm
        self.clipper = clipper
        self.opt, self.accountant, self.criterion = opt, accountant, criterion
        self.params, self.anchor, self.mu, self.fold, self.sample_gen = params, anchor, mu, fold, sample_gen
        self.functorch = owner.grad_sample_mode == "functorch"
        # Cleared before every forward pass, not only before backward: torch's ExpandedWeights
        # (mode ew) refuses a forward pass while a parameter still holds a per-sample gradient.
        opt.zero_grad(set_to_none=True)

    def batches(self, loader: Any, epochs: int, steps: int) -> Any:
        return self.owner.poisson_loader(loader, self.sample_gen)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.criterion is not None:  # ghost clipping: the loss wrapper runs the two backward passes
            return self.criterion(logits, torch.stack((labels.float(), mask.float()), -1))
        return per_exam_bce(logits, labels, mask).mean()

    def nothing_to_learn(self) -> bool:
        _drop_activations(self.plain_model)  # a family's forward ran, but no backward will
        if self.clipper is not None:
            self.clipper.clear()
        self.opt.zero_grad(set_to_none=True)
        self.owner._noise_step(self.opt, self.accountant, self.params, self.anchor, self.mu)
        return True

    def regularise(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # FedProx's term is added to the noised gradient (_add_proximal), not clipped

    def step(self, loss: torch.Tensor, batch_size: int) -> None:
        loss.backward()
        if self.clipper is not None:
            self.clipper.clipped_grads(batch_size, self.owner.plan.max_grad_norm)  # per exam, into .grad
            self.clipper.optimizer_step(self._noise_and_step)
            return
        if self.fold and self.functorch:
            _fold_views(self.params, batch_size, self.fold)
        if self.opt.pre_step():  # clip per exam, add noise, account
            _add_proximal(self.params, self.anchor, self.mu)
            self.opt.original_optimizer.step()
        self.opt.zero_grad(set_to_none=True)  # before the next forward pass (see __init__)

    def _noise_and_step(self) -> None:
        if self.opt.pre_step():  # fused: .grad holds the clipped sum; add noise, scale, account
            _add_proximal(self.params, self.anchor, self.mu)
            self.opt.original_optimizer.step()
        self.opt.zero_grad(set_to_none=True)


class _ViewFolding:
    """Grad samplers for this wrapper only: Opacus' own, with two changes.

    1. Conv2d inputs are made contiguous first: Opacus' ``unfold2d`` assumes NCHW strides and
       silently computes wrong per-sample gradients for channels_last inputs (our models).
    2. ``views`` > 0 (hooks mode, multi-view model): per-exam gradients straight from the
       folded backbone call, never per image. The backbone sees batch * views images
       (exam-major); each hooked layer there is told its batch is ``batch`` exams (Opacus'
       ``max_batch_len``, which also scales the mean loss's gradients per exam) and its
       sampler sums over an exam's views: for Conv2d inside the batched matmul, for other
       layers (GroupNorm, Linear) by summing the per-image rows.
    """

    def __init__(self, model: nn.Module, gsm: Any, views: int) -> None:
        self.views = views
        self.modules = (
            [
                m
                for part in (getattr(model, "backbone", None), getattr(model, "embed", None))
                if isinstance(part, nn.Module)
                for m in part.modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))
            ]
            if views
            else []
        )
        samplers = dict(type(gsm).GRAD_SAMPLERS)
        gsm.GRAD_SAMPLERS = {t: self._folded(f) for t, f in samplers.items()}  # this wrapper only
        self.handles = []
        for m in self.modules:
            m._dp_views = views  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
            self.handles.append(m.register_forward_hook(self._set_batch))

    def _set_batch(self, module: nn.Module, inputs: tuple, _out: Any) -> None:
        if module.training and torch.is_grad_enabled():
            module.max_batch_len = inputs[0].shape[0] // self.views

    def _folded(self, sampler: Callable) -> Callable:
        def run(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
            views = getattr(layer, "_dp_views", 0)
            if type(layer) is nn.Conv2d:
                if views and layer.groups == 1:
                    return _conv_grad_per_exam(layer, activations[0], backprops, views)
                activations = [activations[0].contiguous()] + list(activations[1:])
            if not views:
                return sampler(layer, activations, backprops)
            out = sampler(layer, activations, backprops)
            return {p: g.reshape(g.shape[0] // views, views, *g.shape[1:]).sum(1) for p, g in out.items()}

        return run

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.modules:
            for attr in ("_dp_views", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)


def _conv_grad_per_exam(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, views: int) -> dict:
    """Per-exam weight gradient of a conv called on exam-major views: sum over views of
    backprops @ unfolded inputs^T, accumulated in one (batch, out, in*k*k) tensor."""
    from opacus.utils.tensor_utils import unfold2d

    x = x.to(backprops.dtype).contiguous()  # unfold2d assumes NCHW strides
    n = x.shape[0] // views
    a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    b = backprops.reshape(a.shape[0], -1, a.shape[-1])
    a = a.view(n, views, *a.shape[1:])
    b = b.view(n, views, *b.shape[1:])
    ret = {}
    if layer.weight.requires_grad:
        g = torch.bmm(b[:, 0], a[:, 0].transpose(1, 2))
        for v in range(1, views):
            g.baddbmm_(b[:, v], a[:, v].transpose(1, 2))
        ret[layer.weight] = g.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = b.sum((1, 3))
    return ret


def _fold_views(params: list[nn.Parameter], batch: int, views: int) -> None:
    """Per-image gradients of the backbone (batch * views rows, exam-major) -> per-exam gradients.

    Opacus scales per-sample gradients of a mean loss by the layer's batch (batch * views), the
    loss is a mean over exams, so each exam's gradient is the sum over its views divided by views.
    """
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.shape[0] == batch * views:
            folded = gs.reshape(batch, views, *gs.shape[1:]).sum(1) / views
            p.grad_sample = folded  # type: ignore[attr-defined]  # Opacus adds grad_sample at runtime
        elif gs is not None and (not isinstance(gs, torch.Tensor) or gs.shape[0] != batch):
            raise RuntimeError(
                f"per-sample gradient of shape {tuple(getattr(gs, 'shape', ()))} fits neither "
                f"{batch} exams nor {batch} x {views} views"
            )


def _drop_activations(model: nn.Module) -> None:
    # A forward without backward leaves Opacus' captured inputs behind; the next backward would mix them in.
    for m in model.modules():
        if hasattr(m, "activations"):
            m.activations = []  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor | Module
        if hasattr(m, "max_batch_len"):
            del m.max_batch_len


def _add_proximal(params: list[nn.Parameter], anchor: list[torch.Tensor] | None, mu: float) -> None:
    # FedProx's term does not touch the data, so it is added after the noise at no privacy cost.
    if anchor is None:
        return
    for p, a in zip(params, anchor):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)


class _EmptySafe(torch.utils.data.Dataset):
    """Lets a Poisson batch sampler draw nobody: ``__getitems__([])`` is an empty dict."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> Any:
        if not indices:
            return {}
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(indices)
        from torch.utils.data import default_collate

        return default_collate([self.dataset[i] for i in indices])


def local_dp_for(context: Context, cfg: RunConfig, site_dir: Path, n_train: int, server_round: int) -> LocalDP | None:
    """The site's DP decision for a train message: None (no local DP), a LocalDP round, or
    DPRefused with the reason when the site's policy forbids the round."""
    ceiling = site_ceiling(context.node_config)
    if cfg.dp == "off":
        if ceiling is not None:
            raise DPRefused(
                f"this site's policy ({CEILING_KEY} = {ceiling:g}) requires differential privacy, "
                "but the run has dp = off"
            )
        return None
    if cfg.dp == "central":
        if ceiling is not None:
            raise DPRefused(
                f"this site's policy ({CEILING_KEY} = {ceiling:g}) needs dp = local: central DP "
                "adds noise at the coordinator, so the site cannot bound its own epsilon"
            )
        return None
    from fedbreast.shared.training.tasks import task_for  # here: tasks imports the training stack

    unit = task_for(cfg).dp_unit
    if ceiling is not None and unit != "exam":
        raise DPRefused(
            f"this site's {CEILING_KEY} = {ceiling:g} bounds epsilon per patient, but DP-SGD in model "
            f"{cfg.model!r} protects one training {unit} (a patch or lesion; a patient has several), so a "
            "patient's epsilon would be larger than the one accounted"
        )
    plan = plan_local_round(cfg, n_train)
    key = run_key(context.run_config, context.run_id)
    ledger = PrivacyLedger.for_run(site_dir, key)
    if ceiling is not None:
        projected = ledger.projected_epsilon(plan)
        # The ceiling is for the site's data, not per run: a fresh run does not start at 0.
        elsewhere = lifetime_epsilon(site_dir, exclude_run=key)
        if projected + elsewhere > ceiling:
            raise DPRefused(
                f"privacy ceiling: round {server_round} would bring this site's lifetime epsilon to "
                f"{projected + elsewhere:.3f} (this run {projected:.3f} with delta {plan.delta:g}, "
                f"{ledger.epsilon(plan.delta):.3f} of it spent so far; earlier runs and releases "
                f"{elsewhere:.3f}), above this site's {CEILING_KEY} = {ceiling:g}"
            )
    return LocalDP(
        plan, ledger, cfg.dp_grad_sample_mode, cfg.dp_freeze_blocks, server_round, train_scope=cfg.dp_train_scope
    )


@contextmanager
def privacy_lock(site_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive hold on the site's privacy budget (``state/dp/.lock``, flock): every check of
    the lifetime epsilon and the spending that follows it happen under it, whichever process
    (one ClientApp process per message) and whichever run."""
    import fcntl

    folder = _dp_dir(site_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


RELEASES = "releases.jsonl"  # in state/dp: every noised release outside DP-SGD (histograms)


def _dp_dir(site_dir: str | os.PathLike[str]) -> Path:
    return Path(site_dir) / "state" / "dp"


def lifetime_epsilon(site_dir: str | os.PathLike[str], exclude_run: str | None = None) -> float:
    """Epsilon this site has spent on its data over all runs: each run's DP-SGD ledger (its last
    round's epsilon) plus every noised release, composed by addition (basic composition, an
    upper bound). ``exclude_run``: the ledger key of the run being planned (its own accountant
    composes its rounds more tightly). An unreadable record refuses (DPRefused): never a reset."""
    total = 0.0
    folder = _dp_dir(site_dir)
    if not folder.is_dir():
        return 0.0
    for path in sorted(folder.glob("*.json")):
        if path.stem == exclude_run:
            continue
        ledger = PrivacyLedger(path)
        if ledger.rounds:
            total += float(ledger.rounds[-1].get("epsilon", 0.0) or 0.0)
        elif ledger.history:  # a ledger without round entries: recompute (delta 1e-5 is what runs use)
            total += ledger.epsilon(1e-5)
    releases = folder / RELEASES
    if releases.exists():
        for n, line in enumerate(releases.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                total += float(json.loads(line)["epsilon"])
            except (ValueError, KeyError, TypeError):
                raise DPRefused(f"privacy release record {releases} line {n} is unreadable; not releasing") from None
    return total


def record_release(site_dir: str | os.PathLike[str], run: str, what: str, epsilon: float) -> None:
    """Charge one noised release (e.g. a Laplace histogram) to the site's lifetime budget,
    durably, before it leaves."""
    path = _dp_dir(site_dir) / RELEASES
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"run": run, "what": what, "epsilon": float(epsilon), "time": round(time.time(), 3)}) + "\n"
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


# ---- central DP: the site's side (the coordinator's is server/central_dp.py) ----------------


def central_dp_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod for central DP: Flower's ``fixedclipping_mod`` when the coordinator sends a
    clipping norm, a pass-through otherwise (so runs without central DP and "unable" replies
    are untouched), plus the equal aggregation weight."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if not any(KEY_CLIPPING_NORM in c for c in msg.content.config_records.values()):
        return call_next(msg, context)
    inner: dict[str, Any] = {}

    def run(m: Message, c: Context) -> Message:
        inner["reply"] = call_next(m, c)
        return inner["reply"]

    out = fixedclipping_mod(msg, context, run)
    reply = inner.get("reply")
    if reply is not None and not reply.has_error() and len(reply.content.array_records) == 0:
        return reply  # the site answered "unable": nothing to clip
    if not out.has_error():
        for record in out.content.metric_records.values():
            record[CENTRAL_WEIGHT_KEY] = 1
    return out
