"""The hospital site's Flower ClientApp: local training and local evaluation of the global model.

Only model tensors and aggregate metrics leave: the train reply carries the updated
weights and training statistics; the evaluate reply carries per-split metrics with
bootstrap CIs, and per-class score histograms (test and validation) from which the server
computes a pooled ROC and a federated operating point without any per-patient score leaving
the site.

A site that cannot take part (no manifest, no complete exam) answers with status
"unable" and its reason instead of failing, so the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedbreast.client.audit import egress_mod
from fedbreast.client.personal import (
    cross_site_metrics,
    global_digest,
    personal_arrays,
    personal_metrics,
    personaliser_for,
    psft_metrics,
    refuse_fine_tuning_outside_dp,
)
from fedbreast.client.policy import PolicyRefused, policy_mod, policy_of
from fedbreast.client.secure_aggregation import secure_aggregation_mod
from fedbreast.shared import protocol
from fedbreast.shared.config import HARNESS_KEYS, RunConfig
from fedbreast.shared.data.manifest import read_site_meta
from fedbreast.shared.data.site_data import SiteData, SiteUnavailable
from fedbreast.shared.metrics import (
    BINARY_METRIC_KEYS,
    add_laplace_noise,
    binary_metrics,
    bootstrap_ci,
    operating_threshold,
    score_histogram,
)
from fedbreast.shared.models.factory import build_model
from fedbreast.shared.training.accounting import run_key
from fedbreast.shared.training.dp import (
    CEILING_KEY,
    DPRefused,
    central_dp_mod,
    lifetime_epsilon,
    local_dp_for,
    privacy_lock,
    record_release,
    site_ceiling,
)
from fedbreast.shared.training.local import pick_device
from fedbreast.shared.training.tasks import FamilySite, task_for
from fedbreast.shared.update_encoding import FP32, EncodingError, encode_update

log = logging.getLogger("fedbreast.client")
# egress_mod outermost: every reply is audited on the site's disk as it leaves (masked or not),
# refusals included; then the site's policy (client/policy.py), before anything reads the message.
app = ClientApp(mods=[egress_mod, policy_mod, secure_aggregation_mod])

# Run-config keys that steer the simulation harness, not the model; the ClientApp ignores them.
SIM_KEYS = HARNESS_KEYS
CI_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "mcc", "spec_at_sens100")


def site_dir_of(context: Context) -> Path:
    """The site's data folder: node config ``data-path`` (deployment), or the simulated
    site for this partition (simulation: ``sim-sites-dir`` holds site-1 ... site-N)."""
    node = context.node_config
    if "data-path" in node:
        return Path(str(node["data-path"]))
    sim_root = context.run_config.get("sim-sites-dir")
    if sim_root and "partition-id" in node:
        sites = sorted(p for p in Path(str(sim_root)).iterdir() if p.is_dir())
        pid = int(node["partition-id"])
        if pid >= len(sites):
            raise SiteUnavailable(f"simulated partition {pid} has no site under {sim_root} ({len(sites)} sites)")
        return sites[pid]
    raise SiteUnavailable("no data-path in this SuperNode's --node-config")


def site_name_of(context: Context, data: SiteData | FamilySite | None = None) -> str:
    """The name the site reports under: node config, else its manifest's, else its folder's."""
    if "site-name" in context.node_config:
        return str(context.node_config["site-name"])
    if data is not None:
        return data.name
    try:
        folder = site_dir_of(context)
    except SiteUnavailable:
        return f"node-{context.node_id}"
    try:
        return str(read_site_meta(folder).get("site") or folder.name)
    except ValueError:
        return folder.name


def _ok(context: Context, data: SiteData | FamilySite | None = None) -> protocol.SiteInfo:
    return protocol.SiteInfo(site_name_of(context, data))


def _unable(msg: Message, context: Context, reason: str) -> Message:
    log.warning("site cannot take part: %s", reason)
    return protocol.unable(msg, site_name_of(context), reason)


def _load(msg: Message, context: Context) -> tuple[RunConfig, SiteData | FamilySite, torch.nn.Module]:
    cfg = RunConfig.from_flower(context.run_config, ignore=SIM_KEYS)
    data = task_for(cfg).open(site_dir_of(context), cfg)  # the family's inputs at this site
    model = site_model(cfg)
    model.load_state_dict(protocol.array_record(msg.content).to_torch_state_dict(), strict=True)
    return cfg, data, model


def site_model(cfg: RunConfig) -> torch.nn.Module:
    """The model's structure at the site; its weights always come in the message. A run's
    ``weights-path`` is never opened here: it would let the coordinator probe the site's files."""
    return build_model(cfg.replace(weights_path=""))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """The coordinator's roll call before round 1: the site's name and whether it can train.

    Opening the site here also warms its preprocessing cache, so round 1 measures training.
    """
    try:
        cfg = RunConfig.from_flower(context.run_config, ignore=SIM_KEYS)
        data = task_for(cfg).open(site_dir_of(context), cfg)
    except SiteUnavailable as exc:
        return _unable(msg, context, str(exc))
    counts = {f"{split}_exams": data.exams(split) for split in ("train", "val", "test")}
    # Training samples (exams, or patches for the patch family): SecAgg+ sizes its weights from them.
    counts["train_samples"] = len(data.datasets["train"])
    return protocol.reply(msg, _ok(context, data), {protocol.NUM_EXAMPLES: counts["train_exams"], **counts})


