"""Samples and the integer batches the CTR models read.

Ids are hashed into a fixed number of buckets, so an unbounded catalogue and user base fit a
fixed-size model and a restored checkpoint reads new ids without migration. Bucket 0 is
reserved for padding (the empty history slots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from models.hashing import stable_hash
from models.ranking import RANK_FEATURES, Candidates

# Dense inputs of the model: a candidate's ranking context (``models.ranking.ranking_context``),
# then the share of the user's last ``CATEGORY_WINDOW`` items in the candidate's category. Zero
# for samples that were not ranked (a positive outside the served list, sampled negatives).
N_DENSE = RANK_FEATURES + 1
CATEGORY_WINDOW = 10


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled (user, item) pair with the features it had at event time.

    ``history`` holds the user's most recent items *before* the event, newest last. Samples
    with the same ``group`` are one served list (the item taken and candidates it was chosen
    over), trained with a softmax over the list; ungrouped samples with per-row cross-entropy.
    """

    user_id: str
    item_id: str
    category: str | None
    history: tuple[str, ...]
    label: float
    ts: int
    dense: tuple[float, ...] = ()  # numeric context, e.g. the candidate's retrieval score
    group: str | None = None

    def as_obj(self) -> dict[str, object]:
        o: dict[str, object] = {
            "u": self.user_id,
            "i": self.item_id,
            "c": self.category,
            "h": list(self.history),
            "y": self.label,
            "ts": self.ts,
            "d": list(self.dense),
        }
        if self.group is not None:
            o["g"] = self.group
        return o

    @classmethod
    def from_obj(cls, o: dict[str, object]) -> Sample:
        """Inverse of ``as_obj``; raises ``KeyError``/``TypeError``/``ValueError`` on a bad object."""
        h = o["h"]
        if not isinstance(h, list) or not all(isinstance(x, str) for x in h):
            raise TypeError("h must be a list of strings")
        c = o.get("c")
        if c is not None and not isinstance(c, str):
            raise TypeError("c must be a string or null")
        y = float(o["y"])  # type: ignore[arg-type]
        if y not in (0.0, 1.0):
            raise ValueError("y must be 0 or 1")
        d = o.get("d", [])
        if not isinstance(d, list) or not all(isinstance(x, (int, float)) for x in d):
            raise TypeError("d must be a list of numbers")
        g = o.get("g")
        if g is not None and not isinstance(g, str):
            raise TypeError("g must be a string or null")
        return cls(str(o["u"]), str(o["i"]), c, tuple(h), y, int(o["ts"]), tuple(map(float, d)), g)  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class CtrBatch:
    """B samples as arrays: ``user``, ``item``, ``cat`` (B,) int64 buckets; ``hist`` (B, L) int64
    buckets, 0 where empty; ``dense`` (B, F) float32; ``label`` (B,) float32 in {0, 1};
    ``group`` (B,) int64 or None (no lists): rows with the same id >= 0 are one served list,
    trained with a softmax over the list; -1 marks rows trained with per-row cross-entropy."""

    user: np.ndarray
    item: np.ndarray
    cat: np.ndarray
    hist: np.ndarray
    dense: np.ndarray
    label: np.ndarray
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def take(self, idx: np.ndarray) -> CtrBatch:
        g = None if self.group is None else self.group[idx]
        return CtrBatch(
            self.user[idx], self.item[idx], self.cat[idx], self.hist[idx], self.dense[idx], self.label[idx], g
        )


