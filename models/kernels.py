"""Compiled kernels for the per-block hot paths (numba, ``nogil``: they run beside other threads).

Each kernel takes a whole block's (or chunk's) worth of flat arrays and does the per-user or
per-row loops that numpy cannot express without materialising a (users x catalogue) matrix.
They are pure functions of their inputs; ``models.ranking`` and ``models.items`` prepare the
arrays and keep the semantics, which the tests check against plain-Python references.

Compiled on first use and cached next to this file (``cache=True``), so a worker pays the
compilation once per installation, not once per start.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from models.users import CODE_BITS, CODE_MASK, HEAD, LAST_TS

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(cache=True, nogil=True)
def rank_users(
    src_ptr: np.ndarray,
    src_item: np.ndarray,
    src_w: np.ndarray,
    nb_off: np.ndarray,
    nb_len: np.ndarray,
    slab_item: np.ndarray,
    slab_score: np.ndarray,
    seen_ptr: np.ndarray,
    seen_item: np.ndarray,
    excluded: np.ndarray,
    trend: np.ndarray,
    v_ptr: np.ndarray,
    v_item: np.ndarray,
    v_score: np.ndarray,
    l_ptr: np.ndarray,
    l_item: np.ndarray,
    l_score: np.ndarray,
    has_long: bool,
    hsum: np.ndarray,
    pop_term: np.ndarray,
    w_cooc: float,
    w_vec: float,
    w_long: float,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every user's best ``k`` candidates, best first (ties: lower item number).

    User r's candidates are the neighbours of its sources (``src_item`` from ``src_ptr[r]``,
    newest first, weights ``src_w``; item j's neighbours are ``nb_len[j]`` slab entries from
    ``nb_off[j]``), its user-vector and long-term candidates (``v_*``, ``l_*``, grouped by user
    through ``*_ptr``) and the trending items, less its seen items and the excluded ones. Score:
    ``pop_term + w_cooc * cooc / hsum + taste``, where cooc sums the neighbour score times the
    source weight and taste is ``w_vec * vec`` plus, with a long-term model, ``w_long * long``
    scaled so that the user's best long-term and co-occurrence scores are equal.

    Returns (count, items, scores, source, taste), (users, k) arrays; ``source`` is the source
    contributing most (ties: the newest), or -1 where taste outweighs co-occurrence or no source
    contributed.
    """
    nu = len(hsum)
    n = len(pop_term)
    # scratch per catalogue item, zero between users (each user resets what it touched)
    # the last user row that made the item a candidate or ruled it out (seen or excluded)
    stamp = np.full(n, -1, dtype=np.int64)
    cooc = np.zeros(n)
    vec = np.zeros(n)
    lng = np.zeros(n)
    listed = np.full(n, -1, dtype=np.int64)  # per item: its position in the user's list, if a source may be named
    cand = np.empty(n + 1, dtype=np.int64)
    c_score = np.empty(n)
    c_item = np.empty(n, dtype=np.int64)
    c_cooc = np.empty(n)
    c_taste = np.empty(n)
    blocked = excluded[excluded < n]
    out_cnt = np.zeros(nu, dtype=np.int64)
    out_item = np.zeros((nu, k), dtype=np.int64)
    out_score = np.zeros((nu, k))
    out_src = np.full((nu, k), -1, dtype=np.int64)
    out_taste = np.zeros((nu, k))
    best = np.zeros(k)
    for r in range(nu):
        # ruled out before any source touches them: never candidates, so the passes over the
        # candidates need no test (their scratch scores are reset at the end)
        for q in range(seen_ptr[r], seen_ptr[r + 1]):
            stamp[seen_item[q]] = r
        for i in blocked:
            stamp[i] = r
        m = 0
        for q in range(src_ptr[r], src_ptr[r + 1]):
            h = src_w[q]
            a = nb_off[src_item[q]]
            for t in range(a, a + nb_len[src_item[q]]):
                i = slab_item[t]
                m = _touch(i, r, stamp, cand, m)
                cooc[i] += np.float64(slab_score[t]) * h
        for q in range(v_ptr[r], v_ptr[r + 1]):
            m = _touch(v_item[q], r, stamp, cand, m)
            vec[v_item[q]] = v_score[q]
        for i in trend:
            m = _touch(i, r, stamp, cand, m)
        for q in range(l_ptr[r], l_ptr[r + 1]):
            m = _touch(l_item[q], r, stamp, cand, m)
            lng[l_item[q]] = l_score[q]
        safe = hsum[r] if hsum[r] > 0 else 1.0
        scale = 1.0
        if has_long:
            cmax = 0.0
            lmax = 0.0
            for t in range(m):
                i = cand[t]
                ct = w_cooc * cooc[i] / safe
                if ct > cmax:
                    cmax = ct
                if lng[i] > lmax:
                    lmax = lng[i]
            scale = (cmax if cmax > 0 else 1.0) / (lmax if lmax > 0 else 1.0)
        for t in range(m):
            i = cand[t]
            ct = w_cooc * cooc[i] / safe
            taste = w_vec * vec[i]
            if has_long:
                taste = taste + w_long * lng[i] * scale
            c_score[t] = pop_term[i] + ct + taste
            c_item[t] = i
            c_cooc[t] = ct
            c_taste[t] = taste
        sel = _top(c_score[:m], c_item[:m], k)
        kk = len(sel)
        out_cnt[r] = kk
        for t in range(kk):
            x = sel[t]
            out_item[r, t] = c_item[x]
            out_score[r, t] = c_score[x]
            out_taste[r, t] = c_taste[x]
            if c_taste[x] <= c_cooc[x]:  # a source is named only where co-occurrence weighs most
                listed[c_item[x]] = t
        # the source contributing most to each listed item (ties: the newest): a second pass
        # over the sources, for the listed items only
        for t in range(kk):
            best[t] = 0.0
        for q in range(src_ptr[r], src_ptr[r + 1]):
            j = src_item[q]
            h = src_w[q]
            a = nb_off[j]
            for t in range(a, a + nb_len[j]):
                i = slab_item[t]
                u = listed[i]
                if u >= 0:
                    c = np.float64(slab_score[t]) * h
                    if c > best[u]:
                        best[u] = c
                        out_src[r, u] = j
        for t in range(kk):
            listed[out_item[r, t]] = -1
        for t in range(m):
            _clear(cand[t], cooc, vec, lng)
        for q in range(seen_ptr[r], seen_ptr[r + 1]):
            _clear(seen_item[q], cooc, vec, lng)
        for i in blocked:
            _clear(i, cooc, vec, lng)
    return out_cnt, out_item, out_score, out_src, out_taste


