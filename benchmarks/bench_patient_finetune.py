"""Cost of patient-specific fine-tuning per patient (seed 000), on the CPU and, where
present, on the GPU.

    .venv/bin/python benchmarks/bench_patient_finetune.py                       # seed settings, CPU (+ CUDA)
    .venv/bin/python benchmarks/bench_patient_finetune.py --patients 2 --threads 2 --backbones rawnet
    .venv/bin/python benchmarks/bench_patient_finetune.py --device cuda --patients 20 --out psft.json

Per test patient the site copies the global weights into one reusable working model,
fine-tunes it for one epoch on the patient's normal-tissue patches (labelled benign; Adam,
lr 1e-4, batch 200) and re-scores the patient's lesion patches
(shared/training/patient_finetune.py). The seed's sizes: 227-px patches, 200 per image;
normal patches from the 4 DES images of a patient (CC and MLO of both breasts) = 800, lesion
patches from the 2 views of the lesion breast = 400. The models are the birads family's
(BI-RADS feature fusion at FC1) on the seed's two backbones, RawNet and AlexNet, each with
the seed's whole-network fine-tuning (scope "all") and with the head only (scope "head",
features of the frozen body computed once per patient).

The patches are synthetic and held in memory in the patch datasets' interface, so the
figure is the fine-tuning itself; reading a real site's patches from its memmap cache is
a separate, small cost. Reported per configuration: wall seconds per patient (reset, fetch,
one epoch, re-score; after one warm-up patient) and the process's CPU seconds for the same
(on a shared, busy machine the wall time overstates the cost), normal patches per patient,
optimiser steps, and what a naive deepcopy + new Adam per patient would add on top.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedbreast.shared.models.birads import BiradsEncoder, BiradsNet
from fedbreast.shared.models.multiview import count_parameters
from fedbreast.shared.training.local import bf16_supported
from fedbreast.shared.training.patient_finetune import PSFTConfig, evaluate_patient_finetune


class SyntheticPatches:
    """``patients`` x ``per_patient`` patches in the LesionPatchDataset / NormalPatchDataset
    interface (patients, indices_for_patient, __getitems__, patient_skipped)."""

    def __init__(
        self, patients: int, images: int, per_image: int, patch: int, label: float, seed: int, bank: int = 512
    ) -> None:
        rng = np.random.default_rng(seed)
        self._bank = torch.from_numpy(rng.random((bank, 1, patch, patch), dtype=np.float32))
        self.per_patient = images * per_image
        self._patients = [f"P{i:03d}" for i in range(patients)]
        self._per_image, self._label = per_image, label
        self.patient_skipped: dict[str, str] = {}

    def patients(self) -> list[str]:
        return list(self._patients)

    def indices_for_patient(self, patient: str) -> np.ndarray:
        k = self._patients.index(patient)
        return np.arange(k * self.per_patient, (k + 1) * self.per_patient)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = self._bank[torch.from_numpy(idx % len(self._bank))].clone()  # a fresh batch, as a memmap read gives
        return {
            "x": x,
            "y": torch.full((len(idx),), self._label),
            "y_mask": torch.ones(len(idx), dtype=torch.bool),
            "image": torch.from_numpy(idx // self._per_image),
            "index": torch.from_numpy(idx),
        }


def bench(backbone: str, scope: str, device: torch.device, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dim = BiradsEncoder().dim
    model = BiradsNet(backbone=backbone, birads_dim=dim, birads_fusion="feature").to(device).eval()
    lesion = SyntheticPatches(args.patients + 1, 2, args.per_image, args.patch, 1.0, seed=1)
    normal = SyntheticPatches(args.patients + 1, 4, args.per_image, args.patch, 0.0, seed=2)
    vec = torch.zeros(dim)
    vec[0] = 1.0

    def extras(patient, kind, batch):
        return {"birads": vec.expand(batch["x"].shape[0], -1)}

    def forward(m, batch):
        return m(batch["x"], batch["birads"])

    cfg = PSFTConfig(lr=1e-4, epochs=1, batch_size=args.batch, scope=scope, amp=args.amp)
    patients = lesion.patients()
    evaluate_patient_finetune(
        model, lesion, normal, cfg, device, forward=forward, extras=extras, patients=patients[:1]
    )  # warm-up
    res = evaluate_patient_finetune(
        model, lesion, normal, cfg, device, forward=forward, extras=extras, patients=patients[1:]
    )
    # What a naive implementation pays per patient on top: a deepcopy and a new optimiser.
    t0 = time.perf_counter()
    for _ in range(3):
        work = copy.deepcopy(model)
        torch.optim.Adam(work.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    naive = (time.perf_counter() - t0) / 3
    return {
        "backbone": backbone,
        "scope": scope,
        "device": str(device),
        "parameters": count_parameters(model),
        "patients": res.patients,
        "normal_patches_per_patient": res.normal_patches // max(res.patients, 1),
        "lesion_patches_per_patient": lesion.per_patient,
        "steps_per_patient": res.steps / max(res.patients, 1),
        "seconds_per_patient": res.seconds_per_patient,
        "cpu_seconds_per_patient": res.cpu_seconds / max(res.patients, 1),
        "naive_copy_seconds": naive,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=3, help="timed patients per configuration (after one warm-up)")
    ap.add_argument("--per-image", type=int, default=200, help="patches per image (seed: 200)")
    ap.add_argument("--patch", type=int, default=227, help="patch side in px (seed: 227)")
    ap.add_argument("--batch", type=int, default=200, help="fine-tuning batch (seed: 200)")
    ap.add_argument("--backbones", default="rawnet,alexnet")
    ap.add_argument("--scopes", default="all,head")
    ap.add_argument("--device", default="all", choices=("all", "cpu", "cuda"), help="all: CPU, and CUDA when present")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    rows = []
    for device in devices:
        name = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
        )
        amp = args.amp == "bf16" or (args.amp == "auto" and bf16_supported(device))
        print(f"# {device}: {name}; bf16 autocast: {'on' if amp else 'off'}", flush=True)
        for backbone in args.backbones.split(","):
            for scope in args.scopes.split(","):
                row = bench(backbone.strip(), scope.strip(), device, args)
                row["device_name"], row["bf16"] = name, amp
                rows.append(row)
                print(
                    f"{row['device']:5s} {row['backbone']:8s} scope={row['scope']:4s} params={row['parameters']:>9,d}  "
                    f"normal patches/patient {row['normal_patches_per_patient']}, lesion {row['lesion_patches_per_patient']}, "
                    f"steps {row['steps_per_patient']:.0f}:  {row['seconds_per_patient']:.3f} s/patient "
                    f"(process CPU {row['cpu_seconds_per_patient']:.2f} s)  "
                    f"(a deepcopy + new Adam per patient would add {row['naive_copy_seconds'] * 1000:.1f} ms)",
                    flush=True,
                )
    if not torch.cuda.is_available():
        print("# no CUDA device here: GPU figures not measured")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
