"""Public pretraining for DP (issue 17 item 4): ``fedbreast pretrain`` writes a backbone file that
``weights-path`` loads exactly, and ``dp-train-scope`` chooses what DP-SGD fine-tunes over it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedbreast.cli import main
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.models import build_backbone
from fedbreast.shared.models.backbones import WeightsFileError
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.dp import local_dp_for
from fedbreast.shared.training.local import train_local
from fedbreast.simulation.pretrain import pretrain
from fedbreast.simulation.simulate import prepare_federation

# What pretrain trains: the multiview family (2-channel LE + DES stem) on a tiny smallcnn.
TINY = dict(backbone="smallcnn", image_h=64, image_w=32, rounds=1, amp="off", workers=0, batch_size=4, bootstrap=20)
DEEPEST = "block3.0.weight"  # smallcnn's last conv, in the body's (and the file's) keys
STEM = "block0.0.weight"


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("public")
    # A generated federation of its own seed: data public to the consortium, not the private sites.
    prepare_federation(root / "data", sites=2, patients=6, seed=4242, echo=lambda *_: None)
    out = root / "weights.pt"
    info = pretrain(root / "data" / "sites", out, dict(TINY), echo=lambda *_: None)
    return {"root": root, "sites": root / "data" / "sites", "out": out, "info": info}


def _body(model: nn.Module) -> nn.Module:
    return model.backbone.body  # type: ignore[union-attr,return-value]


def test_the_pretrained_backbone_loads_through_weights_path_exactly(public) -> None:
    info, out = public["info"], public["out"]
    assert out.is_file() and info["part"] == "backbone" and info["stem_channels"] == 2 and len(info["sites"]) == 2
    trained = _body(info["network"]).state_dict()
    fresh = build_model(RunConfig(**TINY, weights_path=str(out)))
    loaded = _body(fresh).state_dict()
    assert list(loaded) == list(trained)
    for key, value in trained.items():  # every tensor, the deepest conv and the 2-channel stem included
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded[DEEPEST], trained[DEEPEST]) and loaded[STEM].shape[1] == 2
    assert not torch.equal(loaded[DEEPEST], _body(build_model(RunConfig(**TINY))).state_dict()[DEEPEST])
    # A 1-channel family gets the 2-channel stem averaged and rescaled as for an ImageNet file:
    # mean over the trained channels x 2 / 1, i.e. their sum (a grey image on both channels gives the same).
    one, _ = build_backbone("smallcnn", 1, out)
    stem = one.body.state_dict()[STEM]
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, trained[STEM].sum(1, keepdim=True))
    assert torch.equal(one.body.state_dict()[DEEPEST], trained[DEEPEST])
    # The file names its backbone: another backbone is refused naming the file.
    with pytest.raises(WeightsFileError, match=r"weights\.pt holds a pretrained 'smallcnn' backbone.*'rawnet'"):
        build_backbone("rawnet", 1, out)


def test_a_groupnorm_pretraining_is_what_a_dp_run_starts_from_and_only_a_dp_run(public) -> None:
    out = public["root"] / "weights-gn.pt"
    info = pretrain(public["sites"], out, dict(TINY), norm="group", echo=lambda *_: None)
    trained = _body(info["network"]).state_dict()
    assert not any(k.endswith("running_mean") for k in trained)
    dp_model = build_model(RunConfig(**TINY, dp="local", weights_path=str(out)))
    loaded = _body(dp_model).state_dict()
    assert list(loaded) == list(trained)
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    assert not torch.equal(loaded["block3.1.weight"], torch.ones_like(trained["block3.1.weight"]))
    with pytest.raises(ConfigError, match=r"weights-gn\.pt.*pretrained for DP"):
        build_model(RunConfig(**TINY, weights_path=str(out)))
    # norm = group: a run without DP builds the DP form and starts from the same file (the no-DP
    # arm of a DP comparison), under another model signature than the BatchNorm model.
    plain = RunConfig(**TINY, norm="group", weights_path=str(out))
    no_dp = _body(build_model(plain)).state_dict()
    assert list(no_dp) == list(trained) and all(torch.equal(no_dp[k], v) for k, v in trained.items())
    assert plain.model_signature() == RunConfig(**TINY, dp="local").model_signature()
    assert plain.model_signature() != RunConfig(**TINY).model_signature()
    with pytest.raises(ConfigError, match="norm = 'batch': DP-SGD cannot clip per-exam gradients through BatchNorm"):
        RunConfig(**TINY, dp="local", norm="batch")  # dp-train-scope = last-blocks trains BatchNorm layers


class Exams(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, 2, 64, 32, generator=g)
        self.y = torch.randint(0, 2, (n, 2), generator=g).float()
        self.mask = torch.ones(n, 2, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "y_mask": self.mask[i]}


@pytest.mark.parametrize(
    ("scope", "frozen", "trained"),
    [
        ("head", ("backbone.",), ("cc_head.", "mlo_head.")),
        ("last-blocks", ("backbone.body.block0.",), ("backbone.body.block3.", "cc_head.")),
        ("all", (), ("backbone.body.block0.", "backbone.body.block3.", "cc_head.")),
    ],
)
def test_dp_train_scope_fine_tunes_only_its_parameters(public, tmp_path, scope, frozen, trained) -> None:
    cfg = RunConfig(
        **{**TINY, "batch_size": 2},
        dp="local",
        dp_noise_multiplier=1.0,
        dp_freeze_blocks=1,
        dp_train_scope=scope,
        weights_path=str(public["out"]),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    context = SimpleNamespace(node_config={}, run_config={"run-dir": str(tmp_path / "run")}, run_id=7)
    session = local_dp_for(context, cfg, tmp_path / "site", 6, 1)  # type: ignore[arg-type]
    assert session is not None and session.train_scope == scope
    loader = torch.utils.data.DataLoader(Exams(6), batch_size=2)
    train_local(model, loader, lr=0.05, amp="off", dp=session)
    after = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    changed = {n for n in names if not torch.equal(after[n], before[n])}
    kept = [n for n in names if frozen and n.startswith(frozen)]
    assert kept or not frozen
    assert not changed.intersection(kept), f"{scope}: {sorted(changed.intersection(kept))} were trained"
    for prefix in trained:
        assert any(n.startswith(prefix) for n in changed), f"{scope}: nothing under {prefix} was trained"
    if scope == "head":
        assert session.frozen and all(n.startswith("backbone.") for n in session.frozen)
        assert {n for n in names if n.startswith("backbone.")}.isdisjoint(changed)
        assert changed  # the head trained
    # The scope's requires_grad flags are restored after the round (freeze's mechanism).
    if scope != "last-blocks":  # last-blocks keeps today's behaviour: its leading blocks stay off
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_dp_train_scope_is_validated_naming_the_key() -> None:
    assert RunConfig().dp_train_scope == "last-blocks"  # today's dp-freeze-blocks behaviour
    with pytest.raises(ConfigError, match="dp-train-scope = 'backbone': must be one of head, last-blocks, all"):
        RunConfig.from_flower({"dp-train-scope": "backbone"})


def test_a_folder_without_ingested_sites_is_refused_naming_it(tmp_path, capsys) -> None:
    empty = tmp_path / "public-empty"
    (empty / "not-a-site").mkdir(parents=True)
    out = tmp_path / "w.pt"
    argv = ["pretrain", "--sites-dir", str(empty), "--out", str(out), "--backbone", "smallcnn"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no ingested site" in err and not out.exists()
    assert main(["pretrain", "--sites-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err
    assert main(["pretrain", "--sites-dir", str(empty), "--out", str(out), "--set", "dp=local"]) == 2
    assert "pretraining is on public data, without DP" in capsys.readouterr().err


def test_the_whole_pretrained_network_is_a_checkpoint_a_run_starts_from(public, tmp_path) -> None:
    from fedbreast.server.checkpoints import CheckpointError, initial_checkpoint
    from fedbreast.simulation.simulate import simulate

    info = pretrain(public["sites"], tmp_path / "w.pt", dict(TINY), norm="group", model_out=tmp_path / "pre")
    ckpt_path = Path(info["checkpoint"])
    assert ckpt_path == tmp_path / "pre" / "checkpoints" / "final.pt"
    # Heads included: every tensor of the network, for the DP run and for the no-DP run with norm = group.
    for cfg in (RunConfig(**TINY, dp="local"), RunConfig(**TINY, norm="group")):
        ckpt = initial_checkpoint(ckpt_path, cfg.model_signature())
        model = build_model(cfg)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in ckpt.arrays.items()}, strict=True)
        trained = info["network"].state_dict()
        assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    # simulate --baselines: the local-only and pooled models start from it too (like for like).
    from fedbreast.simulation.baselines import _started

    cfg = RunConfig(**TINY, norm="group")
    started = _started(cfg, initial_checkpoint(ckpt_path, cfg.model_signature()).arrays)
    assert started is not None and all(torch.equal(started.state_dict()[k], v) for k, v in trained.items())
    # A BatchNorm run cannot start from it: refused before any round, naming the file.
    with pytest.raises(CheckpointError, match=r"final\.pt: was written by a different model"):
        simulate(
            tmp_path / "run",
            sites_dir=public["sites"],
            overrides=dict(TINY),
            init_checkpoint=ckpt_path,
            engine="inprocess",
            echo=lambda *_: None,
        )


def test_a_batchnorm_backbone_under_dp_stays_fixed_in_eval_mode_and_only_the_head_trains(public, tmp_path) -> None:
    """norm = batch with dp-train-scope = head: the public BatchNorm backbone (a --norm batch file)
    is a fixed map; no private batch statistic enters its running stats, and DP-SGD trains the head."""
    cfg = RunConfig(
        **{**TINY, "batch_size": 2},
        dp="local",
        dp_noise_multiplier=1.0,
        dp_train_scope="head",
        norm="batch",
        weights_path=str(public["out"]),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    context = SimpleNamespace(node_config={}, run_config={"run-dir": str(tmp_path / "run")}, run_id=7)
    session = local_dp_for(context, cfg, tmp_path / "site", 6, 1)  # type: ignore[arg-type]
    assert session is not None
    train_local(model, torch.utils.data.DataLoader(Exams(6), batch_size=2), lr=0.05, amp="off", dp=session)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("cc_head.", "mlo_head.")) for k in changed), sorted(changed)
    with pytest.raises(ConfigError, match="dp-train-scope = head"):
        RunConfig(**TINY, dp="central", norm="batch", dp_train_scope="head")


def test_baselines_give_the_pooled_test_auc_over_every_sites_test_units(tmp_path) -> None:
    """simulate --baselines (issue 17 item 5): besides each site's AUC, the AUC of all sites' test
    units together, the figure the federated run's pooled test AUC is compared with."""
    import numpy as np

    from fedbreast.shared.metrics import binary_metrics
    from fedbreast.shared.training.local import predict
    from fedbreast.shared.training.tasks import task_for
    from fedbreast.simulation.baselines import ALL_SITES, run_baselines, train_pooled

    cfg = RunConfig(**TINY)
    # Enough patients that the pooled test split holds both classes (the `public` sites' do not).
    dirs = prepare_federation(tmp_path / "data", sites=2, patients=16, seed=7, echo=lambda *_: None)
    sites = [task_for(cfg).open(d, cfg) for d in dirs]
    out = run_baselines(sites, cfg, echo=lambda *_: None)
    assert set(out) == {s.name for s in sites} | {ALL_SITES}
    # The pooled arm's figure is the AUC of the concatenated scores, not a mean of per-site AUCs.
    model = train_pooled(sites, cfg)  # seeded: the same model again
    scored = [predict(model, s.loader("test", cfg.batch_size, shuffle=False, workers=0), amp="off") for s in sites]
    y = np.concatenate([np.asarray(t[0]) for t in scored])
    p = np.concatenate([np.asarray(t[1]) for t in scored])
    assert 0 < y.sum() < len(y), "the test needs both classes in the pooled test split"
    assert out[ALL_SITES]["pooled"] == pytest.approx(binary_metrics(y, p)["auc"])
    assert 0.0 <= out[ALL_SITES]["local"] <= 1.0
