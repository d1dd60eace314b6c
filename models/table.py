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

import numpy as np
import orjson

from models.longterm import ItemRegression

_MAGIC = b"SRT1"


@dataclass(frozen=True)
class TableEntry:
    """One item as the item stage last published it: ``log_pop`` is the log of its
    forward-decayed popularity (comparable between entries whatever their age), ``neighbours``
    its best neighbours with their scores, best first, and ``unit`` its unit context vector."""

    item_id: str
    log_pop: float
    neighbours: list[str]
    scores: np.ndarray  # float32
    unit: np.ndarray  # float32, (dim,)

    def encode(self) -> bytes:
        header = orjson.dumps({"item": self.item_id, "log_pop": self.log_pop, "nb": self.neighbours})
        return b"".join(
            (
                _MAGIC,
                len(header).to_bytes(4, "little"),
                header,
                np.ascontiguousarray(self.scores, dtype="<f4").tobytes(),
                np.ascontiguousarray(self.unit, dtype="<f4").tobytes(),
            )
        )

    @staticmethod
    def decode(blob: bytes) -> TableEntry:
        """The entry ``encode`` wrote; ValueError if ``blob`` is not one."""
        if blob[:4] != _MAGIC:
            raise ValueError("not a streamrec table entry (bad magic)")
        n = int.from_bytes(blob[4:8], "little")
        try:
            h = orjson.loads(blob[8 : 8 + n])
            k = len(h["nb"])
            scores = np.frombuffer(blob, dtype="<f4", count=k, offset=8 + n)
            unit = np.frombuffer(blob, dtype="<f4", offset=8 + n + 4 * k)
            log_pop = -math.inf if h["log_pop"] is None else float(h["log_pop"])
            return TableEntry(str(h["item"]), log_pop, list(h["nb"]), scores, unit)
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
        self.neighbours: list[tuple[np.ndarray, np.ndarray] | None] = []
        self.entries = 0  # entries applied, ever
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
        """Take in newer entries (each replaces the item's previous one); returns how many."""
        n = 0
        item, get = self.item, self.index.get
        for e in entries:
            i = item(e.item_id)
            codes = list(map(get, e.neighbours))  # C-speed lookups; new ids take the slow path
            if None in codes:
                codes = [item(x) for x in e.neighbours]
            nb = np.array(codes, dtype=np.int32)
            self.neighbours[i] = (nb, np.array(e.scores, dtype=np.float32))  # a copy: the message can go
            self.log_pop[i] = e.log_pop
            if len(e.unit) == self.dim:
                self.unit[i] = e.unit
            n += 1
        self.entries += n
        return n

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
        lists = sum(a.nbytes + b.nbytes for nb in self.neighbours if nb is not None for a, b in (nb,))
        lt = self.long
        long_bytes = 0 if lt is None else lt.weights.nbytes + lt.pos.nbytes + lt.pool.nbytes
        return lists + self.log_pop.nbytes + self.unit.nbytes + long_bytes


_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float32)