@nb.njit(cache=True, nogil=True, inline="always")
def _clear(i: int, cooc: np.ndarray, vec: np.ndarray, lng: np.ndarray) -> None:
    """Zero item ``i``'s scratch scores for the next user."""
    cooc[i] = 0.0
    vec[i] = 0.0
    lng[i] = 0.0


@nb.njit(cache=True, nogil=True, inline="always")
def _touch(i: int, r: int, stamp: np.ndarray, cand: np.ndarray, m: int) -> int:
    """Make item ``i`` a candidate of user row ``r`` (once): appended to ``cand[:m]`` without a
    branch, kept only if new to the user; returns the new length."""
    cand[m] = i
    m += stamp[i] != r
    stamp[i] = r
    return m


@nb.njit(cache=True, nogil=True, inline="always")
def _worse(s1: float, i1: int, s2: float, i2: int) -> bool:
    """Whether (score s1, item i1) ranks below (s2, i2): lower score, or a tie and a higher item."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


# Value buckets for ``_top``'s pre-selection, and the most scores one may hold for ``_sorted_best``
# to sort all of them: its insertion sort is quadratic within a bucket, and from 128 scores on
# each of its 2n buckets is narrower than one of these, so holds at most twice as many (below
# 128, n^2 is small anyway).
_BINS = 256
_CROWD = 32


@nb.njit(cache=True, nogil=True)
def _top(score: np.ndarray, item: np.ndarray, k: int, sort_few: bool = False) -> np.ndarray:
    """Positions of the k best (score descending, ties by lower item), best first.

    A heap costs a sift for every candidate that beats its root, and candidates often come
    in rising order (a pool listed by popularity, scores that follow it), so most of them do.
    With many more candidates than k, a histogram of the scores first finds the lowest bucket
    that keeps at least k above it: three branch-free passes that cost the same whatever the
    order. Nothing outside the kept buckets can be among the k best, and they usually hold
    little more than k, so the kept are sorted outright (``_sorted_best``: half the time of
    heap sifts and pops for a top 100 of 850 long-term scores); many more than k (ties, a few
    huge scores) go to the heap. With ``sort_few``, at most 2k scores (a co-occurrence row,
    bounded at twice the neighbour list) are all sorted when spread out: a third of the heap's
    time for the top 200 of MovieLens-100K's rows."""
    m = len(score)
    if m < 64 or (m <= 2 * k and not sort_few):
        return _heap_top(score, item, k)
    lo = score[0]
    hi = score[0]
    total = 0.0  # not finite if any score is not (NaN or inf): then the heap alone decides
    for t in range(m):
        lo = min(lo, score[t])
        hi = max(hi, score[t])
        total += score[t]
    s = (_BINS - 1) / (hi - lo) if hi > lo else 0.0
    if not (math.isfinite(total) and math.isfinite(s)) or s <= 0.0:
        return _heap_top(score, item, k)
    cnt = np.zeros(_BINS, dtype=np.int64)
    for t in range(m):
        cnt[int((score[t] - lo) * s)] += 1
    if m <= 2 * k:  # sort_few: nearly all are kept, sorted outright unless crowded into few buckets
        return _sorted_best(score, item, lo, hi)[:k] if cnt.max() <= _CROWD else _heap_top(score, item, k)
    b = _BINS - 1
    kept = cnt[b]
    while kept < k:
        b -= 1
        kept += cnt[b]
    where = np.empty(kept + 1, dtype=np.int64)
    n = 0
    for t in range(m):  # the same bucket expression as the histogram's: the same n == kept
        where[n] = t
        n += int((score[t] - lo) * s) >= b
    sc = np.empty(n)
    it = np.empty(n, dtype=np.int64)
    kept_lo = hi
    for t in range(n):
        sc[t] = score[where[t]]
        it[t] = item[where[t]]
        kept_lo = min(kept_lo, sc[t])
    sel = _sorted_best(sc, it, kept_lo, hi)[:k] if n <= 4 * k else _heap_top(sc, it, k)
    for t in range(len(sel)):
        sel[t] = where[sel[t]]
    return sel