class FeatureHasher:
    """Maps ids to buckets in ``[1, buckets)`` with a stable hash, memoised (ids repeat a lot)."""

    def __init__(self, buckets: int, hist_len: int, n_dense: int = 0, seed: int = 0) -> None:
        if buckets < 2:
            raise ValueError("buckets must be at least 2")
        self.n_buckets, self.hist_len, self.n_dense, self.seed = buckets, hist_len, n_dense, seed
        # None (no category) is bucket 0, the padding row, like an empty history slot
        self._memo: dict[str, dict[str | None, int]] = {"u": {}, "i": {None: 0}, "c": {None: 0}}
        self._hist_memo: dict[tuple[str, ...], np.ndarray] = {}

    def bucket(self, field: str, value: str) -> int:
        memo = self._memo.setdefault(field, {})
        b = memo.get(value)
        if b is None:
            b = 1 + stable_hash(self.seed, field, value) % (self.n_buckets - 1)
            if len(memo) < 1_000_000:  # bounded: beyond it, hash every time
                memo[value] = b
        return b

    def buckets(self, field: str, values: Sequence[str | None]) -> np.ndarray:
        """``bucket`` of many values, (n,) int64, None -> 0: one pass in C once every value is
        memoised (the common case: ids repeat; new ones are hashed first), else value by value."""
        memo = self._memo.setdefault(field, {})
        n = len(values)
        try:
            return np.fromiter(map(memo.__getitem__, values), dtype=np.int64, count=n)
        except KeyError:
            for v in set(values).difference(memo):
                if v is not None:
                    self.bucket(field, v)
        try:
            return np.fromiter(map(memo.__getitem__, values), dtype=np.int64, count=n)
        except KeyError:  # the memo is full
            return np.fromiter((0 if v is None else self.bucket(field, v) for v in values), dtype=np.int64, count=n)

    def history(self, h: tuple[str, ...]) -> np.ndarray:
        """(L,) buckets of a history, right-aligned; memoised briefly, because a positive and its
        sampled negatives share one history."""
        row = self._hist_memo.get(h)
        if row is None:
            L = self.hist_len
            row = np.zeros(L, dtype=np.int64)
            hh = h[-L:]
            if hh:
                row[L - len(hh) :] = self.buckets("i", hh)
            if len(self._hist_memo) >= 4096:
                self._hist_memo.clear()
            self._hist_memo[h] = row
        return row

    def batch(self, samples: Sequence[Sample]) -> CtrBatch:
        n, L = len(samples), self.hist_len
        user = np.empty(n, dtype=np.int64)
        item = np.empty(n, dtype=np.int64)
        cat = np.empty(n, dtype=np.int64)
        hist = np.zeros((n, L), dtype=np.int64)
        label = np.empty(n, dtype=np.float32)
        dense = np.zeros((n, self.n_dense), dtype=np.float32)
        group = np.full(n, -1, dtype=np.int64)
        groups: dict[str, int] = {}
        bk = self.bucket
        hrow = self.history
        for r, s in enumerate(samples):
            if s.group is not None:
                group[r] = groups.setdefault(s.group, len(groups))
            user[r] = bk("u", s.user_id)
            item[r] = bk("i", s.item_id)
            cat[r] = bk("c", s.category) if s.category is not None else 0
            if s.history:
                hist[r] = hrow(s.history)
            label[r] = s.label
            if s.dense:
                dense[r, : len(s.dense)] = s.dense[: self.n_dense]
        return CtrBatch(user, item, cat, hist, dense, label, group if groups else None)


class _Codes(dict[str | None, int]):
    """Small integer codes of values in the order first seen; None is -1."""

    def __init__(self) -> None:
        super().__init__({None: -1})

    def __missing__(self, key: str | None) -> int:
        code = self[key] = len(self) - 1
        return code


def rerank_dense(
    c: Candidates, categories: Mapping[str, str], candidate_categories: Sequence[str | None] | None = None
) -> np.ndarray:
    """The (U, width, N_DENSE) float32 dense inputs of a chunk's candidates (zeros past
    ``c.cnt``): the ranking context and each candidate's category share among the user's last
    ``CATEGORY_WINDOW`` items. The worker's samples and its scoring both read these, so the
    model sees the same inputs; computed for the whole chunk at once. ``candidate_categories``:
    the categories of ``c.ids`` flattened, if the caller has them already."""
    nu, width = c.ids.shape
    out = np.zeros((nu, width, N_DENSE), dtype=np.float32)
    out[:, :, :RANK_FEATURES] = c.context
    if nu == 0 or width == 0:
        return out
    cat, codes = categories.get, _Codes()
    recent = c.recent(CATEGORY_WINDOW)
    n_recent = np.fromiter(map(len, recent), dtype=np.int64, count=nu)
    held = np.full((nu, CATEGORY_WINDOW), -2, dtype=np.int64)  # -2: no item, -1: no category
    flat = list(chain.from_iterable(recent))
    held[np.arange(CATEGORY_WINDOW) >= CATEGORY_WINDOW - n_recent[:, None]] = np.fromiter(
        map(codes.__getitem__, map(cat, flat)), dtype=np.int64, count=len(flat)
    )
    cc = list(map(cat, c.ids.ravel().tolist())) if candidate_categories is None else candidate_categories
    cand = np.fromiter(map(codes.__getitem__, cc), dtype=np.int64, count=len(cc)).reshape(nu, width)
    # per user, how many of its recent items hold each category code; read at each candidate's
    n_codes = len(codes) - 1  # without None
    if n_codes == 0:
        return out
    rows = np.arange(nu)[:, None]
    counts = np.bincount((rows * n_codes + held)[held >= 0], minlength=nu * n_codes).reshape(nu, n_codes)
    same = np.where(cand >= 0, counts[rows, np.maximum(cand, 0)], 0)
    has = n_recent > 0
    out[has, :, RANK_FEATURES] = same[has].astype(np.float32) / n_recent[has, None].astype(np.float32)
    return out
