"""Bytes and time of a train reply's update per ``update-encoding`` (shared/update_encoding.py).

    .venv/bin/python benchmarks/bench_update_encoding.py

The model is the default of ``fedbreast simulate`` (simulation/simulate.py PRESET: multiview,
resnet18, 256 x 128 px, BatchNorm). Its update is a real one: a few SGD steps on random exams
(lr and momentum of the preset), so every layer and BatchNorm's running statistics change as
in a round. Per encoding: the values' bytes (payload) and the bytes of the serialised arrays
as Flower sends them (wire: each array's .npy header too), both also as a ratio of fp32's in
the same run; the best-of-``--repeat`` time of encoding at the site plus decoding at the
coordinator; and the relative error of the decoded change, ||decoded - trained|| / ||trained
- received|| over the float tensors; and, to show why the change is sent rather than the
weights, that error when the weights themselves travel in float16 or int8.
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np
import torch
from flwr.app import Array

from fedbreast.shared.config import RunConfig
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.update_encoding import UPDATE_ENCODINGS, decode_update, encode_update, is_float, payload_bytes
from fedbreast.simulation.simulate import PRESET


def a_round(
    cfg: RunConfig, steps: int, batch: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(received, trained): the model's state before and after ``steps`` SGD steps on random exams."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    received = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 4, cfg.in_channels, cfg.image_h, cfg.image_w)  # 4 views: L-CC, L-MLO, R-CC, R-MLO
        y = torch.randint(0, 2, (batch, 2)).float()  # a label per breast
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return received, trained


def wire_bytes(arrays: dict[str, np.ndarray]) -> int:
    """The serialised arrays' bytes as a Flower ArrayRecord carries them (.npy format)."""
    return sum(len(Array(np.require(a, requirements="C")).data) for a in arrays.values())


def change_error(
    decoded: dict[str, np.ndarray], trained: dict[str, np.ndarray], received: dict[str, np.ndarray]
) -> float:
    num = sum(float(np.sum((decoded[k].astype(np.float64) - trained[k]) ** 2)) for k in trained if is_float(trained[k]))
    den = sum(
        float(np.sum((trained[k].astype(np.float64) - received[k]) ** 2)) for k in trained if is_float(trained[k])
    )
    return (num / den) ** 0.5 if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="SGD steps of the fake round")
    ap.add_argument("--batch", type=int, default=2, help="exams a step")
    ap.add_argument("--repeat", type=int, default=3, help="timings: the best of this many")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = RunConfig(**PRESET)
    received, trained = a_round(cfg, args.steps, args.batch)
    n = sum(a.size for a in trained.values() if is_float(a))
    print(
        f"model: {cfg.model} {cfg.backbone} {cfg.image_h}x{cfg.image_w}, {len(trained)} tensors, "
        f"{n:,} float values; update: {args.steps} SGD steps (lr {cfg.lr}), best of {args.repeat}"
    )
    rows = []
    for encoding in UPDATE_ENCODINGS:
        encoded = encode_update(trained, received, encoding)
        decoded = decode_update(encoded, received, encoding)
        seconds = min(
            timeit.repeat(
                lambda e=encoding: decode_update(encode_update(trained, received, e), received, e),
                number=1,
                repeat=args.repeat,
            )
        )
        rows.append(
            (encoding, payload_bytes(encoded), wire_bytes(encoded), seconds, change_error(decoded, trained, received))
        )
    base_payload, base_wire = rows[0][1], rows[0][2]
    print(
        f"{'encoding':8} {'payload MB':>10} {'ratio':>6} {'wire MB':>8} {'ratio':>6} {'enc+dec ms':>10} {'change error':>12}"
    )
    for encoding, payload, wire, seconds, error in rows:
        print(
            f"{encoding:8} {payload / 1e6:10.2f} {payload / base_payload:6.3f} {wire / 1e6:8.2f} "
            f"{wire / base_wire:6.3f} {seconds * 1e3:10.1f} {error:12.2e}"
        )
    # Why the change and not the weights: the weights themselves in float16 (not an option).
    as_fp16 = {k: a.astype(np.float16).astype(a.dtype) if is_float(a) else a for k, a in trained.items()}
    print(f"(not an option) the weights in fp16: change error {change_error(as_fp16, trained, received):.2e}")
    zero = {k: np.zeros_like(a) for k, a in trained.items()}  # the change from zero: the weights themselves
    as_int8 = decode_update(encode_update(trained, zero, "int8"), zero, "int8")
    print(f"(not an option) the weights in int8: change error {change_error(as_int8, trained, received):.2e}")


if __name__ == "__main__":
    main()
