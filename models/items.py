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

import numpy as np
import scipy.sparse as sp

from models.deltas import DeltaMessage, item_partition
from models.longterm import LongTermOwner
from models.params import ModelParams
from models.table import TableEntry
from models.users import index_vector

_REBASE_AT = 60.0  # rebase when the forward-decay exponent passes this (exp(60) ~ 1e26)
_DENSE_PAIRS = 4096  # below this many pair updates, the dense context update is faster
_MS_PER_H = 3_600_000.0


@dataclass
class ItemEffect:
    """What an ``apply`` changed: owned items whose row or popularity moved, in first-change
    order; events applied, and events skipped as already applied."""

    items: list[int] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0


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
        # owned items: their rows (keyed by item), and per-slot vectors and publication marks
        self.cooc: dict[int, dict[int, float]] = {}
        self.slot: dict[int, int] = {}
        self.context = np.zeros((0, params.dim), dtype=np.float32)
        self.row_mass = np.zeros(0, dtype=np.float64)  # co-occurrence weight ever added to a row
        self.pub_mass = np.zeros(0, dtype=np.float64)  # row mass and popularity when last published
        self.pub_pop = np.zeros(0, dtype=np.float64)
        # source partition -> the offset before which its events are applied
        self.applied: dict[int, int] = {}
        self.sim_dirty: dict[int, None] = {}  # owned items whose published sim: list is out of date
        self.events_applied = 0
        self.long = LongTermOwner(params) if partition == 0 and params.w_long > 0 else None

    _STRUCTURAL = ("dim", "seed", "half_life_h")

    def reconfigure(self, params: ModelParams) -> list[str]:
        """Adopt new settings on a restored state (see ``UserPartition.reconfigure``);
        ``half_life_h`` is structural here too: it sets the scale of every stored weight."""
        old = self.params
        changed = [k for k, v in vars(params).items() if getattr(old, k) != v]
        bad = [n for n in changed if n in self._STRUCTURAL]
        if bad:
            raise ValueError(
                f"the saved item state was built with {', '.join(f'{n}={getattr(old, n)}' for n in bad)}; it "
                f"cannot continue with {', '.join(f'{n}={getattr(params, n)}' for n in bad)}. Restore those "
                "settings, or delete the item-stage snapshots and the internal topics to rebuild from the log."
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
            self.pop = _grown(self.pop, cap)
            self.index_vecs = _grown(self.index_vecs, cap)
            self.own = _grown(self.own, cap)
        self.item_ids.append(item_id)
        self.item_index[item_id] = i
        self.own[i] = item_partition(item_id, self.partitions) == self.partition
        self.index_vecs[i] = index_vector(self.params.seed, item_id, self.params.dim)
        return i

    def _slot(self, i: int) -> int:
        s = self.slot.get(i)
        if s is None:
            s = self.slot[i] = len(self.slot)
            if s >= len(self.row_mass):
                cap = max(256, 2 * len(self.row_mass))
                self.context = _grown(self.context, cap)
                self.row_mass = _grown(self.row_mass, cap)
                self.pub_mass = _grown(self.pub_mass, cap)
                self.pub_pop = _grown(self.pub_pop, cap)
            self.cooc[i] = {}
        return s

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
        for row in self.cooc.values():
            for k in row:
                row[k] *= f

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
        ``pair weight * scale(t)`` to the row this partition owns.
        """
        eff = ItemEffect()
        ev_item: list[np.ndarray] = []
        ev_ts: list[np.ndarray] = []
        ev_w: list[np.ndarray] = []
        pr_ev: list[np.ndarray] = []
        pr_row: list[np.ndarray] = []
        pr_col: list[np.ndarray] = []
        pr_w: list[np.ndarray] = []
        profiles: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        n_ev = 0
        for m in messages:
            done = self.applied.get(m.source, -1)
            if m.end <= done:
                eff.skipped += len(m)
                continue
            k0 = int(np.searchsorted(m.ev_offset, done)) if done > m.start else 0
            p0 = int(np.searchsorted(m.pr_ev, k0)) if k0 else 0
            self.applied[m.source] = m.end
            eff.skipped += k0
            if k0 == len(m):
                continue
            loc = self._items(m.ids)
            items = loc[m.ev_item[k0:]]
            ev_item.append(items)
            ev_ts.append(m.ev_ts[k0:])
            ev_w.append(m.ev_w[k0:])
            pr_ev.append(m.pr_ev[p0:].astype(np.int64) - k0 + n_ev)
            pr_row.append(loc[m.pr_row[p0:]])
            pr_col.append(loc[m.pr_col[p0:]])
            pr_w.append(m.pr_w[p0:])
            if m.users:
                users = m.users
                profiles.append(([users[u] for u in m.ev_user[k0:].tolist()], items, m.ev_new[k0:].astype(bool)))
            n_ev += len(m) - k0
        if not n_ev:
            return eff
        items = np.concatenate(ev_item)
        ts = np.concatenate(ev_ts)
        g = self._scales(ts)
        np.add.at(self.pop, items, np.concatenate(ev_w) * g)  # unbuffered: in event order
        self.max_ts = max(self.max_ts, int(ts.max()))
        eff.applied = n_ev
        self.events_applied += n_ev
        changed: dict[int, None] = {}
        self._update_rows(
            np.concatenate(pr_row),
            np.concatenate(pr_col),
            np.concatenate(pr_w).astype(np.float64) * g[np.concatenate(pr_ev)],
            changed,
        )
        if self.long is not None:
            for users, its, new in profiles:
                self.long.feed(users, its, new)
        for i in items[self.own[items]].tolist():  # owned items whose popularity moved
            if i not in changed:
                self._slot(i)
                changed[i] = None
        eff.items = list(changed)
        self.sim_dirty.update(changed)
        return eff

    def _update_rows(self, rows: np.ndarray, cols: np.ndarray, inc: np.ndarray, changed: dict[int, None]) -> None:
        """``cooc[r][c] += inc`` per pair (rows are owned), then the bound, masses and vectors."""
        if not len(rows):
            return
        cooc = self.cooc
        slot = self.slot
        touched = np.unique(rows)
        for r in touched.tolist():
            if r not in slot:
                self._slot(r)
        for r, c, v in zip(rows.tolist(), cols.tolist(), inc.tolist(), strict=True):
            row = cooc[r]
            row[c] = row.get(c, 0.0) + v
        cap, keep = 2 * self.params.neighbours, self.params.neighbours
        for r in touched.tolist():
            changed[r] = None
            if len(cooc[r]) > cap:
                _prune(cooc[r], keep)
        slots = np.fromiter((slot[r] for r in rows.tolist()), dtype=np.int64, count=len(rows))
        self.row_mass[: len(slot)] += np.bincount(slots, weights=inc, minlength=len(slot))
        self._update_context(slots, cols, inc)

    def _update_context(self, slots: np.ndarray, cols: np.ndarray, inc: np.ndarray) -> None:
        """context[r] += inc * index[c] for every pair, batched over the rows touched: cost grows
        with the batch, not with the catalogue. Small batches gather rows densely, large ones go
        through a sparse product; which path runs depends only on the batch."""
        if len(inc) <= _DENSE_PAIRS:
            order = np.argsort(slots, kind="stable")
            s2, c2, v2 = slots[order], cols[order], inc[order]
            us, starts = np.unique(s2, return_index=True)
            delta = np.add.reduceat(self.index_vecs[c2] * v2[:, None].astype(np.float32), starts, axis=0)
        else:
            us, sinv = np.unique(slots, return_inverse=True)
            uc, cinv = np.unique(cols, return_inverse=True)
            mat = sp.csr_matrix((inc, (sinv, cinv)), shape=(len(us), len(uc)))
            delta = (mat @ self.index_vecs[uc].astype(np.float64)).astype(np.float32)
        self.context[us] += delta

    # -- reads ---------------------------------------------------------------------------------
    def compute_sim(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Owned item ``i``'s neighbours (indices, scores) by normalised co-occurrence, best first:
        ``c_ij / (pop_i ** 0.5 * pop_j ** sim_beta)`` in weights as of now (scale-free when
        ``sim_beta`` is 0.5)."""
        row = self.cooc.get(i)
        if not row or self.pop[i] <= 0:
            return _EMPTY_I, _EMPTY_F
        keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        vals = np.fromiter(row.values(), dtype=np.float64, count=len(row))
        beta = self.params.sim_beta
        pk = self.pop[keys]
        norm = np.sqrt(pk) if beta == 0.5 else pk**beta * self.scale_now() ** (0.5 - beta)
        s = vals / np.maximum(math.sqrt(self.pop[i]) * norm, 1e-300)
        top = np.argsort(-s, kind="stable")[: self.params.sim_list_len]
        return keys[top], s[top]

    def log_pop(self, i: int) -> float:
        """``log`` of item ``i``'s forward-decayed popularity, independent of the landmark."""
        p = float(self.pop[i])
        return math.log(p) + self.lam * (self.landmark or 0) if p > 0 else -math.inf

    def due_entries(self, items: Sequence[int]) -> list[TableEntry]:
        """Table entries for the owned ``items`` whose row weight or popularity grew by more than
        ``sim_refresh`` since they were last published (a bounded staleness that keeps the
        publication rate small), with their neighbour lists and unit vectors as of now."""
        f = 1.0 + self.params.sim_refresh
        out = []
        for i in items:
            s = self.slot[i]
            mass, pop = self.row_mass[s], self.pop[i]
            if mass > self.pub_mass[s] * f or pop > self.pub_pop[s] * f:
                self.pub_mass[s], self.pub_pop[s] = mass, pop
                out.append(self.entry(i))
        return out

    def entry(self, i: int) -> TableEntry:
        """Owned item ``i``'s table entry as of now."""
        idx, sc = self.compute_sim(i)
        ctx = self.context[self.slot[i]]
        norm = float(np.linalg.norm(ctx))
        ids = self.item_ids
        return TableEntry(
            ids[i],
            self.log_pop(i),
            [ids[j] for j in idx.tolist()],
            sc.astype(np.float32),
            ctx / norm if norm > 0 else ctx.copy(),
        )

    def all_entries(self) -> list[TableEntry]:
        """Every owned item's entry (a full republication, e.g. to rebuild a lost table)."""
        return [self.entry(i) for i in self.slot]

    def mark_all_sims(self) -> None:
        """Mark every owned item's ``sim:`` list out of date (its neighbours' popularity moves
        it too): the next ``sim_lists`` calls then rewrite them all from the state as it is."""
        self.sim_dirty.update(dict.fromkeys(self.slot))

    def sim_lists(self, budget: int, k: int) -> list[tuple[str, list[tuple[str, float]]]]:
        """Fresh ``sim:`` lists (best ``k`` neighbours, now) of at most ``budget`` items whose
        published list is out of date, oldest change first."""
        out: list[tuple[str, list[tuple[str, float]]]] = []
        ids = self.item_ids
        while self.sim_dirty and len(out) < budget:
            i = next(iter(self.sim_dirty))
            del self.sim_dirty[i]
            idx, sc = self.compute_sim(i)
            out.append((ids[i], [(ids[j], s) for j, s in zip(idx[:k].tolist(), sc[:k].tolist(), strict=True)]))
        return out

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


def _grown(a: np.ndarray, cap: int) -> np.ndarray:
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out


def _prune(row: dict[int, float], keep: int) -> None:
    """Keep the ``keep`` heaviest entries; a stable sort, so ties keep insertion order and the
    same events always prune the same way."""
    keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
    vals = np.fromiter(row.values(), dtype=np.float64, count=len(row))
    top = np.argsort(-vals, kind="stable")[:keep]
    row.clear()
    row.update(zip(keys[top].tolist(), vals[top].tolist(), strict=True))


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
