"""Differential privacy: the DP-compatible model, DP-SGD with the accountant on disk, the
site's epsilon ceiling, max-aggregation of epsilon, config errors, and central DP through
Flower's wrapper and clipping mod in our own round loop. Tiny models on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedbreast.server.exchange import to_numpy, to_record
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training import dp as dpmod
from fedbreast.shared.training.accounting import CENTRAL_WEIGHT_KEY
from fedbreast.shared.training.dp import DPRefused, PrivacyLedger, local_dp_for
from fedbreast.shared.training.local import train_local

TINY = dict(backbone="smallcnn", image_h=64, image_w=32, amp="off", workers=0, augment=False, batch_size=2)


class Exams(torch.utils.data.Dataset):
    """Random 4-view exams with per-breast labels (one unlabelled breast in every third exam)."""

    def __init__(self, n: int, h: int = 64, w: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, 2, h, w, generator=g)
        self.y = torch.randint(0, 2, (n, 2), generator=g).float()
        self.mask = torch.ones(n, 2, dtype=torch.bool)
        self.mask[::3, 1] = False

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "y_mask": self.mask[i]}


def loader(n: int = 6, batch: int = 2, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Exams(n, **kw), batch_size=batch)


def context(run_dir: str = "runs/a", **node) -> SimpleNamespace:
    return SimpleNamespace(node_config=node, run_config={"run-dir": run_dir}, run_id=7)


def dp_round(cfg: RunConfig, site: Path, run_dir: str = "runs/a", round_: int = 1, n: int = 6, **node):
    """One site round as the ClientApp runs it: a fresh model, a fresh LocalDP, only the disk in common."""
    torch.manual_seed(0)
    model = build_model(cfg)
    session = local_dp_for(context(run_dir, **node), cfg, site, n, round_)
    stats = train_local(model, loader(n), lr=0.05, amp="off", dp=session)
    return model, session, stats


def test_dp_model_has_groupnorm_no_inplace_ops_and_the_servers_keys(tmp_path):
    cfg = RunConfig(**TINY, dp="local", dp_freeze_blocks=1)
    model = build_model(cfg)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = local_dp_for(context(), cfg, tmp_path, 6, 1)
    stats = train_local(model, loader(), lr=0.05, amp="off", dp=session)
    assert stats.steps == session.plan.steps == 3 and not model.split_views
    state = model.state_dict()
    # What the site sends: the unwrapped model's keys, exactly the coordinator's initial model's.
    assert list(state) == list(build_model(cfg).state_dict())
    assert not any("_module" in k for k in state)
    assert torch.equal(state["backbone.body.block0.0.weight"], before["backbone.body.block0.0.weight"])  # frozen
    assert not torch.equal(state["cc_head.weight"], before["cc_head.weight"])  # trained privately
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert session.metrics()["dp_epsilon"] > 0 and np.isnan(session.metrics()["train_loss"])


def test_resnet_residual_blocks_are_hook_safe(tmp_path):
    cfg = RunConfig(
        backbone="resnet18", image_h=32, image_w=32, amp="off", dp="local", dp_freeze_blocks=0, batch_size=2
    )
    model = build_model(cfg)
    assert type(model.backbone.body.layer1[0]).__module__ == "fedbreast.shared.training.dp"
    session = local_dp_for(context(), cfg, tmp_path, 2, 1)
    before = model.backbone.body.conv1.weight.detach().clone()
    stats = train_local(model, loader(2, h=32, w=32), lr=0.05, amp="off", dp=session)
    assert stats.steps == 1 and not torch.equal(before, model.backbone.body.conv1.weight)


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch", "ghost", "fused"])
def test_every_grad_sample_mode_trains(tmp_path, mode):
    cfg = RunConfig(**TINY, dp="local", dp_grad_sample_mode=mode, dp_freeze_blocks=1)
    model, session, stats = dp_round(cfg, tmp_path)
    assert stats.steps == 3 and session.metrics()["dp_epsilon"] > 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize(
    "engine, backbone", [("hooks", "smallcnn"), ("hooks", "resnet18"), ("functorch", "smallcnn"), ("ew", "smallcnn")]
)
def test_per_sample_gradients_are_exactly_each_exams_own_gradient(engine, backbone):
    # The backbone sees 4 views per exam; the unit of privacy is the exam. Compare Opacus'
    # per-sample gradients (hooks: folded in the grad samplers; functorch: folded after
    # backward; ew: one backbone call per view) with autograd on each exam alone. The model
    # is channels_last, which Opacus' own conv sampler gets wrong (see _ViewFolding).
    import copy

    from opacus.grad_sample import prepare_module

    cfg = RunConfig(**{**TINY, "backbone": backbone, "image_h": 32}, dp="local")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    reference = copy.deepcopy(model)
    data = Exams(3, h=32)
    x, y, m = data.x, data.y, data.mask
    gsm = prepare_module(model, grad_sample_mode=engine, batch_first=True, loss_reduction="mean")
    folding = dpmod._ViewFolding(model, gsm, 4) if engine == "hooks" else None
    model.split_views = engine == "ew"
    dpmod.per_exam_bce(gsm(x), y, m).mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if engine == "functorch":
        dpmod._fold_views(params, 3, 4)
    for i in range(3):
        reference.zero_grad()
        dpmod.per_exam_bce(reference(x[i : i + 1]), y[i : i + 1], m[i : i + 1]).mean().backward()
        for p, r in zip(params, reference.parameters()):
            torch.testing.assert_close(p.grad_sample[i], r.grad, rtol=1e-4, atol=1e-6)
    if folding is not None:
        folding.close()
    gsm.cleanup()


def test_per_exam_gradients_are_clipped_per_exam():
    # Without noise (a plan the config would refuse), one plain-SGD step moves the model by at
    # most lr * C: the mean of per-exam gradients each clipped to C.
    cfg = RunConfig(**TINY, dp="local", dp_freeze_blocks=4, dp_max_grad_norm=0.01)
    model = build_model(cfg)
    plan = dpmod.DPPlan(
        noise_multiplier=0.0,
        sample_rate=1.0,
        steps=1,
        planned_steps=1,
        max_grad_norm=0.01,
        delta=1e-5,
        expected_batch_size=6,
        target_epsilon=0.0,
    )
    session = dpmod.LocalDP(plan, PrivacyLedger(Path("/nonexistent/never-written.json")), "hooks", 4, 1)
    session.ledger.save = lambda *a, **k: None  # no disk in this test
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_local(model, loader(6, batch=6), lr=1.0, momentum=0.0, weight_decay=0.0, amp="off", dp=session)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 0.01 + 1e-6


def test_epsilon_accumulates_on_disk_across_fresh_engines_and_a_new_run_starts_at_zero(tmp_path):
    cfg = RunConfig(**TINY, dp="local", rounds=2, dp_epsilon=3.0)
    eps = []
    for round_ in (1, 2):
        _, session, _ = dp_round(cfg, tmp_path, round_=round_)
        eps.append(session.metrics()["dp_epsilon"])
    ledger_files = list((tmp_path / "state" / "dp").glob("*.json"))
    assert len(ledger_files) == 1 and len(json.loads(ledger_files[0].read_text())["rounds"]) == 2
    assert 0 < eps[0] < eps[1] <= 3.0 + 1e-6
    assert eps[1] > 2.5  # the noise was planned so that the budget is reached at the last round
    _, fresh, _ = dp_round(cfg, tmp_path, run_dir="runs/b")
    assert fresh.metrics()["dp_epsilon"] == pytest.approx(eps[0], rel=1e-6)
    assert len(list((tmp_path / "state" / "dp").glob("*.json"))) == 2


def test_empty_poisson_batches_are_noise_steps_and_are_accounted(tmp_path):
    cfg = RunConfig(**{**TINY, "batch_size": 1}, dp="local", local_steps=30)  # q = 1/4: P(empty draw) = 0.32
    _, session, stats = dp_round(cfg, tmp_path, n=4)
    assert stats.steps == 30 and session.empty_steps > 0
    assert sum(n for _, _, n in session.history) == 30


def test_the_site_ceiling_refuses_with_a_reason_naming_it(tmp_path):
    cfg = RunConfig(**TINY, dp="local", rounds=3, dp_noise_multiplier=1.0)
    _, session, _ = dp_round(cfg, tmp_path, round_=1)
    spent = session.metrics()["dp_epsilon"]
    with pytest.raises(DPRefused, match=r"dp-max-epsilon = .*") as exc:
        local_dp_for(context(**{"dp-max-epsilon": spent * 1.1}), cfg, tmp_path, 6, 2)
    assert "round 2" in str(exc.value) and "above this site's dp-max-epsilon" in str(exc.value)
    assert local_dp_for(context(**{"dp-max-epsilon": spent * 3}), cfg, tmp_path, 6, 2) is not None
    with pytest.raises(DPRefused, match="requires differential privacy, but the run has dp = off"):
        local_dp_for(context(**{"dp-max-epsilon": 8}), RunConfig(**TINY), tmp_path, 6, 1)
    with pytest.raises(DPRefused, match="needs dp = local"):
        local_dp_for(context(**{"dp-max-epsilon": 8}), RunConfig(**TINY, dp="central"), tmp_path, 6, 1)
    with pytest.raises(DPRefused, match="dp-max-epsilon = 'lots' is not a number"):
        local_dp_for(context(**{"dp-max-epsilon": "lots"}), cfg, tmp_path, 6, 1)


def test_a_corrupt_ledger_refuses_rather_than_resetting_epsilon(tmp_path):
    cfg = RunConfig(**TINY, dp="local")
    dp_round(cfg, tmp_path)
    (ledger,) = (tmp_path / "state" / "dp").glob("*.json")
    ledger.write_text("{broken")
    with pytest.raises(DPRefused, match="unreadable"):
        local_dp_for(context(), cfg, tmp_path, 6, 2)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(dp="on"), "dp"),
        (dict(dp="local", dp_delta=0.0), "dp-delta"),
        (dict(dp="local", dp_epsilon=-1.0), "dp-epsilon"),
        (dict(dp="local", dp_noise_multiplier=0.0), "dp-noise-multiplier"),
        (dict(dp="local", dp_max_grad_norm=0.0), "dp-max-grad-norm"),
        (dict(dp="local", dp_grad_sample_mode="fast"), "dp-grad-sample-mode"),
        (dict(dp="local", dp_freeze_blocks=-1), "dp-freeze-blocks"),
        (dict(dp="central", strategy="krum"), "dp"),
    ],
)
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"run config: {key} = "):
        RunConfig(**changes)
    with pytest.raises(ConfigError, match=rf"run config: {key} = "):
        RunConfig.from_flower({RunConfig.flower_key(k): v for k, v in changes.items()})


def test_dp_changes_the_model_signature():
    assert RunConfig(dp="local").model_signature() == RunConfig(dp="central").model_signature()
    assert RunConfig(dp="local").model_signature() != RunConfig().model_signature()


# ---- the coordinator: epsilon by maximum, central DP through our loop -------------------------------


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class Grid:
    """Answers train messages the way a ClientApp would (through the central-DP mod), per site."""

    def __init__(self, epsilons: dict[str, float], step: float = 1.0):
        self.epsilons, self.step = epsilons, step
        self.nodes = {100 + i: s for i, s in enumerate(epsilons)}
        self.n = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        self.replies = []
        for m in messages:
            self.n += 1
            m.metadata.__dict__["_message_id"] = f"m{self.n}"
            ids.append(f"m{self.n}")
            self.replies.append(dpmod.central_dp_mod(m, None, self._answer))
        return ids

    def pull_messages(self, ids):
        out, self.replies = self.replies, []
        return out

    def send_and_receive(self, messages, timeout=None):
        self.push_messages(messages)
        return self.pull_messages(None)

    def _answer(self, m: Message, _ctx) -> Message:
        site = self.nodes[m.metadata.dst_node_id]
        if m.metadata.message_type == "query":
            content = {"metrics": MetricRecord({"num-examples": 10, "train_exams": 10})}
        elif m.metadata.message_type == "train":
            arrays = {k: v.numpy() + self.step for k, v in m.content["arrays"].items()}
            metrics = {"num-examples": 10 * (1 + len(site)), "train_seconds": 0.1}
            if self.epsilons[site] >= 0:
                metrics.update(dp_epsilon=self.epsilons[site], dp_delta=1e-5)
            content = {"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}
        else:
            content = {"metrics": MetricRecord({"num-examples": 5, "val_auc": 0.7})}
        content["site"] = ConfigRecord({"name": site, "status": "ok", "reason": ""})
        reply = Message(RecordDict(content), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        return reply


def initial() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def test_epsilon_is_aggregated_by_maximum(tmp_path, task_identity):
    cfg = RunConfig(backbone="smallcnn", rounds=1, round_timeout=1, wait_for_sites=1)
    FederatedRun(Grid({"a": 1.0, "bb": 3.0, "ccc": 2.0}), cfg, tmp_path, initial(), echo=lambda s: None).run()
    (row,) = MetricStore(tmp_path).rows("aggregate-train")
    assert row["dp_epsilon"] == 3.0 and row["sites"] == 3 and row["num-examples"] == 20 + 30 + 40


def test_central_dp_clips_at_the_site_and_noises_the_mean_with_accounting(tmp_path, task_identity):
    cfg = RunConfig(
        backbone="smallcnn",
        rounds=2,
        round_timeout=1,
        wait_for_sites=1,
        dp="central",
        dp_max_grad_norm=0.5,
        dp_noise_multiplier=1.0,
    )
    fed = FederatedRun(Grid({"a": -1, "b": -1, "c": -1}, step=1.0), cfg, tmp_path, initial(), echo=lambda s: None)
    fed.run()
    rows = MetricStore(tmp_path).rows("aggregate-train")
    assert [r["round"] for r in rows] == [1, 2]
    assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]
    assert rows[0]["dp_noise_multiplier"] == 1.0
    # Each site's +1 update (norm 3) was clipped to 0.5 and the equal-weight mean noised (std
    # 1.0 * 0.5 / 3 per entry): about 1.0 of signal plus 0.7 of noise over two rounds, far from
    # the unclipped 6.0.
    moved = np.sqrt(sum(float((v**2).sum()) for v in fed.arrays.values()))
    assert 0 < moved < 3.0
    assert json.loads((tmp_path / "dp" / "central.json").read_text())["releases"] == 2


def test_central_mod_passes_through_without_a_clipping_norm_and_for_unable_replies(task_identity):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    arrays = to_record({"w": np.zeros(4, np.float32)})
    plain = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train"
    )
    big = to_record({"w": np.full(4, 10.0, np.float32)})

    def answer(m, _):
        return Message(RecordDict({"arrays": big, "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    out = dpmod.central_dp_mod(plain, None, answer)
    assert np.allclose(to_numpy(out.content["arrays"])["w"], 10.0) and CENTRAL_WEIGHT_KEY not in out.content["metrics"]
    clipped = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 2.0})}),
        dst_node_id=5,
        message_type="train",
    )
    out = dpmod.central_dp_mod(clipped, None, answer)
    assert np.linalg.norm(to_numpy(out.content["arrays"])["w"]) == pytest.approx(2.0, rel=1e-5)
    assert out.content["metrics"][CENTRAL_WEIGHT_KEY] == 1

    def unable(m, _):
        return Message(
            RecordDict(
                {
                    "metrics": MetricRecord({"num-examples": 0}),
                    "site": ConfigRecord({"name": "s", "status": "unable", "reason": "no data"}),
                }
            ),
            reply_to=m,
        )

    out = dpmod.central_dp_mod(clipped, None, unable)
    assert not out.has_error() and out.content["site"]["status"] == "unable"


# ---- a federated run ---------------------------------------------------------------------------------

# The real ServerApp round loop and ClientApp with its mods (central DP's fixedclipping_mod
# included) on real Flower messages, in this process: the DP code paths are the same as on
# Ray, whose transport test_simulation.py and test_secure_aggregation.py prove (each Ray
# simulation costs 40-60 s of start-up CPU on 2 cores; docs/test-suite.md).
ENGINE = "inprocess"


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> Path:
    """One generated 2-site federation for both DP simulations (its DP ledgers are per run)."""
    return tmp_path_factory.mktemp("dp-federation")


def test_simulation_with_local_dp_reports_growing_epsilon(tmp_path, two_sites):
    from fedbreast.simulation.simulate import simulate

    overrides = dict(
        backbone="smallcnn",
        image_h=64,
        image_w=32,
        bootstrap=50,
        hist_bins=64,
        rounds=2,
        dp="local",
        dp_epsilon=8.0,
        dp_freeze_blocks=1,
    )
    run = tmp_path / "run"
    result = simulate(run, sites=2, patients=8, overrides=overrides, data_dir=two_sites, engine=ENGINE)
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    by_site: dict[str, list[float]] = {}
    for r in sorted(store.rows("train"), key=lambda r: r["round"]):
        by_site.setdefault(r["site"], []).append(r["dp_epsilon"])
    assert len(by_site) == 2
    for eps in by_site.values():
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    agg = {r["round"]: r["dp_epsilon"] for r in store.rows("aggregate-train")}
    assert agg == {rnd: max(e[rnd - 1] for e in by_site.values()) for rnd in (1, 2)}
    assert all(r["train_loss"] is None for r in store.rows("train"))  # withheld under DP
    assert len(store.rows("evaluate")) == 4  # evaluation replies stay valid


def test_simulation_with_central_dp_clips_at_sites_and_accounts_at_the_server(tmp_path, two_sites):
    from fedbreast.simulation.simulate import simulate

    overrides = dict(
        backbone="smallcnn",
        image_h=64,
        image_w=32,
        bootstrap=50,
        hist_bins=64,
        rounds=2,
        dp="central",
        dp_epsilon=10.0,
        dp_max_grad_norm=0.5,
    )
    run = tmp_path / "run"
    result = simulate(run, sites=2, patients=8, overrides=overrides, data_dir=two_sites, engine=ENGINE)
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    assert len(store.rows("train")) == 4 and len(store.rows("evaluate")) == 4  # the mod is on train only
    assert all(r[CENTRAL_WEIGHT_KEY] == 1 for r in store.rows("train"))  # clipped by fixedclipping_mod
    eps = [r["dp_epsilon"] for r in sorted(store.rows("aggregate-train"), key=lambda r: r["round"])]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 10.0 + 1e-6
