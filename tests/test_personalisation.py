"""Patient-specific fine-tuning (seed 000), site personalisation kept on the site's disk,
FedBN, and the cross-site evaluation matrix (issue 4, items 2, 3 and 7)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from clientapp_messages import as_task, request, site_context
from test_preprocess import breast_image, circle_lesion, make_record
from test_simulation import TINY
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.cache import build_cache, open_cache
from fedbreast.shared.data.datasets import LesionPatchDataset, NormalPatchDataset
from fedbreast.shared.data.preprocess import PreprocessConfig
from fedbreast.shared.data.schema import Label, Lesion, ShapeKind, Split
from fedbreast.shared.models import build_backbone
from fedbreast.shared.training.patient_finetune import (
    PatientFinetuner,
    PSFTConfig,
    evaluate_patient_finetune,
    malignancy_logit,
)
from fedbreast.shared.training.personalise import (
    PersonalSettings,
    PersonalStore,
    SitePersonaliser,
    norm_state_keys,
    state_digest,
)

NATIVE = PreprocessConfig(window="dicom", crop_breast=True, pad="none", size=None, orientation="none")
ROWS, COLS = 160, 120
BLOB = (0.3, 0.5, 0.08)
WHOLE = Lesion(kind=ShapeKind.BOX, points=((0.0, 0.0), (COLS - 1.0, ROWS - 1.0)))
P, N = 24, 12  # patch side, patches per image


class PatchNet(nn.Module):
    """A registry backbone + one linear layer: (B, 1, h, w) -> (B,) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, feat = build_backbone("smallcnn", 1)
        self.fc = nn.Linear(feat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)).squeeze(1)


# ---- patient-specific fine-tuning on real patch datasets -------------------------------------------


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> dict:
    """Test-split patients: P0/P2 malignant, P1 benign (each with a normal other breast);
    P3 has one breast whose lesion covers it all: no normal tissue to sample."""
    root = tmp_path_factory.mktemp("psft")
    recs = []
    plan = {"P0": ("L", Label.MALIGNANT), "P1": ("L", Label.BENIGN), "P2": ("R", Label.MALIGNANT)}
    for p, (side, label) in plan.items():
        for lat, chest in (("L", "left"), ("R", "right")):
            lesion = lat == side
            for view in ("CC", "MLO"):
                img = breast_image(ROWS, COLS, chest=chest, blob=BLOB if lesion else None, seed=len(recs))
                recs.append(
                    make_record(
                        root,
                        f"{p}{lat}{view}",
                        img,
                        patient=p,
                        exam=f"E{p}",
                        laterality=lat,
                        view=view,
                        energy="DES",
                        label=label if lesion else Label.NORMAL,
                        lesions=(circle_lesion(ROWS, COLS, chest, BLOB),) if lesion else (),
                        split=Split.TEST,
                    )
                )
    for view in ("CC", "MLO"):
        recs.append(
            make_record(
                root,
                f"P3L{view}",
                breast_image(ROWS, COLS, seed=9),
                patient="P3",
                exam="EP3",
                laterality="L",
                view=view,
                energy="DES",
                label=Label.MALIGNANT,
                lesions=(WHOLE,),
                split=Split.TEST,
            )
        )
    assert build_cache(root, recs, NATIVE).failed == 0
    cache = open_cache(root, NATIVE)
    return {
        "lesion": LesionPatchDataset(recs, cache, split="test", patch=P, n_patches=N, seed=0),
        "normal": NormalPatchDataset(recs, cache, split="test", patch=P, n_patches=N, margin=2, seed=0),
    }


def _model() -> PatchNet:
    torch.manual_seed(0)
    return PatchNet().eval()


def test_patient_finetune_changes_predictions_and_reports_with_and_without(patches):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    res = evaluate_patient_finetune(
        model, patches["lesion"], patches["normal"], PSFTConfig(lr=1e-2, batch_size=16), torch.device("cpu")
    )
    # Units are lesion images: 2 views x 4 patients; both arms score the same ones.
    assert len(res.y) == 8 and res.y.tolist().count(0) == 2 and len(res.p_base) == len(res.p_psft) == 8
    assert res.patients == 3 and res.skipped == {"no normal tissue": 1} and res.normal_patches == 3 * 4 * N
    assert res.steps == 3 * 3  # 48 normal patches per patient in batches of 16, one epoch
    # Fine-tuned towards "benign" on normal tissue: every fine-tuned patient's scores fall.
    tuned = ~np.isclose(res.p_base, res.p_psft)
    assert tuned.sum() == 6 and (res.p_psft[tuned] < res.p_base[tuned]).all()
    # P3 (no normal tissue) keeps its base scores in both arms.
    assert np.allclose(res.p_base[~tuned], res.p_psft[~tuned])
    for k, v in model.state_dict().items():  # the evaluated model itself is untouched
        assert torch.equal(v, before[k]), k
    m = res.metrics("test", include_base=True)
    assert {"test_auc", "test_auc_psft", "test_spec_at_sens100", "test_spec_at_sens100_psft"} <= set(m)
    assert m["test_psft_patients"] == 3 and m["test_psft_skipped_patients"] == 1 and m["test_n_psft"] == 8
    assert 0.0 <= m["test_auc_psft"] <= 1.0 and m["test_psft_seconds_per_patient"] > 0
    assert all(isinstance(v, (int, float)) for v in m.values())  # aggregates only: no per-patient values


