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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import orjson

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
    """Neighbour lists, popularity and vectors of every item, indexed by catalogue number."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.log_pop = np.full(0, -np.inf)
        self.unit = np.zeros((0, dim), dtype=np.float32)
        # per item: its neighbours (catalogue numbers, scores), or the entry not yet parsed
        self.neighbours: list[tuple[np.ndarray, np.ndarray] | TableEntry | None] = []
        self.entries = 0  # entries applied, ever
        # item partition -> its watermark (source partition -> offset applied before)
        self.watermarks: dict[int, dict[int, int]] = {}
        self.long: ItemRegression | None = None
        self.long_version = 0
        self._pop: tuple[int, np.ndarray] = (-1, np.zeros(0))

    @property
    def n_items(self) -> int:
        return len(self.ids)

    def item(self, item_id: str) -> int:
        """``item_id``'s catalogue number, added (with no entry yet) if new."""
        i = self.index.get(item_id)
        if i is None:
            i = self.index[item_id] = len(self.ids)
            self.ids.append(item_id)
            self.neighbours.append(None)
            if i >= len(self.log_pop):
                cap = max(1024, 2 * len(self.log_pop))
                lp = np.full(cap, -np.inf)
                lp[:i] = self.log_pop[:i]
                un = np.zeros((cap, self.dim), dtype=np.float32)
                un[:i] = self.unit[:i]
                self.log_pop, self.unit = lp, un
        return i

    def apply(self, entries: Iterable[TableEntry]) -> int:
        """Take in newer entries (each replaces the item's previous one); returns how many. The
        neighbour lists are mapped onto the catalogue when first read (``sim_top``)."""
        n = 0
        item = self.item
        for e in entries:
            i = item(e.item_id)
            self.neighbours[i] = e
            self.log_pop[i] = e.log_pop
            if len(e.unit) == self.dim:
                self.unit[i] = e.unit
            n += 1
        self.entries += n
        return n

    def _parse(self, e: TableEntry) -> tuple[np.ndarray, np.ndarray]:
        ids = e.neighbours
        codes = list(map(self.index.get, ids))  # C-speed lookups; new ids take the slow path
        if None in codes:
            codes = [self.item(x) for x in ids]
        return np.array(codes, dtype=np.int32), np.array(e.scores, dtype=np.float32)  # copies: the entry can go

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

    def sim_top(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i``'s published neighbours (catalogue numbers, scores), best first."""
        nb = self.neighbours[i] if i < len(self.neighbours) else None
        if isinstance(nb, TableEntry):
            nb = self.neighbours[i] = self._parse(nb)
        return nb if nb is not None else (_EMPTY_I, _EMPTY_F)

    def set_long(self, version: int, ids: Sequence[str], weights: np.ndarray) -> None:
        """Install a long-term model version: its pool's item ids mapped onto the catalogue."""
        pool = np.fromiter((self.item(x) for x in ids), dtype=np.int64, count=len(ids))
        pos = np.full(self.n_items, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
        self.long = ItemRegression(pool, pos, weights)
        self.long_version = version

    def memory_bytes(self) -> int:
        """Bytes held in the table's arrays (neighbour lists, popularity, vectors)."""
        for i in range(self.n_items):
            self.sim_top(i)  # every list parsed, as after a worker has ranked with all of them
        lists = sum(nb[0].nbytes + nb[1].nbytes for nb in self.neighbours if isinstance(nb, tuple))
        lt = self.long
        long_bytes = 0 if lt is None else lt.weights.nbytes + lt.pos.nbytes + lt.pool.nbytes
        return lists + self.log_pop.nbytes + self.unit.nbytes + long_bytes


_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float32)
