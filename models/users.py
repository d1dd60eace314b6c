"""The user stage's state: per user, a bounded recent history, seen items and a vector.

One ``UserPartition`` holds what was learned from the events of one partition of the events
topic (producers key events by user, so a user lives in one partition). It depends on those
events alone, never on other partitions or on the item stage: a plain picklable value that a
worker snapshots with the offset it reflects, that a replay rebuilds exactly, and that moves
between workers with its partition.

Item-level learning is not done here: each block's ``apply`` returns the block's item-level
deltas (``models.deltas``), popularity increments and co-occurrence pairs, which the item stage
(``models.items``) aggregates over every partition.

A user vector is the type-weighted, recency-decayed sum of the fixed random *index* vectors of
the user's items (random indexing, seeded by item id), so it too depends only on the user's
events. Its inner product with an item's unit *context* vector (the item stage's sum of the
index vectors of the item's co-occurring items) estimates how strongly the item co-occurs with
the user's decayed history.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from models.deltas import BlockDeltas, item_partition
from models.events import Event, Forget
from models.hashing import stable_hash
from models.params import ModelParams

if TYPE_CHECKING:
    from models.table import ItemTable

_MS_PER_H = 3_600_000.0


def index_vector(seed: int, item_id: str, dim: int) -> np.ndarray:
    """An item's fixed random index vector: Gaussian, of expected unit length, seeded by its id."""
    rng = np.random.default_rng(stable_hash(seed, "item", item_id))
    return (rng.standard_normal(dim) / math.sqrt(dim)).astype(np.float32)


class UserState:
    """A user's bounded recent history ``(item, ts, weight)``, seen items, and event count."""

    __slots__ = ("uid", "history", "win_items", "win_sw", "seen", "seen_arr", "n_events", "last_ts", "vec", "vec_ts")

    def __init__(self, uid: str = "") -> None:
        self.uid = uid  # the user's id, the same string object as their key in ``users``
        # at most ``history_len`` entries, oldest first: a list, not a deque(maxlen), because a
        # deque allocates a block of 64 slots (about 600 bytes) for the first entry
        self.history: list[tuple[int, int, float]] = []
        # the pairing window, kept as two flat lists because the hot loop zips over them
        self.win_items: list[int] = []
        self.win_sw: list[float] = []
        self.seen: dict[int, None] = {}  # insertion-ordered set, so the oldest can be forgotten
        self.seen_arr = array("q")  # the same items in the same order, readable by numpy without a copy
        self.n_events = 0  # also the list version: monotonic, and the same on every replay
        self.last_ts = 0
        # decayed, type-weighted sum of item index vectors, as of event time ``vec_ts``
        self.vec: np.ndarray | None = None
        self.vec_ts = 0


@dataclass
class BatchEffect:
    """What a batch changed: users in first-touch order, and the item-level deltas it produced."""

    users: list[str] = field(default_factory=list)
    deltas: BlockDeltas | None = None
    applied: int = 0
    duplicates: int = 0
    forgotten: list[str] = field(default_factory=list)  # the users of its ``Forget``s, known or not, in order