def update_encoding_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The train reply's weights as the run's ``update-encoding`` sends them (shared/update_encoding.py):
    the change to the received global model in fp16 or int8, after everything else (central DP's
    clip included: encoding is post-processing). A change that cannot be encoded (not finite: a
    diverged model, or a non-finite global model from the coordinator) is not sent: the site
    answers "unable" with the reason."""
    encoding = str(context.run_config.get("update-encoding", FP32))
    received = msg.content.array_records.get(protocol.ARRAYS)  # held now: inner code may replace it
    reply = call_next(msg, context)
    if encoding == FP32 or received is None or reply.has_error() or protocol.ARRAYS not in reply.content.array_records:
        return reply  # an "unable" reply carries no arrays
    trained = protocol.array_record(reply.content)
    try:
        encoded = encode_update(
            {k: v.numpy() for k, v in trained.items()}, {k: v.numpy() for k, v in received.items()}, encoding
        )
    except EncodingError as exc:
        return _unable(msg, context, f"update-encoding {encoding}: {exc}")
    reply.content[protocol.ARRAYS] = ArrayRecord(
        {k: Array(np.require(v, requirements="C")) for k, v in encoded.items()}
    )
    return reply


# update_encoding_mod outermost: it encodes what central DP's clip leaves.
@app.train(mods=[update_encoding_mod, central_dp_mod])  # central_dp_mod clips only when the coordinator runs central DP
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        cfg, data, model = _load(msg, context)
    except SiteUnavailable as exc:
        return _unable(msg, context, str(exc))
    server_round = protocol.round_of(msg.content, default=1)
    # DP rounds of all runs at this site take turns: the lifetime budget is checked and spent as
    # one step, so concurrent messages cannot each pass the check before any of them has spent.
    budget = privacy_lock(site_dir_of(context)) if cfg.dp == "local" else nullcontext()
    with budget:
        try:  # the site's policy on its data, then local DP or its refusal (shared/training/dp.py)
            policy = policy_of(context)
            if policy is not None:
                policy.check_training(len(data.datasets["train"]), cfg)
            dp = local_dp_for(context, cfg, site_dir_of(context), len(data.datasets["train"]), server_round)
        except PolicyRefused as exc:
            return _unable(msg, context, f"refused: {exc}")
        except DPRefused as exc:
            return _unable(msg, context, str(exc))
        torch.manual_seed(cfg.seed * 1000 + server_round)
        device = pick_device()
        personaliser = personaliser_for(context, cfg, site_dir_of(context)) if cfg.fedbn else None
        # FedBN: train with the site's own normalisation layers (from its disk, so also after a restart)
        own_norms = personaliser.use_local_norms(model, server_round) if personaliser is not None else False
        try:  # the family's local training (train_local underneath; keyword arguments pass through to it)
            stats = task_for(cfg).train(model.to(device), data, cfg, server_round, device, dp=dp)
        except SiteUnavailable as exc:  # e.g. no ultrasound for mgus' fusion step
            return _unable(msg, context, str(exc))
    metrics = {
        protocol.NUM_EXAMPLES: stats.examples,
        "train_loss": stats.loss,
        "train_seconds": time.perf_counter() - t0,  # the whole local step: load the model, then train
        "train_images_per_s": stats.images_per_s,
        "train_steps": stats.steps,
        "lr": cfg.lr_at(server_round),
    }
    if personaliser is not None:
        metrics["fedbn_own_norms"] = int(own_norms)  # 0 until the site has trained once in this run
    if dp is not None:
        metrics.update(dp.metrics())  # epsilon spent in this run so far; the un-noised train loss withheld
    straggle(context)
    # FedBN: the trained norm layers stay on the site's disk; the received ones go back.
    if personaliser is not None:
        state = personaliser.reply_state(model, protocol.array_record(msg.content).to_torch_state_dict(), server_round)
    else:
        state = model.cpu().state_dict()
    return protocol.reply(msg, _ok(context, data), metrics, ArrayRecord(state))


def straggle(context: Context) -> None:
    """Drills only: node config ``debug-delay-seconds`` (site.toml [site], off by default)
    holds the training reply back, so a test can show the round closing at its timeout."""
    delay = float(context.node_config.get("debug-delay-seconds", 0) or 0)
    if delay > 0:
        log.warning("debug-delay-seconds = %s: holding the training reply back", delay)
        time.sleep(delay)


def split_metrics(
    split: str,
    y: np.ndarray,
    p: np.ndarray,
    loss: float,
    exams: int,
    cfg: RunConfig,
    with_ci: bool,
    threshold: float = 0.5,
) -> dict:
    """Fixed key set per split, NaN where undefined, so every site's reply has the same keys.
    Thresholded metrics (accuracy, sensitivity...) use ``threshold``: the site's operating point."""
    out: dict[str, float | int | list[int]] = {
        f"{split}_exams": exams,
        f"{split}_loss": loss if math.isfinite(loss) else float("nan"),
        f"{split}_threshold": threshold,
    }
    if len(y):
        point = binary_metrics(y, p, threshold=threshold)
    else:
        point = {k: float("nan") for k in BINARY_METRIC_KEYS} | {"n": 0, "n_pos": 0, "n_neg": 0}
    out.update({f"{split}_{k}": v for k, v in point.items()})
    if with_ci:
        ci = (
            bootstrap_ci(y, p, metrics=CI_METRICS, n_boot=cfg.bootstrap, seed=cfg.seed, threshold=threshold)
            if len(y) and cfg.bootstrap
            else {}
        )
        for m in CI_METRICS:
            _, lo, hi = ci.get(m, (math.nan, math.nan, math.nan))
            out[f"{split}_{m}_lo"], out[f"{split}_{m}_hi"] = lo, hi
    return out


