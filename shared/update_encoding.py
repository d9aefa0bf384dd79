"""Compressed train replies: how a site's model update travels (run config ``update-encoding``).

- ``fp32`` (the default): the trained weights as they are, today's reply.
- ``fp16``: the *change* to the received global model, per tensor in float16 with one
  power-of-two float32 scale (half the bytes). The change, not the weights: float16 keeps 11
  significant bits, so a weight of 0.05 is held to about 3e-5, more than most of a round's
  changes. Scaled: a round's changes are mostly below float16's smallest normal number (6e-5;
  99% of them after two SGD steps of the default resnet18 model), where it keeps few bits and
  numpy converts slowly; a power of two (exact in float32) moves the tensor's largest change to
  2**15, so every change within 2**29 of it keeps 11 bits.
- ``int8``: the change, per tensor, as int8 with one float32 scale (symmetric: ``change ~ q x
  scale``, q in [-127, 127], scale = max |change| / 127): a quarter of the bytes. Symmetric, not
  affine: a tensor that did not change (a frozen layer, FedBN's norm layers sent back as
  received) is then exactly zero and decodes to the global model bit for bit.

The scales travel as one float32 array under :data:`SCALES_KEY`, in the order of
:func:`float_keys`. Only floating-point tensors are encoded; integer buffers (BatchNorm's
``num_batches_tracked``) pass through unchanged. The coordinator decodes against the global
model it sent, so every check and aggregation after it sees float32 weights. Decoding treats
the reply as untrusted: a wrong dtype, a shape that differs, a missing or non-finite scale raise
:class:`EncodingError` naming the tensor. No error feedback (a site carrying its rounding error
into the next round): int8's error is at most half a step (scale / 2) per value, and with no
measurement showing that it costs accuracy, a per-site residual kept between rounds is not
worth its state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FP32, FP16, INT8 = "fp32", "fp16", "int8"
UPDATE_ENCODINGS = (FP32, FP16, INT8)
# A key no torch state-dict key can have (':' and '-' are not in Python identifiers).
SCALES_KEY = "update-encoding:scales"
INT8_MAX = 127
FP16_TOP_EXPONENT = 15  # fp16: a tensor's largest change is scaled to at most 2**15 (float16's largest: 65504)
_TINY = float(np.finfo(np.float32).tiny)  # no scale below it: a smaller one would vanish in float32
_WIRE_DTYPE: dict[str, np.dtype[Any]] = {FP16: np.dtype(np.float16), INT8: np.dtype(np.int8)}


class EncodingError(ValueError):
    """An update that cannot be encoded or decoded; the text names the tensor and what is wrong."""


def is_float(array: np.ndarray) -> bool:
    """Whether a tensor is encoded (floating point) or passes through unchanged."""
    return bool(np.issubdtype(array.dtype, np.floating))


def float_keys(reference: Mapping[str, np.ndarray]) -> list[str]:
    """The encoded tensors' names, sorted: the order of the scales on both sides, whatever
    order a record's keys arrive in."""
    return sorted(k for k, a in reference.items() if is_float(a))


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The bytes of the arrays' values (what an update costs on the wire, less each array's header)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def encode_update(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], encoding: str
) -> dict[str, np.ndarray]:
    """The site's side: ``trained`` (its weights after the round) as ``encoding`` sends them,
    relative to ``received`` (the global model the coordinator sent). Raises EncodingError when
    the two do not match or the change is not finite (a NaN would make its scale NaN)."""
    _known(encoding)
    if encoding == FP32:
        return dict(trained)
    if set(trained) != set(received):
        raise EncodingError("the trained model's tensors differ from the received model's")
    out: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for key, weights in trained.items():
        if not is_float(weights):
            out[key] = weights
            continue
        base = received[key]
        if base.shape != weights.shape:
            raise EncodingError(f"tensor {key!r} has shape {weights.shape}, the received one {base.shape}")
        change = weights.astype(np.float32) - base.astype(np.float32)
        if not np.isfinite(change).all():
            raise EncodingError(f"tensor {key!r}: the change to the received model is not finite")
        out[key], scales[key] = quantise(change, encoding)
    out[SCALES_KEY] = np.array([scales[k] for k in float_keys(trained)], dtype=np.float32)
    return out


