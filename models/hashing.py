"""Hashes that are the same in every process and on every run (``hash()`` of str is salted)."""

from __future__ import annotations

import hashlib


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts``: seeds every per-item and per-user random choice."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")
