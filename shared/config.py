"""The one typed configuration of a federated run, validated before anything starts.

Flower carries run settings as a flat dict with kebab-case keys (``[tool.flwr.app.config]``
in pyproject.toml, ``--run-config`` on ``flwr run``). :func:`RunConfig.from_flower`
turns that dict into this dataclass and rejects an unknown key, a wrong type or an
out-of-range value with the key named. Site-only settings (data path, DP ceiling, GPU)
are not here: they live in the site's own config and never travel in a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedbreast.shared.data.rules import ConfigError
from fedbreast.shared.families import FAMILIES, FamilySettings
from fedbreast.shared.update_encoding import FP32, UPDATE_ENCODINGS

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
# single: seed 001's no-fusion baseline; left-right: its left-right-only fusion (no CC-MLO fusion)
VIEW_FUSIONS = ("average", "concat", "single", "left-right")
HEADS = ("pooled", "vgg_fc")
AMP_MODES = ("auto", "bf16", "off")
WINDOWS = ("percentile", "dicom", "fixed")
NORMS = ("auto", "batch", "group")  # auto: GroupNorm under DP (Opacus needs it), else BatchNorm
KEY_METRICS = ("val_auc", "val_loss", "val_mcc", "val_accuracy")
# Which round's model a run reports, exports and predicts with (server/checkpoints.py reported_kinds).
MODEL_SELECTIONS = ("last-round", "best-val")
DP_MODES = ("off", "local", "central")  # shared/training/dp.py
# Per-sample gradient engines: Opacus' four, and fused (shared/training/fused_dp.py: per-exam norms in one backward)
DP_GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost", "fused")
# What local DP-SGD trains (shared/training/dp.py), e.g. over a `fedbreast pretrain` backbone:
# head = every layer outside the registry backbone (the backbone stays as loaded: freeze's
# "backbone" scope); last-blocks = all but the first dp-freeze-blocks backbone blocks (the default,
# today's behaviour); all = every parameter (dp-freeze-blocks unused).
DP_TRAIN_SCOPES = ("head", "last-blocks", "all")
PSFT_SCOPES = ("all", "head")
OPTIMIZERS = ("sgd", "adam")  # local training (shared/training/local.py): seed 001's SGD, seed 000's Adam
# What local training keeps fixed (shared/training/freeze.py): none = full-tune; backbone = the
# registry CNNs, the layers on top train (seed 003's semi-tune, seed 000's FT-AlexNet: its last
# two layers); all-but-head = only the logit layers train.
FREEZE_SCOPES = ("none", "backbone", "all-but-head")
# update-norm-bound = -1 is "auto" (the default): 3 x the round's median change norm in a plain
# run; nothing under secure aggregation (no single update is seen) or central DP (every change
# is clipped to dp-max-grad-norm, at the site and again at the coordinator). 0: off.
AUTO_NORM_BOUND = -1.0
AUTO_NORM_MULTIPLE = 3.0
# Run-config keys of the simulation harness, not run settings: the sites folder, the run
# directory, and a policy file for every simulated site (client/policy.py). A deployed site
# ignores the first and the last (it has its own data path and its own policy). The coordinator's
# own: a checkpoint file it loads as the initial model (init-checkpoint), evaluation only of it
# (evaluate-only = "true": no train message is sent), and a site kept out of training (holdout-site).
HARNESS_KEYS = ("sim-sites-dir", "run-dir", "sim-site-policy", "init-checkpoint", "evaluate-only", "holdout-site")
SANITY_CEILINGS = {
    "hist_bins": 4096,  # a score histogram finer than this is a list of scores
    "bootstrap": 100_000,
    "workers": 256,
    "local_epochs": 10_000,
    "local_steps": 1_000_000,
    "personal_epochs": 10_000,
    "personal_steps": 1_000_000,
    "psft_epochs": 10_000,
    "rounds": 100_000,
}


@dataclass(frozen=True)
class RunConfig(FamilySettings):
    # model
    model: str = "multiview"
    backbone: str = "resnet18"
    view_fusion: str = "average"
    head: str = "pooled"
    in_channels: int = 2  # LE+DES; FFDM exams fill the DES channel with zeros
    image_h: int = 256
    image_w: int = 128
    window: str = "percentile"  # percentile (vendor-robust) | dicom | fixed (seed 001's 1500-3300)
    weights_path: str = ""  # local ImageNet state_dict file; never downloaded
    # The backbone's norm layers. "group" without DP builds the DP model's form, so a run without
    # DP can start from a `fedbreast pretrain --norm group` file: the no-DP arm of a DP comparison
    # then has the same pretrained start as the DP arms.
    norm: str = "auto"
    # A family's own settings (patch-size, box-size, crop-size, ...) are in its package:
    # shared/families/<name>/settings.py, inherited through FamilySettings.
    # federation
    rounds: int = 3
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_sites: int = 1
    min_evaluate_sites: int = 1
    min_available_sites: int = 1
    round_timeout: float = 600.0
    wait_for_sites: float = 120.0  # how long to wait for min_available_sites before a clean stop
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam / FedYogi
    trim_beta: float = 0.2  # FedTrimmedAvg
    krum_byzantine: int = 0  # Krum: number of malicious sites tolerated
    # Model-replacement defence (server/phases.py, docs/server-robustness.md): > 0 clips each
    # update's change to this multiple of the round's median change norm; -1 = auto (the default,
    # AUTO_NORM_BOUND above: 3 in a plain run, none with secure aggregation or central DP); 0 = off.
    update_norm_bound: float = AUTO_NORM_BOUND
    # SecAgg+ (server/secure_aggregation.py): the coordinator sees only the sum of the updates
    secure_aggregation: bool = False
    secagg_shares: float = 1.0  # fraction of the sampled sites each site shares its key with
    secagg_threshold: float = 0.67  # fraction of those shares needed to unmask a dropped site
    secagg_clip_range: float = 4.0  # a site's per-value change must lie in [-clip, clip] (it is quantised there)
    # How a site's train reply carries its update (shared/update_encoding.py, docs/performance.md):
    # fp32 = the weights as today; fp16 = the change to the global model in float16 (0.5x the
    # bytes); int8 = the change per tensor in int8 with one scale (0.25x). The coordinator decodes
    # before it checks and aggregates. Why: the update is the most a site sends a round (45 MB, default model).
    update_encoding: str = FP32
    # local training (seed 001: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 halved at 10/30/40)
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many batches per round instead of epochs
    batch_size: int = 8
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_rounds: str = "10,30,40"
    lr_decay_factor: float = 0.5
    optimizer: str = "sgd"  # sgd | adam (seed 000: Adam, lr 1e-4); adam ignores momentum
    freeze: str = "none"  # none | backbone | all-but-head (FREEZE_SCOPES above)
    augment: bool = True
    amp: str = "auto"
    workers: int = 2
    # Use the virtual DES images a site made with a trained cyclegan (`fedbreast site synthesize`,
    # shared/data/virtual.py) where it has no real DES: an FFDM site then trains and scores as a
    # CEM site instead of a zero DES channel. Off: they are never read. No tensor depends on it.
    virtual_des: bool = False
    # With virtual-des: the fraction of a CEM site's patients whose real DES are replaced by
    # virtual ones (seed 004's 10-100 % experiment; needs `site synthesize --all-views`), chosen
    # by the run's seed. 0: real DES wherever there is one.
    virtual_des_replace: float = 0.0
    # evaluation and reporting
    key_metric: str = "val_auc"  # picks checkpoints/best.pt, written whatever model-selection is
    # last-round (default): the report, `predict`, `export` and `evaluate RUN_DIR` use the last
    # round's model, the budget the --baselines models train and keep. best-val: the round with the
    # best key metric (seed 001's early stopping). On the default run's validation splits (12-20
    # units a site) best-val picked round 2 or 3 of 4 in four of five data seeds and scored 0.006
    # lower pooled test AUC than the last round (docs/default-quality.md).
    model_selection: str = "last-round"
    bootstrap: int = 1000
    hist_bins: int = 512
    hist_noise_epsilon: float = 0.0  # > 0: Laplace noise on histogram counts (site policy may force it)
    # A site's own Youden cut-off counts in the report only when its validation split holds at least
    # this many units and at least a quarter of it (5 of 20) of each class; below that the federated
    # cut-off (pooled validation histograms, server/phases.py) is used for it. Youden's J from fewer
    # than ~5 of a class moves in steps of 20% sensitivity or specificity: one exam decides the
    # cut-off (site-2's 6 validation exams gave specificity 0.05 on test). 0: always the local one.
    min_val_for_local_threshold: int = 20
    seed: int = 0
    # differential privacy (shared/training/dp.py); a site's own epsilon ceiling is its node
    # config dp-max-epsilon, never a run setting
    dp: str = "off"  # off | local (DP-SGD at every site) | central (clipped updates, noise at the server)
    dp_epsilon: float = 0.0  # target epsilon for the whole run; 0: use dp-noise-multiplier as given
    dp_delta: float = 1e-5
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0  # local: per-exam gradient clip; central: per-site update clip
    dp_grad_sample_mode: str = "fused"  # per-sample engine: hooks | ew | functorch | ghost | fused
    dp_freeze_blocks: int = 4  # local DP: leading backbone blocks not trained (resnet: conv1, bn1, layer1, layer2)
    dp_train_scope: str = "last-blocks"  # local DP: head | last-blocks (dp-freeze-blocks) | all (DP_TRAIN_SCOPES)
    # patient-specific fine-tuning at evaluation (seed 000; patch family "birads" only)
    patient_finetune: bool = False
    psft_lr: float = 1e-4  # seed 000: Adam 1e-4, batch 200, one epoch on the patient's normal patches
    psft_epochs: int = 1
    psft_batch_size: int = 200
    psft_scope: str = "all"  # all: the whole network (the seed) | head: the last layer only (faster)
    # site personalisation (kept on the site's disk) and FedBN
    personal_epochs: int = 0  # > 0: fine-tune the global model on the site's train split for the personal model
    personal_steps: int = 0  # > 0: this many batches instead of epochs
    personal_lr: float = 0.0  # 0: the round's learning rate
    fedbn: bool = False  # normalisation layers stay at the sites
    cross_site: bool = False  # after the last round: every personal model + the global one on every site's test split

    # ---- conversion -------------------------------------------------------------------
    @staticmethod
    def flower_key(name: str) -> str:
        return name.replace("_", "-")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> RunConfig:
        """Build from Flower's flat kebab-case dict; raises ConfigError naming the key."""
        by_key = {cls.flower_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in ignore:
                continue
            if key == "update-norm-bound" and value == "auto":  # the spelled-out default
                value = AUTO_NORM_BOUND
            f = by_key.get(key)
            if f is None:
                raise ConfigError(f"run config: unknown key {key!r}; valid keys: {', '.join(sorted(by_key))}")
            values[f.name] = _coerce(key, value, f.type)
        return cls(**values)

    def to_flower(self) -> dict[str, Any]:
        return {self.flower_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def model_signature(self) -> str:
        """Hash of what fixes the model's tensors: a checkpoint of another signature cannot resume."""
        keys: tuple[str, ...] = ("model", "backbone", "view_fusion", "head", "in_channels", "image_h", "image_w")
        keys += FAMILIES[self.model].signature_keys  # none for multiview: its older checkpoints stay valid
        values = {k: getattr(self, k) for k in keys}
        if self.group_norm:  # GroupNorm models have other tensors than the BatchNorm model
            values["norm"] = "group"
        if self.model == "multiview" and self.multiview_cnn_rounds > 0:  # two-stage: a per-image head too
            values["cnn_head"] = True
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def group_norm(self) -> bool:
        """The model's norm layers are GroupNorm (the DP form): always under DP, or by ``norm``."""
        return self.norm == "group" or (self.norm == "auto" and self.dp != "off")

    @property
    def notes(self) -> list[str]:
        """What the run's report and model card flag about its settings (the family's notes)."""
        return FAMILIES[self.model].notes(self)

    @property
    def decay_rounds(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.lr_decay_rounds.split(",") if x.strip())

    def lr_at(self, server_round: int) -> float:
        """Step decay by round (rounds play the role of the seed's epochs)."""
        return self.lr * self.lr_decay_factor ** sum(server_round > r for r in self.decay_rounds)

    # ---- validation -------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"run config: {self.flower_key(name)} = {getattr(self, name)!r}: {why}")

        for name, choices in (
            ("model", tuple(FAMILIES)),
            ("strategy", STRATEGIES),
            ("view_fusion", VIEW_FUSIONS),
            ("head", HEADS),
            ("amp", AMP_MODES),
            ("window", WINDOWS),
            ("norm", NORMS),
            ("key_metric", KEY_METRICS),
            ("model_selection", MODEL_SELECTIONS),
            ("optimizer", OPTIMIZERS),
            ("freeze", FREEZE_SCOPES),
            ("update_encoding", UPDATE_ENCODINGS),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        from fedbreast.shared.models import available_backbones

        if self.backbone not in available_backbones():
            raise bad("backbone", f"must be one of {', '.join(available_backbones())}")
        if not 0.0 <= self.virtual_des_replace <= 1.0:
            raise bad("virtual_des_replace", "must be in [0, 1]")
        if self.virtual_des_replace > 0 and not self.virtual_des:
            raise bad("virtual_des_replace", "replaces real DES by virtual ones: it needs virtual-des = true")
        from fedbreast.shared.models.backbones import MIN_INPUT_PX

        least = MIN_INPUT_PX.get(self.backbone, 0)
        for name in FAMILIES[self.model].input_size_keys:  # the family's image / patch / box / crop side
            if getattr(self, name) < least:
                raise bad(name, f"backbone {self.backbone!r} needs images of at least {least} x {least} px")
        if self.in_channels not in (1, 2):
            raise bad("in_channels", "must be 1 (LE / FFDM) or 2 (LE + DES)")
        for name in ("image_h", "image_w"):
            if not 16 <= getattr(self, name) <= 4096:
                raise bad(name, "must be between 16 and 4096 pixels")
        for name in ("rounds", "batch_size", "local_epochs"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("min_train_sites", "min_evaluate_sites", "min_available_sites"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "must be in (0, 1]")
        for name in ("round_timeout", "wait_for_sites", "lr"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in (
            "local_steps",
            "weight_decay",
            "proximal_mu",
            "krum_byzantine",
            "bootstrap",
            "hist_noise_epsilon",
            "min_val_for_local_threshold",
            "workers",
        ):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.update_norm_bound < 0 and self.update_norm_bound != AUTO_NORM_BOUND:
            raise bad("update_norm_bound", "must be -1 (auto), 0 (off) or a positive multiple of the median norm")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if not 0 < self.trim_beta < 0.5:
            raise bad("trim_beta", "must be in (0, 0.5)")
        if self.hist_bins < 16:
            raise bad("hist_bins", "must be at least 16")
        # Sanity ceilings for every run, whoever sends it (a site's own policy is stricter:
        # client/policy.py): beyond these a value is a mistake or an attack on the site's memory.
        for name, most in SANITY_CEILINGS.items():
            if getattr(self, name) > most:
                raise bad(name, f"must be at most {most}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
        try:
            self.decay_rounds  # noqa: B018 - parsing it is the check
        except ValueError:
            raise bad("lr_decay_rounds", "must be comma-separated round numbers, e.g. '10,30,40'") from None
        for family in FAMILIES.values():  # every family's settings, whatever this run's model
            if family.settings is not None:
                family.settings.check(self, bad)
        self._validate_dp(bad)
        self._validate_secure_aggregation(bad)
        if self.head == "vgg_fc" and self.backbone != "vgg16_bn":
            raise bad("head", "the faithful vgg_fc head needs backbone = 'vgg16_bn'")
        if self.psft_scope not in PSFT_SCOPES:
            raise bad("psft_scope", f"must be one of {', '.join(PSFT_SCOPES)}")
        if self.psft_lr <= 0:
            raise bad("psft_lr", "must be positive")
        for name in ("psft_epochs", "psft_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("personal_epochs", "personal_steps", "personal_lr"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.patient_finetune and self.model != "birads":
            raise bad("patient_finetune", "needs a patch classifier: model = 'birads' (seed 000)")
        if self.cross_site and not self.personalised:
            raise bad(
                "cross_site", "needs a personal model: set personal-epochs or personal-steps > 0, or fedbn = true"
            )
        if self.dp != "off" and self.fine_tunes_without_dp:
            # Both train on the site's data outside DP-SGD, and the first sends the result out.
            raise bad(
                "dp",
                f"cannot run with {' and '.join(self.fine_tunes_without_dp)}: they fine-tune on the site's data "
                "without DP-SGD",
            )
        if self.norm == "batch" and self.dp != "off" and (self.dp != "local" or self.dp_train_scope != "head"):
            # With dp-train-scope = head the backbone, BatchNorm included, is fixed in eval mode: a
            # public-pretrained affine map that no private statistic or gradient reaches.
            raise bad(
                "norm",
                "DP-SGD cannot clip per-exam gradients through BatchNorm: under DP it needs dp = local with "
                "dp-train-scope = head (the backbone stays fixed, in eval mode), or use norm = auto or group",
            )
        if self.cross_site and self.dp != "off":
            raise bad(
                "cross_site",
                "cannot run with dp: personal models are fine-tuned without DP and the cross-site phase sends them out",
            )

    @property
    def fine_tunes_without_dp(self) -> list[str]:
        """The run-config keys that make a site train on its data outside DP-SGD (personal
        fine-tuning, patient-specific fine-tuning); empty when none does."""
        keys = []
        if self.personal_epochs > 0 or self.personal_steps > 0:
            keys.append("personal-epochs" if self.personal_epochs > 0 else "personal-steps")
        if self.patient_finetune:
            keys.append("patient-finetune")
        return keys

    @property
    def median_norm_multiple(self) -> float:
        """The multiple of the round's median change norm each update is clipped to; 0: none.
        Auto (AUTO_NORM_BOUND) resolves here, so an explicit value is always used as given."""
        if self.update_norm_bound != AUTO_NORM_BOUND:
            return self.update_norm_bound
        return 0.0 if self.secure_aggregation or self.dp == "central" else AUTO_NORM_MULTIPLE

    @property
    def personalised(self) -> bool:
        """Sites keep a personal model (fine-tuned on their train split, or with their own norm layers)."""
        return self.personal_epochs > 0 or self.personal_steps > 0 or self.fedbn

    def _validate_secure_aggregation(self, bad) -> None:
        if not 0 < self.secagg_shares <= 1:
            raise bad("secagg_shares", "must be a fraction in (0, 1]")
        if not 0 < self.secagg_threshold <= 1:
            raise bad("secagg_threshold", "must be a fraction in (0, 1]")
        if not (self.secagg_clip_range > 0 and math.isfinite(self.secagg_clip_range)):
            raise bad("secagg_clip_range", "must be positive")
        if not self.secure_aggregation:
            return
        # Everything below needs to see single updates, which secure aggregation exists to hide.
        if self.strategy != "fedavg":
            raise bad(
                "secure_aggregation",
                f"works with strategy = 'fedavg' only (a masked sum is a weighted mean); got {self.strategy!r}",
            )
        if self.update_norm_bound > 0:  # auto (-1) is accepted: it clips nothing under secure aggregation
            raise bad(
                "secure_aggregation",
                "cannot run with update-norm-bound: the coordinator never sees one site's update to clip it",
            )
        if self.dp == "central":
            raise bad(
                "secure_aggregation",
                "cannot run with dp = 'central' (it clips single updates at the server); use dp = 'local'",
            )
        if self.update_encoding != FP32:
            raise bad(
                "update_encoding",
                "cannot run with secure-aggregation = true: SecAgg+ quantises and masks the change itself "
                "(secagg-clip-range); use update-encoding = 'fp32' with secure aggregation",
            )
        if self.model in ("mgus", "latefusion"):
            raise bad(
                "secure_aggregation",
                f"model {self.model!r} averages some branches over only the sites that train them, "
                "which needs per-site updates; use it without secure aggregation",
            )

    def _validate_dp(self, bad) -> None:
        if self.dp not in DP_MODES:
            raise bad("dp", f"must be one of {', '.join(DP_MODES)}")
        if self.dp_grad_sample_mode not in DP_GRAD_SAMPLE_MODES:
            raise bad("dp_grad_sample_mode", f"must be one of {', '.join(DP_GRAD_SAMPLE_MODES)}")
        if self.dp_train_scope not in DP_TRAIN_SCOPES:
            raise bad("dp_train_scope", f"must be one of {', '.join(DP_TRAIN_SCOPES)}")
        if not 0 < self.dp_delta < 1:
            raise bad("dp_delta", "must be in (0, 1), e.g. 1e-5")
        for name in ("dp_epsilon", "dp_noise_multiplier", "dp_freeze_blocks"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number, not negative")
        if not (self.dp_max_grad_norm > 0 and math.isfinite(self.dp_max_grad_norm)):
            raise bad("dp_max_grad_norm", "must be positive")
        if self.dp != "off" and self.dp_epsilon == 0 and self.dp_noise_multiplier == 0:
            raise bad("dp_noise_multiplier", "must be positive when dp is on and dp-epsilon is 0 (no budget given)")
        if self.dp == "central" and self.strategy not in ("fedavg", "fedprox"):
            raise bad(
                "dp",
                "central DP needs an averaging strategy (fedavg or fedprox): its noise is "
                "calibrated to a mean of clipped updates",
            )


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run config: {key} = {value!r}: expected {kind}") from None