def histogram_noise_epsilon(context: Context, cfg: RunConfig) -> float:
    """Laplace noise on the score histograms: the run may ask for it, and a site's own policy
    (``hist-noise-epsilon`` in its node config) can demand it; the stricter (smaller) epsilon wins."""
    asked = [e for e in (cfg.hist_noise_epsilon, float(context.node_config.get("hist-noise-epsilon", 0) or 0)) if e > 0]
    return min(asked) if asked else 0.0


def score_histograms(
    context: Context, cfg: RunConfig, y: np.ndarray, p: np.ndarray, split: str = "test"
) -> dict[str, list[int]]:
    """One split's per-class score histograms (``{split}_hist_pos`` / ``{split}_hist_neg``), as this
    site's policy lets them leave: the test split's for the pooled ROC, the validation split's for
    the federated operating point (server/phases.py), each under the same rules.

    Bins: the run's ``hist-bins``, or fewer (a divisor, so the coordinator can pool it) when the
    policy caps them (client/policy.py), for this split's own size. Noise: the stricter of the
    run's and the site's ``hist-noise-epsilon``; each noised release is charged to the site's
    lifetime budget. A site with a privacy ceiling (``dp-max-epsilon``) releases no histogram it
    cannot account for: none without noise, none beyond the ceiling (the reply then has no
    histogram keys for the split, and the coordinator pools the others')."""
    policy = policy_of(context)
    n_bins = policy.hist_bins(cfg.hist_bins, len(y)) if policy is not None else cfg.hist_bins
    hist = score_histogram(y, p, bins=n_bins) if len(y) else None
    keys = f"{split}_hist_pos", f"{split}_hist_neg"
    if hist is None:
        return {keys[0]: [0] * n_bins, keys[1]: [0] * n_bins}
    epsilon = histogram_noise_epsilon(context, cfg)  # per patient
    ceiling = site_ceiling(context.node_config)
    per_patient = task_for(cfg).units_per_patient  # one patient changes up to this many counts
    site_dir = site_dir_of(context)
    what = f"{'validation' if split == 'val' else split} histogram"
    if ceiling is not None:
        if epsilon <= 0 or per_patient is None:
            log.warning("%s withheld: %s is set and it cannot be accounted per patient", what, CEILING_KEY)
            return {}
        with privacy_lock(site_dir):  # checked and charged as one step (see train)
            if lifetime_epsilon(site_dir) + epsilon > ceiling:
                log.warning("%s withheld: its epsilon %g would pass %s = %g", what, epsilon, CEILING_KEY, ceiling)
                return {}
            record_release(site_dir, run_key(context.run_config, context.run_id), what, epsilon)
    elif epsilon > 0:  # no ceiling: still on the ledger, so the record of what was spent is whole
        record_release(site_dir, run_key(context.run_config, context.run_id), what, epsilon)
    if epsilon > 0:
        # Laplace noise for epsilon per patient: a patient's units move up to that many counts.
        scale = per_patient if per_patient is not None else 1
        hist = add_laplace_noise(hist, epsilon / scale, np.random.default_rng(), n_groups=min(16, n_bins))
    return {keys[0]: hist["hist_pos"], keys[1]: hist["hist_neg"]}


