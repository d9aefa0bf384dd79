"""Compressed train replies (run config ``update-encoding``, shared/update_encoding.py).

The encoding's error bounds and byte ratios on a real model, its refusal of malformed replies
(naming the tensor), its refusal next to secure aggregation, and one federated run of the
in-process engine in int8 (without DP and with central DP), where one site's reply carries a NaN
scale: that site is left out of the round with the reason, the others' updates are decoded and
averaged, and the coordinator's rows show a quarter of the fp32 bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedbreast.server.exchange import to_record
from fedbreast.server.federation import FederatedRun
from fedbreast.server.metric_store import MetricStore
from fedbreast.shared.config import RunConfig
from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.update_encoding import (
    FP16,
    FP32,
    INT8,
    SCALES_KEY,
    EncodingError,
    decode_update,
    encode_update,
    float_keys,
    payload_bytes,
)
from fedbreast.simulation.inprocess import InProcessGrid
from fedbreast.simulation.simulate import prepare_federation

torch.set_num_threads(1)
TINY = dict(backbone="smallcnn", image_h=64, image_w=32)


def model_arrays(cfg: RunConfig) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}


def trained_from(received: dict[str, np.ndarray], step: float = 1e-3, seed: int = 0) -> dict[str, np.ndarray]:
    """``received`` after a fake round: every float tensor moved by noise of size ``step``."""
    rng = np.random.default_rng(seed)
    return {
        k: (a + rng.normal(0, step, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a + 1
        for k, a in received.items()
    }


@pytest.fixture(scope="module")
def pair() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    received = model_arrays(RunConfig(**TINY))
    return received, trained_from(received)


def test_fp32_is_the_weights_as_they_are(pair) -> None:
    received, trained = pair
    encoded = encode_update(trained, received, FP32)
    assert decode_update(encoded, received, FP32).keys() == trained.keys()
    assert all(encoded[k] is trained[k] for k in trained)


@pytest.mark.parametrize("encoding", [FP16, INT8])
def test_round_trip_error_is_bounded_and_integer_buffers_pass_unchanged(pair, encoding: str) -> None:
    received, trained = pair
    encoded = encode_update(trained, received, encoding)
    decoded = decode_update(encoded, received, encoding)
    assert decoded.keys() == received.keys()
    scales = dict(zip(float_keys(received), encoded[SCALES_KEY].tolist()))
    for key, ref in received.items():
        got = decoded[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if ref.dtype.kind != "f":  # BatchNorm's num_batches_tracked: passes through as trained
            assert encoded[key].dtype == ref.dtype
            np.testing.assert_array_equal(got, trained[key])
            continue
        change = trained[key].astype(np.float64) - ref
        error = np.abs(got.astype(np.float64) - trained[key])
        eps = 4 * np.finfo(np.float32).eps * np.abs(trained[key]).max(initial=0)  # the float32 sums' own rounding
        if encoding == FP16:  # the change to 11 significant bits (float16's subnormal step below 2**-14 of the scale)
            assert np.abs(change).max() / scales[key] < 2**15, key
            assert (error <= np.abs(change) * 2.0**-11 + scales[key] * 2.0**-24 + eps).all(), key
        else:  # half an int8 step of the tensor's scale
            assert scales[key] == pytest.approx(np.abs(change).max() / 127, rel=1e-5)
            assert (error <= scales[key] / 2 * (1 + 1e-5) + eps).all(), key


def test_an_unchanged_tensor_decodes_to_the_global_model_bit_for_bit(pair) -> None:
    received, trained = pair
    frozen = next(iter(float_keys(received)))  # a frozen layer, or FedBN's norm layers sent back as received
    trained = {**trained, frozen: received[frozen].copy()}
    for encoding in (FP16, INT8):
        decoded = decode_update(encode_update(trained, received, encoding), received, encoding)
        np.testing.assert_array_equal(decoded[frozen], received[frozen])


def test_byte_ratios_on_a_real_model(pair) -> None:
    received, trained = pair
    fp32 = payload_bytes(encode_update(trained, received, FP32))
    assert payload_bytes(encode_update(trained, received, FP16)) / fp32 == pytest.approx(0.5, abs=0.01)
    assert payload_bytes(encode_update(trained, received, INT8)) / fp32 == pytest.approx(0.25, abs=0.01)


def test_a_site_does_not_encode_a_change_that_is_not_finite(pair) -> None:
    received, trained = pair
    key = float_keys(received)[0]
    broken = {**received, key: np.full_like(received[key], np.inf)}  # e.g. a non-finite global model sent to it
    for encoding in (FP16, INT8):
        with pytest.raises(EncodingError, match=f"tensor '{key}'.*not finite"):
            encode_update(trained, broken, encoding)


def malformed(encoded: dict[str, np.ndarray], how: str, key: str, keys: list[str]) -> dict[str, np.ndarray]:
    """``encoded`` with one thing wrong about tensor ``key`` (``keys``: the float tensors, the scales' order)."""
    out = dict(encoded)
    if how == "dtype":
        out[key] = out[key].astype(np.float32)
    elif how == "shape":
        out[key] = out[key].reshape(-1)[:-1]
    elif how == "nan-scale":
        out[SCALES_KEY] = out[SCALES_KEY].copy()
        out[SCALES_KEY][keys.index(key)] = np.nan
    elif how == "missing-scale":
        out[SCALES_KEY] = out[SCALES_KEY][:-1]
    elif how == "no-scales":
        del out[SCALES_KEY]
    return out


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("dtype", "tensor '{key}' has dtype float32, expected int8"),
        ("shape", "tensor '{key}' has shape"),
        ("nan-scale", "tensor '{key}': its scale nan is not a finite non-negative number"),
        ("missing-scale", "the scale of tensor '{last}' is missing"),
        ("no-scales", "missing 1 tensor"),
    ],
)
def test_a_malformed_int8_reply_is_refused_naming_the_tensor(pair, how: str, reason: str) -> None:
    received, trained = pair
    encoded = encode_update(trained, received, INT8)
    keys = float_keys(received)
    key = keys[1]
    with pytest.raises(EncodingError) as exc:
        decode_update(malformed(encoded, how, key, keys), received, INT8)
    assert reason.format(key=key, last=keys[-1]) in str(exc.value)


