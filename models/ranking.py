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

import numpy as np

from models.exploration import epsilon_greedy
from models.state import PartitionState

_MS_PER_H = 3_600_000.0


@dataclass(frozen=True, slots=True)
class RecItem:
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
    """The published ``sim:{item}`` list: neighbours by cosine-normalised co-occurrence."""
    return [(state.item_ids[j], s) for j, s in state.sim_top(i)]


def recommend(state: PartitionState, user_ids: Sequence[str], blocked: Collection[str] = ()) -> list[RecList]:
    """Lists for ``user_ids`` from the state as it is now (call after ``state.apply``).

    Items the user has seen and ``blocked`` items are never candidates.
    """
    p = state.params
    n = state.n_items
    if not user_ids or n == 0:
        return []
    pop = state.pop[:n]
    pop_max = float(pop.max()) or 1.0
    trend = [int(i) for i in top_indices(pop, p.trending_len)]
    vecs = state.user_vectors(user_ids)
    pool = top_indices(pop, p.vector_pool) if n > p.vector_pool else np.arange(n)
    ctx = state.context[pool]
    norms = np.linalg.norm(ctx, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    sims = vecs @ (ctx / norms).T  # (users, pool)
    decay = math.log(2.0) / (p.user_half_life_h * _MS_PER_H)
    ids = state.item_ids
    out: list[RecList] = []
    excluded = {state.item_index[b] for b in blocked if b in state.item_index}
    for r, uid in enumerate(user_ids):
        u = state.users[uid]
        seen: Collection[int] = u.seen.keys() | excluded if excluded else u.seen
        cooc: dict[int, float] = {}
        why: dict[int, tuple[float, int]] = {}
        hsum = 0.0
        used_src: set[int] = set()
        for j, ts, w in reversed(u.history):
            if j in used_src:
                continue
            used_src.add(j)
            h = w * math.exp(-decay * (u.last_ts - ts))
            hsum += h
            for c, s in state.sim_top(j):
                if c in seen:
                    continue
                contrib = h * s
                cooc[c] = cooc.get(c, 0.0) + contrib
                if contrib > why.get(c, (0.0, -1))[0]:
                    why[c] = (contrib, j)
            if len(used_src) >= p.sources:
                break
        vrow = sims[r]
        vscore: dict[int, float] = {}
        for k in top_indices(vrow, p.vector_candidates + len(seen)):
            j = int(pool[k])
            if j not in seen:
                vscore[j] = float(vrow[k])
                if len(vscore) >= p.vector_candidates:
                    break
        scores: dict[int, float] = {}
        for j in set(cooc) | set(vscore) | {t for t in trend if t not in seen}:
            s = p.w_pop * float(pop[j]) / pop_max
            if hsum > 0:
                s += p.w_cooc * cooc.get(j, 0.0) / hsum
            s += p.w_vec * max(0.0, vscore.get(j, 0.0))
            scores[j] = s
        ranked = sorted(scores, key=lambda j: (-scores[j], j))
        slots = epsilon_greedy(
            ranked[: p.n_recs],
            ranked[p.n_recs : p.n_recs + p.explore_pool],
            p.n_recs,
            p.epsilon,
            p.seed,
            uid,
            u.n_events,
        )
        items = []
        for sl in slots:
            if sl.explore:
                reason = "exploration"
            elif sl.item in why:
                reason = f"similar to {ids[why[sl.item][1]]}"
            elif sl.item in vscore:
                reason = "close to your recent taste"
            else:
                reason = "trending"
            items.append(RecItem(ids[sl.item], round(scores.get(sl.item, 0.0), 6), sl.explore, round(sl.p, 6), reason))
        out.append(RecList(uid, u.n_events, u.last_ts, items))
    return out
