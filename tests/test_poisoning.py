"""Poisoned updates against the real round loop (issue 5, item 7).

The coordinator's FederatedRun runs in-process against a grid whose sites are the real
ClientApp (query, train, evaluate on generated data, tiny birads model). Two sites turn
hostile after training honestly: one sends NaN, one scales its update 100x relative to the
global model (w_global + 100 (w_local - w_global)). The test measures the global model's
pooled test AUC (from the sites' evaluate histograms, as the coordinator reports it):

- clean FedAvg (every site honest), with the default update-norm-bound (auto: 3 x the round's
  median change norm), which clips no honest update here (the same model as with the bound off),
- attacked FedAvg with no bound (update-norm-bound = 0): validation drops the NaN update, the
  100x one wrecks the model,
- attacked with a defence. The claimed defence, within 0.02 of clean (issue 5): the norm bound
  (update-norm-bound = 1: the coordinator clips each update's change to the round's median
  change norm before FedAvg; server/validation.py clip_to_median_norm). FedMedian holds the
  model too, but on 2026-12-01 it missed 0.02 at seed 0 (0.753 against a clean 0.784; 0.778
  against 0.787 when first measured), so it is held to 0.05: far from the wrecked FedAvg.

The data: five FFDM sites with small images and fixed pseudonymisation keys (patients' splits
follow their pseudonyms, so the test set is the same every run). Krum was measured too and
missed the bound at seed 0 on an earlier, smaller setting (0.956 vs 0.986), so it is not a
claimed defence here.

    .venv/bin/python tests/test_poisoning.py   # prints the AUC table for both seeds
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedbreast.server.exchange import to_record
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.generate import SiteProfile, generate_federation
from fedbreast.shared.data.ingest import ingest
from fedbreast.simulation.inprocess import InProcessGrid, ReplyHook
from fedbreast.simulation.simulate import PRESETS

torch.set_num_threads(1)

SITES, PATIENTS, DATA_SEED, IMAGE_HW = 5, 40, 0, (300, 200)
TINY = dict(
    backbone="smallcnn",
    bootstrap=0,
    hist_bins=64,
    workers=0,
    local_epochs=1,
    patch_size=32,
    n_patches=12,
    batch_size=64,
    rounds=4,
    lr=0.02,
    round_timeout=60,
    wait_for_sites=1,
    # A robustness test needs honest sites that learn fast and far above chance: the reader's
    # assessment and density are in on purpose (a near-label input, flagged in a real run's
    # report); the seed-000 default (four groups) learns slower in 4 tiny rounds.
    birads_groups="mass_shape,mass_margin,internal_enhancement,bpe,density,assessment",
)
ATTACK = {"site-4": "nan", "site-5": "scale"}  # the others stay honest
SCALE = 100.0


def attacker(attacks: dict[str, str]) -> ReplyHook:
    """``attacks[site]`` corrupts that site's honest train reply before it is sent."""

    def on_reply(site_dir: Path, request: Message, reply: Message) -> Message:
        how = attacks.get(site_dir.name)
        if how and request.metadata.message_type == "train" and "arrays" in reply.content.array_records:
            sent = {k: v.numpy() for k, v in request.content["arrays"].items()}
            reply.content["arrays"] = to_record(
                corrupt(how, sent, {k: v.numpy() for k, v in reply.content["arrays"].items()})
            )
        return reply

    return on_reply


