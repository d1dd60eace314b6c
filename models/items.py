"""The item stage's state: co-occurrence rows, popularity and item vectors, over every user.

One ``ItemPartition`` owns the co-occurrence rows of the items that hash to it
(``models.deltas.item_partition``) and keeps the popularity of *every* item (neighbour scores are
normalised by the popularity of the neighbour, which another partition may own). It is fed the
``DeltaMessage``s of every user partition and applies each event exactly once: it remembers, per
source partition, the offset up to which it has applied, and applies only the part of a message
beyond it. Its state is a plain picklable value, snapshotted with its input offset.

Aggregation is commutative: rows and popularity are sums of per-event increments, so the state
after a set of messages does not depend on how the user partitions' messages interleaved (up to
floating-point rounding). The exception is the row bound: a row that grows past
``2 * neighbours`` entries is pruned back to its ``neighbours`` heaviest, and which light entries
a pruning drops depends on what has arrived by then.

Decay uses *forward decay* (Cormode et al., 2009): an event at time ``t`` adds
``w * exp(lam * (t - landmark))``; every stored weight is then the decayed sum scaled by one
common factor, so comparisons need no per-read decay and increments commute. Popularity leaves
the partition as ``log(stored) + lam * landmark``, which does not depend on the landmark.

Item vectors are a random-indexing sketch of co-occurrence: an owned item's *context* vector
accumulates the index vectors (``models.users.index_vector``) of the items it co-occurs with,
weighted like the counts; its cosine with another's estimates the cosine of their full rows.

The owner of partition 0 also keeps the long-term model's inputs (``models.longterm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import orjson

from models.arrays import PackedStrings, grown
from models.deltas import DeltaMessage, item_partition
from models.kernels import (
    add_context,
    add_found,
    join_json_lists,
    merge_entries,
    row_neighbours,
    search_sorted,
    sum_by_key,
)
from models.longterm import LongTermOwner
from models.params import ModelParams
from models.table import TableEntry
from models.users import index_vector

_REBASE_AT = 60.0  # rebase when the forward-decay exponent passes this (exp(60) ~ 1e26)
_MS_PER_H = 3_600_000.0


@dataclass
class ItemEffect:
    """What an ``apply`` changed: owned items whose row or popularity moved, in first-change
    order; events applied, and events skipped as already applied."""

    items: list[int] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0
    forgotten: int = 0  # forget requests applied (each once)


class ItemPartition:
    """The item-level state of one item partition; ``apply`` folds delta messages in."""

    def __init__(self, params: ModelParams, partition: int = 0, partitions: int = 1) -> None:
        self.params = params
        self.partition, self.partitions = partition, partitions
        self.lam = math.log(2.0) / (params.half_life_h * _MS_PER_H)
        self.landmark: int | None = None
        self.max_ts = 0
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        self.pop = np.zeros(0, dtype=np.float64)
        self.index_vecs = np.zeros((0, params.dim), dtype=np.float32)
        self.own = np.zeros(0, dtype=bool)  # per item: this partition owns its row
        # owned items: their rows, and per-slot vectors, row sizes and publication marks
        self.counts = PairCounts()
        self.slot: dict[int, int] = {}
        self.slot_of = np.zeros(0, dtype=np.int64)  # per item: its slot, or -1
        self.row_len = np.zeros(0, dtype=np.int64)  # non-zero entries per row
        self.slot_items: list[int] = []  # slot -> item
        self.context = np.zeros((0, params.dim), dtype=np.float32)
        self.row_mass = np.zeros(0, dtype=np.float64)  # co-occurrence weight ever added to a row
        self.pub_mass = np.zeros(0, dtype=np.float64)  # row mass and popularity when last published
        self.pub_pop = np.zeros(0, dtype=np.float64)
        # source partition -> the offset before which its events are applied
        self.applied: dict[int, int] = {}
        self.sim_dirty: dict[int, None] = {}  # owned items whose published sim: list is out of date
        self.unpublished: dict[int, None] = {}  # owned items changed since the last publication check
        self.events_applied = 0
        self.long = LongTermOwner(params) if partition == 0 and params.w_long > 0 else None

    _STRUCTURAL = ("dim", "seed", "half_life_h")

    def __getstate__(self) -> dict[str, object]:
        d = self.__dict__.copy()
        d.pop("_json_ids", None)  # a cache of the item ids, rebuilt on demand
        return d

    def reconfigure(self, params: ModelParams) -> list[str]:
        """Adopt new settings on a restored state (see ``UserPartition.reconfigure``);
        ``half_life_h`` is structural here too: it sets the scale of every stored weight."""
        changed = self.params.changes_to(
            params, self._STRUCTURAL, "delete the item-stage snapshots and the internal topics to rebuild from the log"
        )
        self.params = params
        if self.long is not None:
            self.long.params = params
        elif self.partition == 0 and params.w_long > 0:
            self.long = LongTermOwner(params)
        return changed

    # -- items ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def _items(self, ids: Sequence[str]) -> np.ndarray:
        """Local indices of ``ids``, adding the new ones."""
        index = self.item_index
        out = np.empty(len(ids), dtype=np.int64)
        for k, x in enumerate(ids):
            i = index.get(x)
            if i is None:
                i = self._add(x)
            out[k] = i
        return out

    def _add(self, item_id: str) -> int:
        i = len(self.item_ids)
        if i >= len(self.pop):
            cap = max(1024, 2 * len(self.pop))
            self.pop = grown(self.pop, cap)
            self.index_vecs = grown(self.index_vecs, cap)
            self.own = grown(self.own, cap)
            slot_of = np.full(cap, -1, dtype=np.int64)
            slot_of[: len(self.slot_of)] = self.slot_of
            self.slot_of = slot_of
        self.item_ids.append(item_id)
        self.item_index[item_id] = i
        self.own[i] = item_partition(item_id, self.partitions) == self.partition
        self.index_vecs[i] = index_vector(self.params.seed, item_id, self.params.dim)
        return i

    def _slot(self, i: int) -> int:
        s = self.slot.get(i)
        if s is None:
            s = self.slot[i] = len(self.slot)
            self.slot_of[i] = s
            self.slot_items.append(i)
            if s >= len(self.row_mass):
                cap = max(256, 2 * len(self.row_mass))
                self.context = grown(self.context, cap)
                self.row_mass = grown(self.row_mass, cap)
                self.row_len = grown(self.row_len, cap)
                self.pub_mass = grown(self.pub_mass, cap)
                self.pub_pop = grown(self.pub_pop, cap)
        return s

    def row(self, i: int) -> dict[int, float]:
        """Owned item ``i``'s co-occurrence row, {item: stored weight} (for inspection and tests)."""
        cols, vals = self.counts.row(i)
        return dict(zip(cols.tolist(), vals.tolist(), strict=True))

    # -- decay ---------------------------------------------------------------------------------
    def _scales(self, ts: np.ndarray) -> np.ndarray:
        """Forward-decay factors of event times ``ts``; rebases first if they would grow too big."""
        if self.landmark is None:
            self.landmark = int(ts[0])
        top = int(ts.max())
        if self.lam * (top - self.landmark) > _REBASE_AT:
            self._rebase(top)
        return np.exp(self.lam * (ts - self.landmark).astype(np.float64))

    def _rebase(self, ts: int) -> None:
        """Move the landmark to ``ts``: rescale every stored weight by the same factor."""
        assert self.landmark is not None
        f = math.exp(-self.lam * (ts - self.landmark))
        self.landmark = ts
        self.pop *= f
        self.row_mass *= f
        self.pub_mass *= f
        self.pub_pop *= f
        self.context *= np.float32(f)  # unit vectors are scale-free
        self.counts.scale(f)

    def scale_now(self) -> float:
        """The forward-decay factor of the newest event: stored weights / weights as of now."""
        return 1.0 if self.landmark is None else math.exp(self.lam * (self.max_ts - self.landmark))

    def decayed_pop(self) -> np.ndarray:
        """Popularity of every item at the newest event time, in type-weighted events."""
        return self.pop[: self.n_items] / self.scale_now()

    # -- updates -------------------------------------------------------------------------------
    def apply(self, messages: Sequence[DeltaMessage]) -> ItemEffect:
        """Fold in the events of ``messages`` (in order) not applied before.

        Each event adds ``w * scale(t)`` to its item's popularity, and each of its pairs adds
        ``pair weight * scale(t)`` to the row this partition owns. A forget request (partition 0's
        messages) drops the user's long-term profile between the profile records before and after
        it; like events, each is applied once.
        """
        eff = ItemEffect()
        ev_item: list[np.ndarray] = []
        ev_ts: list[np.ndarray] = []
        ev_w: list[np.ndarray] = []
        pr_ev: list[np.ndarray] = []
        pr_row: list[np.ndarray] = []
        pr_col: list[np.ndarray] = []
        pr_w: list[np.ndarray] = []
        # the long-term model's records in order: (users, items, new) per run of events, or the id
        # of a user to forget
        profiles: list[tuple[list[str], np.ndarray, np.ndarray] | str] = []
        n_ev = 0
        for m in messages:
            done = self.applied.get(m.source, -1)
            if m.end <= done:
                eff.skipped += len(m)
                continue
            k0 = int(np.searchsorted(m.ev_offset, done)) if done > m.start else 0
            f0 = int(np.searchsorted(m.fg_offset, done)) if done > m.start and len(m.fg_user) else 0
            forgets = m.fg_user[f0:]
            eff.forgotten += len(forgets)
            self.applied[m.source] = m.end
            eff.skipped += k0
            if k0 == len(m):
                profiles.extend(forgets)
                continue
            loc = self._items(m.ids)
            items = loc[m.ev_item[k0:]]
            ev_item.append(items)
            ev_ts.append(m.ev_ts[k0:])
            ev_w.append(m.ev_w[k0:])
            ev, rows, cols, w = m.row_updates(k0)
            pr_ev.append(ev + n_ev)
            pr_row.append(loc[rows])
            pr_col.append(loc[cols])
            pr_w.append(w)
            if m.users:
                users = m.users
                us = [users[u] for u in m.ev_user[k0:].tolist()]
                new = m.ev_new[k0:].astype(bool)
                a = 0  # the events before each forget, then the forget
                for c, who in zip(np.searchsorted(m.ev_offset[k0:], m.fg_offset[f0:]).tolist(), forgets, strict=True):
                    profiles.append((us[a:c], items[a:c], new[a:c]))
                    profiles.append(who)
                    a = c
                profiles.append((us[a:], items[a:], new[a:]))
            else:
                profiles.extend(forgets)
            n_ev += len(m) - k0
        if self.long is not None:
            for rec in profiles:
                if isinstance(rec, str):
                    self.long.forget(rec)
                else:
                    self.long.feed(*rec)
        if not n_ev:
            return eff
        items = np.concatenate(ev_item)
        ts = np.concatenate(ev_ts)
        g = self._scales(ts)
        np.add.at(self.pop, items, np.concatenate(ev_w) * g)  # unbuffered: in event order
        self.max_ts = max(self.max_ts, int(ts.max()))
        eff.applied = n_ev
        self.events_applied += n_ev
        owned = np.unique(items[self.own[items]])  # owned items whose popularity moved
        rows = np.concatenate(pr_row)
        inc = np.concatenate(pr_w).astype(np.float64) * g[np.concatenate(pr_ev)]
        # one sort for the whole iteration: the distinct (row, col) entries, increments summed
        # in input order; everything below works on them
        keys, summed = sum_by_key((rows << 32) | np.concatenate(pr_col), inc)
        key_rows = keys >> 32
        starts = np.flatnonzero(np.diff(key_rows, prepend=-1))  # where each row's entries begin
        moved_rows = key_rows[starts]
        for i in np.union1d(owned, moved_rows).tolist():
            if i not in self.slot:
                self._slot(i)
        self._update_rows(keys, summed, starts)
        changed = dict.fromkeys(moved_rows.tolist())
        changed.update(dict.fromkeys(owned.tolist()))
        eff.items = list(changed)
        self.sim_dirty.update(changed)
        self.unpublished.update(changed)
        return eff

    def _update_rows(self, keys: np.ndarray, inc: np.ndarray, starts: np.ndarray) -> None:
        """``row[r][c] += inc`` per distinct entry (sorted ``keys``, ``row << 32 | col``; each row's
        entries start at ``starts``; rows are owned and have slots), then the row bound, masses
        and context vectors, all batched: cost grows with the batch, not with the catalogue."""
        if not len(keys):
            return
        fresh = self.counts.add(keys, inc)
        n = len(self.slot)
        self.row_len[:n] += np.bincount(self.slot_of[fresh], minlength=n)
        cap, keep = 2 * self.params.neighbours, self.params.neighbours
        for s in np.flatnonzero(self.row_len[:n] > cap).tolist():
            self.row_len[s] = self.counts.prune(self.slot_items[s], keep)
        slots = self.slot_of[keys[starts] >> 32]
        self.row_mass[slots] += np.add.reduceat(inc, starts)
        add_context(self.context, slots, starts, keys & _COL, inc, self.index_vecs)  # context[r] += inc * index[c]

    # -- reads ---------------------------------------------------------------------------------
    def compute_sims(self, items: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Owned ``items``' neighbours by normalised co-occurrence, best first (ties by item
        number): ``c_ij / (pop_i ** 0.5 * pop_j ** sim_beta)`` in weights as of now (scale-free
        when ``sim_beta`` is 0.5), in one kernel call. Returns (count, neighbours, scores),
        (items, sim_list_len) arrays."""
        rows = np.asarray(items, dtype=np.int64)
        row_pop = np.where(self.slot_of[rows] >= 0, self.pop[rows], 0.0)  # no row: no neighbours
        c = self.counts
        lo, hi = c.bounds(c.keys, rows)
        rlo, rhi = c.bounds(c.rkeys, rows)
        p = self.params
        pop = self.pop[: self.n_items]
        beta = p.sim_beta
        col_norm = np.sqrt(pop) if beta == 0.5 else pop**beta * self.scale_now() ** (0.5 - beta)
        return row_neighbours(c.keys, c.vals, lo, hi, c.rkeys, c.rvals, rlo, rhi, row_pop, col_norm, p.sim_list_len)

    def log_pop(self, i: int) -> float:
        """``log`` of item ``i``'s forward-decayed popularity, independent of the landmark."""
        p = float(self.pop[i])
        return math.log(p) + self.lam * (self.landmark or 0) if p > 0 else -math.inf

    def due_entries(self) -> list[TableEntry]:
        """Table entries for the owned items that changed since the last call and whose row weight
        or popularity grew by more than ``sim_refresh`` since they were last published (a bounded
        staleness that keeps the publication rate small), with their neighbour lists and unit
        vectors as of now. The running system calls this on a schedule, so that how often an
        item is published does not depend on how its events were batched."""
        if not self.unpublished:
            return []
        f = 1.0 + self.params.sim_refresh
        items = np.fromiter(self.unpublished, dtype=np.int64, count=len(self.unpublished))
        self.unpublished.clear()
        s = self.slot_of[items]
        mass, pop = self.row_mass[s], self.pop[items]
        due = (mass > self.pub_mass[s] * f) | (pop > self.pub_pop[s] * f)
        s = s[due]
        self.pub_mass[s], self.pub_pop[s] = mass[due], pop[due]
        return self.entries(items[due].tolist())

    def entries(self, items: Sequence[int]) -> list[TableEntry]:
        """Owned ``items``' table entries as of now (their neighbour lists in one batch)."""
        if not items:
            return []
        cnt, idx, sc = self.compute_sims(items)
        ctx = self.context[self.slot_of[np.asarray(items, dtype=np.int64)]]
        norms = np.linalg.norm(ctx, axis=1)
        unit = ctx / np.where(norms > 0, norms, 1.0)[:, None]
        ids, sc32 = self.item_ids, sc.astype(np.float32)
        quoted = self._quoted_ids()
        # the JSON arrays orjson would make of the neighbour ids, joined from the quoted ids
        buf, off = join_json_lists(idx, cnt, quoted.buf, quoted.off)
        blob, at = buf.tobytes(), off.tolist()
        return [
            TableEntry(ids[i], self.log_pop(i), blob[at[q] : at[q + 1]], sc32[q, :m], unit[q])
            for q, (i, m) in enumerate(zip(items, cnt.tolist(), strict=True))
        ]

    def _quoted_ids(self) -> PackedStrings:
        """Every item's id as a JSON string, in one buffer extended as items come: a table
        entry's neighbour list is joined from it, with no list of id strings per entry."""
        q: PackedStrings | None = self.__dict__.get("_json_ids")
        if q is None:
            q = self._json_ids = PackedStrings(orjson.dumps)
        q.extend(self.item_ids)
        return q

    def all_entries(self) -> list[TableEntry]:
        """Every owned item's entry (a full republication, e.g. to rebuild a lost table)."""
        return self.entries(list(self.slot))

    def mark_all_sims(self) -> None:
        """Mark every owned item's ``sim:`` list out of date (its neighbours' popularity moves
        it too): the next ``sim_lists`` calls then rewrite them all from the state as it is."""
        self.sim_dirty.update(dict.fromkeys(self.slot))

    def sim_lists(self, budget: int, k: int) -> list[tuple[str, list[tuple[str, float]]]]:
        """Fresh ``sim:`` lists (best ``k`` neighbours, now) of at most ``budget`` items whose
        published list is out of date, oldest change first."""
        ids = self.item_ids
        todo = list(islice(self.sim_dirty, budget))
        for i in todo:
            del self.sim_dirty[i]
        if not todo:
            return []
        cnt, idx, sc = self.compute_sims(todo)
        idx_l, sc_l = idx.tolist(), sc.tolist()
        return [
            (ids[i], [(ids[j], x) for j, x in zip(idx_l[q][: min(m, k)], sc_l[q][: min(m, k)], strict=True)])
            for q, (i, m) in enumerate(zip(todo, cnt.tolist(), strict=True))
        ]

    def trending(self, k: int) -> list[tuple[str, float]]:
        """The k most popular items with their popularity now (type-weighted events), ties by
        item id so that every run lists them alike."""
        pop = self.decayed_pop()
        ids = self.item_ids
        if len(pop) > 4 * k:  # only near the top can items tie into the list
            part = np.argpartition(-pop, 4 * k - 1)[: 4 * k]
            part = part[pop[part] >= pop[part].min()]
        else:
            part = np.arange(len(pop))
        best = sorted(part.tolist(), key=lambda j: (-pop[j], ids[j]))[:k]
        return [(ids[j], float(pop[j])) for j in best]


