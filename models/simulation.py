"""The two-stage topology in one process: for prequential evaluation and the served comparison.

The running system (``stream_app``) passes deltas, table entries and long-term models between
processes through Kafka and Redis; this class passes the same values directly, through the same
model code: P user partitions (users split like the producer's partitioner, CRC-32 of the key),
one item partition (its results do not depend on how items are partitioned: rows are per item and
popularity is global), and the table the user partitions rank from. ``lag`` delays every table
entry by that many events, as the live system's round trip through the item stage delays it
(a lag of L ms at R events/s is about L * R / 1000 events); a long-term model becomes visible at
its install point, half a refit period after its inputs were taken (standing in for the time a
fit takes).
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Collection, Sequence

from models.deltas import DeltaMessage, split
from models.engine import item_step, user_step
from models.events import Event, Forget
from models.items import ItemPartition
from models.longterm import FitInput, fit
from models.params import ModelParams
from models.ranking import Observer, RecList, Rescorer, recommend
from models.table import ItemTable, TableEntry, top_indices
from models.users import UserPartition


def user_partition(user_id: str, partitions: int) -> int:
    """The partition librdkafka's default partitioner puts a message keyed ``user_id`` in."""
    return zlib.crc32(user_id.encode()) % partitions


class TwoStage:
    """User partitions, an item partition and a table, fed one event at a time."""

    def __init__(self, params: ModelParams, partitions: int = 1, lag: int = 0) -> None:
        if partitions < 1 or lag < 0:
            raise ValueError("partitions must be at least 1 and lag at least 0")
        self.params = params
        self.parts = [UserPartition(params) for _ in range(partitions)]
        self.offsets = [0] * partitions
        self.items = ItemPartition(params)
        self.table = ItemTable(params.dim)
        self.lag = lag
        self.events = 0
        self.entries: deque[tuple[int, list[TableEntry]]] = deque()
        self.fits: deque[tuple[int, int, FitInput]] = deque()

    def part(self, user_id: str) -> UserPartition:
        return self.parts[user_partition(user_id, len(self.parts))]

    def learn(self, event: Event) -> None:
        """The event through its user partition, the item partition and, after the lag, the table."""
        p = user_partition(event.user_id, len(self.parts))
        part, off = self.parts[p], self.offsets[p]
        self.offsets[p] = off + 1
        d = part.apply([event], [off]).deltas
        self.events += 1
        if d is not None and len(d):
            self._items(split(d, p, off, off + 1, part.routes(1), 1))
        self._deliver()

    def block(
        self, events: Sequence[Event | Forget], rescorer: Rescorer | None = None, observer: Observer | None = None
    ) -> list[RecList]:
        """A block of events the way one worker with both stages takes it (one partition): the
        user stage ranks the block's users, then its deltas reach the item stage and (after the
        lag, counted in events) the table. Returns the block's lists."""
        if len(self.parts) != 1:
            raise ValueError("block() runs one partition")
        part, off = self.parts[0], self.offsets[0]
        offsets = list(range(off, off + len(events)))
        self.offsets[0] = off + len(events)
        out = user_step(part, self.table, events, offsets, rescorer=rescorer, observer=observer)
        self.events += len(events)
        self._items(out.messages)
        self._deliver()
        return out.lists

    def _items(self, messages: Sequence[DeltaMessage]) -> None:
        if not messages:
            return
        out = item_step(self.items, messages, trending=False)
        if out.entries:
            self.entries.append((self.events + self.lag, out.entries))
        if out.fit is not None:
            version, install_at, inp = out.fit
            self.fits.append((install_at, version, inp))

    def _deliver(self) -> None:
        while self.entries and self.entries[0][0] <= self.events:
            self.table.apply(self.entries.popleft()[1])
        while self.fits and self.fits[0][0] <= self.events:
            _, version, inp = self.fits.popleft()
            install_fit(self.table, self.items, version, inp)

    def recommend(
        self, user_id: str, rescorer: Rescorer | None = None, observer: Observer | None = None
    ) -> RecList | None:
        """The user's list as a worker would rank it now; None for a user not seen yet."""
        part = self.part(user_id)
        if user_id not in part.users:
            return None
        (rl,) = recommend(part, self.table, [user_id], rescorer=rescorer, observer=observer)
        return rl

    def trending(self, k: int, exclude: Collection[str]) -> list[str]:
        """What a reader gets for an unknown user: the item stage's trending items."""
        it = self.items
        pop = it.decayed_pop()
        ex = {it.item_index[x] for x in exclude if x in it.item_index}
        top = [j for j in top_indices(pop, k + len(ex)).tolist() if j not in ex]
        return [it.item_ids[j] for j in top[:k]]


def install_fit(table: ItemTable, items: ItemPartition, version: int, inp: FitInput) -> None:
    """Fit the long-term model on ``inp`` now and install it in ``table``, as a worker does once
    the item stage's fit process has published it."""
    m = fit(inp)
    table.set_long(version, [items.item_ids[j] for j in m.pool.tolist()], m.weights)
