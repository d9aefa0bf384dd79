"""Pseudonymisation of patient and study identifiers with a site-local secret key.

A keyed hash (HMAC-SHA256) rather than a plain hash: patient ids are low-entropy, so an
unkeyed hash could be reversed by enumerating them. The key never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fedbreast.shared.durable import atomic_create_bytes

KEY_FILE = "secret.key"


def load_or_create_key(site_dir: str | Path) -> bytes:
    """Return the site's key, creating it (mode 0600) on first use."""
    path = Path(site_dir) / KEY_FILE
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 16:
            raise ValueError(f"{path}: key is shorter than 16 bytes; delete it only if nothing was ingested yet")
        return key
    key = secrets.token_bytes(32)
    # Complete and fsynced before it appears (a crash never leaves an empty key), 0600, and
    # never replaced: if another ingest created it first, its key is the site's key.
    if not atomic_create_bytes(path, (key.hex() + "\n").encode(), mode=0o600):
        return load_or_create_key(site_dir)
    return key


def pseudonymise(key: bytes, kind: str, raw_id: str) -> str:
    """Stable pseudonym for ``raw_id`` of ``kind`` ("patient", "exam"): 16 hex chars, prefixed."""
    digest = hmac.new(key, f"{kind}\x00{raw_id.strip()}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0]}{digest[:16]}"
