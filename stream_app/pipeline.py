"""The user stage: events keyed by user in, lists out, item-level deltas on to the item stage.

Per block of one events partition: decode and validate (invalid messages to the dead-letter
topic), fold the events into the partition's user state, rank every touched user against the
worker's item table (``stream_app.table_feed``), write the lists to Redis and produce the block's
deltas to the deltas topic, one message per item partition (``models.deltas``). The loop itself,
snapshots and commits are ``stream_app.stage``'s.

Micro-batches are cut at offsets that are multiples of ``batch_size`` (per partition) unless the
partition is caught up, in which case whatever has arrived is processed at once (low latency).
So a log that is already in the topic is cut the same way every time, including after a restart
from a snapshot.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import Message, TopicPartition

from models import threads
from models.ctr.samples import SampleBuilder
from models.deltas import cut, encode
from models.engine import user_step
from models.events import Event, EventSchema, Forget, InvalidEvent
from models.kernels import warm_up
from models.ranking import RecList
from models.table import ItemTable
from models.users import UserPartition
from stream_app import metrics
from stream_app.config import Settings
from stream_app.ctr_runtime import ModelWatcher
from stream_app.kafka_io import topic_partitions
from stream_app.os_threads import name_native
from stream_app.output import Output
from stream_app.snapshots import Tag
from stream_app.stage import PartitionRun, StageLoop, offset_of
from stream_app.table_feed import TableFeed

log = logging.getLogger(__name__)


@dataclass
class Stats:
    events: int = 0
    invalid: int = 0
    duplicates: int = 0
    lists: int = 0
    batches: int = 0
    samples: int = 0
    deltas: int = 0  # delta messages produced
    forgets: int = 0  # forget requests applied (``streamrec forget``)
    # how many of its partition's events the table missed when a block was ranked (since the
    # last stats report)
    table_lag: deque[int] = field(default_factory=lambda: deque(maxlen=100_000))

    def table_lag_quantiles(self) -> tuple[int, int, int]:
        """p50, p99 and max of the blocks' table lag, in events."""
        xs = sorted(self.table_lag) or [0]
        return xs[len(xs) // 2], xs[min(len(xs) - 1, int(0.99 * len(xs)))], xs[-1]


def split_block(buffer: list[Message], next_offset: int, batch_size: int, caught_up: bool) -> int:
    """How many buffered messages form the next block (0: wait for more).

    A block ends just before the next offset that is a multiple of ``batch_size``. It is ready
    when a later message proves the boundary was passed, or when the partition is caught up.
    """
    if not buffer:
        return 0
    # the first buffered offset, not next_offset: after retention deleted the log's head, the
    # first message can lie far beyond the offset we asked for
    start = max(next_offset, offset_of(buffer[0]))
    boundary = (start // batch_size + 1) * batch_size
    n = 0
    for m in buffer:
        if offset_of(m) >= boundary:
            return n
        n += 1
    return n if caught_up else 0


def decode_block(
    schema: EventSchema, msgs: list[Message]
) -> tuple[list[Event | Forget], list[int], list[tuple[Message, str]]]:
    """The valid events and control messages (``Forget``) in order, with their offsets, and the
    invalid messages with the reason."""
    events: list[Event | Forget] = []
    offsets: list[int] = []
    bad: list[tuple[Message, str]] = []
    for m in msgs:
        try:
            events.append(schema.decode_message(m.value()))
            offsets.append(offset_of(m))
        except InvalidEvent as e:
            bad.append((m, e.reason))
    return events, offsets, bad


class Pipeline(StageLoop[UserPartition]):
    """The user stage: consume -> validate -> update user state -> rank -> write Redis ->
    produce deltas -> commit, in micro-batches."""

    name = "user stage"

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        super().__init__(settings, client, settings.events_topic, settings.group_id)
        self.schema = settings.event_schema()
        self.params = settings.params()
        self.stats = Stats()
        self.feed = TableFeed(settings, self.store, self.params.dim)
        self.item_partitions = 0  # of the deltas topic, read at start
        self._blocked: set[str] = set()
        self._blocked_at = 0.0
        self._waiting: dict[int, float] = {}  # partitions whose next block waits for the table, since
        self._waited_out: set[int] = set()  # partitions ranking on without waiting any longer
        # the CTR model, when its weight is set: picked up from Redis as the trainer publishes
        self.categories: dict[str, str] = {}
        self.watcher = ModelWatcher(settings, self.store, self.categories) if settings.w_ctr > 0 else None
        self._ranker: tuple[Any, float | None, str] = (None, None, settings.model_version)
        self._arrivals: list[int] = []  # Kafka timestamps (ms) of the iteration's valid events
        # ``SPLIT_STAGES``: whether the item stage process is ready (set by the app); None once it is
        self.item_stage_ready: Callable[[], bool] | None = None
        self._asked_at = 0.0

    @property
    def table(self) -> ItemTable:
        """The worker's item table (the feed replaces it when it restores a snapshot)."""
        return self.feed.table

    # -- the stage's parts -------------------------------------------------------------------
    def prepare(self) -> None:
        warm_up()  # the kernels compiled (or loaded) before the first block, not in it
        threads.set_threads(self.s.rank_threads, initializer=name_native)
        self.item_partitions = topic_partitions(self.s, self.s.deltas)
        if self.item_partitions == 0:
            raise RuntimeError(f"the deltas topic {self.s.deltas} does not exist (the worker creates it at start)")
        self.feed.start()
        if self.watcher is not None:
            self.watcher.start()

    def close(self) -> None:
        self.feed.stop()

    def new_state(self, partition: int) -> UserPartition:
        return UserPartition(self.params)

    def adopt(self, partition: int, state: Any) -> tuple[UserPartition, list[str]]:
        if not isinstance(state, UserPartition):
            raise ValueError(
                f"the snapshot of partition {partition} of {self.topic} holds a {type(state).__name__}, not user "
                "state (written by an older release?); delete it to rebuild the state from the log"
            )
        return state, state.reconfigure(self.params)

    def attach(self, run: PartitionRun[UserPartition]) -> None:
        if self.s.samples:
            # user histories continue those of the state (views still open when the previous
            # owner stopped are not carried over: at worst a few negatives are lost)
            b = SampleBuilder(self.s.sample_params())
            b.seed_from(run.state)
            run.extra = b

    def extra_due(self, now: float) -> bool:
        return bool(self.snapshots.due([self.feed.snapshottable()], now))

    def extra_snapshots(self, now: float) -> None:
        x = self.feed.snapshottable()
        if self.snapshots.due([x], now):
            self.feed.saved_at = now  # don't ask again while this one is being written
            if self.snapshots.write(x.tag, self.feed.writer(), background=True) is not None:
                self.feed.saved_as(x.tag, time.monotonic())

    def snapshot_done(self, tag: Tag, started: float) -> None:
        self.feed.saved_as(tag, started)

    # -- an iteration ------------------------------------------------------------------------
    def process(self, drained: bool, now: float) -> Output | None:
        self.feed.poll()  # between blocks: new neighbour lists, a new long-term model
        w = self.watcher
        # one model for the whole iteration, even if a new version lands meanwhile
        self._ranker = (w.rescorer, w.epsilon, w.label) if w is not None else (None, None, self.s.model_version)
        r = w.rescorer if w is not None else None
        metrics.CTR_MODEL_VERSION.set(r.version if r is not None else 0)
        lists: list[RecList] = []
        forgotten: list[str] = []  # users forgotten in this iteration: their rec: keys are deleted
        self._arrivals = []
        started = self._item_stage_started(now)
        for run in self.runs.values():
            while run.buffer and started:
                n = split_block(run.buffer, run.next_offset, self.s.batch_size, self._caught_up(run, drained))
                if n == 0 or not self._table_current(run, offset_of(run.buffer[0]), now):
                    break
                block, run.buffer = run.buffer[:n], run.buffer[n:]
                got, gone = self._block(run, block)
                if gone:  # lists of these users ranked before their forget are never written
                    drop = set(gone)
                    lists = [rl for rl in lists if rl.user_id not in drop]
                    forgotten.extend(gone)
                lists.extend(got)
        if not lists and not forgotten:
            return None
        label, arrivals = self._ranker[2], np.asarray(self._arrivals, dtype=np.float64)
        arrivals = arrivals[arrivals > 0]  # -1: the broker gave no timestamp

        def write() -> None:
            self.store.write(lists, model=label, forget=forgotten)
            metrics.LISTS_WRITTEN.inc(len(lists))
            metrics.FRESHNESS.observe_many((time.time() * 1000.0 - arrivals) / 1000.0)

        return write

    def waiting(self) -> bool:
        """A block waits for the item table: wait for the table topic instead of the events."""
        if self.item_stage_ready is not None and any(r.buffer for r in self.runs.values()):
            self.feed.poll(timeout=self.s.poll_timeout_ms / 1000)  # blocks wait for the item stage to start
            return True
        if not any(p in self._waiting and p not in self._waited_out for p in self.runs):
            return False
        t0 = time.perf_counter()
        self.feed.poll(timeout=self.s.poll_timeout_ms / 1000)
        metrics.TABLE_WAIT.inc(time.perf_counter() - t0)
        return True

    def _item_stage_started(self, now: float) -> bool:
        """Whether blocks may go ahead: with the item stage in a child process (``SPLIT_STAGES``),
        not before that process is ready. Both start together, and the child (its own interpreter,
        its group join) is usually ready seconds later: a user stage that went ahead would run
        ``table_max_lag`` events ahead of an empty table and wait there, or, past
        ``table_wait_s``, rank its blocks against it. Asked at most every 0.1 s; once ready,
        never again (later, the table lag bound holds blocks back)."""
        ready = self.item_stage_ready
        if ready is None:
            return True
        if now - self._asked_at < 0.1:
            return False
        self._asked_at = now
        if not ready():
            return False
        self.item_stage_ready = None
        log.info("user stage: the item stage process is ready")
        return True

    def _table_current(self, run: PartitionRun[UserPartition], first: int, now: float) -> bool:
        """Whether the item table reflects the partition's events up to ``table_max_lag`` before
        ``first``, the block's first offset (the item stage's watermarks say so). If not, the
        block waits, at most ``table_wait_s``: then it is ranked anyway (the item stage is down
        or far behind; said once in the log) until the table has caught up again."""
        p = run.partition
        applied = self.table.applied(p, self.item_partitions)
        if applied >= first - self.s.table_max_lag:
            self.stats.table_lag.append(max(first - applied, 0))
            if self._waiting.pop(p, None) is not None and p in self._waited_out:
                self._waited_out.discard(p)
                log.info("user stage: partition %d: the item table has caught up", p)
            return True
        since = self._waiting.setdefault(p, now)
        if now - since < self.s.table_wait_s:
            return False
        if p not in self._waited_out:
            self._waited_out.add(p)
            log.warning(
                "user stage: partition %d: the item table is more than %d events behind for %.0f s "
                "(is an item stage running?); ranking with it as it is",
                p,
                self.s.table_max_lag,
                now - since,
            )
        return True

    def _caught_up(self, run: PartitionRun[UserPartition], drained: bool) -> bool:
        """Whether to process a partial block now rather than wait for the rest of it.

        Yes when the buffer reaches the partition's high watermark, or when the fetch queue ran
        dry and less than a block is outstanding (live traffic: latency matters). A log that is
        already in the topic therefore always splits at multiples of ``batch_size``.
        """
        assert self.consumer is not None
        _, hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, run.partition), cached=True)
        lag = hi - (offset_of(run.buffer[-1]) + 1) if hi >= 0 else 0
        return lag <= 0 or (drained and lag < self.s.batch_size)

    def _block(self, run: PartitionRun[UserPartition], block: list[Message]) -> tuple[list[RecList], list[str]]:
        """The block's lists, and the users it forgot (``streamrec forget``), in order."""
        sink = self.sink
        assert sink is not None
        events, offsets, bad = decode_block(self.schema, block)
        for m, reason in bad:
            label = metrics.invalid_reason(reason)
            metrics.EVENTS_INVALID.labels(label).inc()
            if offset_of(m) >= run.dlq_from:  # an earlier run already dead-lettered the rest
                sink.dead_letter(m.key(), m.value(), run.partition, offset_of(m), reason)
                metrics.DEAD_LETTERS.labels(label).inc()
        samples: SampleBuilder | None = run.extra
        if samples is not None:
            # before the state moves on: features as at event time. This runs ahead of the state's
            # event_id de-duplication, so a duplicated event also duplicates its samples.
            smp = samples.feed(events)
            for x in smp:
                sink.send(self.s.samples_topic, orjson.dumps(x.as_obj()), key=x.user_id.encode())
            self.stats.samples += len(smp)
        if self.watcher is not None:
            cats = self.categories
            for e in events:
                if isinstance(e, Event) and e.props:
                    c = e.props.get("category")
                    if isinstance(c, str):
                        cats[e.item_id] = c
        rescorer, epsilon, _ = self._ranker
        out = user_step(
            run.state,
            self.table,
            events,
            offsets,
            source=run.partition,
            span=(offset_of(block[0]), offset_of(block[-1]) + 1),
            item_partitions=self.item_partitions,
            blocked=self._blocked_items(),
            rescorer=rescorer,
            epsilon=epsilon,
            observer=samples,
        )
        key = str(run.partition).encode()
        for q, msg in enumerate(out.messages):
            for piece in cut(msg, self.s.delta_max_bytes):
                sink.send(self.s.deltas, encode(piece), key=key, partition=q)
                self.stats.deltas += 1
                metrics.DELTAS_PRODUCED.inc()
        sink.poll()
        run.next_offset = offset_of(block[-1]) + 1
        st = self.stats
        st.events += out.effect.applied
        st.invalid += len(bad)
        st.duplicates += out.effect.duplicates
        st.lists += len(out.lists)
        st.batches += 1
        metrics.EVENTS_PROCESSED.inc(out.effect.applied)
        if out.effect.duplicates:
            metrics.EVENTS_DUPLICATE.inc(out.effect.duplicates)
        gone = out.effect.forgotten
        # arrival times of the block's events, for the freshness histogram: not of invalid
        # messages or forget requests, which get no list
        skip = {offset_of(m) for m, _ in bad}
        if gone:
            skip.update(o for e, o in zip(events, offsets, strict=True) if isinstance(e, Forget))
        self._arrivals.extend(m.timestamp()[1] for m in block if not skip or offset_of(m) not in skip)
        if gone:
            st.forgets += len(gone)
            metrics.FORGETS.inc(len(gone))
            run.snapshot_soon = True  # so that no snapshot holds them for long (next iteration)
            log.info("user stage: partition %d: %d user(s) forgotten on request", run.partition, len(gone))
        return out.lists, gone

    def _blocked_items(self) -> set[str]:
        now = time.monotonic()
        if now - self._blocked_at >= 1.0:
            self._blocked = self.retry(self.store.unavailable)
            self._blocked_at = now
        return self._blocked
