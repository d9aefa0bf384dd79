"""fedbreast export: a trained model as TorchScript / ONNX that runs without fedbreast, plus its model card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbreast.cli import main
from fedbreast.server.checkpoints import load_checkpoint, reported_kinds, save_checkpoint
from fedbreast.shared import export as ex
from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.factory import build_model

pytest.importorskip("onnxruntime")

# Loads every exported file in a fresh interpreter with torch and onnxruntime only, runs the
# saved inputs and writes the outputs; fedbreast must never have been imported.
FRESH = """
import json, sys
import numpy as np, onnxruntime, torch
jobs, out = json.loads(sys.argv[1]), {}
for key, job in jobs.items():
    data = np.load(job["inputs"])
    xs = [data[n] for n in job["names"]]
    if job["file"].endswith(".onnx"):
        sess = onnxruntime.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
        y = sess.run(None, dict(zip(job["names"], xs)))[0]
    else:
        y = torch.jit.load(job["file"])(*[torch.from_numpy(x) for x in xs]).numpy()
    out[key] = y.tolist()
assert not [m for m in sys.modules if m.split(".")[0] == "fedbreast"], "fedbreast was imported"
print(json.dumps(out))
"""


def run_fresh(jobs: dict[str, dict], cwd: Path) -> dict[str, np.ndarray]:
    # -I: isolated (no user site, no PYTHONPATH, not the working dir on sys.path), from a folder
    # without fedbreast; the venv's own site-packages still hold the editable install's path
    # entry, so the assertion in FRESH is what proves nothing imported it.
    done = subprocess.run(
        [sys.executable, "-I", "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {k: np.asarray(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def reference(arrays: dict, cfg: RunConfig, inputs: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    net = build_model(cfg)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    net.eval()
    spec = ex.SPECS[cfg.model]
    names = [i.name for i in spec.inputs(cfg, net)]
    with torch.no_grad():
        y = spec.wrap(net).eval()(*[torch.from_numpy(inputs[n]) for n in names]).numpy()
    return names, y


def random_inputs(cfg: RunConfig, batch: int = 5) -> dict[str, np.ndarray]:
    net = build_model(cfg)
    rng = np.random.default_rng(7)
    out = {}
    for i in ex.SPECS[cfg.model].inputs(cfg, net):
        x = rng.random((batch, *i.shape[1:]), dtype=np.float32)
        out[i.name] = (x > 0.3).astype(np.float32) if i.name == "available" else x
    return out


def test_a_simulated_run_exports_and_runs_without_fedbreast(tmp_path: Path) -> None:
    from fedbreast.client.audit import app_hash
    from fedbreast.simulation.simulate import simulate

    run = tmp_path / "run"
    overrides = dict(rounds=1, backbone="smallcnn", image_h=64, image_w=32, bootstrap=20, workers=0)
    result = simulate(run, sites=2, patients=8, overrides=overrides, engine="inprocess", echo=lambda *_: None)
    assert result["run"]["status"] == "finished:completed"
    ckpt = load_checkpoint(run, reported_kinds(run)[0])  # the model `export RUN_DIR` takes
    assert ckpt is not None
    cfg = RunConfig.from_flower(ckpt.meta["config"])
    inputs = random_inputs(cfg)
    np.savez(tmp_path / "inputs.npz", **inputs)
    jobs, cards = {}, {}
    for fmt in ex.FORMATS:
        out = tmp_path / fmt
        assert main(["export", str(run), "--out", str(out), "--format", fmt]) == 0
        card = json.loads((out / "model_card.json").read_text())
        cards[fmt] = card
        names = [i["name"] for i in card["inputs"]]
        jobs[fmt] = {"file": str(out / card["model"]["file"]), "inputs": str(tmp_path / "inputs.npz"), "names": names}
        assert (out / "model_card.md").read_text().startswith("# Model card: multiview")
    got = run_fresh(jobs, tmp_path)
    names, want = reference(ckpt.arrays, cfg, inputs)
    for fmt, card in cards.items():
        diff = float(np.abs(got[fmt] - want).max())
        print(f"multiview {fmt}: max abs diff {diff:.3g}, {card['model']['bytes']} bytes")
        assert got[fmt].shape == (5, 2) and diff <= 1e-4
        assert card["verification"]["max_abs_diff"] <= 1e-4
        assert card["verification"]["checked_with"] == {"torchscript": "torch.jit.load", "onnx": "onnxruntime"}[fmt]
        assert card["family"] == "multiview" and card["config"]["backbone"] == "smallcnn"
        assert card["checkpoint"]["sha256"] == ckpt.meta["sha256"] and card["checkpoint"]["round"] == 1
        assert card["app_hash"] == app_hash()
        assert card["preprocessing"]["multiview"]["size"] == [64, 32]
        assert card["inputs"][0]["shape"] == ["batch", 4, cfg.in_channels, 64, 32]
        t = card["training"]
        assert sorted(t["sites"]) == ["site-1", "site-2"] and t["strategy"] == "fedavg"
        assert all(s["num-examples"] > 0 for s in t["sites"].values())
        assert sorted(t["test_per_site"]) == ["site-1", "site-2"]
        assert {"test_auc", "test_auc_lo", "test_auc_hi"} <= set(t["test_per_site"]["site-1"])
        assert "test_pooled_auc" in t["test_pooled"] and "dp_spent" not in t
        assert "not a medical device" in card["intended_use"]
        text = json.dumps(card)
        assert "test_hist" not in text  # score histograms stay out of the card
    md = (tmp_path / "onnx" / "model_card.md").read_text()
    assert "site-1" in md and "pooled" in md and ckpt.meta["sha256"] in md


FAMILIES = {
    "birads": dict(model="birads", backbone="smallcnn", patch_size=32),
    "birads-decision": dict(model="birads", backbone="smallcnn", patch_size=32, birads_fusion="decision"),
    "mgus": dict(model="mgus", backbone="smallcnn", crop_size=32),
    "latefusion": dict(model="latefusion", backbone="smallcnn", image_h=32, image_w=32),
    "dualmode": dict(model="dualmode", backbone="smallcnn", box_size=32),
    "multiview-dp": dict(model="multiview", backbone="smallcnn", image_h=32, image_w=16, dp="local", dp_epsilon=8.0),
}


def test_every_family_exports_in_both_formats(tmp_path: Path) -> None:
    jobs, wants = {}, {}
    for name, kw in FAMILIES.items():
        cfg = RunConfig(**kw)
        torch.manual_seed(0)
        arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
        run = tmp_path / name
        meta = {"round": 2, "config": cfg.to_flower(), "model_signature": cfg.model_signature(), "metrics": {}}
        save_checkpoint(run, "final", arrays, meta)
        if cfg.dp != "off":  # a train row with the epsilon spent
            row = {"round": 2, "phase": "train", "site": "a", "num-examples": 3, "dp_epsilon": 1.5}
            (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        inputs = random_inputs(cfg)
        np.savez(tmp_path / f"{name}.npz", **inputs)
        names, wants[name] = reference(arrays, cfg, inputs)
        for fmt in ex.FORMATS:
            out = tmp_path / f"{name}-{fmt}"
            assert main(["export", str(run / "checkpoints" / "final.pt"), "--out", str(out), "--format", fmt]) == 0
            card = json.loads((out / "model_card.json").read_text())
            assert card["verification"]["max_abs_diff"] <= 1e-4 and card["family"] == cfg.model
            assert [i["name"] for i in card["inputs"]] == names
            if cfg.dp != "off":
                assert card["training"]["dp_spent"]["epsilon_spent_max"] == 1.5
            path = out / card["model"]["file"]
            jobs[f"{name}/{fmt}"] = {"file": str(path), "inputs": str(tmp_path / f"{name}.npz"), "names": names}
            print(
                f"{name} {fmt}: {card['model']['bytes']} bytes, in-export diff {card['verification']['max_abs_diff']:.3g}"
            )
    got = run_fresh(jobs, tmp_path)
    for key, y in got.items():
        diff = float(np.abs(y - wants[key.split("/")[0]]).max())
        print(f"{key}: fresh-interpreter max abs diff {diff:.3g}")
        assert y.shape == wants[key.split("/")[0]].shape and diff <= 1e-4


def test_a_family_without_a_spec_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(model="dualmode", backbone="smallcnn", box_size=32)
    arrays = {k: v.detach().numpy() for k, v in build_model(cfg).state_dict().items()}
    monkeypatch.delitem(ex.SPECS, "dualmode")
    with pytest.raises(ex.ExportError, match="family 'dualmode' cannot be exported"):
        ex.export_model(arrays, {"config": cfg.to_flower(), "round": 1}, tmp_path / "out")
    assert main(["export", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "o")]) == 2