def test_each_patient_starts_from_the_base_model(patches):
    """The working copy is reset per patient: a patient's scores do not depend on who came before."""
    cfg = PSFTConfig(lr=1e-2, batch_size=16)
    alone = evaluate_patient_finetune(_model(), patches["lesion"], patches["normal"], cfg, patients=["P1"])
    after = evaluate_patient_finetune(_model(), patches["lesion"], patches["normal"], cfg, patients=["P0", "P1"])
    assert np.allclose(after.p_psft[-2:], alone.p_psft, atol=1e-6)


def test_head_scope_trains_only_the_last_layer_on_cached_features(patches):
    model = _model()
    tuner = PatientFinetuner(model, PSFTConfig(lr=1e-2, batch_size=16, scope="head"), torch.device("cpu"))
    res = evaluate_patient_finetune(
        model, patches["lesion"], patches["normal"], PSFTConfig(lr=1e-2, batch_size=16, scope="head")
    )
    assert res.patients == 3 and (res.p_psft <= res.p_base + 1e-9).all() and not np.allclose(res.p_psft, res.p_base)
    lesion = patches["lesion"]
    batch = lesion.__getitems__(lesion.indices_for_patient("P0"))
    normal = patches["normal"].__getitems__(patches["normal"].indices_for_patient("P0"))
    pairs = tuner.head_inputs([dict(normal)])
    assert tuner.head_name == "fc" and tuner.cache_features  # the head's output is the model's output
    tuner.finetune_head(pairs, torch.Generator().manual_seed(0))
    base = model.state_dict()
    for k, v in tuner.work.state_dict().items():
        assert torch.equal(v, base[k]) != k.startswith("fc."), k  # only the head moved
    assert tuner.score([dict(batch)]).shape == (len(batch["x"]),)


def test_two_class_heads_score_the_malignant_class():
    out = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    assert torch.allclose(torch.sigmoid(malignancy_logit(out)), torch.softmax(out, 1)[:, 1])
    with pytest.raises(ValueError, match="patch classifier output"):
        malignancy_logit(torch.zeros(2, 3))


# ---- personal state on the site's disk, FedBN --------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3))).squeeze(1)


def test_personal_model_survives_a_restart_and_is_reused(tmp_path):
    calls = []

    def fine_tune(m: nn.Module) -> None:
        calls.append(1)
        with torch.no_grad():
            m.fc.bias.add_(1.0)

    torch.manual_seed(0)
    model = BNNet()
    digest = state_digest(model.state_dict())
    settings = PersonalSettings(epochs=1)
    first, reused = SitePersonaliser(PersonalStore(tmp_path, "runkey"), settings).personal_model(
        model, digest, 1, fine_tune
    )
    assert not reused and calls == [1] and torch.allclose(first.fc.bias, model.fc.bias + 1)
    # A fresh process: new objects, only the disk carries over.
    again, reused = SitePersonaliser(PersonalStore(tmp_path, "runkey"), settings).personal_model(
        model, digest, 1, fine_tune
    )
    assert reused and calls == [1] and torch.equal(again.fc.bias, first.fc.bias)
    # New global weights: fine-tuned again, and the file now names the new global model.
    with torch.no_grad():
        model.fc.weight.mul_(2)
    _, reused = SitePersonaliser(PersonalStore(tmp_path, "runkey"), settings).personal_model(
        model, state_digest(model.state_dict()), 2, fine_tune
    )
    assert not reused and calls == [1, 1]
    assert (tmp_path / "state" / "personal" / "runkey.pt").exists()
    # A state file from a later round belongs to another run in a reused run directory: ignored.
    _, reused = SitePersonaliser(PersonalStore(tmp_path, "runkey"), settings).personal_model(
        model, state_digest(model.state_dict()), 1, fine_tune
    )
    assert not reused and calls == [1, 1, 1]


def test_a_damaged_state_file_is_not_fatal(tmp_path):
    store = PersonalStore(tmp_path, "k")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not a torch file")
    assert store.load() == {}
    with pytest.raises(ValueError, match="run key"):
        PersonalStore(tmp_path, "../escape")


