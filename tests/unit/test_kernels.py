"""Kernels against plain references: the top-k selection, the galloping search, the id decode,
the summing of a block's co-occurrence increments by entry."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.kernels import _heap_top, _sorted_best, _top, search_sorted, sum_by_key


def _scores(kind: str, m: int, rng: np.random.Generator) -> np.ndarray:
    """Score arrays of the shapes that matter: few distinct values (ties decided by item), wide
    ranges with infinities, rising runs (the heap's worst order, and what a popularity-ordered
    pool gives), ranges a few ulps wide or subnormal (too narrow to cut into buckets), and heavy
    tails."""
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
    """``_top`` (bucket pre-selection, then a sort or a heap) and ``_heap_top`` both give the first k of
    a full sort by (score descending, item ascending), whatever the order of the input; so does
    ``_top`` with ``sort_few`` for at most 2k scores (all sorted unless they crowd together)."""
    rng = np.random.default_rng(seed)
    s, i = _scores(kind, m, rng), rng.permutation(m).astype(np.int64)
    order = np.lexsort((i, -s))
    want = order[:k].tolist()
    assert _top(s, i, k).tolist() == want
    assert _heap_top(s, i, k).tolist() == want
    few = max(k, (m + 1) // 2)
    assert _top(s, i, few, True).tolist() == order[:few].tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["ties", "rising", "narrow", "subnormal", "tail"]),
    st.integers(0, 500),
    st.integers(0, 2**32 - 1),
)
def test_sorted_best_orders_all_by_score_then_lower_item(kind: str, m: int, seed: int) -> None:
    """``_sorted_best`` (what ``_top`` keeps, counting-sorted then insertion-sorted) is the full
    sort by (score descending, item ascending) for finite scores, also when they are too close
    together to fall into different buckets."""
    rng = np.random.default_rng(seed)
    s, i = _scores(kind, m, rng), rng.permutation(m).astype(np.int64)
    lo, hi = (float(s.min()), float(s.max())) if m else (0.0, 0.0)
    assert _sorted_best(s, i, lo, hi).tolist() == np.lexsort((i, -s)).tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-50, 50), max_size=300),
    st.lists(st.integers(-60, 60), max_size=300),
    st.sampled_from(["as drawn", "sorted", "reversed"]),
)
def test_search_sorted_is_numpys_left_search(keys: list[int], needles: list[int], order: str) -> None:
    """``search_sorted`` gallops from the previous answer; it must give ``np.searchsorted``'s
    positions for needles in any order, with repeated keys and needles outside the range."""
    k = np.sort(np.array(keys, dtype=np.int64))
    x = np.array(needles, dtype=np.int64)
    if order != "as drawn":
        x = np.sort(x) if order == "sorted" else np.sort(x)[::-1].copy()
    assert search_sorted(k, x).tolist() == np.searchsorted(k, x).tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 3000),
    st.sampled_from([1, 3, 1_682, 100_000, 2**31 - 1]),
    st.integers(0, 2**32 - 1),
)
def test_sum_by_key_is_unique_and_bincount_bit_for_bit(n: int, items: int, seed: int) -> None:
    """The item stage's entries and their summed increments must not depend on which of the two
    computed them: the same keys, and sums equal to the last bit (both add in input order), for
    catalogues from one item (one radix pass) to the largest row and column numbers (six)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, items, n) << 32 | rng.integers(0, items, n)
    keys = np.concatenate([keys, keys[: n // 3]])  # repeated entries, later in the input
    inc = rng.standard_normal(len(keys)) * 10.0 ** rng.integers(-8, 8, len(keys))
    want, inv = np.unique(keys, return_inverse=True)
    got_k, got_v = sum_by_key(keys, inc)
    assert got_k.tolist() == want.tolist()
    assert got_v.tobytes() == np.bincount(inv, weights=inc, minlength=len(want)).tobytes()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=300, unique=True),
    st.data(),
)
def test_id_codes_map_json_id_lists_as_a_dict_would(ids: list[str], data: st.DataObject) -> None:
    """``IdCodes`` reads orjson's arrays of ids straight from the bytes, several documents per
    call: the same numbers as a dict lookup of the decoded strings, end to end, or a count of
    -1 (the caller decodes) for a document with an unknown id or one that needs an escape in
    JSON, without disturbing the others; the catalogue may grow between calls."""
    import orjson

    from models.id_codes import IdCodes

    codes = IdCodes()
    known = data.draw(st.integers(1, len(ids)))
    for _ in range(3):
        docs = data.draw(st.lists(st.lists(st.sampled_from(ids), max_size=60), min_size=1, max_size=4))
        got, cnt = codes.codes_many([orjson.dumps(d) for d in docs], ids[:known])
        want: list[int] = []
        for d, c in zip(docs, cnt.tolist(), strict=True):
            escaped = any(orjson.dumps(x)[1:-1] != x.encode() for x in d)
            unknown = any(ids.index(x) >= known for x in d)
            assert c == (-1 if escaped or unknown else len(d))
            if c >= 0:
                want += [ids.index(x) for x in d]
        assert got.tolist() == want
        known = data.draw(st.integers(known, len(ids)))
