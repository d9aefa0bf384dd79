"""Export a trained global model as a self-contained file plus a model card.

``fedbreast export CKPT --out DIR --format torchscript|onnx`` writes ``model.pt`` (TorchScript,
``torch.jit.load`` without fedbreast) or ``model.onnx`` (opset 17, dynamic batch axis), and
``model_card.md`` / ``model_card.json`` beside it. Every family gets a wrapper with a fixed
positional signature and one plain tensor out (:data:`SPECS`); the export is checked against
PyTorch on a random batch (max abs difference at most :data:`TOLERANCE`, recorded in the card),
and an ONNX file is run with onnxruntime where it is installed.

It lives in shared/ because the card describes the site's preprocessing (shared/data/
preprocess.py, the site's stack, which server/ may not import) and DP models are rebuilt with
shared/training/dp.py. The checkpoint is read by the caller (fedbreast/cli.py through
server/checkpoints.py, which checks its content hash) and handed over as arrays + meta.
Nothing per patient is read or written: the card's numbers come from the run's metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fedbreast.shared.config import RunConfig
from fedbreast.shared.durable import atomic_write_json, atomic_write_text
from fedbreast.shared.errors import FedbreastError
from fedbreast.shared.models.birads import BiradsEncoder

FORMATS = ("torchscript", "onnx")
FILENAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}
OPSET = 17
TOLERANCE = 1e-4
EXAMPLE_BATCH = 2  # traced with this batch size
CHECK_BATCH = 3  # checked with another: the batch axis is dynamic
INTENDED_USE = (
    "Research only; not a medical device and not cleared for clinical use. Intended as decision "
    "support for the benign vs malignant question on findings a radiologist has already seen, to be "
    "evaluated locally before any use; never as a standalone diagnosis or for screening triage."
)


class ExportError(FedbreastError, RuntimeError):
    """A model that cannot be exported; the message names the family and why."""


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[int, ...]  # the first axis is the batch (dynamic in ONNX)
    dtype: str
    meaning: str


@dataclass(frozen=True)
class Spec:
    """What an exported family takes and gives, and the preprocessing presets that feed it."""

    inputs: Callable[[RunConfig, nn.Module], list[Input]]
    wrap: Callable[[nn.Module], nn.Module]
    output: Callable[[RunConfig], tuple[str, tuple[int, ...], str]]  # name, shape, meaning
    presets: tuple[str, ...]
    unit: str


class _Wrapper(nn.Module):
    """A family's network behind a fixed positional signature and one tensor out."""

    net: Any  # the family's network (its own methods: fuse, ...)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class _Single(_Wrapper):
    """One tensor in (multiview: the four views; dualmode: the boxes), the network's output out."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _MammoUS(_Wrapper):
    def forward(self, mg: Tensor, us: Tensor) -> Tensor:
        out = self.net(mg, us)
        return torch.stack((out["mg"], out["us"], out["fused"]), dim=1)


class _LateFusion(_Wrapper):
    def forward(self, slots: Tensor, available: Tensor) -> Tensor:
        # Every slot is scored (no data-dependent skip); missing ones weigh 0 in the fusion.
        return self.net.fuse(torch.sigmoid(self.net(slots)), available > 0.5)


class _Birads(_Wrapper):
    def forward(self, patches: Tensor, birads: Tensor) -> Tensor:
        return self.net(patches, birads)


def _multiview_inputs(cfg: RunConfig, net: nn.Module) -> list[Input]:
    shape = (EXAMPLE_BATCH, 4, cfg.in_channels, cfg.image_h, cfg.image_w)
    what = "exam views in the order LCC, LMLO, RCC, RMLO; channels LE, DES (FFDM: DES zeros)"
    return [Input("views", shape, "float32", what)]


def _birads_inputs(cfg: RunConfig, net: nn.Module) -> list[Input]:
    p = int(cfg.patch_size)
    out = [Input("patches", (EXAMPLE_BATCH, 1, p, p), "float32", "lesion patches (one channel)")]
    if getattr(net, "birads_fusion", "") == "feature":
        dim = BiradsEncoder(cfg.birads_group_list).dim
        out.append(Input("birads", (EXAMPLE_BATCH, dim), "float32", "the lesion's BI-RADS lexicon vector per patch"))
    return out


def _birads_wrap(net: nn.Module) -> nn.Module:
    return _Birads(net) if getattr(net, "birads_fusion", "") == "feature" else _Single(net)


def _mgus_inputs(cfg: RunConfig, net: nn.Module) -> list[Input]:
    s = int(cfg.crop_size)
    return [
        Input("mg", (EXAMPLE_BATCH, 1, s, s), "float32", "mammography lesion crop"),
        Input("us", (EXAMPLE_BATCH, 1, s, s), "float32", "ultrasound lesion crop"),
    ]


def _latefusion_inputs(cfg: RunConfig, net: nn.Module) -> list[Input]:
    shape = (EXAMPLE_BATCH, 4, 1, cfg.image_h, cfg.image_w)
    return [
        Input("slots", shape, "float32", "images in the slot order FFDM-CC, FFDM-MLO, CESM-CC, CESM-MLO"),
        Input("available", (EXAMPLE_BATCH, 4), "float32", "1 where the slot has an image, 0 where it is missing"),
    ]


def _dualmode_inputs(cfg: RunConfig, net: nn.Module) -> list[Input]:
    s = int(cfg.box_size)
    return [Input("boxes", (EXAMPLE_BATCH, 2, 2, s, s), "float32", "lesion boxes: views (CC, MLO) x modes (LE, DES)")]


SPECS: dict[str, Spec] = {
    "multiview": Spec(
        _multiview_inputs,
        _Single,
        lambda cfg: ("logits", (EXAMPLE_BATCH, 2), "malignancy logit per breast (left, right); sigmoid: probability"),
        ("multiview",),
        "breast",
    ),
    "birads": Spec(
        _birads_inputs,
        _birads_wrap,
        lambda cfg: (
            "logit",
            (EXAMPLE_BATCH,),
            "malignancy logit per patch; a lesion's score is the mean sigmoid over its patches"
            + (", then the BI-RADS decision fusion (not in this file)" if cfg.birads_fusion == "decision" else ""),
        ),
        ("patches",),
        "lesion",
    ),
    "mgus": Spec(
        _mgus_inputs,
        _MammoUS,
        lambda cfg: (
            "logits",
            (EXAMPLE_BATCH, 3),
            "malignancy logits per lesion: mammography, ultrasound, fused (use the fused one when there is "
            "an ultrasound crop, the mammography one otherwise); sigmoid: probability",
        ),
        ("patches", "us"),
        "lesion",
    ),
    "latefusion": Spec(
        _latefusion_inputs,
        _LateFusion,
        lambda cfg: ("probability", (EXAMPLE_BATCH,), "malignancy probability per breast (MCC-weighted late fusion)"),
        ("modality_view",),
        "breast",
    ),
    "dualmode": Spec(
        _dualmode_inputs,
        _Single,
        lambda cfg: ("logit", (EXAMPLE_BATCH,), "malignancy logit per lesion; sigmoid: probability"),
        ("roi_box",),
        "lesion",
    ),
}


def preprocessing(cfg: RunConfig, presets: tuple[str, ...]) -> dict[str, Any]:
    """The preprocessing each input went through at the sites (the family's presets, with the run's changes)."""
    from fedbreast.shared.data.site_data import preprocess_for
    from fedbreast.shared.training.tasks import preprocess_config

    out: dict[str, Any] = {}
    for name in presets:
        if name == "multiview":
            pre = preprocess_for(cfg)
        elif name == "modality_view":
            pre = preprocess_config(name, cfg, size=(cfg.image_h, cfg.image_w))
        else:
            pre = preprocess_config(name, cfg)
        out[name] = pre.to_dict()
    return out


@lru_cache(maxsize=1)
def app_hash() -> str:
    """client/audit.py's app_hash (sha256 over every .py of the package), computed over the
    source files without importing the site's code."""
    import fedbreast

    assert fedbreast.__file__ is not None
    base = Path(fedbreast.__file__).parent
    h = hashlib.sha256()
    for sub in ("", "client", "server", "shared", "simulation"):
        root, name = (base / sub, f"fedbreast.{sub}") if sub else (base, "fedbreast")
        for path in sorted(root.rglob("*.py")):
            h.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _rows(run_dir: Path | None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def training_summary(rows: list[dict[str, Any]], round_: int, cfg: RunConfig) -> dict[str, Any]:
    """Sites and sizes, per-site and pooled test metrics of the checkpoint's round, DP spent.

    Aggregates only: the train rows' counts and the evaluate rows' metrics, never a score."""
    sites: dict[str, dict[str, Any]] = {}
    dp: dict[str, dict[str, float]] = {}
    for r in rows:
        site = str(r.get("site", ""))
        if r.get("phase") == "train" and int(r.get("round", 0)) <= round_:
            entry = sites.setdefault(site, {"rounds_trained": 0})
            entry["rounds_trained"] += 1
            for k, v in r.items():
                if (k.startswith(("n_", "train_n")) or k.endswith(("-examples", "_examples"))) and _num(v) is not None:
                    entry[k] = v
            if _num(r.get("dp_epsilon")) is not None:
                dp[site] = {"epsilon": float(r["dp_epsilon"]), "delta": float(r.get("dp_delta", cfg.dp_delta))}
    per_site: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("phase") == "evaluate" and int(r.get("round", -1)) == round_:
            per_site[str(r.get("site", ""))] = {
                k: float(v) for k, v in r.items() if k.startswith("test_") and _num(v) is not None
            }
    pooled: dict[str, Any] = {}
    weighted: dict[str, float] = {}
    for r in rows:
        if r.get("phase") == "aggregate" and int(r.get("round", -1)) == round_:
            pooled = {k: v for k, v in r.items() if k.startswith("test_pooled") and _num(v) is not None}
            pooled.update({k: v for k, v in r.items() if k.startswith("test_pooled") and k.endswith("unavailable")})
            weighted = {k: float(v) for k, v in r.items() if k.startswith("test_") and _num(v) is not None}
            weighted = {k: v for k, v in weighted.items() if not k.startswith("test_pooled")}
    out: dict[str, Any] = {
        "sites": sites,
        "test_per_site": per_site,
        "test_pooled": pooled,  # over every site's test scores together (histograms, no score leaves a site)
        "test_site_weighted": weighted,  # the sites' metrics weighted by their test sizes
    }
    if cfg.dp != "off":
        spent = max((v["epsilon"] for v in dp.values()), default=None)
        out["dp_spent"] = {"mode": cfg.dp, "epsilon_spent_max": spent, "delta": cfg.dp_delta, "per_site": dp}
    return out


def _example(inputs: list[Input], seed: int = 0, batch: int = EXAMPLE_BATCH) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for inp in inputs:
        t = torch.rand((batch, *inp.shape[1:]), generator=g)
        out.append((t > 0.3).float() if inp.name == "available" else t)
    return tuple(out)


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)), initial=0.0))


