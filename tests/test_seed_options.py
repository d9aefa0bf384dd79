"""The seeds' training recipes as run-config keys (issue 17 item 2): optimizer (seed 000's Adam),
freeze (seed 000's FT-AlexNet, seed 003's semi-tune), the vgg_fc head's dropout (seed 001) and
the inception_v3 / googlenet backbones (seeds 003, 002)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import FAMILIES, family_of
from fedbreast.shared.models import MultiViewFusionNet, build_backbone
from fedbreast.shared.models.backbones import WeightsFileError
from fedbreast.shared.models.birads import BiradsNet
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training import dp as dpmod
from fedbreast.shared.training.dp import PrivacyLedger
from fedbreast.shared.training.freeze import frozen_modules
from fedbreast.shared.training.local import SGDSteps, run_steps, train_local
from fedbreast.shared.training.tasks import train_settings

TINY = dict(backbone="smallcnn", image_h=32, image_w=32, amp="off", workers=0, augment=False, batch_size=2)


def exams(n: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of random 4-view exams, every breast labelled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 2, h, w, generator=g)
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * (n // 2))
    return [{"x": x[i : i + 2], "y": y[i : i + 2], "y_mask": torch.ones(2, 2, dtype=torch.bool)} for i in (0, 2)]


def tiny_model(seed: int = 0, **kw) -> MultiViewFusionNet:
    torch.manual_seed(seed)
    return MultiViewFusionNet("smallcnn", 2, image_hw=(32, 32), **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the run-config keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, good, bad",
    [
        ("optimizer", ["sgd", "adam"], "rmsprop"),
        ("freeze", ["none", "backbone", "all-but-head"], "layers"),
        ("head-dropout", [0.0, 0.5], 1.0),
        ("backbone", ["inception_v3", "googlenet"], "inception_v4"),
    ],
)
def test_each_key_is_validated_at_the_edge_naming_it(key, good, bad):
    for value in good:
        cfg = RunConfig.from_flower({key: value})
        assert cfg.to_flower()[key] == value
    with pytest.raises(ConfigError, match=f"run config: {key} = "):
        RunConfig.from_flower({key: bad})
    if key == "head-dropout":
        with pytest.raises(ConfigError, match="head-dropout"):
            RunConfig.from_flower({key: -0.1})


@pytest.mark.parametrize(
    "model, backbone, key, least",
    [
        ("dualmode", "inception_v3", "box-size", 75),  # seed 003
        ("mgus", "googlenet", "crop-size", 15),  # seed 002
        ("birads", "alexnet", "patch-size", 63),  # seed 000
        ("multiview", "inception_v3", "image-w", 75),
    ],
)
def test_a_backbone_too_large_for_the_familys_images_is_refused_naming_the_key(model, backbone, key, least):
    run = {"model": model, "backbone": backbone}
    assert RunConfig.from_flower({**run, key: max(least, 16)}).backbone == backbone  # the least size runs
    if least > 16:
        with pytest.raises(ConfigError, match=rf"{key} = {least - 1}: .*{backbone}.*at least {least} x {least} px"):
            RunConfig.from_flower({**run, key: least - 1})
    # The generated federation's preset sizes run with the seed's backbone.
    preset = {k: v for k, v in FAMILIES[model].preset.items() if k != "backbone"}
    if model in ("dualmode", "mgus"):
        assert RunConfig(**{**preset, "backbone": backbone}).backbone == backbone


def test_defaults_keep_todays_training_and_only_the_backbone_changes_the_signature():
    cfg = RunConfig()
    assert (cfg.optimizer, cfg.freeze, cfg.head_dropout) == ("sgd", "none", 0.0)
    settings = train_settings(cfg.replace(optimizer="adam", freeze="backbone"), 1, torch.device("cpu"))
    assert settings["optimizer"] == "adam" and settings["freeze"] == "backbone"
    sig = cfg.model_signature()
    for change in (dict(optimizer="adam"), dict(freeze="backbone"), dict(head_dropout=0.5)):
        assert cfg.replace(**change).model_signature() == sig, change  # same tensors
    assert cfg.replace(backbone="inception_v3").model_signature() != sig
    assert cfg.replace(backbone="googlenet").model_signature() != sig


# ---- optimizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_both_optimizers_train_a_step(optimizer):
    model = tiny_model()
    before = snapshot(model)
    stats = train_local(model, exams()[:1], lr=1e-3, weight_decay=0.0, amp="off", steps=1, optimizer=optimizer)
    assert stats.steps == 1
    moved = [(model.state_dict()[k] - before[k]).abs() for k, _ in model.named_parameters()]
    changed = torch.cat([d.flatten() for d in moved])
    assert float(changed.max()) > 0
    if optimizer == "adam":
        # Adam's first step moves every parameter with a gradient by about lr (m / sqrt(v) = +-1);
        # SGD's moves by lr * |grad|, far from it.
        nonzero = changed[changed > 1e-7]
        assert float(nonzero.max()) <= 1e-3 * (1 + 1e-3)
        assert float(nonzero.median()) == pytest.approx(1e-3, rel=0.05)


def test_adam_keeps_its_moments_across_steps_and_fedprox_still_pulls():
    model = tiny_model()
    rule = SGDSteps(model, lr=1e-3, momentum=0.9, weight_decay=5e-4, proximal_mu=0.1, optimizer="adam")
    assert isinstance(rule.opt, torch.optim.Adam)
    stats = run_steps(
        rule,
        exams(),
        epochs=1,
        steps=0,
        device=torch.device("cpu"),
        amp="off",
        augment=None,
        loss_fn=None,
        in_channels=2,
    )
    assert stats.steps == 2
    state = rule.opt.state[rule.params[0]]
    assert int(state["step"]) == 2 and float(state["exp_avg"].abs().sum()) > 0 and float(state["exp_avg_sq"].sum()) > 0
    # FedProx's term is in the loss Adam minimises: > 0 once the weights left the anchor.
    zero = torch.zeros(())
    assert float(rule.regularise(zero).detach()) > 0
    with pytest.raises(ValueError, match="optimizer must be one of"):
        SGDSteps(model, lr=1e-3, momentum=0.9, weight_decay=0.0, proximal_mu=0.0, optimizer="lbfgs")


def test_dp_sgd_runs_with_adam():
    cfg = RunConfig(**TINY, dp="local", dp_freeze_blocks=4)
    model = build_model(cfg)
    plan = dpmod.DPPlan(
        noise_multiplier=1.0,
        sample_rate=1.0,
        steps=2,
        planned_steps=2,
        max_grad_norm=1.0,
        delta=1e-5,
        expected_batch_size=2,
        target_epsilon=0.0,
    )
    session = dpmod.LocalDP(plan, PrivacyLedger(Path("/nonexistent/never-written.json")), "hooks", 4, 1)
    session.ledger.save = lambda *a, **k: None  # type: ignore[method-assign]  # no disk in this test
    before = snapshot(model)

    class Exams(torch.utils.data.Dataset):
        def __init__(self) -> None:
            batch = exams(2)[0]
            self.items = [{k: v[i] for k, v in batch.items()} for i in range(2)]

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            return self.items[i]

    loader = torch.utils.data.DataLoader(Exams(), batch_size=2)
    stats = train_local(
        model, loader, lr=1e-3, weight_decay=0.0, amp="off", dp=session, optimizer="adam", freeze="none"
    )
    assert stats.steps == 2 and session.metrics()["dp_epsilon"] > 0
    after = model.state_dict()
    assert not torch.equal(after["cc_head.weight"], before["cc_head.weight"])
    assert torch.equal(
        after["backbone.body.block0.0.weight"], before["backbone.body.block0.0.weight"]
    )  # dp-freeze-blocks


# ---- freeze ----------------------------------------------------------------------------------------


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_freeze_backbone_leaves_the_backbone_bit_identical(optimizer):
    model = tiny_model()
    before = snapshot(model)
    train_local(model, exams(), lr=0.05, amp="off", freeze="backbone", optimizer=optimizer)
    changed = _changed(model, before)
    frozen = {k for k in before if k.startswith("backbone.")}
    assert any(k.endswith("running_mean") for k in frozen)  # BN statistics are among them
    assert not changed & frozen, sorted(changed & frozen)
    assert {"cc_head.weight", "mlo_head.weight"} <= changed
    assert all(p.requires_grad for p in model.parameters())  # the scope is undone afterwards
    assert all(m.training for m in model.modules())
    # Without the scope, the same step moves the backbone (weights and BN statistics).
    free = tiny_model()
    train_local(free, exams(), lr=0.05, amp="off", optimizer=optimizer)
    assert _changed(free, before) & frozen


def test_freeze_all_but_head_trains_only_the_logit_layers():
    model = tiny_model(view_fusion="concat")
    before = snapshot(model)
    train_local(model, exams(), lr=0.05, amp="off", freeze="all-but-head", proximal_mu=0.01)
    assert _changed(model, before) == {"head.weight", "head.bias"}


def test_freeze_backbone_is_ft_alexnets_last_two_layers_on_the_birads_network():
    # Seed 000's FT-AlexNet: the convolutions fixed, FC1 and FC2 (the birads network's two FC
    # layers) trained. rawnet stands in for alexnet (same structure here: backbone + fc1 + fc2).
    torch.manual_seed(0)
    net = BiradsNet(backbone="rawnet", birads_dim=4, birads_fusion="feature")
    before = snapshot(net)
    g = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(4, 1, 32, 32, generator=g),
        "b": torch.rand(4, 4, generator=g),
        "y": torch.tensor([0, 1, 0, 1.0]),
    }

    def loss_fn(m, b):
        logits = m(b["x"], b["b"])
        return nn.functional.binary_cross_entropy_with_logits(logits, b["y"]), 4

    train_local(net, [batch, batch], lr=1e-3, amp="off", loss_fn=loss_fn, freeze="backbone", optimizer="adam")
    changed = _changed(net, before)
    assert changed == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_freeze_scopes_cover_every_familys_network():
    for name in ("multiview", "birads", "dualmode", "mgus", "latefusion"):
        model = family_of(name).build_model(RunConfig(model=name, backbone="smallcnn", image_h=32, image_w=32))
        for scope in ("backbone", "all-but-head"):
            params = {id(p) for m in frozen_modules(model, scope) for p in m.parameters(recurse=False)}
            assert 0 < len(params) < len(list(model.parameters())), (name, scope)
    with pytest.raises(ValueError, match="freeze must be one of"):
        frozen_modules(tiny_model(), "everything")


# ---- head dropout ------------------------------------------------------------------------------------


def test_head_dropout_reaches_the_vgg_fc_head():
    cfg = RunConfig(backbone="vgg16_bn", head="vgg_fc", image_h=32, image_w=32, head_dropout=0.5)
    model = family_of("multiview").build_model(cfg)
    drops = [m for m in model.embed.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.5 for d in drops)
    default = family_of("multiview").build_model(cfg.replace(head_dropout=0.0))
    assert all(m.p == 0.0 for m in default.modules() if isinstance(m, nn.Dropout))
    # The pooled head's embedding dropout too.
    pooled = family_of("multiview").build_model(RunConfig(**TINY, head_dropout=0.3))
    assert isinstance(pooled.embed, nn.Dropout) and pooled.embed.p == 0.3


# ---- inception_v3 and googlenet ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractors() -> dict[str, nn.Module]:
    """Each new backbone built once for the module (inception_v3 takes seconds to initialise)."""
    torch.manual_seed(0)
    built = {name: build_backbone(name, 2) for name in ("inception_v3", "googlenet")}
    assert built["inception_v3"][1] == 2048 and built["googlenet"][1] == 1024
    return {name: extractor.eval() for name, (extractor, _) in built.items()}


@pytest.mark.parametrize("name, dim, sizes", [("inception_v3", 2048, (75, 96)), ("googlenet", 1024, (32, 96))])
def test_new_backbones_build_and_give_their_feature_width(extractors, name, dim, sizes):
    extractor = extractors[name]
    assert extractor.feat_dim == dim
    assert not any("aux" in n.lower() for n, _ in extractor.named_modules())  # aux heads disabled
    with torch.no_grad():
        for s in sizes:
            out = extractor(torch.randn(2, 2, s, s + 8))
            assert out.shape == (2, dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, least", [("inception_v3", 75), ("googlenet", 15), ("alexnet", 63)])
def test_too_small_inputs_are_refused_naming_the_size(extractors, name, least):
    extractor = extractors[name] if name in extractors else build_backbone(name, 2)[0]
    with pytest.raises(ValueError, match=rf"{name}.*at least {least} x {least} px; got {least - 1} x 80"):
        extractor(torch.randn(1, 2, least - 1, 80))


def test_a_local_weights_file_with_torchvisions_aux_heads_loads(tmp_path):
    # torchvision's googlenet file carries its aux heads: they are ignored, the rest loads.
    from torchvision import models

    full = models.googlenet(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "googlenet.pt"
    torch.save(full.state_dict(), path)
    extractor, _ = build_backbone("googlenet", 1, path)
    got = extractor.body.inception5b.branch1.conv.weight
    assert torch.equal(got, full.inception5b.branch1.conv.weight)
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("inception5b")}, bad)
    with pytest.raises(WeightsFileError, match="missing keys"):
        build_backbone("googlenet", 1, bad)
