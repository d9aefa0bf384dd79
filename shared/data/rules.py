"""Header-reading rules: how laterality, view and energy are read from a vendor's DICOM tags,
and the limits (file size, pixels, frames) a file must meet before it is read or decoded.

Defaults live in ``ingest_rules.toml`` beside this file. A site overrides any table in
its own TOML file (section ``[ingest]``); unknown keys and bad regexes are rejected at
load time with the key named, so a typo never silently changes what is ingested; so is a
limit that is not a positive number.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fedbreast.shared.errors import FedbreastError

from .schema import Energy, Modality, View

_ENERGY_TARGETS = {"LE", "DES", "FFDM", "REJECT"}
MIB = 1 << 20
INGEST_LIMITS = "ingest_limits"  # site.json: the IngestLimits the manifest's files were read under


class ConfigError(FedbreastError, ValueError):
    """A configuration value is invalid; the message names the file and key."""


@dataclass(frozen=True)
class IngestRules:
    modalities: tuple[str, ...]
    laterality_tags: tuple[str, ...]
    laterality_text_tags: tuple[str, ...]
    laterality_patterns: dict[str, re.Pattern[str]]
    view_positions: dict[str, str]
    view_codes: dict[str, str]
    us_view_patterns: dict[str, re.Pattern[str]]
    energy_image_type: dict[str, str]
    energy_description_patterns: dict[str, re.Pattern[str]]
    limits: IngestLimits
    # Digest of the merged configuration: ingest re-reads a file it judged under other rules,
    # so raising a limit or adding a vendor's tag value takes effect on the next run.
    fingerprint: str = ""


@dataclass(frozen=True)
class IngestLimits:
    """Bounds a file must meet before it is read (size) and before its pixels are decoded.

    A hostile or broken file can declare any geometry in a few hundred bytes; decoding
    allocates what the header declares, so these are checked on the header first.
    """

    max_file_bytes: int  # ingest rules max_file_mib
    max_pixels: int  # Rows x Columns of one frame; ingest rules max_megapixels
    max_frames: dict[str, int]  # NumberOfFrames by modality; ingest rules max_frames
    max_decoded_bytes: int  # the whole decoded array (all frames and samples); ingest rules max_decoded_mib

    def frames_for(self, modality: str) -> int:
        # A modality the table does not name holds single images.
        return self.max_frames.get(modality, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_file_bytes": self.max_file_bytes,
            "max_pixels": self.max_pixels,
            "max_frames": dict(sorted(self.max_frames.items())),
            "max_decoded_bytes": self.max_decoded_bytes,
        }

    @classmethod
    def from_dict(cls, where: str, raw: Any) -> IngestLimits:
        """The limits :meth:`to_dict` wrote; ConfigError naming ``where`` and the key if they are not."""
        if not isinstance(raw, dict) or set(raw) != {"max_file_bytes", "max_pixels", "max_frames", "max_decoded_bytes"}:
            raise ConfigError(f"{where}: expected max_file_bytes, max_pixels, max_frames and max_decoded_bytes")
        frames = raw["max_frames"]
        if not isinstance(frames, dict):
            raise ConfigError(f"{where}.max_frames: expected a table of MODALITY = frames")
        ints = {k: raw[k] for k in ("max_file_bytes", "max_pixels", "max_decoded_bytes")}
        ints.update({f"max_frames.{m}": v for m, v in frames.items()})
        for key, value in ints.items():
            if _positive(f"{where}.{key}", value) != int(value):
                raise ConfigError(f"{where}.{key}: {value!r} is not a whole number")
        return cls(
            max_file_bytes=int(raw["max_file_bytes"]),
            max_pixels=int(raw["max_pixels"]),
            max_frames={str(m): int(v) for m, v in frames.items()},
            max_decoded_bytes=int(raw["max_decoded_bytes"]),
        )


def _defaults() -> dict[str, Any]:
    text = resources.files("fedbreast.shared.data").joinpath("ingest_rules.toml").read_text()
    return tomllib.loads(text)["ingest"]


def _compile(where: str, patterns: Any, allowed: set[str]) -> dict[str, re.Pattern[str]]:
    if not isinstance(patterns, dict):
        raise ConfigError(f"{where}: expected a table of NAME = 'regex'")
    out = {}
    for name, pattern in patterns.items():
        if name not in allowed:
            raise ConfigError(f"{where}.{name}: unknown target; expected one of {sorted(allowed)}")
        try:
            out[name] = re.compile(str(pattern), re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{where}.{name}: bad regular expression {pattern!r} ({exc})") from None
    return out


def _mapping(where: str, table: Any, allowed: set[str]) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of VALUE = TARGET")
    for key, target in table.items():
        if target not in allowed:
            raise ConfigError(f"{where}.{key}: {target!r} is not one of {sorted(allowed)}")
    return {str(k).upper(): str(v) for k, v in table.items()}


def _positive(where: str, value: Any) -> float:
    # bool is an int to Python: `max_file_mib = true` must not read as 1 MiB.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {value!r} is not a positive number")
    return float(value)


def _limits(where: str, raw: dict[str, Any]) -> IngestLimits:
    frames = raw["max_frames"]
    if not isinstance(frames, dict):
        raise ConfigError(f"{where}.max_frames: expected a table of MODALITY = frames")
    max_frames = {}
    for modality, value in frames.items():
        if str(modality).upper() not in Modality.__members__:
            raise ConfigError(
                f"{where}.max_frames.{modality}: unknown modality; expected one of {list(Modality.__members__)}"
            )
        if _positive(f"{where}.max_frames.{modality}", value) != int(value):
            raise ConfigError(f"{where}.max_frames.{modality}: {value!r} is not a whole number of frames")
        max_frames[str(modality).upper()] = int(value)
    return IngestLimits(
        max_file_bytes=int(_positive(f"{where}.max_file_mib", raw["max_file_mib"]) * MIB),
        max_pixels=int(_positive(f"{where}.max_megapixels", raw["max_megapixels"]) * 1_000_000),
        max_frames=max_frames,
        max_decoded_bytes=int(_positive(f"{where}.max_decoded_mib", raw["max_decoded_mib"]) * MIB),
    )


def load_rules(site_config: str | Path | None = None) -> IngestRules:
    """Default rules, with the ``[ingest]`` section of ``site_config`` (if given) laid over them."""
    raw = _defaults()
    where = "ingest"
    if site_config is not None:
        path = Path(site_config)
        where = f"{path}: [ingest]"
        try:
            override = tomllib.loads(path.read_text()).get("ingest", {})
        except FileNotFoundError:
            raise ConfigError(f"{path}: site config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        unknown = set(override) - set(raw)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(raw)}")
        for name, value in override.items():
            # Tables merge key by key (a site adds its vendor's values to the defaults);
            # lists and scalars replace.
            raw[name] = {**raw[name], **value} if isinstance(raw[name], dict) and isinstance(value, dict) else value
    mammo_views = {v.value for v in View if v.is_mammo}
    us_views = {v.value for v in View if not v.is_mammo}
    return IngestRules(
        modalities=tuple(str(m).upper() for m in raw["modalities"]),
        laterality_tags=tuple(raw["laterality_tags"]),
        laterality_text_tags=tuple(raw["laterality_text_tags"]),
        laterality_patterns=_compile(f"{where}.laterality_patterns", raw["laterality_patterns"], {"L", "R"}),
        view_positions=_mapping(f"{where}.view_positions", raw["view_positions"], mammo_views),
        view_codes=_mapping(f"{where}.view_codes", raw["view_codes"], mammo_views),
        us_view_patterns=_compile(f"{where}.us_view_patterns", raw["us_view_patterns"], us_views),
        energy_image_type=_mapping(f"{where}.energy_image_type", raw["energy_image_type"], _ENERGY_TARGETS),
        energy_description_patterns=_compile(
            f"{where}.energy_description_patterns",
            raw["energy_description_patterns"],
            {e.value for e in Energy} - {"NA"},
        ),
        limits=_limits(where, raw),
        fingerprint=hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16],
    )