def test_fedbn_norm_layers_stay_local(tmp_path):
    torch.manual_seed(0)
    glob = BNNet()
    received = {k: v.clone() for k, v in glob.state_dict().items()}
    keys = norm_state_keys(glob)
    assert set(keys) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    site = SitePersonaliser(PersonalStore(tmp_path, "k"), PersonalSettings(fedbn=True))
    assert not site.use_local_norms(glob, 1)  # nothing stored yet: the global norms are used
    local = copy.deepcopy(glob).train()
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        local(torch.randn(8, 1, 6, 6) + 3).sum().backward()
        opt.step()
    sent = site.reply_state(local, received, 1)
    for k in keys:  # the reply carries the received norm entries, unchanged
        assert torch.equal(sent[k], received[k]), k
    assert not torch.equal(sent["conv.weight"], received["conv.weight"])
    # Next round: the new global model gets the site's own trained norm layers back, nothing else.
    fresh = BNNet()
    conv = fresh.conv.weight.detach().clone()
    assert site.use_local_norms(fresh, 2)
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], local.state_dict()[k]), k
    assert torch.equal(fresh.conv.weight, conv)
    assert not torch.equal(fresh.state_dict()["bn.running_mean"], received["bn.running_mean"])


# ---- through the ClientApp handlers and a real simulation --------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    from fedbreast.simulation.simulate import prepare_federation

    data_dir = tmp_path_factory.mktemp("federation")
    prepare_federation(data_dir, sites=3, patients=8, seed=0, echo=lambda *_: None)
    return data_dir


def _clear_caches() -> None:
    from fedbreast.client.personal import _normal_patches
    from fedbreast.shared.data.site_data import open_site
    from fedbreast.shared.training import tasks

    open_site.cache_clear()
    tasks._open_family.cache_clear()
    _normal_patches.cache_clear()


def test_fedbn_and_personalisation_through_the_client_handlers(tmp_path, federation):
    from fedbreast.client.app import evaluate, train
    from fedbreast.server.strategies import build_strategy
    from fedbreast.shared.models.factory import build_model

    as_task()
    cfg = RunConfig(**{**TINY, "rounds": 1}, workers=0, local_steps=2, personal_steps=2, fedbn=True)
    run_config = {**cfg.to_flower(), "run-dir": str(tmp_path / "run")}
    torch.manual_seed(0)
    model = build_model(cfg)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    norms = set(norm_state_keys(model))
    replies = []
    for k in (1, 2):
        ctx = site_context(federation / "sites" / f"site-{k}", run_config, site_name=f"site-{k}")
        replies.append(train(request("train", 1, arrays=glob), ctx))
    for r in replies:
        sent = r.content["arrays"].to_torch_state_dict()
        assert all(np.array_equal(sent[k].numpy(), glob[k]) for k in norms)
        assert any(not np.array_equal(sent[k].numpy(), glob[k]) for k in set(glob) - norms)
    # The server's FedAvg over the replies leaves the global norm layers as they were.
    agg, _ = build_strategy(cfg).aggregate_train(1, replies)
    agg = {k: v.numpy() for k, v in agg.items()}
    assert all(np.allclose(agg[k], glob[k]) for k in norms)
    assert any(not np.allclose(agg[k], glob[k]) for k in set(glob) - norms)
    # Evaluate: global and personalised metrics side by side; the personal model is kept on disk...
    ctx = site_context(federation / "sites" / "site-1", run_config, site_name="site-1")
    first = dict(evaluate(request("evaluate", 1, arrays=agg), ctx).content["metrics"])
    assert {"test_auc", "test_auc_personal", "val_auc_personal", "test_exams_personal"} <= set(first)
    assert first["personal_reused"] == 0
    assert list((federation / "sites" / "site-1" / "state" / "personal").glob("*.pt"))
    # ... and reused after a restart (every in-memory cache cleared), with the same results.
    _clear_caches()
    second = dict(evaluate(request("evaluate", 1, arrays=agg), ctx).content["metrics"])
    assert second["personal_reused"] == 1
    for key in ("test_auc_personal", "test_loss_personal", "val_loss_personal"):
        assert first[key] == second[key] or (np.isnan(first[key]) and np.isnan(second[key])), key