class PairCounts:
    """Co-occurrence counts of the rows of one item partition, in sorted arrays keyed
    ``row << 32 | col``: a main array and a small recent one, merged into the main one once it
    holds an eighth as many keys (a log-structured merge). A batch of updates then costs two
    sorted searches and a vectorised add whatever its size, and a row is two contiguous slices.
    A pruned entry is zeroed in place (a later increment starts it again from zero, as for a
    removed entry) and dropped at the next merge."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.vals = np.zeros(0, dtype=np.float64)
        self.rkeys = np.zeros(0, dtype=np.int64)
        self.rvals = np.zeros(0, dtype=np.float64)

    def __len__(self) -> int:
        return int(np.count_nonzero(self.vals) + np.count_nonzero(self.rvals))

    def add(self, uk: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Add ``v[k]`` to entry ``uk[k]`` (distinct sorted keys ``row << 32 | col``); returns the
        rows of the entries that were zero or absent before (one per such entry)."""
        hit, fresh_main = add_found(self.keys, self.vals, uk, v)
        uk, v = uk[~hit], v[~hit]
        hit, fresh_recent = add_found(self.rkeys, self.rvals, uk, v)
        new = uk[~hit]
        if len(new):
            self.rkeys, self.rvals = merge_entries(self.rkeys, self.rvals, new, v[~hit])
            if len(self.rkeys) > max(_RECENT_MIN, len(self.keys) // 8):
                self._merge()
        return np.concatenate([fresh_main, fresh_recent, new]) >> 32

    def _merge(self) -> None:
        live, rlive = self.vals != 0, self.rvals != 0
        self.keys, self.vals = merge_entries(self.keys[live], self.vals[live], self.rkeys[rlive], self.rvals[rlive])
        self.rkeys, self.rvals = self.keys[:0].copy(), self.vals[:0].copy()

    def _bounds(self, keys: np.ndarray, r: int) -> tuple[int, int]:
        lo, hi = self.bounds(keys, np.array([r]))
        return int(lo[0]), int(hi[0])

    @staticmethod
    def bounds(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of ``rows`` lies in the sorted ``keys``: (start, end) arrays."""
        r = rows.astype(np.int64)
        return search_sorted(keys, r << 32), search_sorted(keys, (r + 1) << 32)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``r``'s non-zero entries: (columns, weights)."""
        a, b = self._bounds(self.keys, r)
        c, d = self._bounds(self.rkeys, r)
        cols = np.concatenate([self.keys[a:b], self.rkeys[c:d]]) & _COL
        vals = np.concatenate([self.vals[a:b], self.rvals[c:d]])
        nz = vals != 0
        return cols[nz], vals[nz]

    def prune(self, r: int, keep: int) -> int:
        """Zero all but the ``keep`` heaviest entries of row ``r`` (ties: lower column first);
        returns how many remain."""
        a, b = self._bounds(self.keys, r)
        c, d = self._bounds(self.rkeys, r)
        vals = np.concatenate([self.vals[a:b], self.rvals[c:d]])
        cols = np.concatenate([self.keys[a:b], self.rkeys[c:d]]) & _COL
        order = np.lexsort((cols, -vals))
        drop = np.zeros(len(vals), dtype=bool)
        drop[order[keep:]] = True
        self.vals[a:b][drop[: b - a]] = 0.0
        self.rvals[c:d][drop[b - a :]] = 0.0
        return int(np.count_nonzero(vals[~drop]))

    def scale(self, f: float) -> None:
        self.vals *= f
        self.rvals *= f

    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes + self.rkeys.nbytes + self.rvals.nbytes


_COL = (1 << 32) - 1
_RECENT_MIN = 4096
_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
