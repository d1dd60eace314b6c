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

Memory is the constraint at a million users a partition, so a user is one flat ``array('q')``
(``_HEAD`` counters, then two slots per history entry) plus a row of one float16 matrix of
vectors: about 0.5 kB a user, where objects per entry took 2.5 kB. A user's seen items are the
history's items until the history first drops an entry; only then do they get a set of their own.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from models.deltas import BlockDeltas, item_partition
from models.events import Event, Forget
from models.hashing import stable_hash
from models.params import ModelParams

if TYPE_CHECKING:
    from models.table import ItemTable

_MS_PER_H = 3_600_000.0

# A user's record, ``array('q')``: [events << 24 | vector row, last ts], then per history entry,
# oldest first, (item, ts << 8 | weight code). Event times are below 2^44 ms (``models.events``).
# The vector is as of the last ts between blocks (``apply`` brings every touched user's up to date).
COUNTS, LAST_TS = 0, 1
HEAD = 2
ROW_BITS = 24  # vector rows per partition: at most max_users + 1 (``ModelParams`` checks)
_ROW_MASK = (1 << ROW_BITS) - 1
_ONE_EVENT = 1 << ROW_BITS
CODE_BITS = 8
CODE_MASK = (1 << CODE_BITS) - 1


def index_vector(seed: int, item_id: str, dim: int) -> np.ndarray:
    """An item's fixed random index vector: Gaussian, of expected unit length, seeded by its id."""
    rng = np.random.default_rng(stable_hash(seed, "item", item_id))
    return (rng.standard_normal(dim) / math.sqrt(dim)).astype(np.float32)


class Seen:
    """The items a user has seen once the history no longer holds them all: an insertion-ordered
    set, so that the oldest can be forgotten, and the same items as an array numpy reads."""

    __slots__ = ("items", "arr")

    def __init__(self, items: Sequence[int]) -> None:
        self.items: dict[int, None] = dict.fromkeys(items)
        self.arr = array("q", self.items)


@dataclass(frozen=True)
class UserView:
    """A copy of one user's state in plain values (``UserPartition.user``): for tests, tools and
    readers off the hot path. ``history`` is (item, ts, weight), oldest first."""

    uid: str
    history: list[tuple[int, int, float]]
    seen: list[int]
    n_events: int
    last_ts: int
    vec: np.ndarray | None


