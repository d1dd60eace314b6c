"""Top-N lists for a batch of users: candidates, blended scores, exploration, reasons.

A list is ranked from two parts: the user's own state (``models.users``, their partition's) and
the global item table (``models.table``: neighbour lists, popularity, item vectors and the
long-term model, as the item stage last published them). Candidates come from four places:
co-occurrence neighbours of the user's recent items, the long-term model's best items (one
sparse product for the whole batch), items near the user vector (when it has a weight) and
trending items. Scores blend them (weights in ``ModelParams``); seen items are never candidates.
Exploration then replaces some slots (``models.exploration``).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from models import threads
from models.hashing import stable_hash
from models.kernels import explore_users, history_items, long_term_top, rank_users, user_sources
from models.longterm import recency_weights
from models.params import ModelParams
from models.table import ItemTable, top_indices
from models.users import HEAD, LAST_TS, UserPartition, entry_ts, events_of

_MS_PER_H = 3_600_000.0


class RecItem(NamedTuple):
    item_id: str
    score: float
    explore: bool
    p: float
    reason: str


@dataclass(frozen=True, slots=True)
class RecList:
    """One user's list; ``version`` is the user's event count, monotonic and replay-stable.

    Kept as columns (one entry per slot, best first): a block builds thousands of lists, and
    the writer serialises the columns directly; ``items`` gives the slots as ``RecItem``s."""

    user_id: str
    version: int
    event_ts: int
    item_ids: list[str]
    scores: list[float]
    explore: list[bool]
    p: list[float]
    reasons: list[str]

    @property
    def items(self) -> list[RecItem]:
        return list(map(RecItem, self.item_ids, self.scores, self.explore, self.p, self.reasons))


# Users ranked per kernel call; with user-vector candidates, chunks keep the (users x pool)
# similarity matrix under _DENSE_CELLS cells.
_CHUNK_USERS = 512
_DENSE_CELLS = 1 << 22
_MIN_CHUNK = 16


@dataclass(frozen=True, slots=True)
class Candidates:
    """A chunk of users' ranked candidates, as a rescorer and an observer see them.

    Padded to one width: row r of ``ids`` and ``context`` holds user r's ``cnt[r]`` candidates,
    best first, then None ids and zero rows. ``context`` is the ``ranking_context`` (U, width,
    RANK_FEATURES) float32. Arrays, not per-user lists: a CTR model scores the whole chunk
    in one pass. ``recent(n)`` gives each user's ``n`` most recent items, oldest first.
    """

    user_ids: Sequence[str]
    cnt: np.ndarray
    ids: np.ndarray
    context: np.ndarray
    recent: Callable[[int], list[list[str]]]

    @classmethod
    def of_lists(
        cls,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]],
        context: Sequence[np.ndarray],
    ) -> Candidates:
        """From per-user lists (``context[r]``: (len(candidates[r]), RANK_FEATURES))."""
        cnt = np.fromiter(map(len, candidates), dtype=np.int64, count=len(candidates))
        width = int(cnt.max(initial=0))
        ids = np.full((len(candidates), width), None, dtype=object)
        ctx = np.zeros((len(candidates), width, RANK_FEATURES), dtype=np.float32)
        for r, cs in enumerate(candidates):
            ids[r, : len(cs)] = cs
            ctx[r, : len(cs)] = context[r]
        hists = [list(h) for h in histories]
        return cls(user_ids, cnt, ids, ctx, lambda n: [h[max(len(h) - n, 0) :] if n else [] for h in hists])

    def lists(self) -> list[list[str]]:
        """Each user's candidate ids."""
        return [row[:m] for row, m in zip(self.ids.tolist(), self.cnt.tolist(), strict=True)]


class Rescorer(Protocol):
    """Scores a chunk's candidates in one call (e.g. a CTR model, batched): (U, width) scores,
    of which row r's first ``cnt[r]`` are read. The blend adds them, times ``weight``, to the
    retrieval score normalised so that the user's best candidate's is 1."""

    weight: float

    def score(self, c: Candidates) -> np.ndarray: ...


class Observer(Protocol):
    """Sees every chunk's ranked candidates (before any rescoring): the worker's sample builder
    remembers them as the lists served."""

    def observe(self, c: Candidates) -> None: ...


# Columns of ``ranking_context``.
RANK_FEATURES = 7


