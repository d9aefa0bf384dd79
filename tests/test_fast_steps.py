"""Issue 19 item 7: the fused DP-SGD engine (dp-grad-sample-mode = fused) against autograd and
against the hooks engine. Tiny models, seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_dp import Exams, context, dp_round
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training import dp as dpmod
from fedbreast.shared.training.dp import PrivacyLedger
from fedbreast.shared.training.fused_dp import FusedClipper
from fedbreast.shared.training.local import train_local


def tiny(backbone: str, h: int = 32, w: int = 32, **kw) -> RunConfig:
    return RunConfig(backbone=backbone, image_h=h, image_w=w, amp="off", workers=0, batch_size=3, dp="local", **kw)


def deterministic(cfg: RunConfig) -> nn.Module:
    """The DP model with dropout off, so two engines (and autograd exam by exam) see the same function."""
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def clipped_reference(model: nn.Module, data: Exams, clip: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each exam's gradient by autograd on that exam alone, its norm, Opacus' clip factor, the sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(data)):
        model.zero_grad()
        dpmod.per_exam_bce(model(data.x[i : i + 1]), data.y[i : i + 1], data.mask[i : i + 1]).mean().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).float()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
        norms.append(norm)
    return torch.stack(norms), total


@pytest.mark.parametrize(
    "backbone, freeze", [("smallcnn", 0), ("resnet18", 0), ("resnet18", 3), ("mobilenet_v3_small", 0)]
)
def test_fused_norms_and_clipped_sum_equal_autograd_exam_by_exam(backbone, freeze):
    # channels_last model, four views folded into the backbone's batch: the fused engine's per-exam
    # norms (ghost identity for resnet18's layer4 at this size, per-exam gradients elsewhere) and
    # its clipped sum equal autograd's, exam by exam; the clip lies between the exams' norms.
    # mobilenet_v3_small: depthwise convs go through Opacus' sampler, which needs NCHW inputs
    # (channels_last ones gave zero per-exam gradients there: norms about half the true ones).
    cfg = tiny(backbone, dp_freeze_blocks=freeze)
    model = deterministic(cfg).train().to(memory_format=torch.channels_last)
    dpmod.freeze_leading_blocks(model, freeze)
    reference = copy.deepcopy(model)
    data = Exams(3, h=32)
    ref_norms, _ = clipped_reference(reference, data, 1e9)
    clip = float(ref_norms.median())  # one exam above, one at, one below
    _, ref_sum = clipped_reference(reference, data, clip)
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = FusedClipper(model, params, views=4)
    assert not any(p.requires_grad for p in params)  # autograd computes no weight gradient meanwhile
    dpmod.per_exam_bce(model(data.x), data.y, data.mask).mean().backward()
    norms = clipper.clipped_grads(3, clip)
    clipper.close()
    assert all(p.requires_grad for p in params)
    assert not model._forward_hooks and not model.backbone.body._forward_pre_hooks
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    scale = max(float(r.abs().max()) for r in ref_sum)  # fp32 sums in another order: tolerance on the scale
    for p, r in zip(params, ref_sum):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-5 * scale)
    if backbone == "resnet18" and freeze:  # the frozen blocks stay out of it
        assert model.backbone.body.conv1.weight.grad is None


def test_fused_refuses_a_parameter_shared_by_two_layers():
    # Each layer's part would be normed alone (no cross term of the exam's summed gradient) and
    # the last layer's sum would overwrite the other's: refused, as an unsupported layer is.
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    params = list(model.parameters())
    with pytest.raises(ValueError, match="shared by two layers"):
        FusedClipper(model, params, views=1)
    assert all(p.requires_grad for p in params)


def one_step(cfg: RunConfig, mode: str, model: nn.Module, clip: float, noise: float) -> tuple[list, dpmod.LocalDP]:
    """One DP-SGD step of ``mode`` through train_local on 3 exams (Poisson rate 1: all of them),
    plain SGD with lr 1: returns each parameter's update and the session."""
    plan = dpmod.DPPlan(
        noise_multiplier=noise,
        sample_rate=1.0,
        steps=1,
        planned_steps=1,
        max_grad_norm=clip,
        delta=1e-5,
        expected_batch_size=3,
        target_epsilon=0.0,
    )
    session = dpmod.LocalDP(plan, PrivacyLedger(Path("/nonexistent/x.json")), mode, cfg.dp_freeze_blocks, 1)
    session.ledger.save = lambda *a, **k: None  # type: ignore[method-assign]  # no disk here
    before = [p.detach().clone() for p in model.parameters()]
    loader = torch.utils.data.DataLoader(Exams(3, h=cfg.image_h, w=cfg.image_w), batch_size=3)
    train_local(model, loader, lr=1.0, momentum=0.0, weight_decay=0.0, amp="off", dp=session)
    return [b - p.detach() for b, p in zip(before, model.parameters())], session


