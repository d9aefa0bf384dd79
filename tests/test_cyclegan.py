"""The cyclegan family (issue 18, seed 004's FFDM -> CESM translator): its losses, its two
aggregation schemes, its quality metrics and their pooling, and a real federated run on
generated DICOM with a site that has no CEM and an audit of what left every site."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.data.site_data import SiteUnavailable
from fedbreast.shared.families.cyclegan.model import CycleGANNet
from fedbreast.shared.families.cyclegan.pooling import pooled_quality
from fedbreast.shared.families.cyclegan.quality import QualitySums
from fedbreast.shared.families.cyclegan.task import (
    CycleGANTask,
    LocalDiscriminators,
    discriminator_loss,
    generator_loss,
    lsgan,
)
from fedbreast.shared.models.factory import build_model
from fedbreast.simulation.simulate import prepare_sites, simulate

TINY = dict(
    model="cyclegan", image_h=32, image_w=32, cyclegan_filters=4, cyclegan_blocks=1, batch_size=4, workers=0,
    rounds=2, bootstrap=10, lr=1e-3, lr_decay_rounds="", augment=False, key_metric="val_loss", local_steps=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """Two CEM hospitals and one FFDM-only hospital, as DICOM, ingested."""
    from fedbreast.shared.data.generate import default_profiles

    root = tmp_path_factory.mktemp("gan")
    profiles = default_profiles(3, 12)  # enough test views per CEM site (>= 5) for its quality figures
    profiles[1] = type(profiles[1])(**{**profiles[1].to_dict(), "modalities": "cem"})  # site-2: CEM too
    dirs = prepare_sites(root / "data", profiles, seed=3, echo=lambda *_: None)
    return {"root": root, "dirs": dirs}


def test_the_three_losses_are_the_cyclegans() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, 5)
    assert lsgan(x, True) == pytest.approx(float(((x - 1) ** 2).mean()))
    assert lsgan(x, False) == pytest.approx(float((x**2).mean()))
    net = CycleGANNet(filters=4, blocks=1).views["cc"]
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    adversarial = lambda: lsgan(net.d_b(net.g_ab(a)), True) + lsgan(net.d_a(net.g_ba(b)), True)  # noqa: E731
    cfg0 = RunConfig(**TINY, cyclegan_lambda_cycle=0.0, cyclegan_lambda_identity=0.0)
    loss, fake_b, fake_a = generator_loss(net, a, b, cfg0)
    assert float(loss.detach()) == pytest.approx(float(adversarial().detach()), rel=1e-5)
    assert fake_b.shape == a.shape and fake_a.shape == b.shape
    # Identity generators: cycle and identity terms vanish, the adversarial one is all that is left.
    net.g_ab, net.g_ba = nn.Identity(), nn.Identity()
    loss, _, _ = generator_loss(net, a, b, RunConfig(**TINY))
    assert float(loss.detach()) == pytest.approx(float(adversarial().detach()), rel=1e-5)
    # The optional paired L1 (a named departure) adds lambda x |G(a) - b|.
    paired, _, _ = generator_loss(net, a, b, RunConfig(**TINY, cyclegan_lambda_paired=2.0))
    assert float((paired - loss).detach()) == pytest.approx(2.0 * float((a - b).abs().mean()), rel=1e-5)
    # The discriminators' loss: real toward 1, generated toward 0, both domains, halved.
    d = discriminator_loss(net, a, b, a, b)
    expected = 0.5 * (
        lsgan(net.d_b(b), True) + lsgan(net.d_b(b), False) + lsgan(net.d_a(a), True) + lsgan(net.d_a(a), False)
    )
    assert float(d) == pytest.approx(float(expected))


def test_quality_of_a_perfect_and_a_blank_synthesis() -> None:
    real = torch.rand(6, 1, 32, 32) * 0.5 + 0.25
    breast = torch.zeros(6, 1, 32, 32, dtype=torch.bool)
    breast[:, :, 4:28, 4:20] = True
    lesion = torch.zeros_like(breast)
    lesion[:, :, 10:14, 10:14] = True
    real[lesion] = 0.9  # an enhancing lesion
    perfect = QualitySums()
    perfect.add(real.clone(), real, breast, lesion)
    m = perfect.metrics("t")
    assert m["t_images"] == 6 and m["t_pixels"] == int(breast.sum()) and m["t_mse"] == 0 and m["t_psnr"] == 100.0
    assert m["t_ssim"] == pytest.approx(1.0, abs=1e-4)
    assert m["t_enhancement_synthetic"] == pytest.approx(m["t_enhancement_real"]) and m["t_enhancement_real"] > 1.2
    flat = QualitySums()
    fake = torch.full_like(real, 0.5)
    flat.add(fake, real, breast, lesion)
    f = flat.metrics("t")
    mse = float(((fake - real) ** 2)[breast].mean())
    assert f["t_mse"] == pytest.approx(mse, rel=1e-5) and f["t_psnr"] == pytest.approx(
        10 * math.log10(1 / mse), rel=1e-5
    )
    assert f["t_ssim"] < 0.5 and f["t_enhancement_synthetic"] == pytest.approx(1.0)  # no contrast left


def test_pooled_quality_is_the_quality_of_all_sites_images_together() -> None:
    torch.manual_seed(1)
    parts, whole = [], QualitySums()
    for n in (5, 7):
        real, fake = torch.rand(n, 1, 32, 32), torch.rand(n, 1, 32, 32)
        breast = torch.rand(n, 1, 32, 32) > 0.3
        lesion = torch.rand(n, 1, 32, 32) > 0.9
        site = QualitySums()
        site.add(fake, real, breast, lesion)
        whole.add(fake, real, breast, lesion)
        parts.append(site.metrics("test_synth"))
    pooled, expect = pooled_quality(parts), whole.metrics("t")
    for key in ("mse", "psnr", "ssim", "enhancement_real", "enhancement_synthetic"):
        assert pooled[f"test_pooled_synth_{key}"] == pytest.approx(expect[f"t_{key}"], rel=1e-6), key
    # A malformed (hostile) site's sums are left out of the pool, never the round's end.
    bad = dict(parts[0]) | {"test_synth_sse": float("nan")}
    assert pooled_quality([bad, parts[1]])["test_pooled_synth_images"] == parts[1]["test_synth_images"]
    # Impossible sums (more images than its test count, more error than pixels, SSIM above 1):
    # a site that would outweigh the others is left out too.
    for lie in ({"test_synth_images": 1e12}, {"test_synth_sse": 1e300}, {"test_synth_ssim": 5.0}):
        hostile = dict(parts[0]) | {"num-examples": parts[0]["test_synth_images"]} | lie
        assert pooled_quality([hostile, parts[1]])["test_pooled_synth_images"] == parts[1]["test_synth_images"]
    # Nothing valid: every pooled key is NaN, so no site's own "test_pooled_*" value stands in.
    empty = pooled_quality([{"test_synth_images": "x"}])
    assert empty and all(math.isnan(v) for v in empty.values())
    # Below 5 images only the count leaves a site: no figure of one or two images.
    few = QualitySums()
    few.add(
        torch.rand(2, 1, 32, 32),
        torch.rand(2, 1, 32, 32),
        torch.ones(2, 1, 32, 32, dtype=torch.bool),
        torch.zeros(2, 1, 32, 32, dtype=torch.bool),
    )
    sent = few.metrics("t")
    assert (
        sent["t_images"] == 2
        and sent["t_pixels"] == 0
        and all(math.isnan(sent[f"t_{k}"]) for k in ("sse", "mse", "psnr", "ssim"))
    )


def test_the_config_refuses_what_a_gan_run_cannot_do() -> None:
    with pytest.raises(ConfigError, match="dp"):
        RunConfig(**{**TINY, "dp": "local"})
    with pytest.raises(ConfigError, match="square"):
        RunConfig(**{**TINY, "image_w": 16})
    with pytest.raises(ConfigError, match="cyclegan-lambda-cycle"):
        RunConfig(**{**TINY, "cyclegan_lambda_cycle": float("inf")})
    with pytest.raises(ConfigError, match="cyclegan_aggregate|cyclegan-aggregate"):
        RunConfig(**TINY, cyclegan_aggregate="discriminators")
    a, b = RunConfig(**TINY), RunConfig(**{**TINY, "cyclegan_filters": 8})
    assert a.model_signature() != b.model_signature()


@pytest.mark.parametrize("aggregate", ["all", "generators"])
def test_aggregation_schemes_what_a_site_sends_back(federation, aggregate) -> None:
    cfg = RunConfig(**TINY, cyclegan_aggregate=aggregate)
    task = CycleGANTask()
    site = task.build(federation["dirs"][0], cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    task.train(model, site, cfg, 1, torch.device("cpu"))
    sent = model.state_dict()
    gens = [k for k in sent if ".g_" in k]
    discs = [k for k in sent if CycleGANNet.is_discriminator(k)]
    assert gens and discs and len(gens) + len(discs) == len(sent)
    assert any(not torch.equal(sent[k], received[k]) for k in gens)  # generators trained, sent
    moved = [k for k in discs if not torch.equal(sent[k], received[k])]
    keeper = LocalDiscriminators(site.site_dir, cfg)
    if aggregate == "all":
        assert moved  # discriminators are averaged like the rest
    else:
        assert not moved  # the received ones go back: averaging leaves the global ones unchanged
        own = torch.load(keeper.path, weights_only=True)
        assert set(own) == set(discs) and any(not torch.equal(own[k], received[k]) for k in discs)
        # Next round the site trains with its own discriminators, not the coordinator's.
        fresh = build_model(cfg)
        assert keeper.load_into(fresh, 2)
        assert all(torch.equal(fresh.state_dict()[k], own[k]) for k in discs)
        assert not keeper.load_into(build_model(cfg), 1)  # round 1: from the received ones


def test_evaluate_scores_the_test_split_once_and_again_after_a_change(federation, monkeypatch) -> None:
    cfg = RunConfig(**TINY)
    task = CycleGANTask()
    site = task.build(federation["dirs"][0], cfg)
    model = build_model(cfg)
    calls: list[str] = []
    real = CycleGANTask.quality
    monkeypatch.setattr(
        CycleGANTask, "quality", lambda self, m, s, split, c, d: calls.append(split) or real(self, m, s, split, c, d)
    )
    cpu = torch.device("cpu")
    _, _, loss = task.predict(model, site, "test", cfg, cpu, server_round=1)
    once = task.extra_metrics(model, site, cfg, cpu, server_round=1)
    assert calls == ["test"] and math.isfinite(loss)  # the evaluate reply's second look reuses the first
    with torch.no_grad():  # weights changed in place between the two: scored again, not the stale sums
        next(model.parameters()).add_(1.0)
    task.predict(build_model(cfg), site, "test", cfg, cpu, server_round=1)  # another model object
    again = task.extra_metrics(model, site, cfg, cpu, server_round=1)
    assert calls == ["test", "test", "test"]
    assert again != once


@pytest.fixture(scope="module")
def gan_run(federation) -> dict:
    """One federated cyclegan run over the three sites (two train it)."""
    run_dir = federation["root"] / "run"
    out = simulate(
        run_dir, sites_dir=federation["dirs"][0].parent, overrides=dict(TINY), engine="inprocess", echo=lambda *_: None
    )
    return {"out": out, "run_dir": run_dir}


def test_a_federated_run_reports_quality_and_nothing_else_leaves(federation, gan_run) -> None:
    dirs, out, run_dir = federation["dirs"], gan_run["out"], gan_run["run_dir"]
    assert out["run"]["status"] == "finished:completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {r["site"] for r in rows if r["phase"] == "train"}
    assert trained == {"site-1", "site-2"}  # the CEM sites
    # The FFDM-only site answers "unable", saying why, and the run goes on.
    failures = [r for r in rows if r["phase"] == "failure" and r["site"] == "site-3"]
    assert failures and all("no CEM view" in r["reason"] for r in failures)
    evaluated = [r for r in rows if r["phase"] == "evaluate" and r["round"] == 2]
    assert {r["site"] for r in evaluated} == {"site-1", "site-2"}
    reported = [r for r in evaluated if r["test_synth_images"] >= 5]  # fewer: only the count leaves
    assert reported
    for r in evaluated:
        if r in reported:
            assert 0 < r["test_synth_ssim"] <= 1 and r["test_synth_psnr"] > 0
        else:
            assert r["test_synth_images"] > 0 and r["test_synth_psnr"] is None and r["test_synth_sse"] is None
    agg = next(r for r in rows if r["phase"] == "aggregate" and r["round"] == 2)
    total = sum(r["test_synth_sse"] for r in reported) / sum(r["test_synth_pixels"] for r in reported)
    assert agg["test_pooled_synth_psnr"] == pytest.approx(10 * math.log10(1 / total), rel=1e-6)
    summary = (run_dir / "summary.md").read_text()
    assert "Virtual DES on each site's test split" in summary and "**pooled**" in summary
    # What left each site, from its own audit log: weights, sums and counts; no identifier.
    for d in dirs:
        manifest = [json.loads(line) for line in (d / "manifest.jsonl").read_text().splitlines()]
        ids = {m[k] for m in manifest for k in ("patient", "exam") if m.get(k)}
        assert ids
        text = (d / "audit" / "audit.jsonl").read_text()
        assert not any(i in text for i in ids)
        for line in text.splitlines():
            rec = json.loads(line)
            for a in rec.get("arrays", []):
                name = a["name"] if isinstance(a, dict) else str(a)
                assert name.startswith("views."), name  # only the networks' tensors
            metrics = rec.get("metrics", {})
            for key, value in metrics.items():  # numbers or the (all-zero) score histograms only
                assert (
                    value is None
                    or isinstance(value, (int, float, str))
                    or (isinstance(value, list) and key.endswith(("hist_pos", "hist_neg")) and not any(value))
                ), key


def test_synthesis_at_an_ffdm_site_feeds_a_multiview_run(federation, gan_run, tmp_path) -> None:
    """site synthesize: virtual DES for the FFDM site's views, at the site, marked synthetic;
    a multiview run with virtual-des = true then trains there on (FFDM, DES) pairs."""
    from fedbreast.cli import main
    from fedbreast.client.synthesize import (
        SynthesisError,
        _write_one,
        synthesize_site,
        to_stored_grid,
    )
    from fedbreast.server.checkpoints import load_checkpoint
    from fedbreast.shared.data.site_data import site_records
    from fedbreast.shared.families.cyclegan.task import preprocessing
    from fedbreast.shared.training.tasks import cached_images, task_for

    ffdm = federation["dirs"][2]
    manifest_before = (ffdm / "manifest.jsonl").read_bytes()
    acquired = site_records(ffdm)
    views = [r for r in acquired if r.view.is_mammo]
    assert main(["site", "synthesize", str(ffdm), "--checkpoint", str(gan_run["run_dir"])]) == 0
    assert (ffdm / "manifest.jsonl").read_bytes() == manifest_before  # the acquired manifest untouched
    assert site_records(ffdm) == acquired  # a run that does not ask never sees them
    both = site_records(ffdm, virtual_des=True)
    virtual = [r for r in both if r.synthetic]
    assert len(both) == len(acquired) + len(views) and len(virtual) == len(views)
    by_sha = {r.sha256: r for r in views}
    for v in virtual:
        src = by_sha[v.source_sha256]
        assert v.energy.value == "DES" and (v.patient, v.exam, v.laterality, v.view, v.split, v.label) == (
            src.patient, src.exam, src.laterality, src.view, src.split, src.label
        )  # fmt: skip
        assert Path(v.path).parent == ffdm / "virtual"
    # Again with the same checkpoint: nothing is written twice.
    ckpt = load_checkpoint(gan_run["run_dir"], "best")
    assert ckpt is not None
    again = synthesize_site(ffdm, ckpt)
    assert again.written == 0 and again.kept == len(views)
    # The inverse geometry: an image on the generator's grid, written on the stored grid and read
    # back through the same preprocessing, is the same image (here the source's own pixels, so
    # the flip and padding of a real view are exercised; percentile windowing rescales it).
    cfg = RunConfig.from_flower(dict(ckpt.meta["config"])).replace(workers=0)
    src = by_sha[virtual[0].source_sha256]
    cache = cached_images(ffdm, [src], preprocessing(cfg), cfg)
    image = np.array(cache.get(src.sha256), np.float32)
    written = _write_one(tmp_path / "virtual", src, image, cache.geometry(src.sha256), "test")
    assert (written.rows, written.cols) == (src.rows, src.cols)
    back = np.array(cached_images(ffdm, [written], preprocessing(cfg), cfg).get(written.sha256), np.float32)
    breast = image > 0.02
    assert np.corrcoef(image[breast], back[breast])[0, 1] > 0.98
    assert to_stored_grid(image, cache.geometry(src.sha256)).shape == (src.rows, src.cols)
    # The multiview family at this FFDM site: without virtual DES a zero DES channel ("ffdm"
    # mode), with it the CEM form, (FFDM, DES) per view.
    small = dict(backbone="smallcnn", image_h=64, image_w=32, rounds=1, workers=0, batch_size=4, bootstrap=10)
    plain = task_for(RunConfig(**small)).open(ffdm, RunConfig(**small))
    with_des = task_for(RunConfig(**small, virtual_des=True)).open(ffdm, RunConfig(**small, virtual_des=True))
    assert plain.datasets["train"].channels == "ffdm" and with_des.datasets["train"].channels == "cem"
    x = with_des.datasets["train"].__getitems__([0])["x"]
    assert x.shape[2] == 2 and float(x[:, :, 1].abs().sum()) > 0  # a DES channel that is not zeros
    # DES alone (seed 004's CESM-alone arm): unable without virtual DES, the virtual image with it
    des_only = dict(small, in_channels=1, single_channel="des")
    with pytest.raises(SiteUnavailable, match="needs a DES image"):
        task_for(RunConfig(**des_only)).open(ffdm, RunConfig(**des_only))
    virtual_only = RunConfig(**des_only, virtual_des=True)
    xd = task_for(virtual_only).open(ffdm, virtual_only).datasets["train"].__getitems__([0])["x"]
    assert xd.shape[2] == 1 and torch.equal(xd[:, :, 0], x[:, :, 1])  # the same virtual DES, alone
    run = simulate(
        tmp_path / "mv", sites_dir=ffdm.parent, overrides=dict(small, virtual_des=True), engine="inprocess",
        echo=lambda *_: None,
    )  # fmt: skip
    assert run["run"]["status"] == "finished:completed"
    rows = [json.loads(line) for line in (tmp_path / "mv" / "metrics.jsonl").read_text().splitlines()]
    assert "site-3" in {r["site"] for r in rows if r["phase"] == "train"}
    # A classifier's checkpoint cannot synthesise: refused, naming the family.
    mv = load_checkpoint(tmp_path / "mv", "final")
    assert mv is not None
    # `site predict` scores with what the model trained on: the virtual DES, not a zero channel
    cfg_v = RunConfig(**small, virtual_des=True)
    net = build_model(cfg_v)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in mv.arrays.items()})
    with_v = task_for(cfg_v).score(net, ffdm, cfg_v, torch.device("cpu"))
    zeros = task_for(cfg_v).score(net, ffdm, RunConfig(**small), torch.device("cpu"))
    assert with_v and all(r.score is not None and not r.missing_views for r in with_v)
    assert [r.score for r in with_v] != [r.score for r in zeros]
    with pytest.raises(SynthesisError, match="'multiview' model"):
        synthesize_site(ffdm, mv)


def test_replacing_real_des_by_virtual_for_a_fraction_of_patients(federation, gan_run) -> None:
    """Seed 004's experiment: real DES replaced by virtual DES for 0-100 % of the patients,
    nested (the 25 % patients are among the 50 %'s), from `site synthesize --all-views`."""
    from fedbreast.client.synthesize import synthesize_site
    from fedbreast.server.checkpoints import load_checkpoint
    from fedbreast.shared.data.site_data import site_records

    cem = federation["dirs"][0]
    acquired = site_records(cem)
    des = [r for r in acquired if r.energy.value == "DES"]
    ckpt = load_checkpoint(gan_run["run_dir"], "best")
    assert ckpt is not None
    made = synthesize_site(cem, ckpt, all_views=True)
    assert made.written == len(des) and made.has_des == len(des) and not made.failed
    assert site_records(cem, virtual_des=True) == acquired  # every view has a real DES: it wins

    def swapped(fraction: float) -> set[str]:
        recs = site_records(cem, True, fraction, seed=0)
        assert len(recs) == len(acquired)  # one DES per view, real or virtual
        assert {r.sha256 for r in recs if r.energy.value != "DES"} == {
            r.sha256 for r in acquired if r.energy.value != "DES"
        }
        return {r.patient for r in recs if r.synthetic}

    patients = {r.patient for r in des}
    assert swapped(0.0) == set() and swapped(1.0) == patients
    quarter, half = swapped(0.25), swapped(0.5)
    assert quarter <= half and len(half) == round(0.5 * len(patients)) and len(quarter) == round(0.25 * len(patients))
    assert swapped(0.5) == half and {r.patient for r in site_records(cem, True, 0.5, seed=1) if r.synthetic} != half
    with pytest.raises(ConfigError, match="virtual-des-replace"):
        RunConfig(virtual_des_replace=0.5)


def test_the_site_policy_caps_the_translators_size_and_the_report_mode_is_the_runs(tmp_path) -> None:
    """A coordinator cannot make a site build a huge cyclegan (its policy refuses, naming the
    key), and a site cannot turn a classifier run's report into a synthesis report."""
    from clientapp_messages import as_task, request

    from fedbreast.client.policy import PolicyRefused, SitePolicy
    from fedbreast.server.metric_store import MetricStore

    as_task()  # messages need a task identity; alone (-n0, -k) no earlier test has set one
    from fedbreast.server.report import write_report

    policy = SitePolicy()
    for key, value in (("cyclegan-filters", 100_000), ("cyclegan-blocks", 1_000_000)):
        asked = RunConfig(**TINY).to_flower() | {key: value}
        with pytest.raises(PolicyRefused, match=f"max-{key}"):
            policy.check_message(request("train", 1), asked)
    policy.check_message(request("train", 1), RunConfig(**TINY).to_flower())  # the preset's sizes pass
    keeps = SitePolicy.from_mapping({"keep-cyclegan-discriminators": True}, "site.toml")
    keeps.check_message(request("train", 1), RunConfig(**TINY).to_flower())  # generators only: joins
    with pytest.raises(PolicyRefused, match="keep-cyclegan-discriminators.*'all'"):
        keeps.check_message(request("train", 1), RunConfig(**TINY).to_flower() | {"cyclegan-aggregate": "all"})
    store = MetricStore(tmp_path)
    store.append(1, "evaluate", "site-a", {"test_auc": 0.9, "test_n": 10, "test_exams": 5, "test_synth_psnr": 99.0})
    store.append(1, "aggregate", "ALL", {"test_auc": 0.9, "val_auc": 0.8, "test_pooled_synth_psnr": 99.0})
    write_report(tmp_path, RunConfig(rounds=1))
    text = (tmp_path / "summary.md").read_text()
    assert "Global model on each site's test split" in text and "Virtual DES" not in text