def corrupt(how: str, global_w: dict[str, np.ndarray], local_w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, w in local_w.items():
        if w.dtype.kind != "f":  # integer buffers (BatchNorm's step counter) stay honest
            out[k] = w
        elif how == "nan":
            out[k] = np.full_like(w, np.nan)
        else:  # model replacement: the update scaled 100x around the global model
            out[k] = (global_w[k] + SCALE * (w - global_w[k])).astype(w.dtype)
    return out


def run_federation(
    sites_dir: Path, run_dir: Path, seed: int, attacks: dict[str, str], echo=lambda *_: None, **changes
) -> tuple[float, MetricStore]:
    """One federated run; returns the final round's pooled test AUC of the global model, or
    0.5 (chance) when no site could evaluate it (a wrecked model scores NaN everywhere)."""
    from fedbreast.server.app import initial_arrays

    site_dirs = sorted(p for p in sites_dir.iterdir() if p.is_dir())
    cfg = RunConfig(**{**PRESETS["birads"], **TINY, "seed": seed, "min_available_sites": len(site_dirs), **changes})
    grid = InProcessGrid(site_dirs, cfg.to_flower(), attacker(attacks), site_names=True)
    fed = FederatedRun(grid, cfg, run_dir, initial_arrays(cfg), echo=echo)
    fed.run()
    store = MetricStore(run_dir)
    final = [r for r in store.rows("aggregate") if r["round"] == cfg.rounds]
    return (float(final[0]["test_pooled_auc"]) if final else 0.5), store


def make_sites(data_dir: Path, sites: int = SITES, patients: int = PATIENTS) -> Path:
    """FFDM sites with small images (fast to generate; five of 40 patients give enough test lesions for an AUC)."""
    profiles = [
        SiteProfile(name=f"site-{i + 1}", n_patients=patients, modalities="ffdm", image_hw=IMAGE_HW, prevalence=0.5)
        for i in range(sites)
    ]
    generate_federation(data_dir / "generated", profiles=profiles, seed=DATA_SEED, workers=1)
    for p in profiles:
        src, site_dir = data_dir / "generated" / p.name, data_dir / "sites" / p.name
        # A fixed pseudonymisation key: patients' splits follow their pseudonyms, so the test set is the same every run.
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / "secret.key").write_text(hashlib.sha256(f"poisoning-{p.name}".encode()).hexdigest() + "\n")
        ingest(src / "dicom", site_dir, annotations=src / "annotations.csv", site=p.name, workers=1)
    return data_dir / "sites"


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory) -> Path:
    return make_sites(tmp_path_factory.mktemp("poisoning"))


RESULTS: dict[tuple[int, str], float] = {}  # (seed, variant) -> AUC, shared by the tests below
SEEDS = (0, 1)
ATTACKED_ROUNDS = 2  # plain FedAvg is wrecked from round 1 on; two rounds show it does not recover
# FedMedian alone, as measured: the default bound (auto) turned off for it.
DEFENCES = {"fedmedian": {"strategy": "fedmedian", "update_norm_bound": 0.0}, "norm-bound": {"update_norm_bound": 1.0}}
TOLERANCE = {"norm-bound": 0.02, "fedmedian": 0.05}  # |defended - clean| (see the module docstring)


def _run(sites_dir: Path, tmp: Path, seed: int, variant: str, **more) -> tuple[float, MetricStore, list[str]]:
    attacks = {} if variant == "clean" else ATTACK
    changes = {**DEFENCES.get(variant, {}), **more}
    lines: list[str] = []
    auc, store = run_federation(sites_dir, tmp / f"{variant}-{seed}", seed, attacks, echo=lines.append, **changes)
    RESULTS[(seed, variant)] = auc
    return auc, store, lines


@pytest.mark.parametrize("seed", SEEDS)
def test_nan_update_is_dropped_and_a_100x_update_wrecks_plain_fedavg(sites_dir, tmp_path, seed) -> None:
    clean, clean_store, clean_lines = _run(sites_dir, tmp_path, seed, "clean")
    assert clean > 0.7, clean  # honest sites really learn (measured 0.77-0.79)
    assert not clean_store.rows("failure")
    assert not [ln for ln in clean_lines if "clipped" in ln]  # the default bound leaves honest updates alone
    # Plain FedAvg: the default bound (auto) turned off, so nothing but validation stands in the way.
    attacked, store, _ = _run(
        sites_dir, tmp_path, seed, "fedavg-attacked", rounds=ATTACKED_ROUNDS, update_norm_bound=0.0
    )
    failures = store.rows("failure")
    nan_drops = [f for f in failures if f["site"] == "site-4" and f["stage"] == "train"]
    assert len(nan_drops) == ATTACKED_ROUNDS and all("non-finite" in f["reason"] for f in nan_drops)
    # site-5's scaled update passes validation (finite, right shapes) and FedAvg takes it: the global
    # model scores NaN/inf, so the sites cannot even evaluate it (AUC counted as chance), or scores badly.
    assert {r["site"] for r in store.rows("train")} == {"site-1", "site-2", "site-3", "site-5"}
    last = [f for f in failures if f["round"] == ATTACKED_ROUNDS and f["stage"] == "evaluate"]
    if not [r for r in store.rows("aggregate") if r["round"] == ATTACKED_ROUNDS]:  # nobody could evaluate it
        assert {f["site"] for f in last} == {f"site-{i}" for i in range(1, SITES + 1)}, last
    assert attacked < clean - 0.2, (clean, attacked)