def test_histograms(context: Context, cfg: RunConfig, y: np.ndarray, p: np.ndarray) -> dict[str, list[int]]:
    """The test split's per-class score histograms (:func:`score_histograms`)."""
    return score_histograms(context, cfg, y, p, "test")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        cfg, data, model = _load(msg, context)
        refuse_fine_tuning_outside_dp(context, cfg)
    except (SiteUnavailable, DPRefused) as exc:
        return _unable(msg, context, str(exc))
    device = pick_device()
    task = task_for(cfg)
    server_round = protocol.round_of(msg.content, default=cfg.rounds) if protocol.CONFIG in msg.content else None
    personaliser = personaliser_for(context, cfg, site_dir_of(context)) if cfg.personalised else None
    digest = global_digest(model) if personaliser is not None else ""
    if personaliser is not None:  # FedBN: the global model is evaluated with the site's own norm layers
        personaliser.use_local_norms(model, server_round or cfg.rounds)
    metrics: dict = {}
    threshold = 0.5
    # The operating point leaves the site snapped to the grid of the histograms it releases
    # (shared/metrics operating_threshold): never finer than what those already show.
    policy = policy_of(context)
    grid = policy.hist_bins(cfg.hist_bins, 1 << 30) if policy is not None else cfg.hist_bins
    val_scores: tuple[np.ndarray, np.ndarray] | None = None
    for split in ("val", "test"):
        y, p, loss = task.predict(model.to(device), data, split, cfg, device, server_round=server_round)
        if not np.isfinite(p).all():  # a diverged or poisoned global model: say so, do not crash
            return _unable(
                msg, context, f"the global model gives non-finite scores on the {split} split; nothing to evaluate"
            )
        if split == "val":
            # The site's operating point (Youden's J) comes from its validation split and applies to test.
            if len(y):
                threshold = operating_threshold(y, p, grid=grid)
            val_scores = (y, p)  # an empty split too: its all-zero histogram keeps every reply's keys the same
        metrics.update(
            split_metrics(split, y, p, loss, data.exams(split), cfg, with_ci=split == "test", threshold=threshold)
        )
        if split == "test":
            metrics.update(test_histograms(context, cfg, y, p))
    if val_scores is not None:
        # After the test histogram, so a site near its privacy ceiling still sends the pooled ROC's:
        # the validation histogram only feeds the federated cut-off (server/phases.py), under the same rules.
        metrics.update(score_histograms(context, cfg, *val_scores, split="val"))
    metrics.update(task.extra_metrics(model, data, cfg, device, server_round=server_round))
    if personaliser is not None:  # the personalised model side by side (*_personal keys)
        metrics.update(
            personal_metrics(
                task,
                data,
                model,
                digest,
                cfg,
                server_round or cfg.rounds,
                device,
                personaliser,
                lambda s, y, p, loss, n, t: split_metrics(s, y, p, loss, n, cfg, with_ci=False, threshold=t),
                grid=grid,
            )
        )
    if cfg.patient_finetune:  # seed 000: test metrics with patient-specific fine-tuning (*_psft keys)
        metrics.update(psft_metrics(task, data, model, cfg, device, grid=grid))
    metrics[protocol.NUM_EXAMPLES] = data.exams("test")
    metrics["eval_seconds"] = time.perf_counter() - t0
    return protocol.reply(msg, _ok(context, data), metrics)