def _export_torchscript(module: nn.Module, example: tuple[Tensor, ...], path: Path, family: str) -> Any:
    try:
        traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - tracing raises many types
        raise ExportError(f"family {family!r}: TorchScript trace failed ({type(exc).__name__}: {exc})") from None
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(traced, str(tmp))
    tmp.replace(path)
    loaded = torch.jit.load(str(path))
    return lambda *xs: loaded(*xs).detach().numpy()


def _logaddexp(g: Any, a: Any, b: Any) -> Any:
    """ONNX has no logaddexp (opset 17): max(a, b) + log(1 + exp(-|a - b|)), stable for any a, b."""
    m = g.op("Max", a, b)
    d = g.op("Neg", g.op("Abs", g.op("Sub", a, b)))
    one = g.op("Constant", value_t=torch.tensor(1.0))
    return g.op("Add", m, g.op("Log", g.op("Add", one, g.op("Exp", d))))


def _export_onnx(module: nn.Module, example: tuple[Tensor, ...], names: list[str], path: Path, family: str) -> Any:
    tmp = path.with_name(path.name + ".tmp")
    axes = {n: {0: "batch"} for n in [*names, "output"]}
    torch.onnx.register_custom_op_symbolic("aten::logaddexp", _logaddexp, OPSET)  # the multiview fusion
    try:
        torch.onnx.export(
            module,
            example,
            str(tmp),
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    except Exception as exc:  # noqa: BLE001 - the exporter names the unsupported operator in its message
        tmp.unlink(missing_ok=True)
        raise ExportError(f"family {family!r}: ONNX export failed ({type(exc).__name__}: {exc})") from None
    tmp.replace(path)
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0]