@pytest.mark.parametrize("defence", sorted(DEFENCES))
@pytest.mark.parametrize("seed", SEEDS)
def test_a_defence_keeps_the_auc_near_the_clean_run(sites_dir, tmp_path, seed, defence) -> None:
    clean = RESULTS.get((seed, "clean"))
    if clean is None:  # this test run alone: measure the clean run here
        clean = _run(sites_dir, tmp_path, seed, "clean")[0]
    defended, store, lines = _run(sites_dir, tmp_path, seed, defence)
    assert [f["site"] for f in store.rows("failure")] == ["site-4"] * TINY["rounds"]  # NaN still dropped
    if defence == "norm-bound":  # the 100x update was cut down every round, named in the run's output
        assert sum("site site-5: update norm" in ln and "clipped" in ln for ln in lines) == TINY["rounds"]
    assert abs(defended - clean) <= TOLERANCE[defence], (seed, defence, clean, defended)


def teardown_module() -> None:
    """The measured AUCs (shown with pytest -n 0 -s), for the record."""
    for (seed, variant), auc in sorted(RESULTS.items()):
        print(f"seed {seed} {variant:16s} pooled test AUC {auc:.4f}")


def test_clip_to_median_norm_cuts_only_the_outlier_and_keeps_counters() -> None:
    from fedbreast.server.validation import clip_to_median_norm, delta_norm

    ref = {"w": np.zeros(4, np.float32), "n": np.array(3, np.int64)}
    honest = [{"w": np.full(4, v, np.float32), "n": np.array(5, np.int64)} for v in (1.0, 1.5, 2.0)]
    scaled = {"w": np.full(4, 100.0, np.float32), "n": np.array(5, np.int64)}
    out, clipped = clip_to_median_norm(honest + [scaled], ref, bound=1.0)
    median = float(np.median([delta_norm(u, ref) for u in honest + [scaled]]))
    assert [c[0] for c in clipped] == [2, 3]  # norms 2, 3, 4, 200 around a median of 3.5
    assert delta_norm(out[3], ref) == pytest.approx(median)
    np.testing.assert_allclose(out[3]["w"] / np.linalg.norm(out[3]["w"]), 0.5)  # same direction
    assert out[3]["w"].dtype == np.float32 and out[3]["n"] == 5
    np.testing.assert_array_equal(out[0]["w"], honest[0]["w"])  # below the median: untouched
    assert clip_to_median_norm(honest, ref, bound=3.0)[1] == []


def main() -> None:
    import json
    import sys
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="poison-"))
    t = time.perf_counter()
    sites = make_sites(tmp / "data")
    print(f"data {time.perf_counter() - t:.1f} s", flush=True)
    variants = (
        json.loads(sys.argv[1])
        if len(sys.argv) > 1
        else {"clean": [{}, {}], "attacked-fedavg": [ATTACK, {}], **{k: [ATTACK, v] for k, v in DEFENCES.items()}}
    )
    for seed in (0, 1):
        for name, (attacks, changes) in variants.items():
            t = time.perf_counter()
            auc, _ = run_federation(sites, tmp / f"{name}-{seed}", seed, attacks, **changes)
            print(f"seed {seed} {name:16s} AUC {auc:.4f}  {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