@app.query("personal")
def personal(msg: Message, context: Context) -> Message:
    """The cross-site phase asks for this site's personalised model: weights only leave."""
    try:
        cfg, data, model = _load(msg, context)
        refuse_fine_tuning_outside_dp(context, cfg)
    except (SiteUnavailable, DPRefused) as exc:
        return _unable(msg, context, str(exc))
    server_round = protocol.round_of(msg.content, default=cfg.rounds)
    personaliser = personaliser_for(context, cfg, site_dir_of(context))
    digest = global_digest(model)
    personaliser.use_local_norms(model, server_round)
    arrays = personal_arrays(task_for(cfg), data, model, digest, cfg, server_round, pick_device(), personaliser)
    return protocol.reply(msg, _ok(context, data), {protocol.NUM_EXAMPLES: data.exams("train")}, ArrayRecord(arrays))


@app.evaluate("cross_site")
def cross_site(msg: Message, context: Context) -> Message:
    """Every model of the cross-site phase (global first, then each site's personalised one)
    on this site's test split; the reply has aggregate metrics per model (m{i}_* keys)."""
    from fedbreast.shared.training.personalise import CROSS_SITE_KEYS, model_slot

    try:
        cfg = RunConfig.from_flower(context.run_config, ignore=SIM_KEYS)
        data = task_for(cfg).open(site_dir_of(context), cfg)
        refuse_fine_tuning_outside_dp(context, cfg)  # its own personal model may be fine-tuned here
    except (SiteUnavailable, DPRefused) as exc:
        return _unable(msg, context, str(exc))
    config = protocol.config_record(msg.content)
    server_round = protocol.round_of(msg.content, default=cfg.rounds)
    names = config["models"]
    assert isinstance(names, list)  # the coordinator's model names (server/cross_site.py)
    models = []
    for i, name in enumerate(names):
        m = site_model(cfg)
        m.load_state_dict(protocol.array_record(msg.content, model_slot(i)).to_torch_state_dict(), strict=True)
        models.append((str(name), m))
    personaliser = personaliser_for(context, cfg, site_dir_of(context))
    metrics = cross_site_metrics(
        task_for(cfg), data, models, cfg, server_round, pick_device(), personaliser, CROSS_SITE_KEYS
    )
    metrics[protocol.NUM_EXAMPLES] = data.exams("test")
    return protocol.reply(msg, _ok(context, data), metrics)
