"""The site's own policy: what the coordinator may ask of this site, checked on every message.

The coordinator is untrusted from the site's point of view. Whatever a run sends (its run
config, its message types), the site compares it with the ``[policy]`` section of its own
``site.toml`` before any of its data is touched, and either

- **refuses** the message with a reason that names the policy key (the reply is an
  "unable", audited like every reply, and the run's table shows it), or
- **clamps** a setting that only costs the site resources or precision (bootstrap
  resamples, data-loader workers, histogram bins), and says so in the reply's ``site``
  record (``notes``) and in the audit log.

Example (every key optional; deploy/site.example.toml)::

    [policy]
    families = ["multiview", "dualmode"]     # the model families this site trains
    messages = ["hello", "train", "evaluate"] # the message types it answers
    min-batch-size = 8                        # no update from fewer exams per step
    min-examples = 16                         # no update from a smaller train split
    max-local-epochs = 5
    max-local-steps = 500
    max-image-pixels = 1048576                # image-h x image-w
    max-patches = 400                         # birads: patches per image
    max-patch-size = 299
    max-descriptor-dim = 2048                 # mgus
    max-cyclegan-filters = 64                 # cyclegan: generator width
    max-cyclegan-blocks = 12                  # cyclegan: residual blocks
    keep-cyclegan-discriminators = true       # cyclegan: refuse cyclegan-aggregate = "all"
    max-bootstrap = 1000                      # clamped
    max-workers = 4                           # clamped
    max-cache-gb = 50                         # the preprocessing cache's disk
    max-hist-bins = 32                        # clamped; also at most test scores / min-scores-per-bin
    min-scores-per-bin = 2
    require-dp = true                         # dp = local only
    max-epsilon = 8.0                         # lifetime: all runs, all releases
    hist-noise-epsilon = 1.0                  # Laplace noise on each histogram release (charged)
    require-secure-aggregation = true         # plain (unmasked) train and personal replies refused
    max-message-mb = 1024                     # model arrays in one received message
    app-hashes = ["<sha256>"]                 # releases this site runs (fedbreast release hash)

A deployed site always has a policy: without a ``[policy]`` section it gets the defaults
below (resource limits and coarse histograms; privacy minimums off). A simulation has none
unless ``fedbreast simulate --site-policy FILE`` gives one to every simulated site.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType

from fedbreast.shared.data.rules import ConfigError

NODE_KEY = "policy"  # node config: the site's validated policy as JSON (the daemon writes it)
SIM_KEY = "sim-site-policy"  # run config, simulation only: a policy file for every simulated site

# Message types as the site names them in ``messages``: Flower's type -> policy name.
MESSAGE_NAMES = {
    MessageType.QUERY: "hello",
    MessageType.TRAIN: "train",
    MessageType.EVALUATE: "evaluate",
    f"{MessageType.QUERY}.personal": "personal",
    f"{MessageType.EVALUATE}.cross_site": "cross_site",
}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
GIB = 1024**3
MIB = 1024**2


class PolicyRefused(RuntimeError):
    """The message is outside this site's policy; the text names the key."""