def ranking_context(
    part: UserPartition,
    table: ItemTable,
    uids: Sequence[str],
    cnt: np.ndarray,
    items: np.ndarray,
    scores: np.ndarray,
    tastes: np.ndarray,
) -> np.ndarray:
    """How retrieval saw each candidate, as inputs for a learned re-ranker: (U, width,
    RANK_FEATURES) float32 for ranked arrays (U, width) with ``cnt`` valid per row (zeros after
    them), each column scaled to about [0, 1]:

    score / best score, log(1 + rank) / 5, taste score / best score, popularity / the most
    popular item's, similarity to the user's newest item, and two user columns (the same in
    every row): log(1 + events) / 10 and log(1 + seconds between the user's last two events) / 20.
    Everything is read from the state and the table as they are now, so a list's context is what
    a sample of the user's next event will carry (no feature from the future).
    """
    nu, width = items.shape
    x = np.zeros((nu, width, RANK_FEATURES), dtype=np.float32)
    valid = np.arange(width) < cnt[:, None]
    if not valid.any():
        return x
    # whole (U, width) columns, padding cleared at the end: nearly every row is full
    best = np.where(valid, scores, -np.inf).max(axis=1)
    top = np.where(best > 0, best, 1.0)[:, None]
    pop = table.pop()
    pmax = float(pop.max()) if len(pop) else 0.0
    x[:, :, 0] = scores / top
    x[:, :, 1] = np.log1p(np.arange(width)) / 5.0
    x[:, :, 2] = tastes / top
    x[:, :, 3] = pop[items] / (pmax if pmax > 0 else 1.0)
    x[:, :, 4] = _newest_item_similarity(part, table, uids, items)
    events = np.zeros(nu)
    gap = np.zeros(nu)
    for r, uid in enumerate(uids):
        rec = part.users[uid]
        events[r] = math.log1p(events_of(rec)) / 10.0
        if len(rec) >= HEAD + 4:
            gap[r] = math.log1p(max(entry_ts(rec[-1]) - entry_ts(rec[-3]), 0) / 1000.0) / 20.0
    x[:, :, 5] = events[:, None]
    x[:, :, 6] = gap[:, None]
    x[~valid] = 0.0
    return x


def _newest_item_similarity(
    part: UserPartition, table: ItemTable, uids: Sequence[str], items: np.ndarray
) -> np.ndarray:
    """Per (user r, candidate ``items[r, j]``): its similarity to the user's newest item (0 if
    not among that item's neighbours), by one sorted lookup of (user, item) keys for the chunk."""
    cat = part.catalogue_map(table)
    lists: list[tuple[int, np.ndarray, np.ndarray]] = []
    for r, uid in enumerate(uids):
        rec = part.users[uid]
        if len(rec) > HEAD:
            nb, sc = table.sim_top(int(cat[rec[-2]]))
            lists.append((r, nb, sc))
    n = table.n_items  # after reading the lists, which may add items to the catalogue
    keys = [r * n + nb.astype(np.int64) for r, nb, _ in lists]
    vals = [sc for _, _, sc in lists]
    k = np.concatenate(keys) if keys else _EMPTY_I
    if k.size == 0:
        return np.zeros(items.shape)
    v = np.concatenate(vals)
    order = np.argsort(k)
    k, v = k[order], v[order]
    want = np.arange(len(uids))[:, None] * n + items
    at = np.searchsorted(k, want).clip(max=k.size - 1)
    out: np.ndarray = np.where(k[at] == want, v[at], 0.0)
    return out


_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _look(
    part: UserPartition,
    table: ItemTable,
    uids: Sequence[str],
    ranked: _Arrays,
    rescorer: Rescorer | None,
    observer: Observer | None,
    keep: int,
) -> _Arrays:
    """Show the chunk's candidates to the observer and, with a rescorer, re-rank them; the best
    ``keep`` of each user's (re-ranked) candidates remain."""
    cnt, items, scores, srcs, tastes = ranked
    local, users = part.item_ids, part.users

    def recent(n: int) -> list[list[str]]:
        recs = [users[u] for u in uids]
        return [[local[i] for i in rec[max(HEAD, len(rec) - 2 * n) :: 2]] if n else [] for rec in recs]

    ids = table.column("id", str)[items]
    ids[np.arange(items.shape[1]) >= cnt[:, None]] = None
    ctx = ranking_context(part, table, uids, cnt, items, scores, tastes)
    c = Candidates(uids, cnt, ids, ctx, recent)
    if observer is not None:
        observer.observe(c)
    if rescorer is None or rescorer.weight <= 0:
        return np.minimum(cnt, keep), items[:, :keep], scores[:, :keep], srcs[:, :keep], tastes[:, :keep]
    return _blend(ranked, rescorer.score(c), rescorer.weight, keep)


