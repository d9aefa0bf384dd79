"""The hospital site's daemon configuration (``site.toml``), validated where it is read.

Every error names the file, the section and the key, so an operator can fix it without
reading code. Relative paths are relative to the folder holding the TOML file.

Example (deploy/site.example.toml)::

    [site]
    name = "hospital-a"               # the name registered at the coordinator
    data-path = "/srv/fedbreast/site" # the ingested site folder (fedbreast site ingest --out)
    state-dir = "/var/lib/fedbreast"  # the daemon's own state
    gpu-required = false
    dp-max-epsilon = 8.0              # refuse runs whose DP budget would exceed this
    # debug-delay-seconds = 30        # drills only: delay every training reply (a straggler)

    [superlink]
    address = "coordinator.example.org:9092"
    root-certificates = "/etc/fedbreast/tls/ca.crt"

    [keys]
    private-key = "/etc/fedbreast/keys/site.key"

    [daemon]
    metrics-port = 9401
    # warm-clientapp = true           # fork each message's ClientApp from a warm process

    [policy]                          # what the coordinator may ask of this site (client/policy.py)
    min-batch-size = 8
    require-dp = true
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbreast.client.policy import DEFAULT as DEFAULT_POLICY
from fedbreast.client.policy import SitePolicy
from fedbreast.shared.data.rules import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class SiteConfig:
    source: Path
    name: str
    data_path: Path
    state_dir: Path
    superlink: str
    root_certificates: Path | None
    private_key: Path | None
    gpu_required: bool = False
    dp_max_epsilon: float | None = None
    hist_noise_epsilon: float | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9401
    clientapp_port: int = 9094
    max_backoff_seconds: float = 60.0
    warm_image_size: tuple[int, int] = (256, 128)
    warm_window: str = "percentile"
    # Fork each message's ClientApp from a warm process (client/warm_clientapp.py) rather
    # than start a fresh interpreter per message; false gives Flower's own launch.
    warm_clientapp: bool = True
    # Test hook, off unless set: the ClientApp sleeps this long before each training reply,
    # making the site a straggler for fault-tolerance drills (tests/test_fault_tolerance.py).
    debug_delay_seconds: float | None = None
    # The [policy] section (defaults when absent): checked by the ClientApp on every message.
    policy: SitePolicy = DEFAULT_POLICY

    def node_config(self) -> dict[str, Any]:
        """What the ClientApp sees as ``context.node_config`` (client/app.py reads these keys)."""
        out: dict[str, Any] = {
            "data-path": str(self.data_path),
            "site-name": self.name,
            "state-dir": str(self.state_dir),
            "policy": self.policy.to_json(),
        }
        if self.dp_max_epsilon is not None:
            out["dp-max-epsilon"] = self.dp_max_epsilon
        if self.hist_noise_epsilon is not None:
            out["hist-noise-epsilon"] = self.hist_noise_epsilon
        if self.debug_delay_seconds:
            out["debug-delay-seconds"] = self.debug_delay_seconds
        return out


# section -> key -> (parser, required); parsers raise ValueError with a short reason.
def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("expected a non-empty string")
    return v.strip()


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _positive(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError("expected a number > 0")
    return float(v)


def _non_negative(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError("expected a number >= 0")
    return float(v)


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError("expected a port number 0-65535 (0 turns the endpoint off)")
    return v


def _name(v: Any) -> str:
    v = _str(v)
    if not SITE_NAME.match(v):
        raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return v


def _address(v: Any) -> str:
    v = _str(v)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in v:
        raise ValueError("expected HOST:PORT without a scheme, e.g. coordinator.example.org:9092")
    return v


def _image_size(v: Any) -> tuple[int, int]:
    m = IMAGE_SIZE.match(_str(v))
    if not m or min(int(m.group(1)), int(m.group(2))) < 16:
        raise ValueError("expected HxW, e.g. 256x128 (the run's image-h x image-w)")
    return int(m.group(1)), int(m.group(2))


SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    "site": {
        "name": (_name, True),
        "data-path": (_str, True),
        "state-dir": (_str, False),
        "gpu-required": (_bool, False),
        "dp-max-epsilon": (_positive, False),
        "hist-noise-epsilon": (_non_negative, False),
        "debug-delay-seconds": (_non_negative, False),
    },
    "superlink": {"address": (_address, True), "root-certificates": (_str, False)},
    "keys": {"private-key": (_str, False)},
    "daemon": {
        "metrics-host": (_str, False),
        "metrics-port": (_port, False),
        "clientapp-port": (_port, False),
        "max-backoff-seconds": (_positive, False),
        "warm-image-size": (_image_size, False),
        "warm-window": (_str, False),
        "warm-clientapp": (_bool, False),
    },
}


def load_site_config(path: str | Path, insecure: bool = False) -> SiteConfig:
    """Read and validate ``site.toml``. TLS material is required unless ``insecure``."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    values: dict[str, Any] = {}
    policy_table = doc.pop("policy", {})
    if not isinstance(policy_table, dict):
        raise ConfigError(f"{path}: policy: expected a [policy] table")
    policy = SitePolicy.from_mapping(policy_table, str(path))
    for section, content in doc.items():
        if section not in SCHEMA:
            known = ", ".join([*(f"[{s}]" for s in SCHEMA), "[policy]"])
            raise ConfigError(f"{path}: [{section}]: unknown section (known: {known})")
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: {section}: expected a [{section}] table")
        for key, raw in content.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key (known: {', '.join(SCHEMA[section])})")
            try:
                values[f"{section}.{key}"] = SCHEMA[section][key][0](raw)
            except ValueError as exc:
                raise ConfigError(f"{path}: [{section}] {key} = {raw!r}: {exc}") from None
    for section, keys in SCHEMA.items():
        for key, (_, required) in keys.items():
            if required and f"{section}.{key}" not in values:
                raise ConfigError(f"{path}: [{section}] {key}: required")
    if not insecure:
        for need in ("superlink.root-certificates", "keys.private-key"):
            if need not in values:
                section, key = need.split(".")
                raise ConfigError(
                    f"{path}: [{section}] {key}: required (TLS and site authentication are on; "
                    "`fedbreast site start --insecure` only on a test network)"
                )

    base = path.resolve().parent

    def p(key: str, default: Path | None = None) -> Path | None:
        value = values.get(key)
        if value is None:
            return default
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    daemon = {k.split(".", 1)[1].replace("-", "_"): v for k, v in values.items() if k.startswith("daemon.")}
    return SiteConfig(
        source=path.resolve(),
        name=values["site.name"],
        data_path=p("site.data-path"),  # type: ignore[arg-type]
        state_dir=p("site.state-dir", base / "state"),  # type: ignore[arg-type]
        superlink=values["superlink.address"],
        root_certificates=p("superlink.root-certificates"),
        private_key=p("keys.private-key"),
        gpu_required=values.get("site.gpu-required", False),
        dp_max_epsilon=values.get("site.dp-max-epsilon"),
        hist_noise_epsilon=values.get("site.hist-noise-epsilon"),
        debug_delay_seconds=values.get("site.debug-delay-seconds"),
        policy=policy,
        **daemon,
    )