class UserPartition:
    """All user state of one partition; ``apply`` folds a batch of events in.

    Items are numbered per partition (``item_ids``), so that a snapshot is self-contained; the
    ranking maps them to the process's catalogue (``ItemTable``) with ``catalogue_map``.
    """

    def __init__(self, params: ModelParams) -> None:
        self.params = params
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        self.index_vecs = np.zeros((0, params.dim), dtype=np.float32)
        self.users: OrderedDict[str, UserState] = OrderedDict()
        # recent event ids (duplicates are dropped), each with its user's id (the ``uid`` object,
        # no copy), so that forgetting a user also forgets their event ids
        # (an OrderedDict: dropping a plain dict's oldest key scans past every key deleted before
        # it, which at a full window cost more than all the rest of ``apply``)
        self.recent_event_ids: OrderedDict[str, str | None] = OrderedDict()
        self.max_ts = 0
        self.events_applied = 0
        # not state: local item -> catalogue number in the table this partition ranks against,
        # and -> item partition (for a number of item partitions)
        self._cat: tuple[ItemTable | None, np.ndarray] = (None, _EMPTY_I)
        self._routes: tuple[int, np.ndarray] = (0, _EMPTY_I)

    _STRUCTURAL = ("dim", "seed")

    def reconfigure(self, params: ModelParams) -> list[str]:
        """Adopt new settings on a restored state; returns the names that changed.

        Ranking and bounds may change freely. ``dim`` and ``seed`` (the index vectors that user
        vectors are made of) cannot: the state would mix two bases, so this raises instead.
        """
        changed = self.params.changes_to(
            params, self._STRUCTURAL, "delete the snapshot to rebuild the state from the log"
        )
        self.params = params
        if not isinstance(self.recent_event_ids, OrderedDict):  # snapshots that kept a plain dict
            self.recent_event_ids = OrderedDict(self.recent_event_ids)
        for uid, u in self.users.items():
            if not hasattr(u, "uid"):  # snapshots of releases before ``forget``
                u.uid = uid
            if not isinstance(u.history, list) or len(u.history) > params.history_len:
                # snapshots that kept histories in deques; or a shorter HISTORY_LEN
                u.history = list(u.history)[-params.history_len :]
        return changed

    def __getstate__(self) -> dict[str, object]:
        d = self.__dict__.copy()
        d["_cat"] = (None, _EMPTY_I)  # the catalogue belongs to the process, not to the state
        d["_routes"] = (0, _EMPTY_I)
        return d

    # -- items ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def _item(self, item_id: str) -> int:
        idx = self.item_index.get(item_id)
        if idx is not None:
            return idx
        idx = len(self.item_ids)
        if idx >= len(self.index_vecs):
            iv = np.zeros((max(1024, 2 * len(self.index_vecs)), self.params.dim), dtype=np.float32)
            iv[:idx] = self.index_vecs[:idx]
            self.index_vecs = iv
        self.item_ids.append(item_id)
        self.item_index[item_id] = idx
        self.index_vecs[idx] = index_vector(self.params.seed, item_id, self.params.dim)
        return idx

    def catalogue_map(self, table: ItemTable) -> np.ndarray:
        """``map[i]``: the catalogue index in ``table`` of local item ``i`` (items new to the
        table are added to its catalogue). Extended incrementally, rebuilt for another table."""
        owner, m = self._cat
        if owner is not table:
            m = _EMPTY_I
        n = self.n_items
        if len(m) < n:
            ext = np.fromiter((table.item(x) for x in self.item_ids[len(m) : n]), dtype=np.int64, count=n - len(m))
            m = np.concatenate([m, ext])
            self._cat = (table, m)
        return m

    def routes(self, partitions: int) -> np.ndarray:
        """``routes[i]``: the item partition that owns local item ``i``'s row."""
        d, r = self._routes
        if d != partitions:
            r = _EMPTY_I
        n = self.n_items
        if len(r) < n:
            ext = np.fromiter(
                (item_partition(x, partitions) for x in self.item_ids[len(r) : n]), dtype=np.int64, count=n - len(r)
            )
            r = np.concatenate([r, ext])
            self._routes = (partitions, r)
        return r

    # -- updates -------------------------------------------------------------------------------
    def apply(self, events: Sequence[Event | Forget], offsets: Sequence[int] | None = None) -> BatchEffect:
        """Fold events in, in order; duplicate ``event_id``s are skipped. A ``Forget`` drops its
        user where it stands (``forget``): the events before it are applied first, those after it
        start a new user; it is passed on in the deltas (``fg_*``), for the long-term model's
        profile of the user.

        A new event of item i pairs with each of the user's last ``pair_window`` items j, with
        weight ``sqrt(w_i * w_j) * pair_decay ** (d - 1)`` for j ``d`` steps back; the pairs,
        with the events' popularity increments and the user-profile records the long-term model
        learns from, are the effect's ``deltas``. ``offsets`` are the events' source offsets
        (default: their positions), by which the item stage recognises what it has applied.
        """
        p = self.params
        tw = p.type_weights
        sqrt_w = {t: math.sqrt(w) for t, w in tw.items()}
        window = p.pair_window
        hist_len = p.history_len
        users = self.users
        seen_ids = self.recent_event_ids
        pd = p.pair_decay
        eff = BatchEffect()
        touched: dict[str, None] = {}
        ev_off: list[int] = []
        ev_ts: list[int] = []
        ev_item: list[int] = []
        ev_w: list[float] = []
        ev_user: list[str] = []
        ev_new: list[bool] = []
        pr_ev: list[int] = []  # per event with pairs: its position, item, window and window weights
        pr_i: list[int] = []
        pr_js: list[list[int]] = []
        pr_sws: list[list[float]] = []
        pr_sw: list[float] = []
        fg_off: list[int] = []
        fg_user: list[str] = []
        flushed = 0  # events whose user vectors are updated (all but the last segment's: at the end)
        for k, ev in enumerate(events):
            if isinstance(ev, Forget):
                if len(ev_off) > flushed:  # the vectors as of just before the forget
                    uids = list(touched) if flushed == 0 else list(dict.fromkeys(ev_user[flushed:]))
                    self._update_user_vectors(
                        uids, ev_user[flushed:], ev_item[flushed:], ev_ts[flushed:], ev_w[flushed:]
                    )
                    flushed = len(ev_off)
                self.forget(ev.user_id)
                eff.forgotten.append(ev.user_id)
                fg_off.append(offsets[k] if offsets is not None else k)
                fg_user.append(ev.user_id)
                continue
            eid = ev.event_id
            if eid is not None and eid in seen_ids:
                eff.duplicates += 1
                continue
            w = tw[ev.type]
            sw = sqrt_w[ev.type]  # one float object per type, shared by every window
            i = self._item(ev.item_id)
            u = users.get(ev.user_id)
            if u is None:
                u = users[ev.user_id] = UserState(ev.user_id)
                if len(users) > p.max_users:
                    users.popitem(last=False)
            else:
                users.move_to_end(ev.user_id)
            if eid is not None:
                seen_ids[eid] = u.uid
                if len(seen_ids) > p.dedupe_window:
                    seen_ids.popitem(last=False)
            wi = u.win_items
            if wi:
                pr_ev.append(len(ev_off))
                pr_i.append(i)
                pr_js.append(wi[:])
                pr_sws.append(u.win_sw[:])
                pr_sw.append(sw)
            wi.append(i)
            u.win_sw.append(sw)
            if len(wi) > window:
                del wi[0], u.win_sw[0]
            h = u.history
            h.append((i, ev.ts, w))
            if len(h) > hist_len:
                del h[0]
            new = i not in u.seen
            if new:
                u.seen[i] = None
                u.seen_arr.append(i)
                if len(u.seen) > p.max_seen:
                    del u.seen[u.seen_arr[0]]  # the oldest (same order), found without a scan
                    del u.seen_arr[0]
            u.n_events += 1
            if ev.ts > u.last_ts:
                u.last_ts = ev.ts
            if ev.ts > self.max_ts:
                self.max_ts = ev.ts
            touched[ev.user_id] = None
            ev_off.append(offsets[k] if offsets is not None else k)
            ev_ts.append(ev.ts)
            ev_item.append(i)
            ev_w.append(w)
            ev_user.append(ev.user_id)
            ev_new.append(new)
        eff.applied = len(ev_off)
        self.events_applied += eff.applied
        if len(ev_off) > flushed:
            if flushed == 0:
                self._update_user_vectors(list(touched), ev_user, ev_item, ev_ts, ev_w)
            else:
                uids = list(dict.fromkeys(ev_user[flushed:]))
                self._update_user_vectors(uids, ev_user[flushed:], ev_item[flushed:], ev_ts[flushed:], ev_w[flushed:])
        eff.users = [uid for uid in touched if uid in users]
        eff.deltas = BlockDeltas(
            ids=self.item_ids,
            ev_offset=np.asarray(ev_off, dtype=np.int64),
            ev_ts=np.asarray(ev_ts, dtype=np.int64),
            ev_item=np.asarray(ev_item, dtype=np.int64),
            ev_w=np.asarray(ev_w, dtype=np.float64),
            ev_user=ev_user,
            ev_new=np.asarray(ev_new, dtype=bool),
            **_pairs(pr_ev, pr_i, pr_js, pr_sws, pr_sw, pd),
            fg_offset=np.asarray(fg_off, dtype=np.int64),
            fg_user=fg_user,
        )
        return eff

    def forget(self, user_id: str) -> bool:
        """Drop everything this partition keeps about ``user_id``: history, seen items, vector,
        event count and the ids of their recent events (so a re-sent old event of theirs is no
        longer recognised as a duplicate). Items they introduced stay in the partition's item
        dictionary (item ids, not personal data). Idempotent; False if the user was unknown."""
        known = self.users.pop(user_id, None) is not None
        ids = self.recent_event_ids
        for eid in [e for e, owner in ids.items() if owner == user_id]:
            del ids[eid]
        return known

    def _update_user_vectors(
        self, uids: list[str], ev_user: list[str], ev_item: list[int], ev_ts: list[int], ev_w: list[float]
    ) -> None:
        """u(T) = u(T0) * exp(-mu (T - T0)) + sum_k w_k exp(-mu (T - t_k)) index[i_k], per user,
        batched; ``T`` is the user's newest event time."""
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
        sums = np.add.reduceat(self.index_vecs[items] * coef[order].astype(np.float32)[:, None], starts, axis=0)
        for r, s in zip(ux_s[starts].tolist(), sums, strict=True):
            u = users[r]
            if u is None:  # evicted within this batch
                continue
            if u.vec is None:
                u.vec = s
            else:
                u.vec = u.vec * np.float32(math.exp(-mu * (u.last_ts - u.vec_ts))) + s
            u.vec_ts = u.last_ts

    # -- reads ---------------------------------------------------------------------------------
    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """Unit-length vectors of ``user_ids`` (rows); zero rows for users without one."""
        out = np.zeros((len(user_ids), self.params.dim), dtype=np.float32)
        for r, uid in enumerate(user_ids):
            v = self.users[uid].vec
            if v is not None:
                out[r] = v
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        unit: np.ndarray = out / norms
        return unit


