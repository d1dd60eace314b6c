"""The user stage's global table: the table topic (all partitions) read into an ``ItemTable``.

Kafka Streams calls this a global table: every user-stage worker reads every partition of the
compacted table topic, from the start on a cold start or from the worker group's newest table
snapshot, and the user stage ranks from it. The feed is polled from the stage's own loop, between
blocks (a block is ranked with one table), without waiting: whatever entries have arrived are
applied. At start-up the feed first catches up with the topic's end, so a new worker never ranks
from a table emptier than its predecessor's.

The long-term model lives beside the table: a daemon thread looks for a new version in Redis
every ``long_poll_s`` and decodes it off the event path; ``poll`` installs it between blocks.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from models.longterm import decode_model
from models.table import ItemTable, TableEntry, decode_watermark
from stream_app.config import Settings
from stream_app.kafka_io import end_offsets, kafka_common, topic_partitions
from stream_app.os_threads import named
from stream_app.redis_store import RedisStore
from stream_app.snapshots import Snapshottable, Tag, Write

log = logging.getLogger(__name__)

_CATCH_UP_TIMEOUT_S = 300.0


class TableFeed:
    def __init__(self, s: Settings, store: RedisStore, dim: int) -> None:
        self.s, self.store = s, store
        self.table = ItemTable(dim)
        self.consumer: Consumer | None = None
        self.offsets: dict[int, int] = {}  # next offset to read, per table partition
        self.saved: dict[int, int] = {}  # the offsets of the newest table snapshot
        self.saved_at = time.monotonic()
        self.invalid = 0
        self._long: tuple[int, list[str], object] | None = None  # decoded, waiting to be installed
        self._long_seen = 0
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=named(self._watch_long), name="streamrec-long-model", daemon=True)

    def start(self) -> None:
        """Restore the newest table snapshot, catch up with the topic's end, start watching for
        long-term model versions. Blocks until caught up."""
        s = self.s
        n = topic_partitions(s, s.table)
        if n == 0:
            raise RuntimeError(f"the table topic {s.table} does not exist (the worker creates it at start)")
        snap = self.store.load_table(s.group_id, s.table)
        start = {p: OFFSET_BEGINNING for p in range(n)}
        if snap is not None:
            offsets, table = snap
            if (
                isinstance(table, ItemTable)
                and getattr(table, "format", 1) == ItemTable.FORMAT
                and table.dim == self.table.dim
                and set(offsets) <= set(start)
            ):
                self.table = table
                self.offsets = dict(offsets)
                self.saved = dict(offsets)
                start.update(offsets)
                log.info("item table: restored a snapshot of %d items at offsets %s", table.n_items, offsets)
            else:
                log.warning("item table: the snapshot does not fit these settings; reading the topic from the start")
        self.consumer = Consumer(
            {
                **kafka_common(s),
                "group.id": f"{s.group_id}.table-reader",  # never joins or commits: partitions are assigned
                "enable.auto.commit": False,
                "fetch.wait.max.ms": s.internal_fetch_wait_ms,
                "queued.max.messages.kbytes": 16384,
            }
        )
        self.consumer.assign([TopicPartition(s.table, p, o) for p, o in start.items()])
        ends = end_offsets(s, s.table, n)
        t0 = time.monotonic()
        while any(self.offsets.get(p, 0) < e for p, e in ends.items()):
            if time.monotonic() - t0 > _CATCH_UP_TIMEOUT_S:
                raise TimeoutError(f"item table: not caught up with {s.table} after {_CATCH_UP_TIMEOUT_S:.0f}s")
            self.poll(timeout=0.2)
        self._install_long(self._fetch_long())
        log.info(
            "item table: %d items, caught up with %s in %.1f s", self.table.n_items, s.table, time.monotonic() - t0
        )
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self.consumer is not None:
            self.consumer.close()

    def poll(self, timeout: float = 0.0, max_messages: int = 5000) -> int:
        """Apply the entries that have arrived (and a new long-term model); returns how many.
        With a ``timeout``, waits at most that long for the first message."""
        assert self.consumer is not None
        entries: list[TableEntry] = []
        msgs = self.consumer.consume(num_messages=1, timeout=timeout) if timeout > 0 else []
        for m in msgs + self.consumer.consume(num_messages=max_messages, timeout=0):
            if m.error() is not None:
                continue
            p, o = m.partition(), m.offset()
            if p is not None and o is not None:
                self.offsets[p] = o + 1
            value = m.value()
            if value is None:  # a tombstone: the item stage never writes one
                continue
            try:
                wm = decode_watermark(value)
                if wm is not None:
                    self.table.apply(entries)  # the entries it covers came before it
                    entries = []
                    if p is not None:
                        self.table.watermarks[p] = wm
                    continue
                entries.append(TableEntry.decode(value))
            except ValueError as e:
                self.invalid += 1
                log.error("item table: skipped an entry at %s/%s/%s: %s", self.s.table, p, o, e)
        n = self.table.apply(entries)
        pending, self._long = self._long, None
        self._install_long(pending)
        return n

    # -- the long-term model -----------------------------------------------------------------
    def _fetch_long(self) -> tuple[int, list[str], object] | None:
        version = self.store.long_model_version()
        if version is None or version <= max(self._long_seen, self.table.long_version):
            return None
        blob = self.store.long_model()
        if blob is None:
            return None
        got = decode_model(blob)
        self._long_seen = got[0]
        return got

    def _watch_long(self) -> None:
        while not self._stop.wait(self.s.long_poll_s):
            try:
                got = self._fetch_long()
            except Exception as e:  # noqa: BLE001 - a bad poll must not kill the watcher
                log.warning("long-term model poll failed (%s); keeping the current version", type(e).__name__)
                continue
            if got is not None:
                self._long = got

    def _install_long(self, got: tuple[int, list[str], object] | None) -> None:
        if got is None or got[0] <= self.table.long_version:
            return
        version, ids, weights = got
        self.table.set_long(version, ids, weights)  # type: ignore[arg-type]
        log.info("long-term model version %d loaded (%d items)", version, len(ids))

    # -- snapshots ---------------------------------------------------------------------------
    def snapshottable(self) -> Snapshottable:
        pos = tuple(sorted(self.offsets.items()))
        return Snapshottable(("table", 0, pos), pos, tuple(sorted(self.saved.items())), self.saved_at)

    def writer(self) -> Write:
        group, topic, offsets, table = self.s.group_id, self.s.table, dict(self.offsets), self.table
        return lambda store: store.save_table(group, topic, offsets, table)

    def saved_as(self, tag: Tag, started: float) -> None:
        """A snapshot tagged ``tag`` (from ``snapshottable``) was written."""
        self.saved, self.saved_at = dict(tag[2]), started
