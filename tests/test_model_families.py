"""Every seed model family: its parts (shapes, RawNet's size, the BI-RADS encoder, the cosine
loss, the MCC fusion maths), the site it cannot use, augmentation on real sites, and a tiny
real federated BI-RADS run on the mixed generated federation that must beat chance. The
pixel-only families' federated runs, which must beat chance too: tests/test_family_learning.py."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.birads import parse_birads_cell
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.schema import BiRads
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.families import FAMILIES, family_of
from fedbreast.shared.families.latefusion.task import confusion_table
from fedbreast.shared.models.birads import BiradsEncoder, BiradsNet
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.models.latefusion import FUSION_UNITS, LateFusionNet, mcc_from_counts, mcc_weights
from fedbreast.shared.models.mgus import CosineHead, cosface_loss
from fedbreast.shared.training.tasks import task_for
from fedbreast.simulation.simulate import PRESETS, prepare_federation, simulate

torch.set_num_threads(1)


# ---- parts ---------------------------------------------------------------------------------------


def test_rawnet_has_about_240k_parameters_and_scores_patches() -> None:
    net = BiradsNet(backbone="rawnet", birads_fusion="none")
    n = sum(p.numel() for p in net.parameters())
    assert 230_000 <= n <= 250_000, n  # seed 000: "around 240 K parameters"
    assert net(torch.randn(2, 1, 227, 227)).shape == (2,)
    assert net(torch.randn(3, 1, 64, 64)).shape == (3,)  # any patch size (the generated sites use 64 px)


@pytest.mark.parametrize(
    "model, inputs",
    [
        ("birads", lambda: (torch.randn(2, 1, 48, 48), torch.zeros(2, 21))),  # seed 000 groups + unknown slots
        ("dualmode", lambda: (torch.randn(2, 2, 2, 48, 48),)),
        ("latefusion", lambda: (torch.randn(2, 4, 1, 48, 48), torch.ones(2, 4, dtype=torch.bool))),
    ],
)
def test_family_output_shapes(model, inputs) -> None:
    net = build_model(RunConfig(model=model, backbone="smallcnn")).eval()
    out = net(*inputs())
    assert out.shape == ((2, 4) if model == "latefusion" else (2,))


def test_mgus_gives_512d_descriptors_and_three_logits() -> None:
    for loss in ("bce", "cosface"):
        net = build_model(RunConfig(model="mgus", backbone="smallcnn", mgus_loss=loss)).eval()
        out = net(torch.randn(3, 1, 48, 48), torch.randn(3, 1, 48, 48))
        assert out["d_mg"].shape == out["d_us"].shape == (3, 512)  # smallcnn's 64 features projected to 512
        assert out["mg"].shape == out["us"].shape == out["fused"].shape == (3,)


def test_birads_encoder_multi_valued_unknown_slots_and_out_of_lexicon() -> None:
    tokens, unknown = parse_birads_cell("mass_shape", "Round - Oval")
    assert tokens == ("round", "oval") and unknown == []
    enc = BiradsEncoder()
    assert enc.dim == 3 + 7 + 3 + 4 + 4 + 10 + 6  # lexicon values + one unknown slot per group
    v = enc.encode(BiRads(mass_shape=tokens, mass_margin=("spiculated",), bpe=("mild",)))
    on = {enc.slots[i] for i in np.flatnonzero(v)}
    assert {"mass_shape=round", "mass_shape=oval", "mass_margin=spiculated", "bpe=mild"} <= on
    # Empty groups fall into their unknown slot.
    assert {"internal_enhancement=unknown", "density=unknown", "assessment=unknown"} <= on
    assert "mass_shape=unknown" not in on
    # A value outside the lexicon maps to unknown, counted, never a crash.
    v2 = enc.encode({"mass_shape": ["star-shaped"], "bpe": ["mild"]})
    assert v2[enc.slots.index("mass_shape=unknown")] == 1 and enc.unknown_values == 1
    sub = BiradsEncoder(("mass_shape", "bpe"))
    assert sub.dim == 4 + 5
    with pytest.raises(ValueError, match="unknown BI-RADS group"):
        BiradsEncoder(("shape",))


def test_decision_fusion_max_linear_and_stacked() -> None:
    torch.manual_seed(0)
    b = torch.zeros(2, 37)
    p_cnn = torch.tensor([0.2, 0.9])
    for kind in ("max", "linear", "stacked"):
        net = BiradsNet(backbone="smallcnn", birads_fusion="decision", decision_fusion=kind, alpha=0.3)
        p_b = torch.sigmoid(net.birads_logit(b))
        got = net.fuse(p_cnn, b)
        if kind == "max":
            want = torch.maximum(p_cnn, p_b)
        elif kind == "linear":
            want = 0.3 * p_b + 0.7 * p_cnn
        else:  # initialised as the mean of the two logits
            lo = torch.log(p_cnn / (1 - p_cnn))
            want = torch.sigmoid(0.5 * lo + 0.5 * net.birads_logit(b))
        torch.testing.assert_close(got, want)
    feature = BiradsNet(backbone="smallcnn", birads_fusion="feature")
    assert feature.fc2.in_features == 256 + 37  # BI-RADS concatenated at the output of FC1


def test_cosface_loss_matches_its_definition() -> None:
    cos = torch.tensor([[0.2, 0.8], [0.6, -0.1]])
    y = torch.tensor([1, 0])
    s, m = 10.0, 0.3
    want = (
        -(
            math.log(math.exp(s * 0.5) / (math.exp(s * 0.2) + math.exp(s * 0.5)))
            + math.log(math.exp(s * 0.3) / (math.exp(s * 0.3) + math.exp(-s * 0.1)))
        )
        / 2
    )
    assert cosface_loss(cos, y, s, m).item() == pytest.approx(want, rel=1e-5)
    assert cosface_loss(cos, y, s, m) > cosface_loss(cos, y, s, 0.0)  # the margin makes it harder
    head = CosineHead(4, scale=s, margin=m)
    f = torch.randn(5, 4)
    c = head.cosines(f)
    assert c.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head(f), s * (c[:, 1] - c[:, 0]))


def test_mcc_weights_from_confusion_counts_and_the_two_stage_fusion() -> None:
    assert mcc_from_counts(40, 10, 40, 10) == pytest.approx(0.6)
    assert mcc_from_counts(0, 0, 10, 5) == 0.0  # undefined -> 0
    counts = [
        [40, 10, 40, 10],  # ffdm_cc   MCC 0.6
        [30, 20, 30, 20],  # ffdm_mlo  MCC 0.2
        [10, 30, 10, 30],  # cesm_cc   MCC -0.5 -> 0
        [45, 5, 45, 5],  # cesm_mlo  MCC 0.8
        [20, 20, 20, 20],  # ffdm      MCC 0 -> 0
        [50, 0, 50, 0],  # cesm      MCC 1
    ]
    w = mcc_weights(counts)
    np.testing.assert_allclose(w, [0.6, 0.2, 0.0, 0.8, 0.0, 1.0], atol=1e-6)
    net = LateFusionNet(backbone="smallcnn")
    net.fusion_mcc.copy_(torch.from_numpy(w))
    p = torch.tensor([[0.9, 0.5, 0.1, 0.7], [0.9, 0.5, 0.0, 0.0]])
    avail = torch.tensor([[True, True, True, True], [True, True, False, False]])
    fused = net.fuse(p, avail)
    ffdm = (0.6 * 0.9 + 0.2 * 0.5) / 0.8
    cesm = 0.7  # cesm_cc has weight 0
    # Modalities: ffdm weight 0, cesm weight 1 -> cesm; the second breast has no CESM -> ffdm alone.
    torch.testing.assert_close(fused, torch.tensor([cesm, ffdm]))
    # All weights 0 in a group: plain mean of what is available.
    net.fusion_mcc.zero_()
    torch.testing.assert_close(net.fuse(p, avail), torch.tensor([((0.9 + 0.5) / 2 + (0.1 + 0.7) / 2) / 2, 0.7]))


def test_late_fusion_sites_send_counts_and_the_server_sums_them_into_weights() -> None:
    net = LateFusionNet(backbone="smallcnn")
    p = torch.tensor([[0.9, 0.2, 0.8, 0.6], [0.1, 0.7, 0.0, 0.0], [0.6, 0.6, 0.3, 0.2]])
    avail = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    y = torch.tensor([1.0, 0.0, 0.0])
    table = confusion_table(net, p, avail, y, torch.ones(3, dtype=torch.bool))
    assert len(table) == 4 * len(FUSION_UNITS) and all(isinstance(v, int) for v in table)
    assert table[0:4] == [1, 1, 1, 0]  # ffdm_cc: tp (0.9, y1), fp (0.6, y0), tn (0.1, y0)
    assert table[8:12] == [1, 0, 1, 0]  # cesm_cc: breast 2 has no CESM
    arrays = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    other = [0] * 24
    out, agg = FAMILIES["latefusion"].after_evaluate(arrays, [{"val_confusion": table}, {"val_confusion": other}])
    np.testing.assert_allclose(out["fusion_mcc"], mcc_weights(np.asarray(table).reshape(6, 4)))
    assert set(agg) == {f"fusion_mcc_{u}" for u in FUSION_UNITS}
    assert out["fusion_mcc"].dtype == arrays["fusion_mcc"].dtype


def test_a_branch_only_some_sites_train_is_averaged_over_those_sites() -> None:
    from fedbreast.shared.families.aggregation import average_where_trained

    before = {"mg.w": np.zeros(2, np.float32), "us.w": np.zeros(2, np.float32), "n": np.array(3)}
    a = {"mg.w": np.full(2, 1.0, np.float32), "us.w": np.full(2, 3.0, np.float32), "n": np.array(4)}  # has US
    b = {"mg.w": np.full(2, 2.0, np.float32), "us.w": np.zeros(2, np.float32), "n": np.array(4)}  # no US: unchanged
    fedavg = {
        "mg.w": np.full(2, 1.75, np.float32),
        "us.w": np.full(2, 0.75, np.float32),
        "n": np.array(4),
    }  # weights 1:3
    updates = [(a, {"num-examples": 10}), (b, {"num-examples": 30})]
    out = average_where_trained(RunConfig(), before, fedavg, updates)
    np.testing.assert_allclose(out["mg.w"], 1.75)  # trained everywhere: FedAvg's own result
    np.testing.assert_allclose(out["us.w"], 3.0)  # only site a trained it: not diluted to 0.75
    assert out["us.w"].dtype == np.float32 and out["n"] == 4
    assert average_where_trained(RunConfig(strategy="fedmedian"), before, fedavg, updates) is fedavg


def test_config_validates_family_fields_and_keeps_multiview_signature() -> None:
    with pytest.raises(ConfigError, match="patch-energies"):
        RunConfig(patch_energies="DES,PET")
    with pytest.raises(ConfigError, match="birads-groups"):
        RunConfig(birads_groups="mass_shape,colour")
    with pytest.raises(ConfigError, match="mgus-training"):
        RunConfig(mgus_training="three-step")
    with pytest.raises(ConfigError, match="model"):
        RunConfig(model="transformer")
    cfg = RunConfig()
    keys = ("model", "backbone", "view_fusion", "head", "in_channels", "image_h", "image_w")
    old = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.model_signature() == old  # multiview checkpoints of earlier versions still resume
    assert (
        RunConfig(model="birads").model_signature()
        != RunConfig(model="birads", birads_fusion="decision").model_signature()
    )
    assert set(PRESETS) == set(FAMILIES) == {"multiview", "birads", "dualmode", "mgus", "latefusion", "cyclegan"}


def test_simulate_cli_selects_the_family_and_its_preset() -> None:
    from fedbreast.cli import _parse_overrides, build_parser

    args = build_parser().parse_args(["simulate", "--model", "mgus", "--set", "mgus-loss=cosface"])
    assert _parse_overrides(args) == {"model": "mgus", "mgus_loss": "cosface"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--model", "transformer"])


# ---- on a generated federation --------------------------------------------------------------------

SITES, PATIENTS, DATA_SEED = 4, 24, 0  # site-1 CEM, site-2 FFDM, site-3 FFDM+US, site-4 CEM
TINY = dict(backbone="smallcnn", bootstrap=0, hist_bins=64, workers=0, local_epochs=1)
FAMILY_TINY = {
    "birads": dict(patch_size=32, n_patches=12, batch_size=64, rounds=3, lr=0.02),
    "dualmode": dict(box_size=48, batch_size=8, rounds=2, lr=0.01),
    "mgus": dict(crop_size=48, batch_size=16, rounds=3, lr=0.01, mgus_modality_rounds=2),
    "latefusion": dict(image_h=48, image_w=48, batch_size=8, rounds=2, lr=0.01),
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("families")
    prepare_federation(data_dir, SITES, PATIENTS, DATA_SEED, echo=lambda *_: None)
    return data_dir


def _cfg(family: str, **kw) -> RunConfig:
    return RunConfig(**{**PRESETS[family], **TINY, **FAMILY_TINY[family], **kw})


@pytest.mark.parametrize(
    "family, site, reason",
    [
        ("dualmode", "site-2", "site-2 has no CEM images"),
        ("birads", "site-3", "site-3 has no DES"),
    ],
)
def test_a_family_refuses_a_site_it_cannot_use_with_the_reason(federation, family, site, reason) -> None:
    cfg = _cfg(family, patch_energies="DES")
    with pytest.raises(SiteUnavailable, match=reason):
        task_for(cfg).open(federation / "sites" / site, cfg)


def test_dualmode_preprocesses_only_the_breasts_it_boxes(federation) -> None:
    from fedbreast.shared.data.cache import open_cache
    from fedbreast.shared.training.tasks import preprocess_config, read_records

    cfg = _cfg("dualmode")
    site_dir = federation / "sites" / "site-1"
    site = task_for(cfg).open(site_dir, cfg)
    records, _ = read_records(site_dir)
    cem = [r for r in records if r.energy.value in ("LE", "DES") and r.view.is_mammo]
    lesion_breasts = {r.breast_key for r in cem if r.lesions}
    assert 0 < len(lesion_breasts) < len({r.breast_key for r in cem})  # the site has breasts without a lesion
    cache = open_cache(site_dir, preprocess_config("roi_box", cfg))
    assert len(cache) == len({r.sha256 for r in cem if r.breast_key in lesion_breasts})
    assert site.units["train"] + site.units["val"] + site.units["test"] > 0


def test_a_site_without_ultrasound_trains_the_mammography_branch_only(federation) -> None:
    cfg = _cfg("mgus")
    task = task_for(cfg)
    site = task.open(federation / "sites" / "site-2", cfg)  # FFDM, no ultrasound
    assert not site.info["has_us"] and site.exams("train") > 0
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = task.train(model, site, cfg, 1, torch.device("cpu"))
    after = model.state_dict()
    assert stats.examples > 0
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mg."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("us.", "fusion_")))
    with pytest.raises(SiteUnavailable, match="has no ultrasound"):
        task.train(model, site, cfg, cfg.mgus_modality_rounds + 1, torch.device("cpu"))  # two-step, step 2


@pytest.mark.parametrize("family", ["birads", "dualmode", "mgus", "latefusion"])
def test_augment_reaches_every_family_reproducibly(federation, family) -> None:
    """`augment` is a run-config key for every family, not only multiview: on, the training
    inputs are warped (seeded by seed and round, so a site's round is reproducible); off, not."""
    task = family_of(family).task()
    x = torch.rand(3, 2, 1, 32, 32)
    on, off = _cfg(family, augment=True), _cfg(family, augment=False)
    assert torch.equal(task.augmenter(off, 1)(x), x)
    warped = task.augmenter(on, 1)(x)
    assert warped.shape == x.shape and not torch.equal(warped, x)
    torch.testing.assert_close(task.augmenter(on, 1)(x), warped)  # same seed and round: same warp
    assert not torch.equal(task.augmenter(on, 2)(x), warped)  # a new round draws new warps
    assert task.augmenter(on, 1)(x[:0]).shape == (0, 2, 1, 32, 32)  # an empty selection passes through
    site = task.open(federation / "sites" / "site-1", on)

    def trained(cfg: RunConfig) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(cfg)
        torch.manual_seed(1)
        task.train(model, site, cfg, 1, torch.device("cpu"), steps=2)
        return model.state_dict()

    a, b, c = trained(on), trained(off), trained(off)
    assert all(torch.equal(b[k], c[k]) for k in b)  # training is deterministic ...
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # ... and augment changes it


def _final_aggregate(run: Path) -> dict:
    rows = MetricStore(run).rows("aggregate")
    return max(rows, key=lambda r: r["round"])


def test_birads_trains_federated_on_the_mixed_federation_and_beats_chance(tmp_path, federation) -> None:
    """BI-RADS + pixels beat chance clearly even on 24 patients a site, where every site takes
    part (DES patches at CEM sites, FFDM patches elsewhere). The pixel-only families need
    more lesions to show they learn: tests/test_family_learning.py."""
    overrides = {"model": "birads", **TINY, **FAMILY_TINY["birads"]}
    result = simulate(
        tmp_path / "run",
        sites=SITES,
        patients=PATIENTS,
        seed=DATA_SEED,
        overrides=overrides,
        data_dir=federation,
        echo=lambda *_: None,
        engine="inprocess",  # the family's learning, not the transport (test_simulation.py runs Ray)
    )
    assert result["run"]["status"] == "finished:completed"
    store = MetricStore(tmp_path / "run")
    assert {r["site"] for r in store.rows("train") if r["round"] == 1 and r["site"] != "ALL"} == {
        f"site-{k}" for k in range(1, 5)
    }
    agg = _final_aggregate(tmp_path / "run")
    evaluations = [r for r in store.rows("evaluate") if r["round"] == agg["round"] and r["site"] != "ALL"]
    assert all(math.isfinite(r["test_auc"]) for r in evaluations if r["test_n_pos"] and r["test_n_neg"])
    assert all("birads_unknown_values" in r for r in evaluations)
    assert agg["test_pooled_auc"] > BEATS_CHANCE, agg["test_pooled_auc"]


BEATS_CHANCE = 0.7


def test_birads_defaults_to_seed_000s_four_groups_and_flags_the_readers_assessment(tmp_path) -> None:
    from fedbreast.server.report import write_report
    from fedbreast.shared.export import limitations
    from fedbreast.shared.models.birads import BiradsEncoder

    seed = RunConfig(model="birads")
    assert seed.birads_group_list == ("mass_shape", "mass_margin", "internal_enhancement", "bpe")
    assert BiradsEncoder(seed.birads_group_list).dim == 3 + 1 + 7 + 1 + 3 + 1 + 4 + 1  # one unknown slot per group
    assert seed.notes == [] and not any("assessment" in x for x in limitations(seed))
    leaky = RunConfig(
        model="birads", birads_groups="mass_shape,mass_margin,internal_enhancement,bpe,density,assessment"
    )
    assert len(leaky.notes) == 2 and "uses the reader's assessment" in leaky.notes[0]
    assert any("uses the reader's assessment" in x for x in limitations(leaky))
    assert RunConfig(model="multiview", birads_groups="assessment").notes == []  # another family's run: no flag
    store = MetricStore(tmp_path)
    store.append(1, "evaluate", "site-a", {"test_auc": 0.9, "test_n": 10, "test_exams": 5, "val_auc": 0.8})
    store.append(1, "aggregate", "ALL", {"test_auc": 0.9, "val_auc": 0.8})
    write_report(tmp_path, leaky.replace(rounds=1))
    text = (tmp_path / "summary.md").read_text()
    assert "**Flag:** birads-groups uses the reader's assessment" in text
    write_report(tmp_path, seed.replace(rounds=1))
    assert "Flag" not in (tmp_path / "summary.md").read_text()
