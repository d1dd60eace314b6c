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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Protocol

import numpy as np

from models.exploration import epsilon_greedy
from models.longterm import recency_weights
from models.params import ModelParams
from models.table import ItemTable
from models.users import UserPartition, UserState

_MS_PER_H = 3_600_000.0


class RecItem(NamedTuple):
    item_id: str
    score: float
    explore: bool
    p: float
    reason: str


@dataclass(frozen=True, slots=True)
class RecList:
    """One user's list; ``version`` is the user's event count, monotonic and replay-stable."""

    user_id: str
    version: int
    event_ts: int
    items: list[RecItem]


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first, ties broken by lower index."""
    if k <= 0 or scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    if k < scores.size:
        part = np.argpartition(-scores, k - 1)[:k]
        # argpartition is not stable on ties at the boundary: widen to every tied value
        kth = scores[part].min()
        part = np.flatnonzero(scores >= kth)
    else:
        part = np.arange(scores.size)
    order = np.lexsort((part, -scores[part]))
    return part[order][:k]


def _sources(u: UserState, k: int, decay: float, step: float = 1.0) -> tuple[list[int], list[float]]:
    """The user's k most recent distinct items, each weighted by event type and recency (in
    event time, and by position: the n-th newest source also weighs ``step ** n``)."""
    srcs: list[int] = []
    hs: list[float] = []
    last = u.last_ts
    f = 1.0
    for j, ts, w in reversed(u.history):
        if j not in srcs:
            srcs.append(j)
            hs.append(w * f * math.exp(-decay * (last - ts)))
            f *= step
            if len(srcs) >= k:
                break
    return srcs, hs


@dataclass
class _Candidates:
    """Every (user row, item) candidate of a chunk of users, from the three sources."""

    nu: int
    seen_user: np.ndarray
    seen_item: np.ndarray
    c_user: np.ndarray  # co-occurrence rows: per user, sources newest first
    c_item: np.ndarray
    c_contrib: np.ndarray
    c_src: np.ndarray
    v_user: np.ndarray  # user-vector rows
    v_item: np.ndarray
    v_score: np.ndarray
    trend: np.ndarray  # trending items, candidates for every user
    hsum: np.ndarray  # per user: total source weight, normalises the co-occurrence score
    l_user: np.ndarray  # long-term model rows (models.longterm); empty without one
    l_item: np.ndarray
    l_score: np.ndarray


# A user's ranking: items best first, with score, contributing source (-1: none) and taste score
# (user vector and long-term model).
_Ranked = tuple[list[int], list[float], list[int], list[float]]
# Dense scoring holds a (users x items) matrix; chunks of users keep it under this many cells.
_DENSE_CELLS = 1 << 20
_DENSE_MIN_USERS = 32


class Rescorer(Protocol):
    """Scores every user's ranked candidates in one call (e.g. a CTR model, batched).

    ``histories[r]`` are user r's recent item ids (oldest first), ``candidates[r]`` the ids to
    score and ``context[r]`` their ``ranking_context`` rows; returns one array of scores per
    user, aligned with ``candidates[r]``, which the blend adds, times ``weight``, to the
    retrieval score normalised so that the best candidate's is 1.
    """

    weight: float

    def score(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]],
        context: Sequence[np.ndarray],
    ) -> list[np.ndarray]: ...


class Observer(Protocol):
    """Sees every chunk of users' ranked candidates with their ``ranking_context`` (before any
    rescoring): the worker's sample builder remembers them as the lists served."""

    def observe(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]],
        context: Sequence[np.ndarray],
    ) -> None: ...


# Columns of ``ranking_context``.
RANK_FEATURES = 7


