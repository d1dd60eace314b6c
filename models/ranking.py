"""Top-N lists for a batch of users: candidates, blended scores, exploration, reasons.

Candidates come from three places: co-occurrence neighbours of the user's recent items, items
near the user vector (one matrix product for the whole batch), and trending items. Scores blend
the three (weights in ``ModelParams``); seen items are never candidates. Exploration then
replaces some slots (``models.exploration``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from models.exploration import epsilon_greedy
from models.state import PartitionState, UserState

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


def trending(state: PartitionState, k: int) -> list[tuple[int, float]]:
    """The k most popular items with their decayed popularity (type-weighted events)."""
    pop = state.decayed_pop()
    return [(int(i), float(pop[i])) for i in top_indices(pop, k)]


def sim_list(state: PartitionState, i: int) -> list[tuple[str, float]]:
    """The published ``sim:{item}`` list: neighbours by cosine-normalised co-occurrence, now."""
    idx, sc = state.compute_sim(i)
    ids = state.item_ids
    return [(ids[j], s) for j, s in zip(idx.tolist(), sc.tolist(), strict=True)]


def _sources(u: UserState, k: int, decay: float) -> tuple[list[int], list[float]]:
    """The user's k most recent distinct items, each weighted by event type and recency."""
    srcs: list[int] = []
    hs: list[float] = []
    last = u.last_ts
    for j, ts, w in reversed(u.history):
        if j not in srcs:
            srcs.append(j)
            hs.append(w * math.exp(-decay * (last - ts)))
            if len(srcs) >= k:
                break
    return srcs, hs