class UserState:
    """The per-user object of snapshots written before 2026-12-03; kept only so that they load
    (``UserPartition.__setstate__`` converts them)."""

    __slots__ = ("uid", "history", "win_items", "win_sw", "seen", "seen_arr", "n_events", "last_ts", "vec", "vec_ts")


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
    ``users`` maps a user id to its record (see ``HEAD``), least recently active first.
    """

    def __init__(self, params: ModelParams) -> None:
        self.params = params
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        self.index_vecs = np.zeros((0, params.dim), dtype=np.float32)
        self.users: OrderedDict[str, array[int]] = OrderedDict()
        self.seen: dict[str, Seen] = {}  # users whose history no longer holds every item seen
        self.weights: list[float] = []  # weight code -> event weight (type weights in use so far)
        # user vectors, one row per user (``row_of``); rows of users gone are reused, zeroed
        self.vecs = np.zeros((0, params.dim), dtype=np.float16)
        self.free_rows: list[int] = []
        self.n_rows = 0
        # recent event ids (duplicates are dropped), each with its user's id, so that forgetting
        # a user also forgets their event ids (an OrderedDict: dropping a plain dict's oldest key
        # scans past every key deleted before it)
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

        Ranking and bounds may change freely (a shorter ``HISTORY_LEN`` trims histories now).
        ``dim`` and ``seed`` (the index vectors that user vectors are made of) cannot: the state
        would mix two bases, so this raises instead.
        """
        changed = self.params.changes_to(
            params, self._STRUCTURAL, "delete the snapshot to rebuild the state from the log"
        )
        self.params = params
        if not isinstance(self.recent_event_ids, OrderedDict):  # snapshots that kept a plain dict
            self.recent_event_ids = OrderedDict(self.recent_event_ids)
        limit = min(params.history_len, params.max_seen)
        for uid, rec in self.users.items():
            n_h = (len(rec) - HEAD) >> 1
            if n_h > limit and uid not in self.seen:
                self.seen[uid] = Seen(rec[HEAD::2])
            if n_h > params.history_len:
                del rec[HEAD : HEAD + 2 * (n_h - params.history_len)]
        return changed

    def __getstate__(self) -> dict[str, object]:
        d = self.__dict__.copy()
        d["_cat"] = (None, _EMPTY_I)  # the catalogue belongs to the process, not to the state
        d["_routes"] = (0, _EMPTY_I)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        if "vecs" not in d:  # a snapshot of a release before 2026-12-03: one object per user
            self._adopt_legacy(d["users"])

    def _adopt_legacy(self, old: OrderedDict[str, Any]) -> None:
        self.users = OrderedDict()
        self.seen = {}
        self.weights = []
        self.vecs = np.zeros((0, self.params.dim), dtype=np.float16)
        self.free_rows = []
        self.n_rows = 0
        codes: dict[float, int] = {}
        mu = math.log(2.0) / (self.params.user_half_life_h * _MS_PER_H)
        for uid, u in old.items():
            rec = self._new_user()
            for i, ts, w in u.history:
                c = codes.get(w)
                if c is None:
                    c = codes[w] = self._code(w)
                rec.append(i)
                rec.append(ts << CODE_BITS | c)
            rec[COUNTS] += u.n_events * _ONE_EVENT
            rec[LAST_TS] = u.last_ts
            self.users[uid] = rec
            self.seen[uid] = Seen(list(u.seen))
            if u.vec is not None:  # as of last_ts, as vectors now are between blocks
                self.vecs[row_of(rec)] = u.vec * math.exp(-mu * (u.last_ts - u.vec_ts))

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

    # -- users ---------------------------------------------------------------------------------
    def _code(self, w: float) -> int:
        """The code of event weight ``w`` in history entries (new weights get the next code)."""
        for c, x in enumerate(self.weights):
            if x == w:
                return c
        if len(self.weights) > CODE_MASK:
            raise ValueError(f"more than {CODE_MASK + 1} distinct event weights in one state")
        self.weights.append(w)
        return len(self.weights) - 1

    def _new_user(self) -> array[int]:
        """A record with a zeroed vector row of its own."""
        if self.free_rows:
            row = self.free_rows.pop()
        else:
            row = self.n_rows
            self.n_rows += 1
            if row >= len(self.vecs):
                grown = np.zeros((max(1024, len(self.vecs) * 3 // 2), self.params.dim), dtype=np.float16)
                grown[: len(self.vecs)] = self.vecs
                self.vecs = grown
        return array("q", (row, 0))

    def _drop_user(self, uid: str, rec: array[int]) -> None:
        """Release what ``uid`` holds besides its record (already out of ``users``)."""
        row = row_of(rec)
        self.vecs[row] = 0
        self.free_rows.append(row)
        self.seen.pop(uid, None)

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
        code = {t: self._code(w) for t, w in p.type_weights.items()}
        weights = self.weights
        sqrt_w = [math.sqrt(w) for w in weights]  # one float object per code, shared by every pair
        span = 2 * p.pair_window  # record slots of the pairing window
        hist_slots = HEAD + 2 * p.history_len
        limit = HEAD + 2 * min(p.history_len, p.max_seen)  # beyond it, seen items need a set
        max_seen = p.max_seen
        users = self.users
        seen = self.seen
        seen_ids = self.recent_event_ids
        item_index = self.item_index
        eff = BatchEffect()
        touched: dict[str, int] = {}  # users in first-touch order, each with its vector's time
        ev_off: list[int] = []
        ev_ts: list[int] = []
        ev_item: list[int] = []
        ev_w: list[float] = []
        ev_user: list[str] = []
        ev_new: list[bool] = []
        pr_ev: list[int] = []  # per event with pairs: its position, item, and the window's entries
        pr_i: list[int] = []
        pr_win: list[array[int]] = []
        pr_sw: list[float] = []
        fg_off: list[int] = []
        fg_user: list[str] = []
        flushed = 0  # events whose user vectors are updated (all but the last segment's: at the end)
        for k, ev in enumerate(events):
            if isinstance(ev, Forget):
                if len(ev_off) > flushed:  # the vectors as of just before the forget
                    uids = list(touched) if flushed == 0 else list(dict.fromkeys(ev_user[flushed:]))
                    self._update_user_vectors(
                        uids, touched, ev_user[flushed:], ev_item[flushed:], ev_ts[flushed:], ev_w[flushed:]
                    )
                    for u in uids:
                        if u in users:
                            touched[u] = users[u][LAST_TS]
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
            c = code[ev.type]
            i = item_index.get(ev.item_id)
            if i is None:
                i = self._item(ev.item_id)
            uid = ev.user_id
            ts = ev.ts
            rec = users.get(uid)
            if rec is None:
                rec = users[uid] = self._new_user()
                if len(users) > p.max_users:
                    self._drop_user(*users.popitem(last=False))
            else:
                users.move_to_end(uid)
            if eid is not None:
                # the key object itself (the newest): the event's own copy of the id is not kept
                seen_ids[eid] = next(reversed(users))
                if len(seen_ids) > p.dedupe_window:
                    seen_ids.popitem(last=False)
            n = len(rec)
            if n > HEAD:
                pr_ev.append(len(ev_off))
                pr_i.append(i)
                pr_win.append(rec[max(HEAD, n - span) :])
                pr_sw.append(sqrt_w[c])
            sv = seen.get(uid)
            if sv is None:
                new = i not in rec[HEAD::2]
                if n >= limit:  # the history is about to hold, or drop, more than a set may
                    sv = seen[uid] = Seen(rec[HEAD::2])
            else:
                new = i not in sv.items
            if new and sv is not None:
                sv.items[i] = None
                sv.arr.append(i)
                if len(sv.items) > max_seen:
                    del sv.items[sv.arr[0]]  # the oldest (same order), found without a scan
                    del sv.arr[0]
            rec.append(i)
            rec.append(ts << CODE_BITS | c)
            if n >= hist_slots:
                del rec[HEAD : HEAD + 2]
            if uid not in touched:
                touched[uid] = rec[LAST_TS]
            rec[COUNTS] += _ONE_EVENT
            if ts > rec[LAST_TS]:
                rec[LAST_TS] = ts
            if ts > self.max_ts:
                self.max_ts = ts
            ev_off.append(offsets[k] if offsets is not None else k)
            ev_ts.append(ts)
            ev_item.append(i)
            ev_w.append(weights[c])
            ev_user.append(uid)
            ev_new.append(new)
        eff.applied = len(ev_off)
        self.events_applied += eff.applied
        if len(ev_off) > flushed:
            if flushed == 0:
                self._update_user_vectors(list(touched), touched, ev_user, ev_item, ev_ts, ev_w)
            else:
                uids = list(dict.fromkeys(ev_user[flushed:]))
                self._update_user_vectors(
                    uids, touched, ev_user[flushed:], ev_item[flushed:], ev_ts[flushed:], ev_w[flushed:]
                )
        eff.users = [uid for uid in touched if uid in users]
        for uid in eff.users:  # appends over-allocate by up to 7 slots: copy to the exact size
            users[uid] = array("q", users[uid])
        eff.deltas = BlockDeltas(
            ids=self.item_ids,
            ev_offset=np.asarray(ev_off, dtype=np.int64),
            ev_ts=np.asarray(ev_ts, dtype=np.int64),
            ev_item=np.asarray(ev_item, dtype=np.int64),
            ev_w=np.asarray(ev_w, dtype=np.float64),
            ev_user=ev_user,
            ev_new=np.asarray(ev_new, dtype=bool),
            **_pairs(pr_ev, pr_i, pr_win, pr_sw, np.asarray(sqrt_w), p.pair_decay),
            fg_offset=np.asarray(fg_off, dtype=np.int64),
            fg_user=fg_user,
        )
        return eff

    def forget(self, user_id: str) -> bool:
        """Drop everything this partition keeps about ``user_id``: history, seen items, vector,
        event count and the ids of their recent events (so a re-sent old event of theirs is no
        longer recognised as a duplicate). Items they introduced stay in the partition's item
        dictionary (item ids, not personal data). Idempotent; False if the user was unknown."""
        rec = self.users.pop(user_id, None)
        if rec is not None:
            self._drop_user(user_id, rec)
        ids = self.recent_event_ids
        for eid in [e for e, owner in ids.items() if owner == user_id]:
            del ids[eid]
        return rec is not None

    def _update_user_vectors(
        self,
        uids: list[str],
        vec_ts: dict[str, int],
        ev_user: list[str],
        ev_item: list[int],
        ev_ts: list[int],
        ev_w: list[float],
    ) -> None:
        """u(T) = u(T0) * exp(-mu (T - T0)) + sum_k w_k exp(-mu (T - t_k)) index[i_k], per user,
        batched; ``T`` is the user's newest event time and ``T0 = vec_ts[user]`` the time its
        vector is as of. Computed in float32, kept in float16."""
        mu = math.log(2.0) / (self.params.user_half_life_h * _MS_PER_H)
        recs = [self.users.get(u) for u in uids]
        row = {u: r for r, u in enumerate(uids)}
        ux = np.fromiter((row[u] for u in ev_user), dtype=np.int64, count=len(ev_user))
        last = np.fromiter(
            (rec[LAST_TS] if rec is not None else self.max_ts for rec in recs), dtype=np.float64, count=len(uids)
        )
        coef = np.asarray(ev_w) * np.exp(-mu * (last[ux] - np.asarray(ev_ts, dtype=np.float64)))
        order = np.argsort(ux, kind="stable")
        ux_s = ux[order]
        starts = np.flatnonzero(np.concatenate(([True], ux_s[1:] != ux_s[:-1])))
        items = np.asarray(ev_item, dtype=np.int64)[order]
        sums = np.add.reduceat(self.index_vecs[items] * coef[order].astype(np.float32)[:, None], starts, axis=0)
        heads = ux_s[starts].tolist()
        keep = [k for k, r in enumerate(heads) if recs[r] is not None]  # users evicted within this batch are skipped
        if not keep:
            return
        rows = np.array([row_of(recs[heads[k]]) for k in keep], dtype=np.int64)
        since = np.array([recs[heads[k]][LAST_TS] - vec_ts[uids[heads[k]]] for k in keep], dtype=np.float64)
        old = self.vecs[rows].astype(np.float32)  # a user without a vector has a zero row
        new = old * np.exp(-mu * since).astype(np.float32)[:, None] + sums[keep]
        # float16 ends at 65504: only a bot's burst gets there, and only the direction is read
        self.vecs[rows] = np.clip(new, -_F16_MAX, _F16_MAX)

    # -- reads ---------------------------------------------------------------------------------
    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """Unit-length vectors of ``user_ids`` (rows); zero rows for users without one."""
        users = self.users
        rows = np.fromiter((row_of(users[u]) for u in user_ids), dtype=np.int64, count=len(user_ids))
        out = self.vecs[rows].astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        unit: np.ndarray = out / norms
        return unit

    def seen_items(self, user_id: str) -> np.ndarray:
        """The user's seen items (local numbers, possibly repeated while they are the history's)."""
        sv = self.seen.get(user_id)
        if sv is not None:
            return np.frombuffer(sv.arr, dtype=np.int64)
        return np.frombuffer(self.users[user_id][HEAD::2], dtype=np.int64)  # a copy: records must stay resizable

    def user(self, user_id: str) -> UserView:
        """A copy of the user's state in plain values; KeyError if unknown."""
        rec = self.users[user_id]
        sv = self.seen.get(user_id)
        w = self.weights
        hist = [(i, x >> CODE_BITS, w[x & CODE_MASK]) for i, x in zip(rec[HEAD::2], rec[HEAD + 1 :: 2], strict=True)]
        vec = self.vecs[row_of(rec)].astype(np.float32)
        return UserView(
            user_id,
            hist,
            list(sv.items) if sv is not None else list(dict.fromkeys(rec[HEAD::2])),
            events_of(rec),
            rec[LAST_TS],
            vec if vec.any() else None,
        )

    def views(self) -> Iterator[UserView]:
        """Every user's ``user``, least recently active first."""
        return (self.user(u) for u in self.users)


def events_of(rec: array[int]) -> int:
    """A record's event count: also the user's list version."""
    return rec[COUNTS] >> ROW_BITS


def row_of(rec: array[int]) -> int:
    """A record's row of the vector matrix."""
    return rec[COUNTS] & _ROW_MASK


def entry_ts(x: int) -> int:
    """The event time of a history entry's second slot."""
    return x >> CODE_BITS


def _pairs(
    pr_ev: list[int],
    pr_i: list[int],
    pr_win: list[array[int]],
    pr_sw: list[float],
    sqrt_w: np.ndarray,
    decay: float,
) -> dict[str, np.ndarray]:
    """Flat pair arrays (event position, i, j, weight) from the per-event windows (record slots,
    oldest first): the weight of a pair ``d`` steps apart is ``sqrt(w_i) * sqrt(w_j) *
    decay ** (d - 1)``; a window entry of the event's own item is no pair."""
    lens = np.fromiter(map(len, pr_win), dtype=np.int64, count=len(pr_win)) >> 1
    total = int(lens.sum())
    ev = np.repeat(np.asarray(pr_ev, dtype=np.int64), lens)
    i = np.repeat(np.asarray(pr_i, dtype=np.int64), lens)
    flat = np.frombuffer(b"".join(pr_win), dtype=np.int64) if pr_win else _EMPTY_I  # one copy, no int objects
    j = flat[0::2]
    wt = np.repeat(np.asarray(pr_sw), lens) * sqrt_w[flat[1::2] & CODE_MASK]
    if decay != 1.0:  # nearer pairs weigh more: the newest window item is 1 step away
        steps = np.repeat(lens, lens) - (np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens))
        wt = wt * decay ** (steps - 1).astype(np.float64)
    keep = i != j
    return {"pr_ev": ev[keep], "pr_i": i[keep], "pr_j": j[keep], "pr_w": wt[keep]}


_EMPTY_I = np.zeros(0, dtype=np.int64)
_F16_MAX = 65000.0
