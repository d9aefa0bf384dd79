"""benchmarks/gpu_check.sh (issue 19 item 6) runs end to end on a CPU with --small: every row
of its table filled, the JSON complete, exit code 0; and its parts (peaks, failed rows)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_run_fills_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    # The CPU path even where a GPU is present: the test checks the script, not the hardware.
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--small", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| measurement | setting | result |"), proc.stdout
    assert len(table) == 2 + 7, proc.stdout  # header, rule, 4 training rows, DP, predict, PSFT
    assert not any("failed" in line for line in table), proc.stdout
    assert "vgg16_bn 512x256 bf16 MFU" in proc.stdout

    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 7 and all(r["ok"] for r in rows), rows
    train = [r for r in rows if r["name"].startswith("train ")]
    assert len(train) == 4
    assert sorted(r["compiled"] for r in train) == [False, False, True, True]  # with and without torch.compile
    for r in train:
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0
        assert r["mfu"] is None  # no peak on a CPU without --peak-tflops: n/a
    (dp,) = [r for r in rows if "dp_ratio" in r]
    assert dp["dp_ratio"] > 0
    (predict,) = [r for r in rows if "exams_per_s" in r]
    assert predict["exams_per_s"] > 0 and predict["exams"] > 0
    (psft,) = [r for r in rows if "seconds_per_patient" in r]
    assert psft["seconds_per_patient"] > 0


def test_peaks_failed_rows_and_goal_line() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        gc = _module()
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gc.peak_for("NVIDIA H200") == gc.peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert gc.peak_for("NVIDIA H100 PCIe") == 756.0
    assert gc.peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert gc.peak_for("NVIDIA L4") == 121.0 and gc.peak_for("NVIDIA L40S") == 362.0
    assert gc.peak_for("Some Future GPU") is None

    def boom() -> dict:
        raise RuntimeError("torch.compile unavailable | here")

    failed = gc.measure("train vgg16_bn + vgg_fc 512x256", "compile", boom, threads=0)
    assert failed["ok"] is False and failed["error"] == "RuntimeError: torch.compile unavailable | here"
    row = {
        "name": "train vgg16_bn + vgg_fc 512x256",
        "setting": "eager",
        "ok": True,
        "images_per_s": 100.0,
        "flops_per_step": 4e12,
        "achieved_tflops": 400.0,
        "mfu": 0.4,
    }
    text = gc.table([row, failed])
    assert "| 100.0 images/s | 4000.0 | 400 | 40.0% |" in text
    assert "failed: RuntimeError: torch.compile unavailable / here |" in text  # no stray cell separator

    class Cuda:
        type = "cuda"

    assert gc.goal_line([row, failed], Cuda()) == "vgg16_bn 512x256 bf16 MFU: 40.0% (goal >= 35%) -- met, eager"
    assert "n/a" in gc.goal_line([{**row, "mfu": None}], Cuda())
    assert "failed" in gc.goal_line([failed], Cuda())