def recommend(state: PartitionState, user_ids: Sequence[str], blocked: Collection[str] = ()) -> list[RecList]:
    """Lists for ``user_ids`` from the state as it is now (call after ``state.apply``).

    Items the user has seen and ``blocked`` items are never candidates. The whole batch of users
    is scored at once: every (user, candidate) row of every source goes into one table, which a
    few sorts and segment reductions turn into per-user rankings. Per-user Python is limited to
    picking sources, exploration and building the output.
    """
    p = state.params
    n = state.n_items
    if not user_ids or n == 0:
        return []
    nu = len(user_ids)
    users = [state.users[uid] for uid in user_ids]
    ar = np.arange(nu)
    pop = state.pop[:n]
    pop_term = p.w_pop * pop / (float(pop.max()) or 1.0)
    trend = top_indices(pop, p.trending_len)
    decay = math.log(2.0) / (p.user_half_life_h * _MS_PER_H)

    # seen and blocked items, as (user row, item) keys
    seen_parts = [np.frombuffer(u.seen_arr, dtype=np.int64) for u in users]
    seen_item = np.concatenate(seen_parts)
    seen_user = np.repeat(ar, [len(x) for x in seen_parts])
    excluded = np.fromiter((state.item_index[b] for b in blocked if b in state.item_index), dtype=np.int64)
    if excluded.size:
        seen_item = np.concatenate([seen_item, np.tile(excluded, nu)])
        seen_user = np.concatenate([seen_user, np.repeat(ar, excluded.size)])

    # nearest items to each user vector (one matrix product), seen ones masked out
    vecs = state.user_vectors(user_ids)
    if n > p.vector_pool:
        pool = top_indices(pop, p.vector_pool)
        pos = np.full(n, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
        sims = vecs @ state.unit[pool].T
        ps = pos[seen_item]
        ok = ps >= 0
        sims[seen_user[ok], ps[ok]] = -np.inf
    else:
        pool = np.arange(n)
        sims = vecs @ state.unit[:n].T
        sims[seen_user, seen_item] = -np.inf
    kv = min(p.vector_candidates, sims.shape[1])
    vpos = np.argpartition(-sims, kv - 1, axis=1)[:, :kv] if kv < sims.shape[1] else np.tile(np.arange(kv), (nu, 1))
    vval = np.take_along_axis(sims, vpos, axis=1).ravel()
    fin = np.isfinite(vval)
    v_item = pool[vpos.ravel()[fin]]
    v_user = np.repeat(ar, kv)[fin]
    v_score = np.maximum(vval[fin], 0.0)

    # co-occurrence neighbours of each user's recent items
    hsum = np.zeros(nu)
    nb_parts: list[np.ndarray] = []
    sc_parts: list[np.ndarray] = []
    h_rep: list[float] = []
    src_rep: list[int] = []
    lens: list[int] = []
    per_user: list[int] = []
    for r, u in enumerate(users):
        srcs, hs = _sources(u, p.sources, decay)
        hsum[r] = sum(hs)
        cnt = 0
        for j, h in zip(srcs, hs, strict=True):
            nb, sc = state.sim_top(j)
            if nb.size:
                nb_parts.append(nb)
                sc_parts.append(sc)
                h_rep.append(h)
                src_rep.append(j)
                lens.append(nb.size)
                cnt += nb.size
        per_user.append(cnt)
    if nb_parts:
        c_item = np.concatenate(nb_parts)
        c_contrib = np.concatenate(sc_parts) * np.repeat(np.asarray(h_rep), lens)
        c_src = np.repeat(np.asarray(src_rep, dtype=np.int64), lens)
    else:
        c_item, c_contrib, c_src = _EMPTY_I, _EMPTY_F, _EMPTY_I
    c_user = np.repeat(ar, per_user)

    # one table of (user, item) rows from all three sources, reduced per (user, item)
    nt = trend.size
    n_other = v_item.size + nu * nt
    item = np.concatenate([c_item, v_item, np.tile(trend, nu)])
    user = np.concatenate([c_user, v_user, np.repeat(ar, nt)])
    contrib = np.concatenate([c_contrib, np.zeros(n_other)])
    vsc = np.concatenate([np.zeros(c_item.size), v_score, np.zeros(nu * nt)])
    src = np.concatenate([c_src, np.full(n_other, -1, dtype=np.int64)])
    key = user * n + item
    order = np.lexsort((-contrib, key))  # per key, the biggest contribution first (ties: newest source)
    key = key[order]
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    g_key = key[first]
    g_cooc = np.add.reduceat(contrib[order], first)
    g_vec = np.maximum.reduceat(vsc[order], first)
    g_src = np.where(g_cooc > 0, src[order][first], -1)
    keep = ~np.isin(g_key, seen_user * n + seen_item)
    g_key, g_cooc, g_vec, g_src = g_key[keep], g_cooc[keep], g_vec[keep], g_src[keep]
    g_user, g_item = g_key // n, g_key % n
    safe = np.where(hsum > 0, hsum, 1.0)
    score = pop_term[g_item] + p.w_cooc * g_cooc / safe[g_user] + p.w_vec * g_vec
    rank = np.lexsort((g_item, -score, g_user))  # per user: best first, ties by item index
    starts = np.searchsorted(g_user[rank], ar)
    ends = np.searchsorted(g_user[rank], ar, side="right")

    ids = state.item_ids
    k = p.n_recs + p.explore_pool
    out: list[RecList] = []
    for r, (uid, u) in enumerate(zip(user_ids, users, strict=True)):
        sel = rank[starts[r] : min(ends[r], starts[r] + k)]
        ranked = g_item[sel].tolist()
        info = dict(
            zip(ranked, zip(score[sel].tolist(), g_src[sel].tolist(), g_vec[sel].tolist(), strict=True), strict=True)
        )
        slots = epsilon_greedy(ranked[: p.n_recs], ranked[p.n_recs :], p.n_recs, p.epsilon, p.seed, uid, u.n_events)
        items = []
        for sl in slots:
            sc_j, src_j, vec_j = info[sl.item]
            if sl.explore:
                reason = "exploration"
            elif src_j >= 0:
                reason = "similar to " + ids[src_j]
            elif vec_j > 0:
                reason = "close to your recent taste"
            else:
                reason = "trending"
            items.append(RecItem(ids[sl.item], sc_j, sl.explore, sl.p, reason))
        out.append(RecList(uid, u.n_events, u.last_ts, items))
    return out


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
