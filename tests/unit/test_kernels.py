"""The kernels' top-k selection against a plain sort."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.kernels import _heap_top, _top


def _scores(kind: str, m: int, rng: np.random.Generator) -> np.ndarray:
    """Score arrays of the shapes that matter: few distinct values (ties decided by item), wide
    ranges with infinities, rising runs (the heap's worst order, and what a popularity-ordered
    pool gives), a range too narrow to cut into buckets, and heavy tails."""
    if kind == "ties":
        return rng.choice([0.0, 0.5, 1.0, 2.0, -1.0], m)
    if kind == "wide":
        s = rng.standard_normal(m) * 10.0 ** rng.integers(-300, 300, m)
        s[rng.random(m) < 0.01] = np.inf
        s[rng.random(m) < 0.01] = -np.inf
        return s
    if kind == "rising":
        return np.sort(rng.exponential(1.0, m)) * rng.uniform(0.9, 1.1, m)
    if kind == "narrow":  # a few ulps apart
        return 1.0 + rng.integers(0, 3, m) * 2.220446049250313e-16
    if kind == "subnormal":  # 255 / range overflows
        return rng.random(m) * 1e-310
    return rng.pareto(1.2, m)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["ties", "wide", "rising", "narrow", "subnormal", "tail"]),
    st.integers(0, 2000),
    st.integers(1, 120),
    st.integers(0, 2**32 - 1),
)
def test_top_is_the_best_k_by_score_then_lower_item(kind: str, m: int, k: int, seed: int) -> None:
    """``_top`` (bucket pre-selection, then a heap) and ``_heap_top`` both give the first k of
    a full sort by (score descending, item ascending), whatever the order of the input."""
    rng = np.random.default_rng(seed)
    s, i = _scores(kind, m, rng), rng.permutation(m).astype(np.int64)
    want = np.lexsort((i, -s))[:k].tolist()
    assert _top(s, i, k).tolist() == want
    assert _heap_top(s, i, k).tolist() == want