def ranking_context(
    part: UserPartition, table: ItemTable, uids: Sequence[str], ranked: Sequence[_Ranked]
) -> list[np.ndarray]:
    """How retrieval saw each candidate, as inputs for a learned re-ranker: per user an
    (n, RANK_FEATURES) float32 array, each column scaled to about [0, 1]:

    score / best score, log(1 + rank) / 5, taste score / best score, popularity / the most
    popular item's, similarity to the user's newest item, and two user columns (the same in
    every row): log(1 + events) / 10 and log(1 + seconds between the user's last two events) / 20.
    Everything is read from the state and the table as they are now, so a list's context is what
    a sample of the user's next event will carry (no feature from the future).
    """
    lens = np.fromiter((len(r[0]) for r in ranked), dtype=np.int64, count=len(ranked))
    n = int(lens.sum())
    x = np.zeros((n, RANK_FEATURES), dtype=np.float32)
    if n:
        # one flat array for the chunk: row k is a candidate of user ``row[k]``
        idx = np.fromiter(chain.from_iterable(r[0] for r in ranked), dtype=np.int64, count=n)
        score = np.fromiter(chain.from_iterable(r[1] for r in ranked), dtype=np.float64, count=n)
        taste = np.fromiter(chain.from_iterable(r[3] for r in ranked), dtype=np.float64, count=n)
        row = np.repeat(np.arange(len(ranked)), lens)
        starts = np.cumsum(lens) - lens
        best = np.full(len(ranked), -np.inf)
        np.maximum.at(best, row, score)
        top = np.where(best > 0, best, 1.0)[row]
        pop = table.pop()
        pmax = float(pop.max()) if len(pop) else 0.0
        x[:, 0] = score / top
        x[:, 1] = np.log1p(np.arange(n) - starts[row]) / 5.0
        x[:, 2] = taste / top
        x[:, 3] = pop[idx] / (pmax if pmax > 0 else 1.0)
        x[:, 4] = _newest_item_similarity(part, table, uids, row, idx)
        events = np.zeros(len(ranked))
        gap = np.zeros(len(ranked))
        for r, uid in enumerate(uids):
            u = part.users[uid]
            events[r] = math.log1p(u.n_events) / 10.0
            if len(u.history) > 1:
                gap[r] = math.log1p(max(u.history[-1][1] - u.history[-2][1], 0) / 1000.0) / 20.0
        x[:, 5] = events[row]
        x[:, 6] = gap[row]
    return np.split(x, np.cumsum(lens)[:-1])