def _pairs(
    pr_ev: list[int],
    pr_i: list[int],
    pr_js: list[list[int]],
    pr_sws: list[list[float]],
    pr_sw: list[float],
    decay: float,
) -> dict[str, np.ndarray]:
    """Flat pair arrays (event position, i, j, weight) from the per-event windows (oldest
    first): the weight of a pair ``d`` steps apart is ``sqrt(w_i) * sqrt(w_j) * decay ** (d - 1)``;
    a window entry of the event's own item is no pair."""
    lens = np.fromiter(map(len, pr_js), dtype=np.int64, count=len(pr_js))
    total = int(lens.sum())
    ev = np.repeat(np.asarray(pr_ev, dtype=np.int64), lens)
    i = np.repeat(np.asarray(pr_i, dtype=np.int64), lens)
    j = np.fromiter(chain.from_iterable(pr_js), dtype=np.int64, count=total)
    wt = np.repeat(np.asarray(pr_sw), lens) * np.fromiter(chain.from_iterable(pr_sws), dtype=np.float64, count=total)
    if decay != 1.0:  # nearer pairs weigh more: the newest window item is 1 step away
        steps = np.repeat(lens, lens) - (np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens))
        wt = wt * decay ** (steps - 1).astype(np.float64)
    keep = i != j
    return {"pr_ev": ev[keep], "pr_i": i[keep], "pr_j": j[keep], "pr_w": wt[keep]}


_EMPTY_I = np.zeros(0, dtype=np.int64)
