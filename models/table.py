"""The global item table: what every user-stage worker knows of every item.

The item stage publishes a ``TableEntry`` per item (its neighbour list, popularity and unit
vector) to a compacted topic keyed by item id; each user-stage worker reads all of that topic
into one ``ItemTable`` and ranks from it. The table also holds the long-term model's current
version (``models.longterm``), mapped onto its catalogue.

The table numbers items in the order it first hears of them (its *catalogue*); that numbering
belongs to the process, so nothing that is snapshotted per partition refers to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import orjson

from models.arrays import grown
from models.id_codes import IdCodes
from models.longterm import ItemRegression

_MAGIC = b"SRT1"
_WATERMARK_MAGIC = b"SRW1"
WATERMARK_KEY = b"\x00streamrec.watermark"  # the table topic key of an item partition's watermark


def encode_watermark(applied: dict[int, int]) -> bytes:
    """An item partition's watermark: per source (user) partition, the offset before which every
    event has been applied and its entries published (those produced before this record)."""
    return _WATERMARK_MAGIC + orjson.dumps({str(p): o for p, o in applied.items()})


def decode_watermark(blob: bytes) -> dict[int, int] | None:
    """The watermark in ``blob``, or None if ``blob`` is not one (an entry)."""
    if blob[:4] != _WATERMARK_MAGIC:
        return None
    return {int(p): int(o) for p, o in orjson.loads(blob[4:]).items()}


@dataclass(frozen=True)
class TableEntry:
    """One item as the item stage last published it: ``log_pop`` is the log of its
    forward-decayed popularity (comparable between entries whatever their age), ``neighbours``
    its best neighbours with their scores, best first, and ``unit`` its unit context vector.

    The neighbour ids travel as one JSON array (``ids_json``), parsed only when a worker first
    ranks with the entry: most entries of a busy item are replaced before anyone reads them."""

    item_id: str
    log_pop: float
    ids_json: bytes
    scores: np.ndarray  # float32
    unit: np.ndarray  # float32, (dim,)

    @staticmethod
    def of(item_id: str, log_pop: float, neighbours: list[str], scores: np.ndarray, unit: np.ndarray) -> TableEntry:
        return TableEntry(item_id, log_pop, orjson.dumps(neighbours), scores, unit)

    @cached_property
    def neighbours(self) -> list[str]:
        ids: list[str] = orjson.loads(self.ids_json)
        return ids

    def encode(self) -> bytes:
        header = orjson.dumps({"item": self.item_id, "log_pop": self.log_pop, "k": len(self.scores)})
        return b"".join(
            (
                _MAGIC,
                len(header).to_bytes(4, "little"),
                header,
                len(self.ids_json).to_bytes(4, "little"),
                self.ids_json,
                np.ascontiguousarray(self.scores, dtype="<f4").tobytes(),
                np.ascontiguousarray(self.unit, dtype="<f4").tobytes(),
            )
        )

    @staticmethod
    def decode(blob: bytes) -> TableEntry:
        """The entry ``encode`` wrote (neighbour ids still unparsed); ValueError if ``blob`` is
        not one."""
        if blob[:4] != _MAGIC:
            raise ValueError("not a streamrec table entry (bad magic)")
        try:
            n = int.from_bytes(blob[4:8], "little")
            h = orjson.loads(blob[8 : 8 + n])
            m = int.from_bytes(blob[8 + n : 12 + n], "little")
            ids_json = blob[12 + n : 12 + n + m]
            k = int(h["k"])
            at = 12 + n + m
            scores = np.frombuffer(blob, dtype="<f4", count=k, offset=at)
            unit = np.frombuffer(blob, dtype="<f4", offset=at + 4 * k)
            log_pop = -math.inf if h["log_pop"] is None else float(h["log_pop"])
            return TableEntry(str(h["item"]), log_pop, ids_json, scores, unit)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed table entry ({type(e).__name__})") from None


class ItemTable:
    """Neighbour lists, popularity and vectors of every item, indexed by catalogue number.

    The parsed neighbour lists live in one flat *slab* (``slab_item``, ``slab_score``; item i's
    list is ``nb_len[i]`` entries from ``nb_off[i]``), so that compiled ranking kernels read any
    item's list without a Python object per item. A replaced list leaves its old slice behind;
    the slab is compacted when over half of it is dead.
    """

    FORMAT = 2  # of the pickled table (a table snapshot of another format is not restored)

    def __init__(self, dim: int) -> None:
        self.format = ItemTable.FORMAT
        self.dim = dim
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.log_pop = np.full(0, -np.inf)
        self.unit = np.zeros((0, dim), dtype=np.float32)
        # per item: the entry whose neighbour list is not yet parsed into the slab, else None
        self.pending: list[TableEntry | None] = []
        self.nb_off = np.zeros(0, dtype=np.int64)
        self.nb_len = np.zeros(0, dtype=np.int64)
        self.slab_item = np.zeros(1024, dtype=np.int32)
        self.slab_score = np.zeros(1024, dtype=np.float32)
        self.slab_used = 0
        self.slab_live = 0
        self.entries = 0  # entries applied, ever
        # item partition -> its watermark (source partition -> offset applied before)
        self.watermarks: dict[int, dict[int, int]] = {}
        self.long: ItemRegression | None = None
        self.long_version = 0
        self._pop: tuple[int, np.ndarray] = (-1, np.zeros(0))

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith(("_col_", "_codes"))}  # caches

    def _id_codes(self) -> IdCodes:
        """The catalogue's ids for the compiled neighbour-list decode (a cache, not pickled)."""
        codes: IdCodes | None = self.__dict__.get("_codes")
        if codes is None:
            codes = self.__dict__["_codes"] = IdCodes()
        return codes

    def column(self, name: str, derive: Callable[[str], object]) -> np.ndarray:
        """``derive(id)`` for every item, as an object array indexed by item number (cached,
        extended as items come; see ``derived_column``)."""
        return derived_column(self, "_col_" + name, self.ids, derive)

    @property
    def n_items(self) -> int:
        return len(self.ids)

    def item(self, item_id: str) -> int:
        """``item_id``'s catalogue number, added (with no entry yet) if new."""
        i = self.index.get(item_id)
        if i is None:
            i = self.index[item_id] = len(self.ids)
            self.ids.append(item_id)
            self.pending.append(None)
            if i >= len(self.log_pop):
                cap = max(1024, 2 * len(self.log_pop))
                lp = np.full(cap, -np.inf)
                lp[:i] = self.log_pop[:i]
                un = np.zeros((cap, self.dim), dtype=np.float32)
                un[:i] = self.unit[:i]
                self.log_pop, self.unit = lp, un
                self.nb_off = grown(self.nb_off, cap)
                self.nb_len = grown(self.nb_len, cap)
        return i

    def apply(self, entries: Iterable[TableEntry]) -> int:
        """Take in newer entries (each replaces the item's previous one); returns how many. The
        neighbour lists are mapped onto the catalogue when first read (``sim_top``)."""
        n = 0
        item = self.item
        for e in entries:
            i = item(e.item_id)
            self.pending[i] = e
            self.log_pop[i] = e.log_pop
            if len(e.unit) == self.dim:
                self.unit[i] = e.unit
            n += 1
        self.entries += n
        return n

    def parse(self, items: Iterable[int]) -> None:
        """Parse the pending neighbour lists of ``items`` into the slab (new ids they name join
        the catalogue), so that ``nb_off``/``nb_len`` describe them. The lists go through one
        compiled decode together (``IdCodes.codes_many``); the few it leaves (an escape, an id
        new to the catalogue) are decoded one by one, in order."""
        pending = self.pending
        todo: list[int] = []
        entries: list[TableEntry] = []
        for i in items:
            e = pending[i]
            if e is not None:
                pending[i] = None
                todo.append(i)
                entries.append(e)
        if not todo:
            return
        codes, cnt = self._id_codes().codes_many([e.ids_json for e in entries], self.ids)
        n_scores = np.fromiter((len(e.scores) for e in entries), dtype=np.int64, count=len(entries))
        good = cnt == n_scores  # a count of -1 never matches
        if not good.all():
            codes = codes[np.repeat(good[cnt >= 0], cnt[cnt >= 0])]
        ok = good.tolist()
        scores = [e.scores for e, g in zip(entries, ok, strict=True) if g]
        self._place(np.asarray(todo, dtype=np.int64)[good], cnt[good], codes, scores)
        slow = [(i, e) for i, e, g in zip(todo, entries, ok, strict=True) if not g]
        for i, e in slow:  # pending until stored, as if taken one at a time
            pending[i] = e
        for i, e in slow:
            pending[i] = None
            self._store(i, e)

    def _place(self, idx: np.ndarray, lens: np.ndarray, codes: np.ndarray, scores: list[np.ndarray]) -> None:
        """Put the lists of items ``idx`` (``lens`` long, ``codes`` and ``scores`` end to end) at
        the slab's end, replacing theirs."""
        total = int(lens.sum())
        self.slab_live -= int(self.nb_len[idx].sum())
        self.nb_len[idx] = 0  # their old slices are dead before any compaction
        if self.slab_used + total > len(self.slab_item):
            self._compact(total)
        a = self.slab_used
        self.slab_item[a : a + total] = codes
        if scores:
            self.slab_score[a : a + total] = np.concatenate(scores)
        self.nb_off[idx] = a + np.cumsum(lens) - lens
        self.nb_len[idx] = lens
        self.slab_used += total
        self.slab_live += total

    def _store(self, i: int, e: TableEntry) -> None:
        """One list the general way: orjson, and a dict lookup per id (new ids join the catalogue)."""
        ids: list[str] = orjson.loads(e.ids_json)
        try:  # C-speed lookups; an id new to the catalogue (None) takes the slow path
            codes = np.fromiter(map(self.index.get, ids), dtype=np.int32, count=len(ids))
        except TypeError:
            codes = np.fromiter(map(self.item, ids), dtype=np.int32, count=len(ids))
        if len(codes) != len(e.scores):
            raise ValueError(f"table entry of {e.item_id!r}: {len(codes)} neighbours, {len(e.scores)} scores")
        self._place(np.array([i], dtype=np.int64), np.array([len(codes)], dtype=np.int64), codes, [e.scores])

    def _compact(self, room: int) -> None:
        """Drop the dead slices (and make ``room`` more), in one vectorised copy."""
        n = self.n_items
        lens = self.nb_len[:n]
        live = np.flatnonzero(lens)
        total = int(lens[live].sum())
        src = np.repeat(self.nb_off[live] - (np.cumsum(lens[live]) - lens[live]), lens[live]) + np.arange(total)
        cap = max(1024, 2 * (total + room))
        item, score = np.zeros(cap, dtype=np.int32), np.zeros(cap, dtype=np.float32)
        item[:total] = self.slab_item[src]
        score[:total] = self.slab_score[src]
        self.nb_off[live] = np.cumsum(lens[live]) - lens[live]
        self.slab_item, self.slab_score = item, score
        self.slab_used = self.slab_live = total

    def applied(self, source: int, partitions: int) -> int:
        """The source offset before which every event of user partition ``source`` is reflected in
        this table: the lowest over the ``partitions`` item partitions' watermarks (-1: none yet)."""
        return min((self.watermarks.get(q, {}).get(source, -1) for q in range(partitions)), default=-1)

    def pop(self) -> np.ndarray:
        """Every item's popularity relative to the most popular one's (0 for items without an
        entry), recomputed once per change of the table."""
        key = self.entries
        if self._pop[0] != key or len(self._pop[1]) != self.n_items:
            lp = self.log_pop[: self.n_items]
            top = float(lp.max()) if len(lp) else -np.inf
            self._pop = (key, np.exp(lp - top) if math.isfinite(top) else np.zeros(len(lp)))
        return self._pop[1]

    def trending(self, k: int) -> np.ndarray:
        """The k most popular items (``pop``), best first, ties by lower number: recomputed once
        per change of the table, not per ranked chunk (a live block may be one user)."""
        pop = self.pop()
        key = (self.entries, len(pop), k)
        cached = getattr(self, "_trend", None)  # tables pickled before it have none
        if cached is None or cached[0] != key:
            cached = self._trend = (key, top_indices(pop, k))
        return cached[1]

    def sim_top(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i``'s published neighbours (catalogue numbers, scores), best first (views of
        the slab: read them before the table changes)."""
        if i >= self.n_items:
            return _EMPTY_I, _EMPTY_F
        self.parse((i,))
        a, k = int(self.nb_off[i]), int(self.nb_len[i])
        return self.slab_item[a : a + k], self.slab_score[a : a + k]

    def set_long(self, version: int, ids: Sequence[str], weights: np.ndarray) -> None:
        """Install a long-term model version: its pool's item ids mapped onto the catalogue."""
        pool = np.fromiter((self.item(x) for x in ids), dtype=np.int64, count=len(ids))
        pos = np.full(self.n_items, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
        self.long = ItemRegression(pool, pos, weights)
        self.long_version = version

    def memory_bytes(self) -> int:
        """Bytes held in the table's arrays (neighbour lists, popularity, vectors)."""
        self.parse(range(self.n_items))  # every list parsed, as after a worker has ranked with all of them
        lists = self.slab_item.nbytes + self.slab_score.nbytes + self.nb_off.nbytes + self.nb_len.nbytes
        lt = self.long
        long_bytes = 0 if lt is None else lt.weights.nbytes + lt.pos.nbytes + lt.pool.nbytes
        return lists + self.log_pop.nbytes + self.unit.nbytes + long_bytes


_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_O = np.empty(0, dtype=object)


def derived_column(owner: object, name: str, ids: Sequence[str], derive: Callable[[str], object]) -> np.ndarray:
    """``derive(x)`` for every id ``x`` of ``ids``, as an object array cached on ``owner`` as
    ``name`` and extended as ids are added (capacity doubles: they often come a few at a time).
    Indexing it with an array of item numbers gives per-item strings for a whole block in one
    call, with no Python loop per item. The array may be longer than ``ids``; the owner leaves
    ``name`` out of what it pickles."""
    cached: tuple[np.ndarray, int] = owner.__dict__.get(name, (_EMPTY_O, 0))
    col, have = cached
    n = len(ids)
    if have < n:
        if n > len(col):
            col = np.concatenate([col[:have], np.empty(max(n, 2 * len(col)) - have, dtype=object)])
        col[have:n] = [derive(x) for x in ids[have:n]]
        owner.__dict__[name] = (col, n)
    return col


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
