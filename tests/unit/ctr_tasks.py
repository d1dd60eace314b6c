"""A synthetic CTR task whose answer is known, shared by the model and trainer tests."""

from __future__ import annotations

import numpy as np

from models.ctr.features import Sample


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
