"""Partition-local incremental state: users, item popularity, co-occurrence and item vectors.

One ``PartitionState`` holds everything learned from the events of one Kafka partition. It is a
plain picklable value: the worker snapshots it together with the offset it reflects, and a restore
is ``pickle.loads``. Updates depend only on the events and their order (event time drives every
decay), so replaying the same log gives the same state.

Decay uses *forward decay* (Cormode et al., 2009): an event at time ``t`` adds
``w * exp(lam * (t - landmark))``. Every stored weight is then the decayed sum scaled by one common
factor, so comparisons between items need no per-read decay, increments commute, and old counts
fade relative to new ones. The landmark moves forward (``_rebase``) before the scale can overflow.

Item vectors are a random-indexing sketch of co-occurrence: every item has a fixed random
Gaussian *index* vector (seeded from its id), and its *context* vector accumulates the index
vectors of the items it co-occurs with, weighted like the counts. The cosine of two context
vectors estimates the cosine of the two items' full (unpruned) co-occurrence rows. A user vector
is the type-weighted, recency-decayed sum of the normalised context vectors of the user's history.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, fields
from itertools import chain, islice

import numpy as np
import scipy.sparse as sp

from models.events import Event
from models.longterm import PROFILE_LEN, FitInput, ItemRegression, fit
from models.params import ModelParams

_FIRST_FIT = 1000  # events before the first long-term fit (or long_refit_events, if fewer)
_DENSE_PAIRS = 4096  # below this many pair updates, the dense context update is faster
_REBASE_AT = 60.0  # rebase when the forward-decay exponent passes this (exp(60) ~ 1e26)
_MS_PER_H = 3_600_000.0


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` of str is salted)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class UserState:
    """A user's bounded recent history ``(item, ts, weight)``, seen items, and event count."""

    __slots__ = ("history", "win_items", "win_sw", "seen", "seen_arr", "n_events", "last_ts", "vec", "vec_ts")

    def __init__(self, history_len: int) -> None:
        self.history: deque[tuple[int, int, float]] = deque(maxlen=history_len)
        # the pairing window, kept as two flat lists because the hot loop zips over them
        self.win_items: list[int] = []
        self.win_sw: list[float] = []
        self.seen: dict[int, None] = {}  # insertion-ordered set, so the oldest can be forgotten
        self.seen_arr = array("q")  # the same items in the same order, readable by numpy without a copy
        self.n_events = 0  # also the list version: monotonic, and the same on every replay
        self.last_ts = 0
        # decayed, type-weighted sum of unit item vectors, as of event time ``vec_ts``
        self.vec: np.ndarray | None = None
        self.vec_ts = 0


@dataclass
class BatchEffect:
    """What a batch changed: users in first-touch order and items whose co-occurrence moved."""

    users: list[str] = field(default_factory=list)
    items: set[int] = field(default_factory=set)
    applied: int = 0
    duplicates: int = 0