def test_patient_finetune_in_the_birads_evaluate_reply(tmp_path, federation):
    from fedbreast.client.app import evaluate
    from fedbreast.shared.models.factory import build_model

    as_task()
    cfg = RunConfig(
        model="birads",
        backbone="smallcnn",
        patch_size=32,
        n_patches=8,
        patch_energies="DES,FFDM",
        patient_finetune=True,
        psft_batch_size=32,
        psft_lr=1e-2,
        workers=0,
        bootstrap=50,
        hist_bins=64,
        rounds=1,
    )
    run_config = {**cfg.to_flower(), "run-dir": str(tmp_path / "run")}
    torch.manual_seed(0)
    arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    replies = []
    for k in (1, 3):
        ctx = site_context(federation / "sites" / f"site-{k}", run_config, site_name=f"site-{k}")
        replies.append(dict(evaluate(request("evaluate", 1, arrays=arrays), ctx).content["metrics"]))
    assert set(replies[0]) == set(replies[1])  # Flower needs the same keys from every site
    for m in replies:
        assert {"test_auc", "test_auc_psft", "test_spec_at_sens100_psft", "val_auc_psft"} <= set(m)
        assert m["test_psft_patients"] >= 1 and m["test_psft_normal_patches"] > 0 and m["test_n_psft"] == m["test_n"]
        # Only aggregates: the histograms are the reply's only lists, as without fine-tuning.
        assert {k for k, v in m.items() if isinstance(v, list)} == {
            "test_hist_pos",
            "test_hist_neg",
            "val_hist_pos",
            "val_hist_neg",
        }


def test_simulation_with_cross_site_matrix(tmp_path, federation):
    from fedbreast.server.metric_store import MetricStore
    from fedbreast.simulation.simulate import simulate

    run = tmp_path / "run"
    overrides = {**TINY, "rounds": 1, "personal_epochs": 1, "fedbn": True, "cross_site": True}
    # In-process: the cross-site phase's messages and replies are the real ones; Ray's transport
    # is test_simulation.py's.
    result = simulate(
        run, sites=3, patients=8, overrides=overrides, data_dir=federation, echo=lambda *_: None, engine="inprocess"
    )
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(run)
    models = ["global"] + [f"site-{k} personal" for k in (1, 2, 3)]
    cells = {(r["site"], r["model"]) for r in store.rows("cross-site")}
    assert cells == {(f"site-{k}", m) for k in (1, 2, 3) for m in models}
    with open(run / "cross_site.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["test_site", "test_n"] + [f"auc[{m}]" for m in models]
    assert [r[0] for r in rows[1:]] == ["site-1", "site-2", "site-3"] and all(len(r) == 6 for r in rows[1:])
    summary = (run / "summary.md").read_text()
    assert "Global vs personalised model" in summary and "Cross-site evaluation" in summary
    assert all("test_auc_personal" in r for r in store.rows("evaluate"))


def test_no_fine_tuning_outside_dp_sgd_when_dp_is_on_or_the_site_requires_it(tmp_path, federation):
    """Personal and patient-specific fine-tuning train on the site's data without DP-SGD. A run
    config with dp on refuses them (the site validates its own copy), and a site whose policy
    requires DP refuses every message that would run them, with the reason; nothing is trained."""
    from fedbreast.client.app import cross_site, evaluate, personal
    from fedbreast.server.exchange import to_record
    from fedbreast.shared import protocol
    from fedbreast.shared.data.rules import ConfigError
    from fedbreast.shared.models.factory import build_model
    from fedbreast.shared.training.personalise import model_slot

    for changes, keys in (
        (dict(personal_epochs=2), "personal-epochs"),
        (dict(personal_steps=2, fedbn=True), "personal-steps"),
        (dict(model="birads", backbone="smallcnn", patient_finetune=True), "patient-finetune"),
    ):
        with pytest.raises(ConfigError, match=rf"dp = 'local': cannot run with {keys}: .*without DP-SGD"):
            RunConfig(**{**TINY, **changes}, dp="local")

    as_task()
    cfg = RunConfig(**{**TINY, "rounds": 1}, workers=0, personal_steps=2)  # dp = off: legal for the run
    run_config = {**cfg.to_flower(), "run-dir": str(tmp_path / "run")}
    torch.manual_seed(0)
    arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    site = federation / "sites" / "site-2"
    strict = site_context(site, run_config, site_name="site-2", policy={"dp-max-epsilon": 4.0})
    before = sorted((site / "state").rglob("*")) if (site / "state").exists() else []
    for handler, kind in ((evaluate, "evaluate"), (personal, "query.personal")):
        out = handler(request(kind, 1, arrays=arrays), strict)
        status = out.content["site"]
        assert status["status"] == "unable", kind
        assert "dp-max-epsilon = 4" in str(status["reason"]) and "personal-steps" in str(status["reason"]), status
        assert "arrays" not in out.content  # no weights leave
    ask = request("evaluate.cross_site", 1)
    ask.content[protocol.CONFIG]["models"] = ["global"]
    ask.content[model_slot(0)] = to_record(arrays)
    assert cross_site(ask, strict).content["site"]["status"] == "unable"
    after = sorted((site / "state").rglob("*")) if (site / "state").exists() else []
    assert after == before  # no personal model was trained or stored
    # The same site without the policy fine-tunes and answers.
    relaxed = site_context(site, run_config, site_name="site-2")
    assert evaluate(request("evaluate", 1, arrays=arrays), relaxed).content["site"]["status"] == "ok"