@dataclass(frozen=True)
class SitePolicy:
    families: tuple[str, ...] | None = None  # None: every installed family
    messages: tuple[str, ...] | None = None  # None: every type this ClientApp answers
    min_batch_size: int = 1
    min_examples: int = 1
    max_local_epochs: int = 20
    max_local_steps: int = 2000
    max_image_pixels: int = 1024 * 1024
    max_patches: int = 500
    max_patch_size: int = 512
    max_descriptor_dim: int = 4096
    max_cyclegan_filters: int = 64  # cyclegan: its network's size is the run's to choose, memory the site's
    max_cyclegan_blocks: int = 16
    # The discriminators see the site's real DES most directly; a site may keep them home always.
    keep_cyclegan_discriminators: bool = False
    max_crop_size: int = 1024  # dualmode box-size, mgus crop-size (pixels a side)
    max_batch_size: int = 256
    max_delta: float = 1e-5  # DP-SGD's delta at most this, and at most 1/(10 n)
    max_evaluations: int | None = None  # evaluate + cross-site messages answered per run
    max_cross_site_models: int = 16
    max_bootstrap: int = 2000
    max_workers: int = 8
    max_cache_gb: float = 100.0
    max_hist_bins: int = 32
    min_scores_per_bin: int = 2
    require_dp: bool = False
    max_epsilon: float | None = None
    hist_noise_epsilon: float | None = None
    require_secure_aggregation: bool = False
    secagg_min_peers: int = 3  # SecAgg+ share holders at the least (client/secure_aggregation.py)
    max_message_mb: float = 2048.0
    # sha256 of the app bundles (releases) this site answers; None: any bundle that selects the
    # installed ClientApp (client/pinned_clientapp.py: the bundle's own code never runs).
    app_hashes: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list, compare=False)

    # ---- reading ------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str) -> SitePolicy:
        """Validate a ``[policy]`` table (TOML keys with dashes); errors name ``where`` and the key."""
        known = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "notes"}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{where}: [policy] {key}: unknown key (known: {', '.join(sorted(known))})")
            try:
                values[known[key].name] = _parse(known[key].name, value)
            except ValueError as exc:
                raise ConfigError(f"{where}: [policy] {key} = {value!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> SitePolicy:
        """A TOML file with a ``[policy]`` table (a site.toml, or a policy file for simulate)."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: policy file not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable TOML file ({exc})") from None
        table = doc.get("policy")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: no [policy] table")
        return cls.from_mapping(table, str(path))

    def to_json(self) -> str:
        out = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "notes" and v is not None}
        return json.dumps(out, sort_keys=True)

    # ---- checks ---------------------------------------------------------------------------

    def check_message(self, msg: Message, run_config: dict[str, Any], site_dir: Path | None = None) -> list[str]:
        """Refuse (PolicyRefused) or clamp (``run_config`` changed in place) before any data is
        opened; returns the clamp notes. Data-dependent checks: :meth:`check_training`, :meth:`hist_bins`."""
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        from fedbreast.shared.config import HARNESS_KEYS, RunConfig

        kind = str(msg.metadata.message_type)
        name = MESSAGE_NAMES.get(kind)
        if name is None:
            raise PolicyRefused(f"message type {kind!r} is not one this site answers")
        if self.messages is not None and name not in self.messages:
            raise PolicyRefused(f"policy messages = {list(self.messages)}: this site does not answer {name!r}")
        size = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
        if size > self.max_message_mb * MIB:
            raise PolicyRefused(
                f"policy max-message-mb = {self.max_message_mb:g}: the message carries {size / MIB:.0f} MB of arrays"
            )
        cfg = RunConfig.from_flower(run_config, ignore=HARNESS_KEYS)
        notes: list[str] = []
        # Workers preprocess whenever the site's data is opened; bootstrap runs in evaluations only.
        # Clamped on the parsed value ("256" and 256.0 parse as 256), written back as an int.
        clamped = [("workers", self.max_workers)] + (
            [("bootstrap", self.max_bootstrap)] if name in ("evaluate", "cross_site") else []
        )
        for key, limit in clamped:
            value = getattr(cfg, key)
            if value > limit:
                run_config[key] = limit
                notes.append(f"{key} {value} -> {limit} (policy max-{key})")
        if name == "cross_site":
            config = msg.content.config_records.get("config")
            models = config.get("models") if config is not None else None
            count = len(models) if isinstance(models, list) else 0
            if count > self.max_cross_site_models:
                raise PolicyRefused(
                    f"policy max-cross-site-models = {self.max_cross_site_models}: the message asks to "
                    f"evaluate {count} models"
                )
        if self.families is not None and cfg.model not in self.families:
            raise PolicyRefused(f"policy families = {list(self.families)}: this site does not train {cfg.model!r}")
        limits: list[tuple[str, float, float, str]] = [
            ("local-epochs", cfg.local_epochs, self.max_local_epochs, "max-local-epochs"),
            ("local-steps", cfg.local_steps, self.max_local_steps, "max-local-steps"),
            ("personal-epochs", cfg.personal_epochs, self.max_local_epochs, "max-local-epochs"),
            ("personal-steps", cfg.personal_steps, self.max_local_steps, "max-local-steps"),
            ("psft-epochs", cfg.psft_epochs if cfg.patient_finetune else 0, self.max_local_epochs, "max-local-epochs"),
            ("image-h x image-w", cfg.image_h * cfg.image_w, self.max_image_pixels, "max-image-pixels"),
            ("batch-size", cfg.batch_size, self.max_batch_size, "max-batch-size"),
            ("psft-batch-size", cfg.psft_batch_size, self.max_batch_size * 8, "max-batch-size (x8 for patches)"),
        ]
        # Family settings (shared/families/*/settings.py), whatever the run's model: a run that sets
        # one far out of range is not one this site joins.
        for key, attr, policy_key, limit in (
            ("n-patches", "n_patches", "max-patches", self.max_patches),
            ("patch-size", "patch_size", "max-patch-size", self.max_patch_size),
            ("descriptor-dim", "descriptor_dim", "max-descriptor-dim", self.max_descriptor_dim),
            ("cyclegan-filters", "cyclegan_filters", "max-cyclegan-filters", self.max_cyclegan_filters),
            ("cyclegan-blocks", "cyclegan_blocks", "max-cyclegan-blocks", self.max_cyclegan_blocks),
            ("box-size", "box_size", "max-crop-size", self.max_crop_size),
            ("crop-size", "crop_size", "max-crop-size", self.max_crop_size),
        ):
            limits.append((key, getattr(cfg, attr), limit, policy_key))
        if (
            self.keep_cyclegan_discriminators
            and cfg.model == "cyclegan"
            and name == "train"
            and getattr(cfg, "cyclegan_aggregate", "generators") != "generators"
        ):
            raise PolicyRefused(
                "policy keep-cyclegan-discriminators: the run asks for cyclegan-aggregate = "
                f"{cfg.cyclegan_aggregate!r}, which sends this site's discriminators; it trains only with 'generators'"
            )
        for key, asked, most, policy_key in limits:
            if asked > most:
                raise PolicyRefused(f"policy {policy_key} = {most:g}: the run asks for {key} = {asked:g}")
        trains = name in ("train", "personal") or (name in ("evaluate", "cross_site") and cfg.fine_tunes_without_dp)
        if trains:
            for key, value in (("batch-size", cfg.batch_size), ("psft-batch-size", cfg.psft_batch_size)):
                if key == "psft-batch-size" and not cfg.patient_finetune:
                    continue
                if value < self.min_batch_size:
                    raise PolicyRefused(
                        f"policy min-batch-size = {self.min_batch_size}: the run asks for {key} = {value} "
                        "(an update from so few exams is close to one patient's gradient)"
                    )
        if self.require_dp and cfg.fine_tunes_without_dp:
            raise PolicyRefused(
                f"policy require-dp: {' and '.join(cfg.fine_tunes_without_dp)} would fine-tune without DP-SGD"
            )
        if self.require_dp and (name == "train" or trains) and cfg.dp != "local":
            raise PolicyRefused(f"policy require-dp: this site trains only with dp = 'local', the run has {cfg.dp!r}")
        if self.require_secure_aggregation:
            if name == "train" and RECORD_KEY_CONFIGS not in msg.content.config_records:
                raise PolicyRefused(
                    "policy require-secure-aggregation: this is a plain train message; "
                    "this site sends its update only masked (SecAgg+)"
                )
            if name in ("personal",):
                raise PolicyRefused(
                    "policy require-secure-aggregation: a personal model would leave this site unmasked"
                )
        if site_dir is not None:
            used = cache_bytes(site_dir)
            if used is not None and used > self.max_cache_gb * GIB:
                raise PolicyRefused(
                    f"policy max-cache-gb = {self.max_cache_gb:g}: the preprocessing cache holds "
                    f"{used / GIB:.1f} GB; the site operator can clear <site-data>/cache"
                )
        return notes

    def check_training(self, n_train: int, cfg: Any) -> None:
        """Checks that need the site's data: update size, and delta <= 1/n under DP."""
        if n_train < self.min_examples:
            raise PolicyRefused(
                f"policy min-examples = {self.min_examples}: this site's train split has {n_train} example(s)"
            )
        if cfg.dp == "local" and n_train > 0 and cfg.dp_delta > min(self.max_delta, 0.1 / n_train):
            raise PolicyRefused(
                f"dp-delta = {cfg.dp_delta:g} is above this site's limit {min(self.max_delta, 0.1 / n_train):.3g} "
                f"(policy max-delta = {self.max_delta:g}, and 1/(10 n) for its {n_train} training examples: "
                "a delta near 1/n allows releasing a record outright)"
            )

    def hist_bins(self, asked: int, n_test: int) -> int:
        """The bins this site releases: the largest divisor of ``asked`` (so the coordinator can pool
        it with finer ones) within ``max-hist-bins`` and ``n_test / min-scores-per-bin``, at least 2."""
        cap = max(2, min(self.max_hist_bins, n_test // max(1, self.min_scores_per_bin)))
        if asked <= cap:
            return asked
        return max([d for d in range(2, cap + 1) if asked % d == 0], default=1)


# A deployed site with no [policy] section; simulation gets None (no policy) unless asked.
DEFAULT = SitePolicy()


def _parse(name: str, value: Any) -> Any:
    spec = {f.name: f for f in fields(SitePolicy)}[name]
    if name == "app_hashes":
        if not isinstance(value, list) or not all(isinstance(v, str) and _SHA256.match(v) for v in value):
            raise ValueError("expected a list of sha256 hex digests (fedbreast release hash prints one)")
        return tuple(v.lower() for v in value)
    if name in ("families", "messages"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("expected a list of names")
        if name == "messages":
            unknown = sorted(set(value) - set(MESSAGE_NAMES.values()))
            if unknown:
                raise ValueError(f"unknown message type(s) {unknown} (known: {sorted(set(MESSAGE_NAMES.values()))})")
        else:
            from fedbreast.shared.families import FAMILIES

            unknown = sorted(set(value) - set(FAMILIES))
            if unknown:
                raise ValueError(f"unknown famil(y/ies) {unknown} (known: {sorted(FAMILIES)})")
        return tuple(value)
    if spec.type in ("bool", bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive, finite number")
    if "int" in str(spec.type) and "float" not in str(spec.type):
        if value != int(value):
            raise ValueError("expected a whole number")
        return int(value)
    return float(value)


def cache_bytes(site_dir: Path | None) -> int | None:
    """Bytes under ``<site_dir>/cache`` (None without a site folder)."""
    if site_dir is None:
        return None
    total = 0
    for root, _dirs, files in os.walk(Path(site_dir) / "cache"):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def policy_of(context: Context) -> SitePolicy | None:
    """This site's policy: node config ``policy`` (a deployed site; the daemon always sets it),
    else, in simulation only (no ``data-path``), the run's ``sim-site-policy`` file; else None.
    An unreadable policy refuses (fail closed): PolicyRefused."""
    node = context.node_config
    if NODE_KEY in node:
        try:
            return SitePolicy.from_mapping(json.loads(str(node[NODE_KEY])), "node config policy")
        except (ValueError, ConfigError) as exc:
            raise PolicyRefused(f"this site's policy cannot be read ({exc}); refusing every message") from None
    if "data-path" not in node and context.run_config.get(SIM_KEY):
        try:
            return SitePolicy.from_file(str(context.run_config[SIM_KEY]))
        except ConfigError as exc:
            raise PolicyRefused(f"the simulated sites' policy cannot be read ({exc})") from None
    return None


def count_evaluation(policy: SitePolicy, msg: Message, context: Context, site_dir: Path) -> None:
    """``max-evaluations``: each evaluate or cross-site message of a run counts; past the limit,
    refused. Every evaluation answers with exact aggregates of the site's splits, so their
    number is what bounds what a coordinator learns from them (docs/security.md)."""
    from fedbreast.shared.durable import atomic_write_json
    from fedbreast.shared.training.accounting import run_key
    from fedbreast.shared.training.dp import privacy_lock

    if MESSAGE_NAMES.get(str(msg.metadata.message_type)) not in ("evaluate", "cross_site"):
        return
    path = Path(site_dir) / "state" / "policy" / f"evaluations-{run_key(context.run_config, context.run_id)}.json"
    with privacy_lock(site_dir):
        try:
            done = int(json.loads(path.read_text(encoding="utf-8"))["count"]) if path.exists() else 0
        except (OSError, ValueError, KeyError, TypeError):
            raise PolicyRefused(f"the evaluation count {path.name} is unreadable; refusing") from None
        assert policy.max_evaluations is not None
        if done >= policy.max_evaluations:
            raise PolicyRefused(
                f"policy max-evaluations = {policy.max_evaluations}: this run has had {done} evaluations"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"count": done + 1})


def policy_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: the policy's message checks before the handler, its notes on the reply."""
    from fedbreast.client.app import site_dir_of, site_name_of
    from fedbreast.shared import protocol
    from fedbreast.shared.data.site_data import SiteUnavailable

    try:
        policy = policy_of(context)
        if policy is None:
            return call_next(msg, context)
        try:
            site_dir: Path | None = site_dir_of(context)
        except SiteUnavailable:
            site_dir = None
        # This message's copies: a clamp applies to it alone (a simulation's contexts live on).
        run_config, node_config = dict(context.run_config), dict(context.node_config)
        notes = policy.check_message(msg, run_config, site_dir)
        if policy.max_evaluations is not None and site_dir is not None:
            count_evaluation(policy, msg, context, site_dir)
        # The DP code (shared/training/dp.py) and the evaluate handler read these node-config keys:
        # the stricter of the policy's and any older [site] setting wins.
        for key, value in (("dp-max-epsilon", policy.max_epsilon), ("hist-noise-epsilon", policy.hist_noise_epsilon)):
            if value is not None:
                old = node_config.get(key)
                node_config[key] = min(value, float(old)) if isinstance(old, (int, float)) else value
    except (PolicyRefused, ValueError) as exc:
        return protocol.unable(msg, site_name_of(context), f"refused: {exc}")
    saved = context.run_config, context.node_config
    context.run_config, context.node_config = run_config, node_config
    try:
        reply = call_next(msg, context)
    finally:
        context.run_config, context.node_config = saved
    if notes and reply.has_content() and protocol.SITE in reply.content.config_records:
        reply.content.config_records[protocol.SITE]["notes"] = "; ".join(notes)
    return reply