@pytest.mark.parametrize("backbone, freeze", [("smallcnn", 0), ("resnet18", 4)])
def test_fused_update_equals_the_hooks_engines_without_noise_and_accounts_the_same(backbone, freeze):
    # The whole path (train_local, Poisson loader, Opacus' optimizer for scaling and accounting):
    # with noise 0 the fused step moves every weight as the hooks engine's does.
    cfg = tiny(backbone, h=64, dp_freeze_blocks=freeze)
    model = deterministic(cfg)
    hooks_model = copy.deepcopy(model)
    probe = copy.deepcopy(model).train()
    dpmod.freeze_leading_blocks(probe, freeze)
    clip = float(clipped_reference(probe, Exams(3, h=64), 1e9)[0].median())
    fused, s_fused = one_step(cfg, "fused", model, clip, 0.0)
    hooks, s_hooks = one_step(cfg, "hooks", hooks_model, clip, 0.0)
    assert s_fused.frozen == s_hooks.frozen and (freeze == 0) == (not s_fused.frozen)
    scale = max(float(h.abs().max()) for h in hooks)
    assert scale > 0
    for f, h in zip(fused, hooks):
        torch.testing.assert_close(f, h, rtol=0, atol=1e-4 * scale)
    assert s_fused.history == s_hooks.history == [(0.0, 1.0, 1)]
    # the engine gave its parameters back: trainable exactly where the hooks engine's are
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in hooks_model.parameters()]


def test_fused_noise_has_the_mechanisms_scale():
    # Noise std per coordinate is sigma * C / E[B] (Opacus' optimizer adds it, as in every mode):
    # the update minus the noise-free update, over the heads' and last block's coordinates.
    cfg = tiny("smallcnn", dp_freeze_blocks=0)
    sigma, clip = 2.0, 0.5
    base = deterministic(cfg)
    clean, _ = one_step(cfg, "fused", copy.deepcopy(base), clip, 0.0)
    noisy, session = one_step(cfg, "fused", copy.deepcopy(base), clip, sigma)
    diff = torch.cat([(n - c).flatten() for n, c in zip(noisy, clean)])
    assert diff.numel() > 10_000
    expected = sigma * clip / 3
    assert abs(float(diff.std()) / expected - 1) < 0.05
    assert abs(float(diff.mean())) < 0.05 * expected
    assert session.history == [(sigma, 1.0, 1)]


def test_fused_mode_trains_from_the_run_config_and_a_familys_own_loss_goes_through_hooks(tmp_path):
    cfg = RunConfig(
        backbone="smallcnn",
        image_h=64,
        image_w=32,
        amp="off",
        workers=0,
        augment=False,
        batch_size=2,
        dp="local",
        dp_grad_sample_mode="fused",
        dp_freeze_blocks=1,
    )
    model, session, stats = dp_round(cfg, tmp_path)
    assert stats.steps == 3 and session.metrics()["dp_epsilon"] > 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert session.engine == "fused"
    # A model family's own loss_fn: fused clips the multi-view model's per-exam loss; another
    # family's per-sample loss trains through the hooks engine instead, DP-SGD all the same.
    fresh = dpmod.local_dp_for(context("runs/fused"), cfg, tmp_path / "other", 6, 1)
    stats = train_local(
        build_model(cfg),
        torch.utils.data.DataLoader(Exams(6), batch_size=2),
        lr=0.05,
        amp="off",
        dp=fresh,
        loss_fn=lambda m, b: (dpmod.per_exam_bce(m(b["x"]), b["y"], b["y_mask"]).mean(), len(b["x"])),
    )
    assert fresh.engine == "hooks" and stats.steps == 3 and fresh.metrics()["dp_epsilon"] > 0


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18"])
def test_fused_clipped_contribution_stays_within_the_bound_under_bf16_autocast(backbone):
    # The clipping bound C is the sensitivity the privacy accounting assumes. Under bf16 autocast
    # the records are bf16; a bf16 clip coefficient or a bf16 weight-gradient computation of the
    # clipped sum let an exam's contribution reach about 1.002-1.003 C. The engine on one exam at a
    # time (its .grad is then that exam's clipped gradient), C below every exam's norm: every
    # contribution within 1e-3 of C (about 2e-4 in fp32 arithmetic on the bf16 records).
    cfg = tiny(backbone)
    model = deterministic(cfg).train().to(memory_format=torch.channels_last)
    data = Exams(6, h=32)
    clip = 0.5 * float(clipped_reference(copy.deepcopy(model), data, 1e9)[0].min())
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = FusedClipper(model, params, views=4)
    ratios = []
    for i in range(len(data)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(data.x[i : i + 1])
        dpmod.per_exam_bce(logits, data.y[i : i + 1], data.mask[i : i + 1]).mean().backward()
        norm = float(clipper.clipped_grads(1, clip)[0])
        assert norm > 1.5 * clip  # clipped
        grads = [p.grad for p in params if p.grad is not None]
        ratios.append(float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads))) / clip)
        for p in params:
            p.grad = None
    clipper.close()
    assert max(ratios) <= 1 + 1e-3, ratios
    assert min(ratios) >= 1 - 1e-3, ratios
