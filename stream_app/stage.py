"""The consume/partition loop that both stages run: batched, exactly-once in its effects.

Why not a faust agent: faust costs ~70 us per event in framework overhead on these machines,
more than all of our model work. This loop runs in its own thread (never on an event loop),
consumes thousands of messages per call, and does per-batch IO only: one Redis pipeline, one
flush of the messages it produced and one offset commit per loop iteration.

Exactly-once *effects*: every assigned partition has its own state, and a snapshot stores it with
the offset it reflects in one Redis SET. On assignment a partition is restored from its snapshot
and consumption resumes at that offset, so redone input rebuilds exactly the state an
uninterrupted run would have. Outputs are idempotent (version-guarded overwrites in Redis,
offset-tagged deltas that the item stage applies once, table entries that replace older ones), and
a batch's offsets are committed only once its outputs have landed, so lag monitoring works.

A stage subclass says what a partition's state is and what an iteration does with the buffered
messages (``process``); this class owns the consumer, the assignment callbacks and the commits,
and uses the output writer (``stream_app.output``: Redis writes on their own thread, overlapping
the next iteration's consume and model work) and the snapshot scheduler (``stream_app.snapshots``).
An iteration waits for the write in flight only before it starts its own write, or before a
snapshot (a snapshot must not hold state whose outputs are not yet in Redis).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from threadpoolctl import threadpool_limits

from stream_app import metrics
from stream_app.config import Settings
from stream_app.kafka_io import KafkaSink, consumer_config
from stream_app.output import Output, OutputWriter
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore
from stream_app.snapshots import SnapshotScheduler, Snapshottable, Tag

log = logging.getLogger(__name__)

# One stage's block work at a time in a process. The stages' threads share one interpreter,
# and the compiled kernels, numpy and torch release the GIL for each call: a thread that gets it
# back while another stage runs Python waits out the switch interval (5 ms) each time, so a
# block of a few milliseconds' work took tens to hundreds. Holding this, the other stage waits
# for the block instead, which costs it no more than the block's own time.
BLOCK_WORK = threading.Lock()

S = TypeVar("S")


def tune_gc() -> None:
    """Fewer, larger young-generation collections, and what start-up made out of their way.

    A stage allocates a few short-lived objects per event (decoded events, tuples, lists), so
    CPython's default threshold (a young collection every 700 allocations) collects every few
    hundred events, and each collection ages survivors toward full ones, which traverse every
    user's and item's objects. Measured in one thread (``streamrec bench --stages``), this setting
    turned about 18,000 events/s into about 23,000. Garbage without cycles is freed by reference
    counting as before; cycles wait a little longer (at most 50,000 allocations) to be collected.
    """
    gc.collect()
    gc.freeze()  # modules, kernels, the loaded table: never garbage, never traversed again
    gc.set_threshold(50_000, 50, 20)


def offset_of(m: Message) -> int:
    """A consumed message's offset (never None for messages without an error)."""
    o = m.offset()
    return -1 if o is None else o


@dataclass
class PartitionRun(Generic[S]):
    """What a stage holds for one assigned partition."""

    partition: int
    state: S
    next_offset: int  # first offset not yet folded into ``state``
    dlq_from: int  # offsets below this were dead-lettered by an earlier run
    snapshot_offset: int
    snapshot_at: float = field(default_factory=time.monotonic)
    buffer: list[Message] = field(default_factory=list)
    extra: Any = None  # stage-specific companions of the state (the user stage's sample builder)
    published: dict[int, int] = field(default_factory=dict)  # the item stage's last watermark sent
    # snapshot at the next iteration, whatever the interval (a user was forgotten: no snapshot
    # should hold them for longer than that)
    snapshot_soon: bool = False