def test_an_infinite_fp16_change_is_refused(pair) -> None:
    received, trained = pair
    encoded = encode_update(trained, received, FP16)
    key = float_keys(received)[0]
    encoded[key] = np.full_like(encoded[key], np.inf)
    with pytest.raises(EncodingError, match=f"tensor '{key}': its float16 change is not finite"):
        decode_update(encoded, received, FP16)


def test_the_run_config_names_the_option_and_refuses_it_with_secure_aggregation() -> None:
    assert RunConfig().update_encoding == FP32
    assert RunConfig.from_flower({"update-encoding": "int8"}).update_encoding == INT8
    with pytest.raises(ConfigError, match="update-encoding = 'bf16': must be one of fp32, fp16, int8"):
        RunConfig(update_encoding="bf16")
    with pytest.raises(ConfigError, match="update-encoding = 'fp16': cannot run with secure-aggregation = true"):
        RunConfig(update_encoding=FP16, secure_aggregation=True)
    RunConfig(update_encoding=INT8, dp="local", fedbn=False)  # local DP: encoding is post-processing
    RunConfig(update_encoding=INT8, dp="central")  # the coordinator decodes, then clips and noises
    RunConfig(update_encoding=INT8, fedbn=True, update_norm_bound=2.0)


def nan_scale(site: str):
    """A site whose int8 train reply carries a NaN scale (after the ClientApp encoded it)."""

    def on_reply(site_dir: Path, request: Message, reply: Message) -> Message:
        if site_dir.name == site and request.metadata.message_type == "train" and reply.content.array_records:
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            arrays[SCALES_KEY] = np.full_like(arrays[SCALES_KEY], np.nan)
            reply.content["arrays"] = to_record(arrays)
        return reply

    return on_reply


@pytest.mark.parametrize(
    "dp", ["off", "central"]
)  # central: the site clips, then encodes; the coordinator decodes, clips, noises
def test_an_int8_federated_run_completes_with_a_quarter_of_the_bytes(tmp_path: Path, dp: str) -> None:
    from fedbreast.server.app import initial_arrays

    sites = prepare_federation(tmp_path / "data", sites=3, patients=8, seed=0, echo=lambda _line: None)
    cfg = RunConfig(
        **TINY,
        update_encoding=INT8,
        rounds=2,
        bootstrap=0,
        hist_bins=64,
        workers=0,
        batch_size=4,
        round_timeout=60,
        wait_for_sites=1,
        min_available_sites=3,
        dp=dp,
    )
    run = tmp_path / "run"
    grid = InProcessGrid(sites, cfg.to_flower(), nan_scale("site-3"), site_names=True)
    before = initial_arrays(cfg)
    FederatedRun(grid, cfg, run, before, echo=lambda _line: None).run()
    store = MetricStore(run)
    fp32 = payload_bytes(before)
    trained = store.rows("train")
    assert sorted({r["site"] for r in trained}) == ["site-1", "site-2"]
    assert all(r["update_bytes"] / fp32 == pytest.approx(0.25, abs=0.01) for r in trained)
    rows = store.rows("aggregate-train")
    assert [r["round"] for r in rows] == [1, 2] and all(r["sites"] == 2 for r in rows)
    assert all(r["update_bytes"] / fp32 == pytest.approx(0.25, abs=0.01) for r in rows)
    failures = [r for r in store.rows("failure") if r["site"] == "site-3"]
    assert len(failures) == 2, failures
    assert "malformed reply: update-encoding int8" in failures[0]["reason"]
    assert "its scale nan is not a finite non-negative number" in failures[0]["reason"]
    assert [r["round"] for r in store.rows("aggregate")] == [1, 2]  # every round evaluated the decoded model
    if dp == "central":
        assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]