def _blend(ranked: _Arrays, extra: np.ndarray, weight: float, keep: int) -> _Arrays:
    """``score / max(score) + weight * rescore``, re-sorted per user (ties by item index), best
    ``keep`` per user: one sort of the chunk's (U, width) arrays."""
    cnt, items, scores, srcs, tastes = ranked
    width = items.shape[1]
    valid = np.arange(width) < cnt[:, None]
    best = np.where(valid, scores, -np.inf).max(axis=1, initial=-np.inf)
    norm = np.where(best > 0, best, 1.0)[:, None]  # a user whose best score is not positive: unscaled
    blended = scores / norm + weight * extra[:, :width].astype(np.float64)
    key = np.where(valid, -blended, np.inf)  # padding last
    order = np.lexsort((items, key), axis=1)[:, :keep]
    items, blended, srcs, tastes = (np.take_along_axis(a, order, axis=1) for a in (items, blended, srcs, tastes))
    return np.minimum(cnt, keep), items, blended, srcs, tastes


def recommend(
    part: UserPartition,
    table: ItemTable,
    user_ids: Sequence[str],
    blocked: Collection[str] = (),
    rescorer: Rescorer | None = None,
    epsilon: float | None = None,
    observer: Observer | None = None,
) -> list[RecList]:
    """Lists for ``user_ids`` of partition ``part`` (call after ``part.apply``), with the
    item table as it is now.

    Items the user has seen and ``blocked`` items are never candidates. Users are ranked a chunk
    at a time by compiled kernels (``models.kernels``): candidates, scores and the top of each
    list, then exploration. Per-user Python is limited to picking sources and building the
    output.

    With a ``rescorer`` (the CTR model), every chunk's candidates are re-ranked by the blend in
    one batched call before exploration. ``epsilon`` overrides the exploration rate (raised for
    a while after the trainer detects drift). An ``observer`` sees every chunk's candidates.
    Both see each user's best ``rerank_pool`` candidates, deeper than the ``n_recs +
    explore_pool`` a list draws from, so a re-ranker can lift items retrieval placed lower;
    without either, ranking stops at the shorter pool (the top of a deeper ranking is the same).
    """
    p = part.params
    if not user_ids:
        return []
    excluded = np.fromiter((table.index[b] for b in blocked if b in table.index), dtype=np.int64)
    k = p.n_recs + p.explore_pool
    looking = observer is not None or (rescorer is not None and rescorer.weight > 0)
    k_look = p.look_pool if looking else k  # a re-ranker sees a deeper pool
    eps = p.epsilon if epsilon is None else epsilon
    chunk = _CHUNK_USERS if p.w_vec <= 0 else max(_MIN_CHUNK, _DENSE_CELLS // max(min(p.vector_pool, table.n_items), 1))
    out: list[RecList] = []
    for c0 in range(0, len(user_ids), chunk):
        uids = user_ids[c0 : c0 + chunk]
        users = [part.users[uid] for uid in uids]  # their records
        ranked = _rank_chunk(part, table, uids, users, excluded, k_look)
        if ranked is None:  # an empty catalogue
            return []
        cnt, items, scores, srcs, tastes = ranked
        if looking:
            cnt, items, scores, srcs, tastes = _look(part, table, uids, ranked, rescorer, observer, k)
        seeds = np.array(
            [stable_hash(p.seed, uid, events_of(rec)) for uid, rec in zip(uids, users, strict=True)], dtype=np.uint64
        )
        n_s, pos, expl, prop = explore_users(cnt, p.n_recs, eps, seeds)
        out.extend(_lists(table, uids, users, n_s, pos, expl, prop, items, scores, srcs, tastes))
    return out


def _lists(
    table: ItemTable,
    uids: Sequence[str],
    users: Sequence[array[int]],
    n_s: np.ndarray,
    pos: np.ndarray,
    expl: np.ndarray,
    prop: np.ndarray,
    items: np.ndarray,
    scores: np.ndarray,
    srcs: np.ndarray,
    tastes: np.ndarray,
) -> list[RecList]:
    """RecLists from the kernels' arrays: slot s of user r holds ranking position ``pos[r, s]``.
    Ids and reasons come from per-item string columns, indexed for the whole chunk at once."""
    rows = np.arange(len(uids))[:, None]
    it, src = items[rows, pos], srcs[rows, pos]
    # reasons: exploration, similar to the source, close to the user's taste, trending
    reasons = _REASONS[np.where(expl, 0, np.where(tastes[rows, pos] > 0, 1, 2))]
    named = ~expl & (src >= 0)
    reasons[named] = table.column("similar", _similar_to)[src[named]]
    ids_l = table.column("id", str)[it].tolist()
    sc, ex, pr, rs = scores[rows, pos].tolist(), expl.tolist(), prop.tolist(), reasons.tolist()
    width = pos.shape[1]
    out = []
    for r, (uid, rec, m) in enumerate(zip(uids, users, n_s.tolist(), strict=True)):
        if m == width:
            out.append(RecList(uid, events_of(rec), rec[LAST_TS], ids_l[r], sc[r], ex[r], pr[r], rs[r]))
        else:
            out.append(
                RecList(uid, events_of(rec), rec[LAST_TS], ids_l[r][:m], sc[r][:m], ex[r][:m], pr[r][:m], rs[r][:m])
            )
    return out


_REASONS = np.array(["exploration", "close to your taste", "trending"], dtype=object)


def _similar_to(item_id: str) -> str:
    return "similar to " + item_id


def _rank_chunk(
    part: UserPartition,
    table: ItemTable,
    uids: Sequence[str],
    users: Sequence[array[int]],
    excluded: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The chunk's best ``k`` candidates per user (``kernels.rank_users``'s arrays); None when
    the catalogue is empty."""
    p = part.params
    cat = part.catalogue_map(table)
    nu = len(users)
    decay = math.log(2.0) / (p.user_half_life_h * _MS_PER_H)
    # the chunk's records end to end (one copy), for the kernels
    recs = np.frombuffer(b"".join(users), dtype=np.int64)
    rec_ptr = _ptr(np.fromiter(map(len, users), dtype=np.int64, count=nu))
    s_ptr, s_loc, s_w, hsum = user_sources(
        recs, rec_ptr, np.asarray(part.weights, dtype=np.float64), p.sources, decay, p.source_decay
    )
    src_item = cat[s_loc]
    table.parse(np.unique(src_item).tolist())  # may name items new to the catalogue
    n = table.n_items
    if n == 0:
        return None
    pop = table.pop()
    pop_term = p.w_pop * pop / (float(pop.max()) or 1.0)
    trend = table.trending(p.trending_len)
    seen_raw = [part.seen_items(uid) for uid in uids]
    seen_len = np.fromiter(map(len, seen_raw), dtype=np.int64, count=nu)
    seen_item = cat[np.concatenate(seen_raw)] if nu else _EMPTY_I
    v_user, v_item, v_score = _vector_candidates(part, table, uids, n, pop, seen_len, seen_item, excluded)
    l_ptr, l_item, l_score = _long_term(table, cat, p, recs, rec_ptr, _ptr(seen_len), seen_item, excluded)
    seen_ptr = _ptr(seen_len)
    v_ptr = _ptr(np.bincount(v_user, minlength=nu))
    has_long = l_item.size > 0
    nb_off, nb_len, slab_item, slab_score = table.nb_off, table.nb_len, table.slab_item, table.slab_score

    def rank(r0: int, r1: int) -> tuple[np.ndarray, ...]:
        return rank_users(
            s_ptr[r0 : r1 + 1],
            src_item,
            s_w,
            nb_off,
            nb_len,
            slab_item,
            slab_score,
            seen_ptr[r0 : r1 + 1],
            seen_item,
            excluded,
            trend,
            v_ptr[r0 : r1 + 1],
            v_item,
            v_score,
            l_ptr[r0 : r1 + 1],
            l_item,
            l_score,
            has_long,
            hsum[r0:r1],
            pop_term,
            p.w_cooc,
            p.w_vec,
            p.w_long,
            k,
        )

    cnt, items, scores, srcs, tastes = threads.by_users(nu, rank)
    return cnt, items, scores, srcs, tastes


def _ptr(lens: np.ndarray) -> np.ndarray:
    """Offsets of consecutive groups of ``lens`` (len + 1 entries)."""
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    lens.cumsum(out=out[1:])  # the method: np.cumsum's dispatch costs more than a small sum
    return out


_AGE_W: dict[float, np.ndarray] = {}


def _age_weights(half_life: float, n: int) -> np.ndarray:
    """``recency_weights`` by age (0: the newest entry), at least ``n`` of them: computed once per
    half-life, not per ranked chunk."""
    w = _AGE_W.get(half_life)
    if w is None or len(w) < n:
        w = _AGE_W[half_life] = recency_weights([max(n, 64)], half_life)[::-1].copy()
    return w


def _vector_candidates(
    part: UserPartition,
    table: ItemTable,
    uids: Sequence[str],
    n: int,
    pop: np.ndarray,
    seen_len: np.ndarray,
    seen_item: np.ndarray,
    excluded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's nearest items to its vector among the ``vector_pool`` most popular, less its
    seen (``seen_len`` per user, laid end to end in ``seen_item``) and the excluded ones (one
    matrix product): (user row, item, score >= 0), grouped by user; none when the vector score
    has no weight."""
    p = part.params
    if p.w_vec <= 0 or p.vector_candidates <= 0:
        return _EMPTY_I, _EMPTY_I, _EMPTY_F
    nu = len(uids)
    seen_user = np.repeat(np.arange(nu), seen_len)
    if excluded.size:
        seen_user = np.concatenate([seen_user, np.repeat(np.arange(nu), excluded.size)])
        seen_item = np.concatenate([seen_item, np.tile(excluded, nu)])
    if n > p.vector_pool:
        pool = top_indices(pop, p.vector_pool)
        pos = np.full(n, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
    else:
        pool, pos = np.arange(n), None
    kv = min(p.vector_candidates, len(pool))
    vecs = part.user_vectors(uids)
    sims = vecs @ table.unit[pool].T
    if pos is None:
        sims[seen_user, seen_item] = -np.inf
    else:
        ps = pos[seen_item]
        ok = ps >= 0
        sims[seen_user[ok], ps[ok]] = -np.inf
    vpos = np.argpartition(-sims, kv - 1, axis=1)[:, :kv] if kv < sims.shape[1] else np.tile(np.arange(kv), (nu, 1))
    vval = np.take_along_axis(sims, vpos, axis=1).ravel()
    fin = np.isfinite(vval)
    return np.repeat(np.arange(nu), kv)[fin], pool[vpos.ravel()[fin]], np.maximum(vval[fin], 0.0).astype(np.float64)


def _long_term(
    table: ItemTable,
    cat: np.ndarray,
    p: ModelParams,
    recs: np.ndarray,
    rec_ptr: np.ndarray,
    seen_ptr: np.ndarray,
    seen_item: np.ndarray,
    excluded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's best unseen items by the long-term model: (per-user offsets, item, positive
    score), grouped by user (records ``recs`` end to end, user r's from ``rec_ptr[r]``)."""
    lt = table.long
    if lt is None or p.w_long <= 0:
        return np.zeros(len(rec_ptr), dtype=np.int64), _EMPTY_I, _EMPTY_F
    lens = (np.diff(rec_ptr) - HEAD) >> 1
    items = cat[history_items(recs, rec_ptr)]
    age_w = _age_weights(p.long_half_life, int(lens.max(initial=0)))
    hist_ptr = _ptr(lens)
    weights, pos, pool = lt.weights, lt.pos, lt.pool

    def top(r0: int, r1: int) -> tuple[np.ndarray, ...]:
        return long_term_top(
            weights,
            pos,
            pool,
            hist_ptr[r0 : r1 + 1],
            items,
            age_w,
            seen_ptr[r0 : r1 + 1],
            seen_item,
            excluded,
            p.long_candidates,
        )

    cnt, item, score = threads.by_users(len(lens), top)
    have = np.arange(item.shape[1]) < cnt[:, None]
    return _ptr(cnt), item[have], score[have]


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