def export_model(
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    out: Path,
    fmt: str = "torchscript",
    run_dir: Path | None = None,
    checkpoint: str = "",
) -> dict[str, Any]:
    """Write the model file and its card into ``out``; return the card."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = RunConfig.from_flower(dict(meta.get("config", {})))
    spec = SPECS.get(cfg.model)
    if spec is None:
        raise ExportError(
            f"family {cfg.model!r} cannot be exported: it has no input/output specification in "
            f"shared/export.py (exportable: {', '.join(SPECS)})"
        )
    from fedbreast.shared.models.factory import build_model

    net = build_model(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{checkpoint or 'checkpoint'}: does not fit its own config's model ({exc})") from None
    net = net.float().eval()
    if hasattr(net, "split_views"):
        cast(Any, net).split_views = False  # one backbone call over all views (DP's per-view form is the same maths)
    module = spec.wrap(net).eval().requires_grad_(False)  # a user's call needs no torch.no_grad()
    inputs = spec.inputs(cfg, net)
    names = [i.name for i in inputs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILENAMES[fmt]
    with torch.no_grad():
        example = _example(inputs)
        if fmt == "torchscript":
            run = _export_torchscript(module, example, path, cfg.model)
        else:
            run = _export_onnx(module, example, names, path, cfg.model)
        check = _example(inputs, seed=1, batch=CHECK_BATCH)  # a batch (and batch size) the export never saw
        reference = module(*check).numpy()
    verified_with = {"torchscript": "torch.jit.load", "onnx": "onnxruntime"}[fmt] if run else "not run"
    diff = _max_diff(run(*check), reference) if run else None
    if diff is not None and not diff <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"family {cfg.model!r}: the {fmt} export differs from PyTorch by {diff:.3g} (> {TOLERANCE}); not written"
        )
    oname, oshape, omeaning = spec.output(cfg)
    card: dict[str, Any] = {
        "model": {
            "file": path.name,
            "format": fmt,
            "bytes": path.stat().st_size,
            "opset": OPSET if fmt == "onnx" else None,
        },
        "family": cfg.model,
        "unit": spec.unit,
        "inputs": [
            {"name": i.name, "shape": ["batch", *i.shape[1:]], "dtype": i.dtype, "meaning": i.meaning} for i in inputs
        ],
        "output": {"name": oname, "shape": ["batch", *oshape[1:]], "dtype": "float32", "meaning": omeaning},
        "preprocessing": preprocessing(cfg, spec.presets),
        "verification": {
            "max_abs_diff": diff,
            "tolerance": TOLERANCE,
            "batch": CHECK_BATCH,
            "checked_with": verified_with,
        },
        "checkpoint": {
            "path": checkpoint,
            "kind": meta.get("kind"),
            "round": meta.get("round"),
            "sha256": meta.get("sha256"),
            "key_metric": meta.get("key_metric"),
            "key_value": meta.get("key_value"),
            "model_signature": meta.get("model_signature"),
        },
        "app_hash": app_hash(),
        "training": {
            "rounds_configured": cfg.rounds,
            "round_of_checkpoint": meta.get("round"),
            "strategy": cfg.strategy,
            "dp": cfg.dp,
            "secure_aggregation": cfg.secure_aggregation,
            **training_summary(_rows(run_dir), int(meta.get("round", 0)), cfg),
        },
        "metrics_at_checkpoint": {k: v for k, v in dict(meta.get("metrics", {})).items() if _num(v) is not None},
        "intended_use": INTENDED_USE,
        "limitations": limitations(cfg),
        "config": cfg.to_flower(),
    }
    atomic_write_json(out / "model_card.json", card, default=str)
    atomic_write_text(out / "model_card.md", render_card(card))
    return card


def limitations(cfg: RunConfig) -> list[str]:
    out = [
        "Trained and evaluated on the data of the participating sites only; performance on other vendors, "
        "populations or acquisition protocols is unknown until measured there (fedbreast evaluate).",
        "Small test sets give wide confidence intervals; read the CIs, not the point estimates.",
        "Inputs must be preprocessed exactly as described (window, crop, size, orientation); other inputs give "
        "meaningless scores.",
        "If the run used generated (simulated) data, the metrics say nothing about clinical performance.",
    ]
    if cfg.dp != "off":
        out.append("Trained with differential privacy: the added noise lowers accuracy against a non-private model.")
    out += [f"The run {note}." for note in cfg.notes]
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _metric_line(name: str, values: Mapping[str, Any], prefix: str) -> str:
    bits = []
    for key in sorted(values):
        if key.endswith(("_lo", "_hi")) or not key.startswith(prefix):
            continue
        lo, hi = values.get(f"{key}_lo"), values.get(f"{key}_hi")
        ci = f" ({_fmt(lo)}-{_fmt(hi)})" if lo is not None and hi is not None else ""
        bits.append(f"{key.removeprefix(prefix)} {_fmt(values[key])}{ci}")
    return f"| {name} | {'; '.join(bits) or 'not recorded'} |"


def render_card(card: Mapping[str, Any]) -> str:
    t, m, v, c = card["training"], card["model"], card["verification"], card["checkpoint"]
    lines = [
        f"# Model card: {card['family']} ({m['format']})",
        "",
        f"**File:** `{m['file']}` ({m['bytes']} bytes). **Checkpoint:** {c['kind']} at round {c['round']}, "
        f"sha256 `{c['sha256']}`. **App hash:** `{card['app_hash']}`.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Input and output",
        "",
        "| name | shape | dtype | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for i in card["inputs"]:
        lines.append(f"| {i['name']} | {tuple(i['shape'])} | {i['dtype']} | {i['meaning']} |")
    o = card["output"]
    lines += [f"| **{o['name']}** (output) | {tuple(o['shape'])} | {o['dtype']} | {o['meaning']} |", ""]
    lines += ["## Preprocessing", ""]
    for name, pre in card["preprocessing"].items():
        lines.append(f"- `{name}`: " + ", ".join(f"{k}={pre[k]}" for k in sorted(pre)))
    lines += [
        "",
        "## Training",
        "",
        f"Strategy {t['strategy']}, {t['rounds_configured']} rounds configured, checkpoint from round "
        f"{t['round_of_checkpoint']}; DP {t['dp']}; secure aggregation {t['secure_aggregation']}.",
        "",
        "| site | sizes (rounds trained, examples) |",
        "| --- | --- |",
    ]
    for site, entry in sorted(t["sites"].items()):
        lines.append(f"| {site} | " + ", ".join(f"{k} {entry[k]}" for k in sorted(entry)) + " |")
    if "dp_spent" in t:
        dp = t["dp_spent"]
        lines += ["", f"DP ({dp['mode']}): epsilon spent up to {_fmt(dp['epsilon_spent_max'])}, delta {dp['delta']}."]
    lines += ["", "## Test metrics at the checkpoint's round (95% CI)", "", "| site | metrics |", "| --- | --- |"]
    for site, values in sorted(t["test_per_site"].items()):
        lines.append(_metric_line(site, values, "test_"))
    lines.append(_metric_line("pooled", t["test_pooled"], "test_pooled_"))
    lines.append(_metric_line("site-weighted mean", t["test_site_weighted"], "test_"))
    lines += [
        "",
        "## Verification",
        "",
        f"Max abs difference to PyTorch on a random batch of {v['batch']}: {v['max_abs_diff']} "
        f"(tolerance {v['tolerance']}; checked with {v['checked_with']}).",
        "",
        "## Limitations",
        "",
        *[f"- {x}" for x in card["limitations"]],
        "",
        "## Run config",
        "",
        "```json",
        json.dumps(card["config"], indent=1, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
