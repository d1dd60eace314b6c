"""Small array helpers shared by the model modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def grown(a: np.ndarray, cap: int) -> np.ndarray:
    """``a`` copied into a zeroed array of ``cap`` rows (the other dimensions kept)."""
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out


class PackedStrings:
    """``encode(x)`` for each id ``x`` of an append-only id list, end to end in one byte buffer
    (id ``c``'s is ``buf[off[c]:off[c + 1]]``) and extended from the list on each ``extend``:
    compiled kernels read every id's bytes with no Python object per id. A cache: its owner
    rebuilds it from the ids rather than pickling it."""

    def __init__(self, encode: Callable[[str], bytes]) -> None:
        self.encode = encode
        self.n = 0
        self.buf = np.zeros(4096, dtype=np.uint8)
        self.off = np.zeros(1025, dtype=np.int64)

    def extend(self, ids: Sequence[str]) -> int:
        """Add the ids of ``ids`` beyond the first ``n``; returns the first one added."""
        first, n = self.n, len(ids)
        if n <= first:
            return first
        new = [self.encode(x) for x in ids[first:]]
        if n + 1 > len(self.off):
            self.off = grown(self.off, 2 * (n + 1))
        self.off[first + 1 : n + 1] = self.off[first] + np.cumsum(np.fromiter(map(len, new), dtype=np.int64))
        end = int(self.off[n])
        if end > len(self.buf):
            self.buf = grown(self.buf, 2 * end)
        self.buf[self.off[first] : end] = np.frombuffer(b"".join(new), dtype=np.uint8)
        self.n = n
        return first