@nb.njit(cache=True, nogil=True)
def _sorted_best(score: np.ndarray, item: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """All positions, best first (as ``_top``), for finite scores within [lo, hi]: a counting
    sort into 2n buckets of equal width, best bucket first, then an insertion sort, which only
    has to reorder within buckets (all of it when the scores are too close to cut apart: O(n^2),
    so for a few hundred at most)."""
    n = len(score)
    nbk = 2 * n
    s = (nbk - 1) / (hi - lo) if hi > lo else 0.0
    if not math.isfinite(s):
        s = 0.0
    start = np.zeros(nbk + 1, dtype=np.int64)
    bucket = np.empty(n, dtype=np.int64)
    for t in range(n):
        b = nbk - 1 - int((score[t] - lo) * s)
        bucket[t] = b
        start[b + 1] += 1
    for b in range(nbk):
        start[b + 1] += start[b]
    out = np.empty(n, dtype=np.int64)
    for t in range(n):
        b = bucket[t]
        out[start[b]] = t
        start[b] += 1
    for t in range(1, n):
        x = out[t]
        sx, ix = score[x], item[x]
        j = t
        while j > 0 and _worse(score[out[j - 1]], item[out[j - 1]], sx, ix):
            out[j] = out[j - 1]
            j -= 1
        out[j] = x
    return out


@nb.njit(cache=True, nogil=True)
def _heap_top(score: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """``_top`` by one pass with a min-heap of the k best so far."""
    m = len(score)
    k = min(k, m)
    heap = np.empty(k, dtype=np.int64)  # positions; heap[0] is the worst kept
    size = 0
    for t in range(m):
        s, i = score[t], item[t]
        if size < k:
            c = size  # sift up
            size += 1
            while c > 0:
                up = (c - 1) >> 1
                if not _worse(s, i, score[heap[up]], item[heap[up]]):
                    break
                heap[c] = heap[up]
                c = up
            heap[c] = t
        elif _worse(score[heap[0]], item[heap[0]], s, i):
            _sift_down(heap, size, t, score, item)
    out = np.empty(k, dtype=np.int64)
    for j in range(k - 1, -1, -1):  # pop the worst first: the best end up first
        out[j] = heap[0]
        size -= 1
        if size > 0:
            _sift_down(heap, size, heap[size], score, item)
    return out


@nb.njit(cache=True, nogil=True, inline="always")
def _sift_down(heap: np.ndarray, size: int, t: int, score: np.ndarray, item: np.ndarray) -> None:
    """Put position ``t`` at the root of ``heap[:size]`` and restore the heap order."""
    s, i = score[t], item[t]
    c = 0
    while True:
        child = 2 * c + 1
        if child >= size:
            break
        if child + 1 < size and _worse(
            score[heap[child + 1]], item[heap[child + 1]], score[heap[child]], item[heap[child]]
        ):
            child += 1
        if not _worse(score[heap[child]], item[heap[child]], s, i):
            break
        heap[c] = heap[child]
        c = child
    heap[c] = t


@nb.njit(cache=True, nogil=True)
def _next(state: np.ndarray) -> float:
    """SplitMix64 (``models.exploration.SplitMix64``): advance ``state[0]``, uniform in [0, 1)."""
    z = state[0] + _GOLDEN
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return float((z ^ (z >> np.uint64(31))) >> np.uint64(11)) / 9007199254740992.0


@nb.njit(cache=True, nogil=True)
def explore_users(
    cnt: np.ndarray, n: int, epsilon: float, seeds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``models.exploration.epsilon_greedy`` for every user at once: user r's ranking has ``cnt[r]``
    items: the first ``min(cnt[r], n)`` are its ranked items, the rest its exploration pool; its
    random stream is seeded ``seeds[r]``. Returns, per user, the slots filled and per slot the
    ranking position placed there, whether it was explored, and its propensity."""
    nu = len(cnt)
    out_n = np.zeros(nu, dtype=np.int64)
    out_item = np.zeros((nu, n), dtype=np.int64)
    out_explore = np.zeros((nu, n), dtype=np.bool_)
    out_p = np.zeros((nu, n))
    flags = np.zeros(n, dtype=np.bool_)
    state = np.zeros(1, dtype=np.uint64)
    remaining = np.zeros(max(cnt.max(), 1) if nu else 1, dtype=np.int64)  # positions of the pool not drawn yet
    for r in range(nu):
        c = cnt[r]
        n_ranked = min(c, n)
        n_rem = c - n_ranked
        remaining[:n_rem] = np.arange(n_ranked, c)
        state[0] = seeds[r]
        flags[:] = False
        if n_rem > 0 and epsilon > 0.0:
            if epsilon >= 1.0:
                flags[:] = True
            else:
                lq = math.log1p(-epsilon)
                g = int(math.log1p(-_next(state)) / lq)
                while g < n:
                    flags[g] = True
                    g += 1 + int(math.log1p(-_next(state)) / lq)
        q = 1.0 - epsilon if n_rem > 0 else 1.0
        e = 0
        s = 0
        for f in range(n):
            if flags[f] and n_rem > 0:
                at = int(_next(state) * n_rem)
                out_item[r, s] = remaining[at]
                out_explore[r, s] = True
                out_p[r, s] = epsilon / n_rem
                s += 1
                remaining[at : n_rem - 1] = remaining[at + 1 : n_rem].copy()
                n_rem -= 1
                continue
            if e < n_ranked:  # the pool and the ranked items are disjoint: nothing to skip
                out_item[r, s] = e
                out_p[r, s] = q
                s += 1
                e += 1
            elif n_rem > 0:  # nothing ranked is left: fill from the pool, with certainty
                out_item[r, s] = remaining[0]
                out_p[r, s] = 1.0
                s += 1
                remaining[: n_rem - 1] = remaining[1:n_rem].copy()
                n_rem -= 1
        out_n[r] = s
    return out_n, out_item, out_explore, out_p


@nb.njit(cache=True, nogil=True)
def user_sources(
    recs: np.ndarray, rec_ptr: np.ndarray, weights: np.ndarray, k: int, decay: float, step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every user's ``k`` most recent distinct history items, weighted by event type and recency.

    User r's record (``models.users``) is ``recs[rec_ptr[r]:rec_ptr[r + 1]]``; ``weights`` maps
    its weight codes to weights. The n-th newest source weighs ``weights[code] * step ** n *
    exp(-decay * (last event time - its time))``. Returns (offsets, items, weights, each user's
    weight sum), sources newest first.
    """
    nu = len(rec_ptr) - 1
    s_ptr = np.zeros(nu + 1, dtype=np.int64)
    s_item = np.empty(nu * k, dtype=np.int64)
    s_w = np.empty(nu * k)
    hsum = np.zeros(nu)
    n = 0
    for r in range(nu):
        a = rec_ptr[r]
        last = recs[a + LAST_TS]
        start = n
        f = 1.0
        q = rec_ptr[r + 1] - 2
        while q >= a + HEAD and n - start < k:
            j = recs[q]
            dup = False
            for t in range(start, n):
                if s_item[t] == j:
                    dup = True
                    break
            if not dup:
                x = recs[q + 1]
                h = weights[x & CODE_MASK] * f * math.exp(-decay * (last - (x >> CODE_BITS)))
                s_item[n] = j
                s_w[n] = h
                hsum[r] += h
                n += 1
                f *= step
            q -= 2
        s_ptr[r + 1] = n
    return s_ptr, s_item[:n], s_w[:n], hsum


@nb.njit(cache=True, nogil=True)
def history_items(recs: np.ndarray, rec_ptr: np.ndarray) -> np.ndarray:
    """The history items of records laid end to end (``user_sources``), oldest first per user."""
    n = 0
    for r in range(len(rec_ptr) - 1):
        n += (rec_ptr[r + 1] - rec_ptr[r] - HEAD) >> 1
    out = np.empty(n, dtype=np.int64)
    t = 0
    for r in range(len(rec_ptr) - 1):
        for q in range(rec_ptr[r] + HEAD, rec_ptr[r + 1], 2):
            out[t] = recs[q]
            t += 1
    return out


@nb.njit(cache=True, nogil=True)
def long_term_top(
    weights: np.ndarray,
    pos: np.ndarray,
    pool: np.ndarray,
    hist_ptr: np.ndarray,
    hist_item: np.ndarray,
    age_w: np.ndarray,
    seen_ptr: np.ndarray,
    seen_item: np.ndarray,
    excluded: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's best ``k`` unseen pool items with a positive long-term score (``models.longterm``):
    user r's score row is ``sum_q age_w[age] * weights[pos[hist_item[q]]]`` over its history,
    oldest first (``age``: entries after q; items outside the pool skipped), summed in float32
    in pool order as a sparse product would.
    Returns (count, catalogue items, scores), (users, k) arrays, best first."""
    nu = len(hist_ptr) - 1
    m = len(pool)
    n_pos = len(pos)
    acc = np.zeros(m, dtype=np.float32)
    blocked = np.empty(len(excluded), dtype=np.int64)  # pool positions of the excluded items
    n_blocked = 0
    for x in excluded:
        if x < n_pos and pos[x] >= 0:
            blocked[n_blocked] = pos[x]
            n_blocked += 1
    blocked = blocked[:n_blocked]
    out_cnt = np.zeros(nu, dtype=np.int64)
    out_item = np.zeros((nu, k), dtype=np.int64)
    out_score = np.zeros((nu, k))
    cols = np.empty(hist_item.size + 1, dtype=np.int64)
    vals = np.empty(hist_item.size + 1, dtype=np.float32)
    c_score = np.empty(m)
    c_item = np.empty(m, dtype=np.int64)
    for r in range(nu):
        nc = 0
        end = hist_ptr[r + 1]
        for q in range(hist_ptr[r], end):
            i = hist_item[q]
            if i < n_pos and pos[i] >= 0:
                cols[nc] = pos[i]
                vals[nc] = np.float32(age_w[end - 1 - q])
                nc += 1
        if nc == 0:
            continue
        order = np.argsort(cols[:nc], kind="mergesort")  # pool order; duplicates summed first
        acc[:] = 0.0
        t = 0
        while t < nc:
            c = cols[order[t]]
            w = vals[order[t]]
            t += 1
            while t < nc and cols[order[t]] == c:
                w += vals[order[t]]
                t += 1
            row = weights[c]
            for j in range(m):
                acc[j] += w * row[j]
        for q in range(seen_ptr[r], seen_ptr[r + 1]):  # seen and excluded items score 0: dropped
            i = seen_item[q]
            if i < n_pos and pos[i] >= 0:
                acc[pos[i]] = 0.0
        for x in blocked:
            acc[x] = 0.0
        mm = 0
        for j in range(m):  # without a branch: about half the pool is kept, unpredictably
            c_score[mm] = acc[j]
            c_item[mm] = pool[j]
            mm += acc[j] > 0
        sel = _top(c_score[:mm], c_item[:mm], k)
        out_cnt[r] = len(sel)
        for t in range(len(sel)):
            out_item[r, t] = c_item[sel[t]]
            out_score[r, t] = c_score[sel[t]]
    return out_cnt, out_item, out_score


@nb.njit(cache=True, nogil=True)
def row_neighbours(
    keys: np.ndarray,
    vals: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rkeys: np.ndarray,
    rvals: np.ndarray,
    rlo: np.ndarray,
    rhi: np.ndarray,
    row_pop: np.ndarray,
    col_norm: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``k`` neighbours of each of a batch of rows by normalised co-occurrence,
    ``c_ij / (sqrt(pop_i) * col_norm[j])``, best first, ties by lower item. Row q's entries are the non-zero ones of
    ``keys[lo[q]:hi[q]]`` and ``rkeys[rlo[q]:rhi[q]]`` (``PairCounts``' two sorted arrays, keyed
    ``row << 32 | col``), its popularity ``row_pop[q]`` (none: no neighbours). Returns (count,
    items, scores), (rows, k) arrays."""
    nr = len(row_pop)
    out_cnt = np.zeros(nr, dtype=np.int64)
    out_item = np.zeros((nr, k), dtype=np.int64)
    out_score = np.zeros((nr, k))
    width = 1
    for q in range(nr):
        width = max(width, hi[q] - lo[q] + rhi[q] - rlo[q])
    c_score = np.empty(width)
    c_item = np.empty(width, dtype=np.int64)
    for q in range(nr):
        pi = row_pop[q]
        if pi <= 0:
            continue
        si = math.sqrt(pi)
        m = _scored(keys, vals, lo[q], hi[q], col_norm, si, c_score, c_item, 0)
        m = _scored(rkeys, rvals, rlo[q], rhi[q], col_norm, si, c_score, c_item, m)
        sel = _top(c_score[:m], c_item[:m], k, True)
        out_cnt[q] = len(sel)
        for t in range(len(sel)):
            out_item[q, t] = c_item[sel[t]]
            out_score[q, t] = c_score[sel[t]]
    return out_cnt, out_item, out_score


@nb.njit(cache=True, nogil=True, inline="always")
def _scored(
    keys: np.ndarray,
    vals: np.ndarray,
    a: int,
    b: int,
    col_norm: np.ndarray,
    si: float,
    c_score: np.ndarray,
    c_item: np.ndarray,
    m: int,
) -> int:
    """Append the normalised scores of the non-zero entries ``a:b`` to ``c_score``/``c_item``
    from position ``m``; returns the new length."""
    for t in range(a, b):
        v = vals[t]
        if v == 0:
            continue
        j = keys[t] & 0xFFFFFFFF
        c_score[m] = v / max(si * col_norm[j], 1e-300)
        c_item[m] = j
        m += 1
    return m


@nb.njit(cache=True, nogil=True)
def search_sorted(keys: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """``np.searchsorted(keys, needles)`` (left side) for needles in any order, fast for sorted
    ones: each search gallops from where the previous one ended, so a sorted batch of needles
    costs about log(gap) steps each over nearby memory, not log(len(keys)) scattered ones."""
    n = len(keys)
    out = np.empty(len(needles), dtype=np.int64)
    at = 0
    for q in range(len(needles)):
        x = needles[q]
        if at > 0 and keys[at - 1] >= x:  # behind the previous needle: search all before it
            a, b = 0, at - 1
        else:  # at or after it: gallop forward
            a, b, step = at, at, 1
            while b < n and keys[b] < x:
                a = b + 1
                b += step
                step <<= 1
            b = min(b, n)
        while a < b:  # the first position in [a, b] whose key is >= x (b: n, or one that is)
            mid = (a + b) >> 1
            if keys[mid] < x:
                a = mid + 1
            else:
                b = mid
        out[q] = a
        at = a
    return out


@nb.njit(cache=True, nogil=True)
def add_found(keys: np.ndarray, vals: np.ndarray, uk: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vals[key] += v`` for the sorted unique ``uk`` found in the sorted ``keys``: (found mask,
    the keys found whose value was zero before)."""
    pos = search_sorted(keys, uk)
    n = len(keys)
    hit = np.zeros(len(uk), dtype=np.bool_)
    fresh = np.empty(len(uk), dtype=np.int64)
    nf = 0
    for q in range(len(uk)):
        p = pos[q]
        if p < n and keys[p] == uk[q]:
            hit[q] = True
            fresh[nf] = uk[q]
            nf += vals[p] == 0
            vals[p] += v[q]
    return hit, fresh[:nf]


@nb.njit(cache=True, nogil=True)
def merge_entries(
    keys: np.ndarray, vals: np.ndarray, new_keys: np.ndarray, new_vals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The entries of two sorted key arrays with no key in common, as one sorted pair of arrays:
    the runs of ``keys`` between the new keys are copied whole (as ``np.insert`` would, in one
    pass instead of its several, with no index arrays), so it costs little more than a copy."""
    n, m = len(keys), len(new_keys)
    at = search_sorted(keys, new_keys)
    out_k = np.empty(n + m, dtype=np.int64)
    out_v = np.empty(n + m, dtype=vals.dtype)
    prev = 0
    for j in range(m):
        p = at[j]
        out_k[prev + j : p + j] = keys[prev:p]
        out_v[prev + j : p + j] = vals[prev:p]
        out_k[p + j] = new_keys[j]
        out_v[p + j] = new_vals[j]
        prev = p
    out_k[prev + m :] = keys[prev:]
    out_v[prev + m :] = vals[prev:]
    return out_k, out_v


@nb.njit(cache=True, nogil=True)
def sum_by_key(keys: np.ndarray, inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``keys`` (``row << 32 | col``, both parts non-negative), sorted, and the sum
    of each one's ``inc`` in input order: what ``np.unique(return_inverse=True)`` and
    ``np.bincount`` give, bit for bit, in a quarter of their time on a block's 72,000 pairs.
    A stable LSD radix sort of the keys packed as ``row * (max col + 1) + col``, 11 bits a pass
    (two passes for a catalogue of 2,000 items, four for 100,000)."""
    n = len(keys)
    if n == 0:
        return keys[:0].copy(), inc[:0].copy()
    rmax, cmax = 0, 0
    for k in range(n):
        rmax = max(rmax, keys[k] >> 32)
        cmax = max(cmax, keys[k] & 0xFFFFFFFF)
    span = cmax + 1
    top = rmax * span + cmax
    bits = 1
    while (1 << bits) <= top:
        bits += 1
    passes = (bits + 10) // 11
    width = (bits + passes - 1) // passes
    mask = (1 << width) - 1
    packed = np.empty(n, dtype=np.int64)
    for k in range(n):
        packed[k] = (keys[k] >> 32) * span + (keys[k] & 0xFFFFFFFF)
    order = np.arange(n)
    spare = np.empty(n, dtype=np.int64)
    count = np.empty(mask + 2, dtype=np.int64)
    shift = 0
    for _ in range(passes):
        count[:] = 0
        for k in range(n):
            count[((packed[order[k]] >> shift) & mask) + 1] += 1
        for b in range(1, mask + 2):
            count[b] += count[b - 1]
        for k in range(n):
            o = order[k]
            d = (packed[o] >> shift) & mask
            spare[count[d]] = o
            count[d] += 1
        order, spare = spare, order
        shift += width
    out_k = np.empty(n, dtype=np.int64)
    out_v = np.empty(n, dtype=inc.dtype)
    m = -1
    prev = -1
    for k in range(n):
        o = order[k]
        if packed[o] != prev:
            m += 1
            prev = packed[o]
            out_k[m] = keys[o]
            out_v[m] = inc[o]
        else:
            out_v[m] += inc[o]
    return out_k[: m + 1], out_v[: m + 1]


@nb.njit(cache=True, nogil=True)
def join_json_lists(
    idx: np.ndarray, cnt: np.ndarray, quoted: np.ndarray, q_off: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row q's first ``cnt[q]`` ids of ``idx`` as a JSON array (``[`` the quoted ids ``,``-joined
    ``]``, as orjson writes a list of strings), every row's end to end: (bytes, row offsets).
    Id j's quoted form is ``quoted[q_off[j]:q_off[j + 1]]`` (``models.arrays.PackedStrings``)."""
    n = len(cnt)
    total = 0
    for q in range(n):
        total += 2 + max(cnt[q] - 1, 0)
        for t in range(cnt[q]):
            j = idx[q, t]
            total += q_off[j + 1] - q_off[j]
    out = np.empty(total, dtype=np.uint8)
    off = np.empty(n + 1, dtype=np.int64)
    p = 0
    for q in range(n):
        off[q] = p
        out[p] = _OPEN
        p += 1
        for t in range(cnt[q]):
            if t:
                out[p] = _COMMA
                p += 1
            j = idx[q, t]
            for b in range(q_off[j], q_off[j + 1]):
                out[p] = quoted[b]
                p += 1
        out[p] = _CLOSE
        p += 1
    off[n] = p
    return out, off


@nb.njit(cache=True, nogil=True)
def add_context(
    context: np.ndarray,
    slots: np.ndarray,
    starts: np.ndarray,
    cols: np.ndarray,
    inc: np.ndarray,
    index_vecs: np.ndarray,
) -> None:
    """``context[slots[r]] += sum_k inc[k] * index_vecs[cols[k]]`` over row r's entries, which
    run from ``starts[r]`` to the next start (float32, summed per row in entry order first)."""
    d = context.shape[1]
    acc = np.zeros(d, dtype=np.float32)
    n = len(cols)
    for r in range(len(starts)):
        acc[:] = 0.0
        end = starts[r + 1] if r + 1 < len(starts) else n
        for k in range(starts[r], end):
            w = np.float32(inc[k])
            v = index_vecs[cols[k]]
            for j in range(d):
                acc[j] += w * v[j]
        row = context[slots[r]]
        for j in range(d):
            row[j] += acc[j]


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_QUOTE, _COMMA, _BACKSLASH, _OPEN, _CLOSE = 34, 44, 92, 91, 93


@nb.njit(cache=True, nogil=True, inline="always")
def _fnv(buf: np.ndarray, a: int, b: int) -> np.uint64:
    """FNV-1a of ``buf[a:b]``."""
    h = _FNV_OFFSET
    for t in range(a, b):
        h = (h ^ np.uint64(buf[t])) * _FNV_PRIME
    return h


@nb.njit(cache=True, nogil=True)
def hash_ids(h_key: np.ndarray, h_code: np.ndarray, id_buf: np.ndarray, id_off: np.ndarray, first: int) -> None:
    """Enter ids ``first:`` (id c is ``id_buf[id_off[c]:id_off[c + 1]]``, UTF-8) into the
    open-addressing table ``h_key``/``h_code`` (power-of-two size, -1: an empty slot)."""
    mask = len(h_key) - 1
    for c in range(first, len(id_off) - 1):
        h = _fnv(id_buf, id_off[c], id_off[c + 1])
        s = np.int64(h & np.uint64(mask))
        while h_code[s] >= 0:
            s = (s + 1) & mask
        h_key[s] = h
        h_code[s] = c


@nb.njit(cache=True, nogil=True)
def json_id_codes(
    buf: np.ndarray,
    doc_off: np.ndarray,
    h_key: np.ndarray,
    h_code: np.ndarray,
    id_buf: np.ndarray,
    id_off: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The numbers of the ids in each of the documents laid end to end in ``buf`` (document d is
    ``buf[doc_off[d]:doc_off[d + 1]]``), by the table of ``hash_ids`` (each match checked byte
    for byte): (codes of the documents decoded, end to end; per document its count, or -1 where
    the caller must decode it the general way). A document is a JSON array of strings as orjson
    writes it (no spaces); one with an escape or an id not in the table is left to the caller."""
    nd = len(doc_off) - 1
    out = np.empty(len(buf) // 3 + nd, dtype=np.int32)  # an id takes at least three bytes: "",
    cnt = np.full(nd, -1, dtype=np.int64)
    k = 0
    for d in range(nd):
        m = _json_ids_into(buf, doc_off[d], doc_off[d + 1], h_key, h_code, id_buf, id_off, out, k)
        if m >= 0:
            cnt[d] = m
            k += m
    return out[:k], cnt


@nb.njit(cache=True, nogil=True, inline="always")
def _json_ids_into(
    doc: np.ndarray,
    start: int,
    end: int,
    h_key: np.ndarray,
    h_code: np.ndarray,
    id_buf: np.ndarray,
    id_off: np.ndarray,
    out: np.ndarray,
    k0: int,
) -> int:
    """Decode the array ``doc[start:end]`` into ``out[k0:]``: how many ids, or -1 (see
    ``json_id_codes``)."""
    if end - start < 2 or doc[start] != _OPEN or doc[end - 1] != _CLOSE:
        return -1
    if end - start == 2:
        return 0
    mask = len(h_key) - 1
    k = k0
    p = start + 1
    while True:
        if doc[p] != _QUOTE:
            return -1
        a = p + 1
        q = a
        h = _FNV_OFFSET  # FNV-1a (``_fnv``) of the id, taken on the way to its closing quote
        while q < end:
            b = doc[q]
            if b == _QUOTE:
                break
            if b == _BACKSLASH:
                return -1
            h = (h ^ np.uint64(b)) * _FNV_PRIME
            q += 1
        if q >= end - 1:
            return -1
        s = np.int64(h & np.uint64(mask))
        code = -1
        while h_code[s] >= 0 and code < 0:
            c = h_code[s]
            if h_key[s] == h and id_off[c + 1] - id_off[c] == q - a:
                code = c
                base = id_off[c] - a
                for t in range(a, q):
                    if id_buf[base + t] != doc[t]:
                        code = -1
                        break
            s = (s + 1) & mask
        if code < 0:
            return -1
        out[k] = code
        k += 1
        p = q + 1
        if p == end - 1:
            return k - k0
        if doc[p] != _COMMA:
            return -1
        p += 1


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the models pass, so
    that a worker pays it at start, before it joins its group, and not in its first block: the
    first compilation after an install takes seconds."""
    i0, f0 = np.zeros(0, dtype=np.int64), np.zeros(0)
    ptr = np.zeros(2, dtype=np.int64)
    one = np.zeros(1)
    rank_users(
        ptr,
        i0,
        f0,
        i0,
        i0,
        np.zeros(0, dtype=np.int32),
        np.zeros(0, dtype=np.float32),
        ptr,
        i0,
        i0,
        i0,
        ptr,
        i0,
        f0,
        ptr,
        i0,
        f0,
        False,
        one,
        one,
        1.0,
        0.0,
        0.5,
        1,
    )
    explore_users(np.zeros(1, dtype=np.int64), 1, 0.1, np.zeros(1, dtype=np.uint64))
    rec, rec_ptr = np.zeros(HEAD, dtype=np.int64), np.array([0, HEAD], dtype=np.int64)
    user_sources(rec, rec_ptr, one, 1, 0.0, 1.0)
    history_items(rec, rec_ptr)
    weights = np.zeros((1, 1), dtype=np.float32)
    frozen = np.frombuffer(weights.tobytes(), dtype=np.float32).reshape(1, 1)  # as a published model is read
    for w in (weights, frozen):
        long_term_top(w, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), ptr, i0, one, ptr, i0, i0, 1)
    row_neighbours(i0, f0, i0, i0, i0, f0, i0, i0, f0, f0, 1)
    ctx = np.zeros((1, 1), dtype=np.float32)
    add_context(ctx, i0, i0, i0, f0, ctx)
    search_sorted(i0, i0)
    add_found(i0, f0, i0, f0)
    merge_entries(i0, f0, i0, f0)
    sum_by_key(i0, f0)
    join_json_lists(np.zeros((0, 1), dtype=np.int64), i0, np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64))
    h_key, h_code = np.zeros(2, dtype=np.uint64), np.full(2, -1, dtype=np.int64)
    id_buf, id_off = np.array([ord("a")], dtype=np.uint8), np.array([0, 1], dtype=np.int64)  # as IdCodes keeps them
    hash_ids(h_key, h_code, id_buf, id_off, 0)
    doc, doc_off = np.frombuffer(b'["a"]', dtype=np.uint8), np.array([0, 5], dtype=np.int64)
    json_id_codes(doc, doc_off, h_key, h_code, id_buf, id_off)