def quantise(change: np.ndarray, encoding: str) -> tuple[np.ndarray, float]:
    """One tensor's change as (values, scale), change ~ values x scale: int8 symmetric, |error| <=
    scale / 2; fp16 with a power-of-two scale, relative error <= 2**-11 (within 2**29 of the peak)."""
    peak = float(np.abs(change).max(initial=0.0))
    wire = _WIRE_DTYPE[encoding]
    if peak == 0.0:
        return np.zeros(change.shape, dtype=wire), 0.0
    if encoding == FP16:  # peak / scale in [2**14, 2**15)
        scale = max(math.ldexp(1.0, math.frexp(peak)[1] - FP16_TOP_EXPONENT), _TINY)
        return (change / np.float32(scale)).astype(wire), scale
    scale = max(float(np.float32(peak / INT8_MAX)), _TINY)
    return np.clip(np.rint(change / np.float32(scale)), -INT8_MAX, INT8_MAX).astype(wire), scale


def decode_update(
    encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], encoding: str
) -> dict[str, np.ndarray]:
    """The coordinator's side: a reply's arrays back to weights of ``reference``'s dtypes (the
    global model it sent). Raises EncodingError, naming the tensor, for anything but a
    well-formed encoding of an update of ``reference``: a missing or unexpected tensor, a shape
    or dtype that differs, a scales array of the wrong length or dtype, a negative or non-finite
    scale, a non-finite float16 change."""
    _known(encoding)
    if encoding == FP32:
        return dict(encoded)
    expected = set(reference) | {SCALES_KEY}
    missing = sorted(expected - set(encoded))
    extra = sorted(set(encoded) - expected)
    if missing:
        raise EncodingError(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if extra:
        raise EncodingError(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
    scales = _scales(encoded, reference)
    wire = _WIRE_DTYPE[encoding]
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        got = encoded[key]
        if got.shape != ref.shape:
            raise EncodingError(f"tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        want = wire if is_float(ref) else ref.dtype
        if got.dtype != want:
            raise EncodingError(f"tensor {key!r} has dtype {got.dtype}, expected {want}")
        if not is_float(ref):
            out[key] = got
            continue
        if encoding == FP16 and not np.isfinite(got).all():
            raise EncodingError(f"tensor {key!r}: its float16 change is not finite")
        out[key] = (ref + got.astype(ref.dtype) * ref.dtype.type(scales[key])).astype(ref.dtype, copy=False)
    return out


def _scales(encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The scales by tensor name, each checked finite and not negative."""
    keys = float_keys(reference)
    raw = encoded[SCALES_KEY]
    if raw.dtype != np.float32 or raw.ndim != 1:
        raise EncodingError(f"{SCALES_KEY!r} is {raw.dtype} of shape {tuple(raw.shape)}, expected a float32 vector")
    if raw.size != len(keys):
        first = keys[raw.size] if raw.size < len(keys) else None
        what = f"the scale of tensor {first!r} is missing" if first else "more scales than float tensors"
        raise EncodingError(f"{SCALES_KEY!r} holds {raw.size} scales for {len(keys)} float tensors: {what}")
    for key, scale in zip(keys, raw):
        if not (np.isfinite(scale) and scale >= 0):
            raise EncodingError(f"tensor {key!r}: its scale {scale} is not a finite non-negative number")
    return dict(zip(keys, raw.tolist()))


def _known(encoding: str) -> None:
    if encoding not in UPDATE_ENCODINGS:
        raise EncodingError(f"unknown update encoding {encoding!r}; one of {', '.join(UPDATE_ENCODINGS)}")
