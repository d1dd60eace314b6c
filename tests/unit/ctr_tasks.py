"""A synthetic CTR task whose answer is known, shared by the model and trainer tests."""

from __future__ import annotations

import numpy as np

from models.ctr.features import N_DENSE, Sample


def group_task(n: int, seed: int, flip: bool = False) -> list[Sample]:
    """Items belong to 10 groups; a user clicks an item iff it is in the group of their history
    (with ``flip``: iff it is not). Only an interaction of target and history can tell: ids
    alone carry no signal."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        g = int(rng.integers(10))
        hist = tuple(f"g{g}-{int(x)}" for x in rng.integers(0, 30, 8))
        same = bool(rng.random() < 0.5)
        tg = g if same else int((g + rng.integers(1, 10)) % 10)
        label = float(same != flip)
        out.append(Sample(f"u{k % 500}", f"g{tg}-{int(rng.integers(30))}", None, hist, label, seed * n + k))
    return out


def list_task(n: int, seed: int, size: int = 10) -> list[Sample]:
    """Served lists of ``size`` candidates whose retrieval score (dense column 0) is noise; the
    item taken is the one most similar to the user's newest item (column 4). A re-ranker must
    learn to read column 4; the retrieval order gets the taken item first 1 time in ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        dense = np.zeros((size, N_DENSE))
        dense[:, 0] = rng.random(size)
        dense[:, 4] = rng.random(size)
        taken = int(np.argmax(dense[:, 4]))
        hist = tuple(f"h{int(x)}" for x in rng.integers(0, 50, 5))
        for j in range(size):
            out.append(
                Sample(
                    f"u{k % 300}",
                    f"i{int(rng.integers(200))}",
                    None,
                    hist,
                    float(j == taken),
                    seed * n + k,
                    tuple(dense[j].tolist()),
                    f"{seed}:{k}",
                )
            )
    return out