class PartitionState:
    """All model state for one partition; ``apply`` folds a batch of events in."""

    def __init__(self, params: ModelParams) -> None:
        self.params = params
        self.lam = math.log(2.0) / (params.half_life_h * _MS_PER_H)
        self.landmark: int | None = None
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        self.pop = np.zeros(0, dtype=np.float64)
        self.index_vecs = np.zeros((0, params.dim), dtype=np.float32)
        self.context = np.zeros((0, params.dim), dtype=np.float32)
        self.unit = np.zeros((0, params.dim), dtype=np.float32)  # context rows scaled to unit length
        self.cooc: list[dict[int, float]] = []
        self.users: OrderedDict[str, UserState] = OrderedDict()
        self.recent_event_ids: dict[str, None] = {}
        # item -> (neighbour indices, scores, row mass when computed); see ``sim_top``
        self.sim_cache: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.row_mass = np.zeros(0, dtype=np.float64)  # co-occurrence weight ever added to each row
        self.max_ts = 0
        self.events_applied = 0
        # the long-term model (``models.longterm``): the fitted one, and the next one, whose
        # inputs were taken at one event count and which is installed at a later one
        self.long: ItemRegression | None = None
        self.long_next_fit = min(params.long_refit_events, _FIRST_FIT)
        self.long_pending: tuple[int, FitInput] | None = None
        self._long_future: Future[ItemRegression] | None = None
        # where fits run; None: in ``apply`` itself. Not part of the state (not pickled).
        self.executor: Executor | None = None

    _STRUCTURAL = ("dim", "seed", "half_life_h")

    def reconfigure(self, params: ModelParams) -> list[str]:
        """Adopt new settings on a restored state; returns the names that changed.

        Ranking and bounds may change freely. ``dim`` and ``seed`` (item vectors) and
        ``half_life_h`` (the scale of every stored weight) cannot: the state would mix two
        incompatible bases, so this raises instead.
        """
        old = self.params
        changed = [f.name for f in fields(ModelParams) if getattr(old, f.name) != getattr(params, f.name)]
        bad = [n for n in changed if n in self._STRUCTURAL]
        if bad:
            raise ValueError(
                f"the saved state was built with {', '.join(f'{n}={getattr(old, n)}' for n in bad)}; it cannot "
                f"continue with {', '.join(f'{n}={getattr(params, n)}' for n in bad)}. Restore those settings, "
                "or delete the snapshot to rebuild the state from the log."
            )
        self.params = params
        return changed

    def __getstate__(self) -> dict[str, object]:
        """A running fit is left out; a restored state fits again from the same inputs, at the
        same event count, so it ranks as an uninterrupted one."""
        d = self.__dict__.copy()
        d["_long_future"] = None
        d["executor"] = None
        return d

    def __setstate__(self, d: dict[str, object]) -> None:
        self.__dict__.update(d)
        if "long" not in d:  # a snapshot from before the long-term model
            self.long, self.long_pending = None, None
            self.long_next_fit = min(self.params.long_refit_events, _FIRST_FIT)

    # -- items ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def _item(self, item_id: str) -> int:
        idx = self.item_index.get(item_id)
        if idx is not None:
            return idx
        idx = len(self.item_ids)
        if idx >= len(self.pop):
            self._grow(max(1024, 2 * len(self.pop)))
        self.item_ids.append(item_id)
        self.item_index[item_id] = idx
        self.cooc.append({})
        rng = np.random.default_rng(stable_hash(self.params.seed, "item", item_id))
        self.index_vecs[idx] = rng.standard_normal(self.params.dim).astype(np.float32) / math.sqrt(self.params.dim)
        return idx

    def _grow(self, cap: int) -> None:
        n, d = len(self.pop), self.params.dim
        pop = np.zeros(cap, dtype=np.float64)
        pop[:n] = self.pop
        iv = np.zeros((cap, d), dtype=np.float32)
        iv[:n] = self.index_vecs
        cv = np.zeros((cap, d), dtype=np.float32)
        cv[:n] = self.context
        un = np.zeros((cap, d), dtype=np.float32)
        un[:n] = self.unit
        rm = np.zeros(cap, dtype=np.float64)
        rm[:n] = self.row_mass
        self.pop, self.index_vecs, self.context, self.unit, self.row_mass = pop, iv, cv, un, rm

    # -- decay ---------------------------------------------------------------------------------
    def _scale(self, ts: int) -> float:
        if self.landmark is None:
            self.landmark = ts
        x = self.lam * (ts - self.landmark)
        if x > _REBASE_AT:
            self._rebase(ts)
            x = 0.0
        return math.exp(x)

    def _rebase(self, ts: int) -> None:
        """Move the landmark to ``ts``: rescale every stored weight by the same factor."""
        assert self.landmark is not None
        f = math.exp(-self.lam * (ts - self.landmark))
        self.landmark = ts
        self.pop *= f
        self.row_mass *= f  # unit vectors are scale-free: unchanged
        self.sim_cache.clear()
        self.context *= np.float32(f)
        for row in self.cooc:
            for k in row:
                row[k] *= f

    def scale_now(self) -> float:
        """The forward-decay factor of the newest event: stored weights / weights as of now."""
        return 1.0 if self.landmark is None else math.exp(self.lam * (self.max_ts - self.landmark))

    def decayed_pop(self) -> np.ndarray:
        """Popularity at the newest event time, in type-weighted events."""
        n = self.n_items
        if self.landmark is None:
            return self.pop[:n].copy()
        return self.pop[:n] * math.exp(-self.lam * (self.max_ts - self.landmark))

    # -- updates -------------------------------------------------------------------------------
    def apply(self, events: Iterable[Event]) -> BatchEffect:
        """Fold events in, in order. Duplicate ``event_id``s are skipped.

        A new event of item i pairs with each of the user's last ``pair_window`` items j and adds
        ``scale(t) * sqrt(w_i * w_j)`` to both ``cooc[i][j]`` and ``cooc[j][i]``.
        """
        p = self.params
        tw = p.type_weights
        window = p.pair_window
        cap, keep = 2 * p.neighbours, p.neighbours
        cooc = self.cooc
        pop = self.pop
        ev_i: list[int] = []
        ev_gsw: list[float] = []
        ev_js: list[list[int]] = []
        ev_sws: list[list[float]] = []
        eff = BatchEffect()
        items = eff.items
        touched: dict[str, None] = {}
        uv_user: list[str] = []
        uv_item: list[int] = []
        uv_ts: list[int] = []
        uv_w: list[float] = []
        users = self.users
        seen_ids = self.recent_event_ids
        pd = p.pair_decay
        dfac = [pd**d for d in range(window - 1, -1, -1)]  # oldest window slot first
        for ev in events:
            if ev.event_id is not None:
                if ev.event_id in seen_ids:
                    eff.duplicates += 1
                    continue
                seen_ids[ev.event_id] = None
                if len(seen_ids) > p.dedupe_window:
                    del seen_ids[next(iter(seen_ids))]
            w = tw[ev.type]
            sw = math.sqrt(w)
            i = self._item(ev.item_id)
            if self.pop is not pop:
                pop = self.pop  # the arrays grew
            g = self._scale(ev.ts)
            pop[i] += w * g
            u = users.get(ev.user_id)
            if u is None:
                u = users[ev.user_id] = UserState(p.history_len)
                if len(users) > p.max_users:
                    users.popitem(last=False)
            else:
                users.move_to_end(ev.user_id)
            wi, ws = u.win_items, u.win_sw
            if wi:
                row_i = cooc[i]
                gsw = g * sw
                if pd != 1.0:  # nearer pairs weigh more: the newest window item is 1 step away
                    ws = [x * f for x, f in zip(ws, dfac[-len(ws) :], strict=True)]
                for j, swj in zip(wi, ws, strict=True):
                    if j == i:
                        continue
                    inc = gsw * swj
                    row_i[j] = row_i.get(j, 0.0) + inc
                    row_j = cooc[j]
                    row_j[i] = row_j.get(i, 0.0) + inc
                    if len(row_j) > cap:
                        _prune(row_j, keep)
                if len(row_i) > cap:
                    _prune(row_i, keep)
                ev_i.append(i)
                ev_gsw.append(gsw)
                ev_js.append(wi[:])
                ev_sws.append(ws[:])
                items.update(wi)
                items.add(i)
                ws = u.win_sw
            wi.append(i)
            ws.append(sw)
            if len(wi) > window:
                del wi[0], ws[0]
            u.history.append((i, ev.ts, w))
            if i not in u.seen:
                u.seen[i] = None
                u.seen_arr.append(i)
                if len(u.seen) > p.max_seen:
                    del u.seen[next(iter(u.seen))]
                    del u.seen_arr[0]
            u.n_events += 1
            if ev.ts > u.last_ts:
                u.last_ts = ev.ts
            if ev.ts > self.max_ts:
                self.max_ts = ev.ts
            touched[ev.user_id] = None
            uv_user.append(ev.user_id)
            uv_item.append(i)
            uv_ts.append(ev.ts)
            uv_w.append(w)
            eff.applied += 1
        self.events_applied += eff.applied
        if ev_i:
            self._update_context(ev_i, ev_gsw, ev_js, ev_sws)
        if uv_user:
            self._update_user_vectors(list(touched), uv_user, uv_item, uv_ts, uv_w)
        eff.users = [uid for uid in touched if uid in users]
        if p.w_long > 0 and eff.applied:
            self._long_term()
        return eff

    def _long_term(self) -> None:
        """Install a fit once the stream reaches its install point; take the next fit's inputs
        after each quarter's growth of the stream, at most every ``long_refit_events`` events. A
        fit is installed half a period after its inputs were taken, whether it ran on the
        executor or runs here now: the lists depend only on the events, not on how long a fit
        took. If the executor fails (at submit or in the fit), the fit runs here instead."""
        p = self.params
        if self.long_pending is not None and self.events_applied >= self.long_pending[0]:
            fut, inp = self._long_future, self.long_pending[1]
            try:
                self.long = fut.result() if fut is not None else fit(inp)
            except np.linalg.LinAlgError:
                pass  # numerically singular (it should not be, with lam > 0): keep the current model
            except Exception:  # the executor failed (e.g. its process died): fit here instead
                self.long = fit(inp)
            self.long_pending, self._long_future = None, None
        if self.long_pending is None and self.events_applied >= self.long_next_fit:
            # young models change fastest: refit after every quarter's growth of the stream,
            # at most every long_refit_events
            every = max(min(p.long_refit_events, self.events_applied // 4), 1)
            inp = self._fit_input()
            self.long_next_fit = self.events_applied + every
            self.long_pending = (self.events_applied + max(every // 2, 1), inp)
            if self.executor is not None:
                try:
                    self._long_future = self.executor.submit(fit, inp)
                except Exception:  # e.g. a broken process pool: fitted here at the install point
                    self._long_future = None

    def _fit_input(self) -> FitInput:
        """X for the next fit: the newest ``PROFILE_LEN`` items of the ``long_users`` most recently
        active users, over the ``long_items`` most popular items."""
        p = self.params
        n = self.n_items
        pool = np.argsort(-self.pop[:n], kind="stable")[: p.long_items]
        pos = np.full(n, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        for r, u in enumerate(islice(reversed(self.users.values()), p.long_users)):
            q = pos[np.frombuffer(u.seen_arr, dtype=np.int64)[-PROFILE_LEN:]]
            q = q[q >= 0]
            cols.append(q)
            rows.append(np.full(len(q), r, dtype=np.int64))
        return FitInput(
            pool,
            np.concatenate(rows) if rows else _EMPTY_I,
            np.concatenate(cols) if cols else _EMPTY_I,
            len(rows),
            n,
            p.long_lambda,
        )

    def _update_context(
        self, ev_i: list[int], ev_gsw: list[float], ev_js: list[list[int]], ev_sws: list[list[float]]
    ) -> None:
        """context[i] += inc * index[j] and context[j] += inc * index[i] for every new pair, batched."""
        n = self.n_items
        lens = np.fromiter(map(len, ev_js), dtype=np.int64, count=len(ev_js))
        rows = np.repeat(np.asarray(ev_i, dtype=np.int64), lens)
        cols = np.fromiter(chain.from_iterable(ev_js), dtype=np.int64, count=int(lens.sum()))
        vals = np.repeat(np.asarray(ev_gsw), lens) * np.fromiter(
            chain.from_iterable(ev_sws), dtype=np.float64, count=int(lens.sum())
        )
        keep = rows != cols
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        r2, c2, v2 = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([vals, vals])
        self.row_mass[:n] += np.bincount(r2, weights=v2, minlength=n)
        # only the rows and columns this batch touched: cost grows with the batch, not the catalogue
        # only the rows this batch touched: cost grows with the batch, not with the catalogue.
        # Small batches (live traffic) gather rows densely; large ones (catch-up) go through a
        # sparse product. Which path runs depends only on the batch, so replays stay exact.
        if len(v2) <= _DENSE_PAIRS:
            order = np.argsort(r2, kind="stable")
            r2, c2, v2 = r2[order], c2[order], v2[order]
            ur, starts = np.unique(r2, return_index=True)
            delta = np.add.reduceat(self.index_vecs[c2] * v2[:, None].astype(np.float32), starts, axis=0)
        else:
            ur, rinv = np.unique(r2, return_inverse=True)
            uc, cinv = np.unique(c2, return_inverse=True)
            m = sp.csr_matrix((v2, (rinv, cinv)), shape=(len(ur), len(uc)))
            delta = (m @ self.index_vecs[uc].astype(np.float64)).astype(np.float32)
        ctx = self.context[ur] + delta
        self.context[ur] = ctx
        norms = np.linalg.norm(ctx, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        self.unit[ur] = ctx / norms

    # -- reads ---------------------------------------------------------------------------------
    def sim_top(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i``'s neighbours (indices, scores) by cosine-normalised co-occurrence, best first.

        ``c_ij / sqrt(pop_i * pop_j)`` is scale-free, so the forward-decay factor cancels. Lists
        are cached and recomputed once more than ``sim_refresh`` of the row's weight is new since
        they were computed (a bounded staleness that keeps per-event work small). The cache is
        part of the state and of its snapshot, so a restored worker ranks as an uninterrupted one.
        """
        hit = self.sim_cache.get(i)
        mass = float(self.row_mass[i])
        if hit is not None and mass <= hit[2] * (1.0 + self.params.sim_refresh):
            return hit[0], hit[1]
        idx, sc = self.compute_sim(i)
        self.sim_cache[i] = (idx, sc, mass)
        return idx, sc

    def compute_sim(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``sim_top`` computed now, without the cache."""
        row = self.cooc[i]
        if not row or self.pop[i] <= 0:
            return _EMPTY_I, _EMPTY_F
        keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        vals = np.fromiter(row.values(), dtype=np.float64, count=len(row))
        beta = self.params.sim_beta
        pk = self.pop[keys]
        norm = np.sqrt(pk) if beta == 0.5 else pk**beta * self.scale_now() ** (0.5 - beta)
        s = vals / np.maximum(math.sqrt(self.pop[i]) * norm, 1e-300)
        top = _top_k(s, self.params.sim_list_len)
        return keys[top], s[top]

    def _update_user_vectors(
        self, uids: list[str], ev_user: list[str], ev_item: list[int], ev_ts: list[int], ev_w: list[float]
    ) -> None:
        """u(T) = u(T0) * exp(-mu (T - T0)) + sum_k w_k exp(-mu (T - t_k)) unit[i_k], per user, batched.

        ``T`` is the user's newest event time. Item vectors are taken as they are at the end of
        the batch an event arrived in, so a user vector costs O(dim) per event, not a history scan.
        """
        mu = math.log(2.0) / (self.params.user_half_life_h * _MS_PER_H)
        users = [self.users.get(u) for u in uids]
        row = {u: r for r, u in enumerate(uids)}
        ux = np.fromiter((row[u] for u in ev_user), dtype=np.int64, count=len(ev_user))
        last = np.fromiter(
            (u.last_ts if u is not None else self.max_ts for u in users), dtype=np.float64, count=len(uids)
        )
        coef = np.asarray(ev_w) * np.exp(-mu * (last[ux] - np.asarray(ev_ts, dtype=np.float64)))
        order = np.argsort(ux, kind="stable")
        ux_s = ux[order]
        starts = np.flatnonzero(np.concatenate(([True], ux_s[1:] != ux_s[:-1])))
        items = np.asarray(ev_item, dtype=np.int64)[order]
        sums = np.add.reduceat(self.unit[items] * coef[order].astype(np.float32)[:, None], starts, axis=0)
        for r, s in zip(ux_s[starts].tolist(), sums, strict=True):
            u = users[r]
            if u is None:  # evicted within this batch
                continue
            if u.vec is None:
                u.vec = s
            else:
                u.vec = u.vec * np.float32(math.exp(-mu * (u.last_ts - u.vec_ts))) + s
            u.vec_ts = u.last_ts

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """Unit-length vectors of ``user_ids`` (rows); zero rows for users without one."""
        d = self.params.dim
        out = np.zeros((len(user_ids), d), dtype=np.float32)
        for r, uid in enumerate(user_ids):
            v = self.users[uid].vec
            if v is not None:
                out[r] = v
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        unit: np.ndarray = out / norms
        return unit


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values, best first; ties keep the lower position."""
    order = np.argsort(-s, kind="stable")
    return order[:k]


def _prune(row: dict[int, float], keep: int) -> None:
    """Keep the ``keep`` heaviest entries; a stable sort, so ties keep insertion order and the
    same events always prune the same way."""
    keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
    vals = np.fromiter(row.values(), dtype=np.float64, count=len(row))
    top = np.argsort(-vals, kind="stable")[:keep]
    row.clear()
    row.update(zip(keys[top].tolist(), vals[top].tolist(), strict=True))