def _newest_item_similarity(
    part: UserPartition, table: ItemTable, uids: Sequence[str], row: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """Per (user ``row``, candidate ``idx``): its similarity to the user's newest item (0 if not
    among that item's neighbours), by one sorted lookup of (user, item) keys for the chunk."""
    cat = part.catalogue_map(table)
    lists: list[tuple[int, np.ndarray, np.ndarray]] = []
    for r, uid in enumerate(uids):
        h = part.users[uid].history
        if h:
            nb, sc = table.sim_top(int(cat[h[-1][0]]))
            lists.append((r, nb, sc))
    n = table.n_items  # after reading the lists, which may add items to the catalogue
    keys = [r * n + nb.astype(np.int64) for r, nb, _ in lists]
    vals = [sc for _, _, sc in lists]
    k = np.concatenate(keys) if keys else _EMPTY_I
    if k.size == 0:
        return np.zeros(len(idx))
    v = np.concatenate(vals)
    order = np.argsort(k)
    k, v = k[order], v[order]
    want = row * n + idx
    at = np.searchsorted(k, want).clip(max=k.size - 1)
    return np.where(k[at] == want, v[at], 0.0)


def _look(
    part: UserPartition,
    table: ItemTable,
    uids: Sequence[str],
    ranked: list[_Ranked],
    rescorer: Rescorer | None,
    observer: Observer | None,
    keep: int,
) -> list[_Ranked]:
    """Show the chunk's candidates to the observer and, with a rescorer, re-rank them; the best
    ``keep`` of each user's (re-ranked) candidates remain."""
    local, ids = part.item_ids, table.ids
    hists = [[local[i] for i, _, _ in part.users[u].history] for u in uids]
    cands = [[ids[i] for i in r[0]] for r in ranked]
    ctx = ranking_context(part, table, uids, ranked)
    if observer is not None:
        observer.observe(uids, hists, cands, ctx)
    if rescorer is None or rescorer.weight <= 0:
        return [(a[:keep], b[:keep], c[:keep], d[:keep]) for a, b, c, d in ranked]
    return _blend(ranked, rescorer.score(uids, hists, cands, ctx), rescorer.weight, keep)


def _blend(ranked: list[_Ranked], extra: list[np.ndarray], weight: float, keep: int) -> list[_Ranked]:
    """``score / max(score) + weight * rescore``, re-sorted (ties by item index), best ``keep``
    per user: one flat sort for the whole chunk."""
    lens = np.fromiter((len(r[0]) for r in ranked), dtype=np.int64, count=len(ranked))
    n = int(lens.sum())
    if n == 0:
        return ranked
    flat = chain.from_iterable
    items = np.fromiter(flat(r[0] for r in ranked), dtype=np.int64, count=n)
    score = np.fromiter(flat(r[1] for r in ranked), dtype=np.float64, count=n)
    src = np.fromiter(flat(r[2] for r in ranked), dtype=np.int64, count=n)
    taste = np.fromiter(flat(r[3] for r in ranked), dtype=np.float64, count=n)
    row = np.repeat(np.arange(len(ranked)), lens)
    starts = np.cumsum(lens) - lens
    top = np.zeros(len(ranked))
    has = lens > 0
    top[has] = np.maximum.reduceat(score, starts[has])
    norm = np.where(top > 0, top, 1.0)[row]  # a user whose best score is not positive: unscaled
    blended = score / norm + weight * np.concatenate(extra).astype(np.float64)
    order = np.lexsort((items, -blended, row))  # per user, best first, ties by item index
    t_l, b_l, s_l, w_l = (a[order].tolist() for a in (items, blended, src, taste))
    ends = np.minimum(lens, keep) + starts
    return [(t_l[a:b], b_l[a:b], s_l[a:b], w_l[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


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

    Items the user has seen and ``blocked`` items are never candidates. Users are scored a chunk
    at a time with array operations: a dense (users x items) score matrix while the catalogue
    is small enough, else a table of (user, item) rows reduced by sorting. Per-user Python is
    limited to picking sources, exploration and building the output.

    With a ``rescorer`` (the CTR model), every chunk's candidates are re-ranked by the blend in
    one batched call before exploration. ``epsilon`` overrides the exploration rate (raised for
    a while after the trainer detects drift). An ``observer`` sees every chunk's candidates.
    Both see each user's best ``rerank_pool`` candidates, deeper than the ``n_recs +
    explore_pool`` a list draws from, so a re-ranker can lift items retrieval placed lower;
    without either, ranking stops at the shorter pool (the top of a deeper ranking is the same).
    """
    p = part.params
    cat = part.catalogue_map(table)  # first: it may add the partition's items to the catalogue
    n = table.n_items
    if not user_ids or n == 0:
        return []
    pop = table.pop()
    pop_term = p.w_pop * pop / (float(pop.max()) or 1.0)
    trend = top_indices(pop, p.trending_len)
    excluded = np.fromiter((table.index[b] for b in blocked if b in table.index), dtype=np.int64)
    if n > p.vector_pool:
        pool = top_indices(pop, p.vector_pool)
        pos = np.full(n, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
    else:
        pool, pos = np.arange(n), None
    chunk = _DENSE_CELLS // n
    dense = chunk >= _DENSE_MIN_USERS
    if not dense:
        chunk = len(user_ids)
    k = p.n_recs + p.explore_pool
    looking = observer is not None or (rescorer is not None and rescorer.weight > 0)
    k_look = p.look_pool if looking else k  # a re-ranker sees a deeper pool
    eps = p.epsilon if epsilon is None else epsilon
    ids = table.ids
    out: list[RecList] = []
    for c0 in range(0, len(user_ids), chunk):
        uids = user_ids[c0 : c0 + chunk]
        cand = _gather(part, table, cat, uids, excluded, trend, pool, pos)
        if table.n_items != n:  # lists read for the first time named items new to the catalogue
            n = table.n_items
            pop = table.pop()
            pop_term = p.w_pop * pop / (float(pop.max()) or 1.0)
        ranked = _rank_dense(cand, n, k_look, pop_term, p) if dense else _rank_table(cand, n, k_look, pop_term, p)
        if looking:
            ranked = _look(part, table, uids, ranked, rescorer, observer, k)
        for uid, (items, scores, srcs, vecs) in zip(uids, ranked, strict=True):
            u = part.users[uid]
            info = dict(zip(items, zip(scores, srcs, vecs, strict=True), strict=True))
            slots = epsilon_greedy(items[: p.n_recs], items[p.n_recs :], p.n_recs, eps, p.seed, uid, u.n_events)
            rec = []
            for sl in slots:
                sc_j, src_j, vec_j = info[sl.item]
                if sl.explore:
                    reason = "exploration"
                elif src_j >= 0:
                    reason = "similar to " + ids[src_j]
                elif vec_j > 0:
                    reason = "close to your taste"
                else:
                    reason = "trending"
                rec.append(RecItem(ids[sl.item], sc_j, sl.explore, sl.p, reason))
            out.append(RecList(uid, u.n_events, u.last_ts, rec))
    return out


def _gather(
    part: UserPartition,
    table: ItemTable,
    cat: np.ndarray,
    user_ids: Sequence[str],
    excluded: np.ndarray,
    trend: np.ndarray,
    pool: np.ndarray,
    pos: np.ndarray | None,
) -> _Candidates:
    p = part.params
    nu = len(user_ids)
    users = [part.users[uid] for uid in user_ids]
    ar = np.arange(nu)
    decay = math.log(2.0) / (p.user_half_life_h * _MS_PER_H)

    # seen and blocked items, as (user row, item) pairs
    seen_parts = [cat[np.frombuffer(u.seen_arr, dtype=np.int64)] for u in users]
    seen_item = np.concatenate(seen_parts)
    seen_user = np.repeat(ar, [len(x) for x in seen_parts])
    if excluded.size:
        seen_item = np.concatenate([seen_item, np.tile(excluded, nu)])
        seen_user = np.concatenate([seen_user, np.repeat(ar, excluded.size)])

    # nearest items to each user vector (one matrix product), seen ones masked out; skipped
    # when the vector score has no weight
    kv = min(p.vector_candidates, len(pool)) if p.w_vec > 0 else 0
    if kv:
        vecs = part.user_vectors(user_ids)
        sims = vecs @ table.unit[pool].T
        if pos is None:
            sims[seen_user, seen_item] = -np.inf
        else:
            ps = pos[seen_item]
            ok = ps >= 0
            sims[seen_user[ok], ps[ok]] = -np.inf
        vpos = np.argpartition(-sims, kv - 1, axis=1)[:, :kv] if kv < sims.shape[1] else np.tile(np.arange(kv), (nu, 1))
        vval = np.take_along_axis(sims, vpos, axis=1).ravel()
    else:
        vpos, vval = np.zeros((nu, 0), dtype=np.int64), _EMPTY_F
    fin = np.isfinite(vval)

    # co-occurrence neighbours of each user's recent items
    hsum = np.zeros(nu)
    nb_parts: list[np.ndarray] = []
    sc_parts: list[np.ndarray] = []
    h_rep: list[float] = []
    src_rep: list[int] = []
    lens: list[int] = []
    per_user: list[int] = []
    for r, u in enumerate(users):
        srcs, hs = _sources(u, p.sources, decay, p.source_decay)
        hsum[r] = sum(hs)
        cnt = 0
        for j, h in zip(cat[srcs].tolist(), hs, strict=True):
            nb, sc = table.sim_top(j)
            if nb.size:
                nb_parts.append(nb)
                sc_parts.append(sc)
                h_rep.append(h)
                src_rep.append(j)
                lens.append(nb.size)
                cnt += nb.size
        per_user.append(cnt)
    l_user, l_item, l_score = _long_term(table, cat, p, users, seen_user, seen_item)
    if nb_parts:
        c_item = np.concatenate(nb_parts)
        c_contrib = np.concatenate(sc_parts) * np.repeat(np.asarray(h_rep), lens)
        c_src = np.repeat(np.asarray(src_rep, dtype=np.int64), lens)
    else:
        c_item, c_contrib, c_src = _EMPTY_I, _EMPTY_F, _EMPTY_I
    return _Candidates(
        nu,
        seen_user,
        seen_item,
        np.repeat(ar, per_user),
        c_item,
        c_contrib,
        c_src,
        np.repeat(ar, kv)[fin],
        pool[vpos.ravel()[fin]],
        np.maximum(vval[fin], 0.0),
        trend,
        hsum,
        l_user,
        l_item,
        l_score,
    )


def _long_term(
    table: ItemTable,
    cat: np.ndarray,
    p: ModelParams,
    users: Sequence[UserState],
    seen_user: np.ndarray,
    seen_item: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's best unseen items by the long-term model: (user row, item, positive score)."""
    lt = table.long
    if lt is None or p.w_long <= 0:
        return _EMPTY_I, _EMPTY_I, _EMPTY_F
    lens = [len(u.history) for u in users]
    items = cat[np.array([i for u in users for i, _, _ in u.history], dtype=np.int64)]
    rows = np.repeat(np.arange(len(users)), lens)
    sc = lt.scores(items, recency_weights(lens, p.long_half_life), rows, len(users))
    ok = seen_item < len(lt.pos)
    ps = lt.pos[seen_item[ok]]
    hit = ps >= 0
    sc[seen_user[ok][hit], ps[hit]] = -np.inf
    m = sc.shape[1]
    kl = min(p.long_candidates, m)
    top = np.argpartition(-sc, kl - 1, axis=1)[:, :kl] if kl < m else np.tile(np.arange(m), (len(users), 1))
    val = np.take_along_axis(sc, top, axis=1).ravel()
    good = val > 0
    return np.repeat(np.arange(len(users)), kl)[good], lt.pool[top.ravel()[good]], val[good].astype(np.float64)


def _rank_dense(c: _Candidates, n: int, k: int, pop_term: np.ndarray, p: ModelParams) -> list[_Ranked]:
    """Scores in a (users x items) matrix; per row, the top k by argpartition."""
    nu = c.nu
    cells = nu * n
    ckey = c.c_user * n + c.c_item
    vkey = c.v_user * n + c.v_item
    cooc = np.bincount(ckey, weights=c.c_contrib, minlength=cells)
    vec = np.zeros(cells)
    vec[vkey] = c.v_score
    member = np.zeros(cells, dtype=bool)
    member[ckey] = True
    member[vkey] = True
    member.reshape(nu, n)[:, c.trend] = True
    member[c.seen_user * n + c.seen_item] = False
    safe = np.where(c.hsum > 0, c.hsum, 1.0)
    cooc_term = p.w_cooc * cooc.reshape(nu, n) / safe[:, None]
    taste = p.w_vec * vec
    if c.l_item.size:
        lkey = c.l_user * n + c.l_item
        member[lkey] = True
        lng = np.zeros(cells)
        lng[lkey] = c.l_score
        lng2 = lng.reshape(nu, n)
        unseen_cooc = np.where(member.reshape(nu, n), cooc_term, 0.0)
        scale = _long_scale(unseen_cooc.max(axis=1), lng2.max(axis=1))
        taste = taste + (p.w_long * lng2 * scale[:, None]).ravel()
    score = (pop_term + cooc_term).ravel() + taste
    score[~member] = -np.inf
    score2 = score.reshape(nu, n)
    top = np.argpartition(-score2, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (nu, 1))
    vals = np.take_along_axis(score2, top, axis=1)
    order = np.lexsort((top, -vals), axis=-1)  # best first, ties by item index
    top = np.take_along_axis(top, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    at = np.arange(nu)[:, None] * n + top
    # the source that contributed most to each listed (user, item); ties: the newest source.
    # Only the rows of listed cells take part: a user has thousands of candidate rows.
    listed = np.zeros(cells, dtype=bool)
    listed[at] = True
    rows = np.flatnonzero(listed[ckey] & (c.c_contrib > 0))
    lk, lc = ckey[rows], c.c_contrib[rows]
    best = np.zeros(cells)
    np.maximum.at(best, lk, lc)
    m = rows[lc == best[lk]]
    uk, first = np.unique(ckey[m], return_index=True)
    src = np.full(cells, -1, dtype=np.int64)
    src[uk] = c.c_src[m[first]]
    # rows are sorted best first, so the candidates (finite scores) are a prefix of each row
    counts = np.isfinite(vals).sum(axis=1).tolist()
    # the reason names a source only where co-occurrence weighs more than taste
    src_at = np.where(taste[at] > cooc_term.ravel()[at], -1, src[at])
    t_l, v_l, s_l, w_l = top.tolist(), vals.tolist(), src_at.tolist(), taste[at].tolist()
    return [(t_l[r][:m], v_l[r][:m], s_l[r][:m], w_l[r][:m]) for r, m in enumerate(counts)]


def _long_scale(cooc_max: np.ndarray, long_max: np.ndarray) -> np.ndarray:
    """Per user, the factor that puts the long-term scores on the co-occurrence scores' scale
    (their maxima equal), so that ``w_long`` is a relative weight; 1/max without co-occurrence."""
    c = np.where(cooc_max > 0, cooc_max, 1.0)
    return np.asarray(c / np.where(long_max > 0, long_max, 1.0))


def _rank_table(c: _Candidates, n: int, k: int, pop_term: np.ndarray, p: ModelParams) -> list[_Ranked]:
    """One table of (user, item) rows from all sources, reduced per pair by sorting; for
    catalogues too large for a dense matrix."""
    nu = c.nu
    ar = np.arange(nu)
    nt = c.trend.size
    nl = c.l_item.size
    n_other = c.v_item.size + nu * nt + nl
    item = np.concatenate([c.c_item, c.v_item, np.tile(c.trend, nu), c.l_item])
    user = np.concatenate([c.c_user, c.v_user, np.repeat(ar, nt), c.l_user])
    contrib = np.concatenate([c.c_contrib, np.zeros(n_other)])
    vsc = np.concatenate([np.zeros(c.c_item.size), c.v_score, np.zeros(nu * nt + nl)])
    lsc = np.concatenate([np.zeros(item.size - nl), c.l_score])
    src = np.concatenate([c.c_src, np.full(n_other, -1, dtype=np.int64)])
    key = user * n + item
    order = np.lexsort((-contrib, key))  # per key, the biggest contribution first (ties: newest source)
    key = key[order]
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    g_key = key[first]
    g_cooc = np.add.reduceat(contrib[order], first)
    g_vec = np.maximum.reduceat(vsc[order], first)
    g_long = np.maximum.reduceat(lsc[order], first)
    g_src = np.where(g_cooc > 0, src[order][first], -1)
    keep = ~np.isin(g_key, c.seen_user * n + c.seen_item)
    g_key, g_cooc, g_vec, g_long, g_src = g_key[keep], g_cooc[keep], g_vec[keep], g_long[keep], g_src[keep]
    g_user, g_item = g_key // n, g_key % n
    safe = np.where(c.hsum > 0, c.hsum, 1.0)
    cooc_term = p.w_cooc * g_cooc / safe[g_user]
    taste = p.w_vec * g_vec
    if nl:
        cmax, lmax = np.zeros(nu), np.zeros(nu)
        np.maximum.at(cmax, g_user, cooc_term)
        np.maximum.at(lmax, g_user, g_long)
        taste = taste + p.w_long * g_long * _long_scale(cmax, lmax)[g_user]
    score = pop_term[g_item] + cooc_term + taste
    g_src = np.where(taste > cooc_term, -1, g_src)  # the reason names a source only where it weighs most
    rank = np.lexsort((g_item, -score, g_user))  # per user: best first, ties by item index
    starts = np.searchsorted(g_user[rank], ar)
    ends = np.searchsorted(g_user[rank], ar, side="right")
    t_l, v_l, s_l, w_l = (a[rank].tolist() for a in (g_item, score, g_src, taste))
    bounds = zip(starts.tolist(), np.minimum(ends, starts + k).tolist(), strict=True)
    return [(t_l[a:b], v_l[a:b], s_l[a:b], w_l[a:b]) for a, b in bounds]


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
