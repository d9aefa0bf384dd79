"""Pseudonymisation of patient and study identifiers with a site-local secret key.

A keyed hash (HMAC-SHA256) rather than a plain hash: patient ids are low-entropy, so an
unkeyed hash could be reversed by enumerating them. The key never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "secret.key"


def load_or_create_key(site_dir: str | Path) -> bytes:
    """Return the site's key, creating it (mode 0600) on first use."""
    path = Path(site_dir) / KEY_FILE
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 16:
            raise ValueError(f"{path}: key is shorter than 16 bytes; delete it only if nothing was ingested yet")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def pseudonymise(key: bytes, kind: str, raw_id: str) -> str:
    """Stable pseudonym for ``raw_id`` of ``kind`` ("patient", "exam"): 16 hex chars, prefixed."""
    digest = hmac.new(key, f"{kind}\x00{raw_id.strip()}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0]}{digest[:16]}"