class StageLoop(Generic[S]):
    """Consume ``topic`` as consumer group ``group``; per partition, a state of type ``S``."""

    name = "stage"
    assigned_label = "partitions"  # how assignments are logged: "assigned <label> [...]"
    queue_kbytes = 65536  # how much the consumer prefetches
    consume_batch = 0  # messages per consume() call (a call waits until it has them, or for the timeout); 0: batch_size

    def __init__(self, settings: Settings, client: redis.Redis, topic: str, group: str) -> None:
        self.s = settings
        self.topic, self.group = topic, group
        self.store = RedisStore(client, settings.redis_prefix)
        self.runs: dict[int, PartitionRun[S]] = {}
        self.stop_event = threading.Event()
        self.consumer: Consumer | None = None
        self.sink: KafkaSink | None = None
        self.error: BaseException | None = None
        self.snapshots = SnapshotScheduler(
            self.store, lambda: redis_client(settings), settings.snapshot_interval_s, settings.snapshot_fork
        )
        self.writer = OutputWriter(self.name.split()[0], self.retry)
        self._live = False  # the last consume call ran dry: no backlog, latency matters
        self._held_poll_at = 0.0  # the last consume call while blocks were held back
        # writes that landed, not yet committed: (messages produced by their submission, offsets)
        self._landed: list[tuple[int, dict[int, int]]] = []
        self._write_mark = 0
        # what /metrics and the health checks read (stream_app.metrics)
        self.label = self.name.split()[0]
        self.lag: dict[int, int] = {}  # partition -> messages behind its high watermark
        self.beat = 0.0  # monotonic time the loop last came round (0: not looping yet)
        self.ready = False  # prepared, joined, and the assigned partitions restored
        self._thread: threading.Thread | None = None
        self._lag_at = 0.0
        metrics.track(self)
        for family in (metrics.REDIS_ERRORS, metrics.KAFKA_ERRORS, metrics.SNAPSHOT_WRITES, metrics.EVENTS_CONSUMED):
            family.labels(self.label)  # exported as 0 from the start, so that rate() has a series
        self._lock_wait = metrics.BLOCK_LOCK_WAIT.labels(self.label)

    # -- what a stage defines ----------------------------------------------------------------
    def new_state(self, partition: int) -> S:
        raise NotImplementedError

    def adopt(self, partition: int, state: Any) -> tuple[S, list[str]]:
        """A restored snapshot's state, checked and reconfigured; and the settings that changed."""
        raise NotImplementedError

    def fetch_wait_ms(self) -> int | None:
        """The consumer's ``fetch.wait.max.ms``; None: ``FETCH_WAIT_MAX_MS``."""
        return None

    def prepare(self) -> None:
        """Before the stage joins its group (e.g. load the item table)."""

    def attach(self, run: PartitionRun[S]) -> None:
        """A partition was assigned (restored or new)."""

    def process(self, drained: bool, now: float) -> Output | None:
        """One iteration's work on the buffered messages; advances ``next_offset`` of the runs it
        consumed from and returns their Redis write (or None)."""
        raise NotImplementedError

    def handover_output(self, runs: list[PartitionRun[S]], stopping: bool) -> Output | None:
        """Before ``runs`` are snapshotted and handed over (revoked, or the worker stops)."""
        return None

    def extra_snapshots(self, now: float) -> None:
        """Snapshots of state other than the partitions' (the user stage's item table)."""

    def extra_due(self, now: float) -> bool:
        """Whether one of ``extra_snapshots`` is due."""
        return False

    def close(self) -> None:
        """After the loop stopped (success or error)."""

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        """Blocking; returns when ``stop()`` is called. Runs in a dedicated thread."""
        self._thread = threading.current_thread()
        self.consumer = Consumer(consumer_config(self.s, self.group, self.queue_kbytes, self.fetch_wait_ms()))
        self.sink = KafkaSink(self.s, self.label)
        try:
            # small matrices, latency-bound: BLAS threads would only compete with ours for cores
            with threadpool_limits(limits=1, user_api="blas"):
                self.prepare()
                tune_gc()
                self.consumer.subscribe(
                    [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
                )
                log.info("%s consuming %s as group %s", self.name, self.topic, self.group)
                while not self.stop_event.is_set():
                    self.beat = time.monotonic()
                    self._iteration()
                self._finish()
        except BaseException as e:
            self.error = e
            log.exception("%s stopped on an error", self.name)
            raise
        finally:
            self.writer.close()
            self.close()
            self.consumer.close()
            self.sink.producer.flush(10)

    def stop(self) -> None:
        self.stop_event.set()

    def alive(self) -> bool:
        """The stage's thread has started and not ended (for /healthz)."""
        return self._thread is None or self._thread.is_alive()

    def snapshot_ages(self, now: float) -> dict[int, float]:
        """Seconds since each assigned partition's last snapshot (for /metrics)."""
        return {r.partition: now - r.snapshot_at for r in list(self.runs.values())}

    # -- partitions --------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.info("%s: assigned %s %s", self.name, self.assigned_label, sorted(tp.partition for tp in tps))
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=30)}
        for tp in tps:
            snap = self.retry(partial(self.store.load_snapshot, self.s.group_id, self.topic, tp.partition))
            done = committed.get(tp.partition, -1)
            if snap is not None:
                offset, raw = snap
                state, changed = self.adopt(tp.partition, raw)  # raises if the state cannot go on
                tp.offset = offset
                log.info(
                    "%s: partition %d: restored snapshot at offset %d (committed %d)%s",
                    self.name,
                    tp.partition,
                    offset,
                    done,
                    f"; settings changed: {', '.join(changed)}" if changed else "",
                )
            else:
                offset, state = 0, self.new_state(tp.partition)
                tp.offset = OFFSET_BEGINNING
                log.info(
                    "%s: partition %d: no snapshot, building state from the start of the log", self.name, tp.partition
                )
            run = self.runs[tp.partition] = PartitionRun(tp.partition, state, offset, max(done, 0), offset)
            self.attach(run)
        consumer.assign(tps)
        self.ready = True

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._settle(sync=True)
        revoked = [self.runs[tp.partition] for tp in tps if tp.partition in self.runs]
        out = self.handover_output(revoked, stopping=False) if revoked else None
        if out is not None:
            self.retry(out)
        for run in revoked:
            if run.next_offset != run.snapshot_offset:
                self._snapshot_inline(run)
        if revoked:
            self._commit({r.partition: r.next_offset for r in revoked}, sync=True)
        for run in revoked:
            del self.runs[run.partition]
            self.lag.pop(run.partition, None)
        consumer.unassign()

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        # Another worker may already own them: drop without snapshotting over its state.
        for tp in tps:
            self.runs.pop(tp.partition, None)
            self.lag.pop(tp.partition, None)
        log.warning("%s: partitions lost: %s", self.name, [tp.partition for tp in tps])

    # -- the loop ----------------------------------------------------------------------------
    def waiting(self) -> bool:
        """Whether the next iteration should wait for something other than the stage's own
        topic (then that topic is only polled, not waited on)."""
        return False

    def _iteration(self) -> None:
        assert self.consumer is not None
        want = self.consume_batch or max(self.s.batch_size, 500)
        waiting = self.waiting()
        wait = 0.0 if waiting else self.s.poll_timeout_ms / 1000
        delay = self.s.block_delay_ms / 1000
        held = waiting and sum(len(r.buffer) for r in self.runs.values()) >= want
        if held:
            # blocks are held back (the item table, a starting item stage): what is buffered
            # already makes the next blocks, and a backlog stays in the broker, not in memory.
            # A message a second keeps the consumer polling, as its group requires
            # (max.poll.interval.ms) however long the wait.
            msgs = []
            if time.monotonic() - self._held_poll_at >= 1.0:
                self._held_poll_at = time.monotonic()
                msgs = self.consumer.consume(num_messages=1, timeout=0)
        elif self._live and delay < wait:
            # live traffic: start a block as soon as an event arrives, with what else arrives
            # within block_delay_ms (a consume call waits until it has ``want`` messages)
            msgs = self.consumer.consume(num_messages=1, timeout=wait)
            if msgs:
                msgs.extend(self.consumer.consume(num_messages=want - 1, timeout=delay))
        else:
            msgs = self.consumer.consume(num_messages=want, timeout=wait)
        drained = len(msgs) < want and not held  # the local fetch queue ran dry: all that has arrived is here
        self._live = drained or (held and self._live)
        if msgs:
            metrics.EVENTS_CONSUMED.labels(self.label).inc(len(msgs))
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    metrics.KAFKA_ERRORS.labels(self.label).inc()
                    log.error("%s: kafka error: %s", self.name, err)
                    if err.fatal():
                        raise RuntimeError(f"fatal Kafka error: {err}")
                continue
            run = self.runs.get(m.partition() or 0)
            if run is not None and offset_of(m) >= run.next_offset:
                run.buffer.append(m)
        now = time.monotonic()
        waited = 0.0
        self._commit_landed(sync=False, wait=False)  # writes that landed, blocks' messages acknowledged
        if self._snapshots_due(now):
            # a snapshot must show no more than Redis does: let the write in flight land first
            t0 = time.perf_counter()
            self._settle(sync=False)
            waited = time.perf_counter() - t0
            self._periodic_snapshots(now)
        else:
            self._periodic_snapshots(now, start=False)
        before = {p: r.next_offset for p, r in self.runs.items()}
        t1 = time.perf_counter()
        # the model work overlaps the previous iteration's write, which lands before this
        # iteration's write starts
        with BLOCK_WORK:
            lock_wait = time.perf_counter() - t1
            out = self.process(drained, now)
        offsets = {p: r.next_offset for p, r in self.runs.items() if r.next_offset != before[p]}
        t2 = time.perf_counter()
        # committed in a later iteration, once the messages of its block are acknowledged: a
        # flush now would also wait for the deltas this block has just produced
        self._settle(sync=False, commit=False)
        waited += time.perf_counter() - t2
        self._lock_wait.inc(lock_wait)
        if out is not None or offsets:
            metrics.BLOCK_SECONDS.observe(t2 - t1, self.label)
            metrics.BLOCK_EVENTS.observe(sum(r.next_offset - before[p] for p, r in self.runs.items()), self.label)
            self._write_mark = self.sink.produced if self.sink is not None else 0  # the block's messages
            self.writer.submit(self._timed(out) if out is not None else None, offsets)
        if now - self._lag_at >= 1.0:
            self._lag_at = now
            self._measure_lag()
        if offsets and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %d messages in, %d consumed; work %.1f ms (of it %.1f waiting for the other stage's "
                "block), waited for the last outputs %.1f ms",
                self.name,
                len(msgs),
                sum(r.next_offset - before[p] for p, r in self.runs.items() if p in offsets),
                1000 * (t2 - t1),
                1000 * lock_wait,
                1000 * waited,
            )

    def _timed(self, out: Output) -> Output:
        def write() -> object:
            t0 = time.perf_counter()
            res = out()
            metrics.REDIS_WRITE_SECONDS.observe(time.perf_counter() - t0, self.label)
            return res

        return write

    def _measure_lag(self) -> None:
        """Messages between each partition's next offset and its high watermark (as last fetched)."""
        assert self.consumer is not None
        for p, r in list(self.runs.items()):
            _, hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            if hi >= 0:
                self.lag[p] = max(hi - r.next_offset, 0)

    def _settle(self, sync: bool, commit: bool = True) -> None:
        """Wait for the write in flight (which retries outages itself); with ``commit``, flush
        what was produced to Kafka, then commit the offsets of every write that has landed."""
        offsets = self.writer.settle()
        if offsets is not None:
            self._landed.append((self._write_mark, offsets))
        if commit:
            self._commit_landed(sync, wait=True)

    def _commit_landed(self, sync: bool, wait: bool) -> None:
        """Commit the offsets of the writes that have landed and whose blocks' messages (e.g.
        their deltas) are acknowledged: all of them after a flush (``wait``), else those whose
        messages happen to be acknowledged already (the rest wait for a later call)."""
        assert self.sink is not None
        if not self._landed:
            return
        if wait:
            self.sink.flush()
            ready, self._landed = self._landed, []
        else:
            n = 0
            while n < len(self._landed) and self.sink.delivered_through(self._landed[n][0]):
                n += 1
            ready, self._landed = self._landed[:n], self._landed[n:]
        offsets: dict[int, int] = {}
        for _, o in ready:
            offsets.update(o)  # a later write's offsets are higher
        # not those of partitions lost meanwhile: another worker may own them now
        offsets = {p: o for p, o in offsets.items() if p in self.runs}
        if offsets:
            self._commit(offsets, sync, flush=False)

    def _commit(self, offsets: dict[int, int], sync: bool, flush: bool = True) -> None:
        assert self.consumer is not None and self.sink is not None
        if flush:
            self.sink.flush()
        tps = [TopicPartition(self.topic, p, o) for p, o in offsets.items()]
        if tps and sync:
            self.consumer.commit(offsets=tps, asynchronous=False)
        elif tps:
            self.consumer.commit(offsets=tps, asynchronous=True)

    def _partition_snapshottables(self) -> list[Snapshottable]:
        return [
            Snapshottable(
                ("partition", r.partition, r.next_offset),
                r.next_offset,
                r.snapshot_offset,
                -math.inf if r.snapshot_soon else r.snapshot_at,  # overdue: first in line
            )
            for r in self.runs.values()
        ]

    def _snapshots_due(self, now: float) -> bool:
        """Whether a snapshot is due in this iteration."""
        return bool(self.snapshots.due(self._partition_snapshottables(), now)) or self.extra_due(now)

    def _periodic_snapshots(self, now: float, start: bool = True) -> None:
        """Note the background snapshots that finished and (``start``: no write in flight, so
        that a snapshot shows no more than Redis does) start those that are due."""
        for done in self.snapshots.finished():
            kind, partition, offset = done.tag
            run = self.runs.get(partition) if kind == "partition" else None
            metrics.SNAPSHOT_WRITES.labels(self.label).inc()
            metrics.SNAPSHOT_SECONDS.observe(time.monotonic() - done.started, self.label)
            if run is not None and offset >= run.snapshot_offset:
                run.snapshot_offset, run.snapshot_at = offset, done.started
                log.info(
                    "%s: partition %d: snapshot at offset %d written in the background in %.0f ms",
                    self.name,
                    partition,
                    offset,
                    1000 * (time.monotonic() - done.started),
                )
            elif kind != "partition":
                self.snapshot_done(done.tag, done.started)
        if not start:
            return
        for x in self.snapshots.due(self._partition_snapshottables(), now):
            run = self.runs[x.tag[1]]
            run.snapshot_at = now  # don't ask again while this one is being written
            run.snapshot_soon = False
            size = self.snapshots.write(x.tag, self._snapshot_writer(run), background=True)
            if size is not None:
                self._snapshotted(run, size, now)
        self.extra_snapshots(now)

    def snapshot_done(self, tag: Tag, started: float) -> None:
        """A background snapshot of something other than a partition finished."""

    def _snapshot_writer(self, run: PartitionRun[S]) -> Callable[[RedisStore], int]:
        group, topic, p, o, state = self.s.group_id, self.topic, run.partition, run.next_offset, run.state
        return lambda store: store.save_snapshot(group, topic, p, o, state)

    def _snapshot_inline(self, run: PartitionRun[S]) -> None:
        """Revocation and shutdown: written now, after any background snapshot."""
        t0 = time.monotonic()
        write = self._snapshot_writer(run)
        size = self.retry(lambda: self.snapshots.write(("partition", run.partition, run.next_offset), write, False))
        self._snapshotted(run, size, t0)

    def _snapshotted(self, run: PartitionRun[S], size: int, t0: float) -> None:
        run.snapshot_offset, run.snapshot_at = run.next_offset, time.monotonic()
        metrics.SNAPSHOT_WRITES.labels(self.label).inc()
        metrics.SNAPSHOT_SECONDS.observe(run.snapshot_at - t0, self.label)
        log.info(
            "%s: partition %d: snapshot at offset %d, %.1f MB in %.0f ms",
            self.name,
            run.partition,
            run.next_offset,
            size / 1e6,
            1000 * (run.snapshot_at - t0),
        )

    def _finish(self) -> None:
        """Graceful stop: final outputs, snapshots, commit. Buffered messages of an unfinished
        block are left for the next owner (they are not committed)."""
        self._settle(sync=True)
        out = self.handover_output(list(self.runs.values()), stopping=True)
        if out is not None:
            self.retry(out)
        for run in self.runs.values():
            if run.next_offset != run.snapshot_offset:
                self._snapshot_inline(run)
        self._commit({r.partition: r.next_offset for r in self.runs.values()}, sync=True)
        self.runs.clear()  # handed over: closing the consumer revokes them once more

    def retry(self, fn: Callable[[], Any]) -> Any:
        """Redis outages stall the stage (nothing is committed meanwhile) instead of losing work."""
        delay = 0.1
        while True:
            try:
                return fn()
            except redis.exceptions.ConnectionError as e:
                metrics.REDIS_ERRORS.labels(self.label).inc()
                self.beat = time.monotonic()  # waiting on Redis, not hung: /healthz stays green
                if self.stop_event.is_set() and delay > 1.0:
                    raise
                log.warning("%s: redis unavailable (%s); retrying in %.1fs", self.name, type(e).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
