"""The hot path: a batched confluent-kafka consumer feeding the pure models, writing to Redis.

Why not a faust agent: faust costs ~70 us per event in framework overhead on these machines
(ARCHITECTURE.md), more than all of our model work. This loop runs in its own thread (never on
an event loop), consumes thousands of messages per call, and does per-batch IO only: one Redis
pipeline, one dead-letter flush and one offset commit per loop iteration.

Exactly-once *effects* on state: every partition has its own ``PartitionState``; a snapshot stores
it together with the offset it reflects in one Redis SET. On assignment a partition is restored
from its snapshot and consumption resumes at that offset, so redone events rebuild exactly the
state an uninterrupted run would have; list writes are version-guarded overwrites, so redoing
them is harmless. Offsets are committed to Kafka after every batch so lag monitoring works.

Micro-batches are cut at offsets that are multiples of ``batch_size`` (per partition) unless the
partition is caught up, in which case whatever has arrived is processed at once (low latency).
So a replay of a log that is already in the topic is cut the same way every time, including
after a restart from a snapshot, which makes lists reproducible, not only state.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from threadpoolctl import threadpool_limits

from models.ctr.samples import SampleBuilder
from models.engine import step
from models.events import Event, EventSchema, InvalidEvent
from models.ranking import RecList, sim_list, trending
from models.state import PartitionState
from stream_app.config import Settings
from stream_app.ctr_runtime import ModelWatcher
from stream_app.kafka_io import DeadLetters, consumer_config
from stream_app.redis_store import RedisStore
from stream_app.snapshots import ForkedSnapshots

log = logging.getLogger(__name__)


@dataclass
class PartitionRun:
    """What the pipeline holds for one assigned partition."""

    partition: int
    state: PartitionState
    next_offset: int  # first offset not yet folded into ``state``
    dlq_from: int  # offsets below this were dead-lettered by an earlier run
    snapshot_offset: int
    snapshot_at: float = field(default_factory=time.monotonic)
    buffer: list[Message] = field(default_factory=list)
    sim_dirty: set[int] = field(default_factory=set)
    samples: SampleBuilder | None = None  # CTR samples, when the worker produces them


@dataclass
class PendingWrite:
    """A batch's Redis write in flight, and the offsets it completes once it lands."""

    future: Future[Any]
    offsets: dict[int, int]


@dataclass
class Stats:
    events: int = 0
    invalid: int = 0
    duplicates: int = 0
    lists: int = 0
    batches: int = 0
    snapshots: int = 0
    samples: int = 0


def offset_of(m: Message) -> int:
    """A consumed message's offset (never None for messages without an error)."""
    o = m.offset()
    return -1 if o is None else o


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


def decode_block(schema: EventSchema, msgs: list[Message]) -> tuple[list[Event], list[tuple[Message, str]]]:
    events: list[Event] = []
    bad: list[tuple[Message, str]] = []
    for m in msgs:
        try:
            events.append(schema.decode(m.value()))
        except InvalidEvent as e:
            bad.append((m, e.reason))
    return events, bad


class Pipeline:
    """Consume -> validate -> update state -> rank -> write Redis -> commit, in micro-batches."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.s = settings
        self.schema = settings.event_schema()
        self.params = settings.params()
        self.store = RedisStore(client, settings.redis_prefix)
        self.runs: dict[int, PartitionRun] = {}
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.consumer: Consumer | None = None
        self.dlq: DeadLetters | None = None
        self._blocked: set[str] = set()
        self._blocked_at = 0.0
        self._sims_at = 0.0
        # Redis writes run on their own thread, overlapping the next batch's consume and model
        # work; a batch's offsets are committed only after its write has landed.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrec-redis")
        self._pending: PendingWrite | None = None
        # long-term model fits (models.longterm) run in a process of their own (LAPACK holds the
        # GIL), off the batch loop; when each is installed is decided by the event count, so
        # lists do not depend on how long one took. Started at once: a spawn takes a second.
        self._fits: ProcessPoolExecutor | None = None
        if self.params.w_long > 0:
            self._fits = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_fit_process_init
            )
            self._fits.submit(int)
        self.error: BaseException | None = None
        # the CTR model, when its weight is set: picked up from Redis as the trainer publishes
        self.categories: dict[str, str] = {}
        self.watcher = ModelWatcher(settings, client, self.categories) if settings.w_ctr > 0 else None
        self._ranker: tuple[Any, float | None, str] = (None, None, settings.model_version)
        self.forked = (
            ForkedSnapshots(settings.redis_url, settings.redis_prefix, settings.group_id, settings.events_topic)
            if settings.snapshot_fork and ForkedSnapshots.available()
            else None
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        """Blocking; returns when ``stop()`` is called. Runs in a dedicated thread."""
        self.consumer = Consumer(consumer_config(self.s))
        self.dlq = DeadLetters(self.s)
        self.consumer.subscribe(
            [self.s.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("pipeline consuming %s as group %s", self.s.events_topic, self.s.group_id)
        if self.watcher is not None:
            self.watcher.start()
        try:
            # small matrices, latency-bound: BLAS threads would only compete with ours for cores
            with threadpool_limits(limits=1, user_api="blas"):
                while not self.stop_event.is_set():
                    self._iteration()
                self._finish_all()
        except BaseException as e:
            self.error = e
            log.exception("pipeline stopped on an error")
            raise
        finally:
            self._writer.shutdown(wait=True)
            if self._fits is not None:
                self._fits.shutdown(wait=True, cancel_futures=True)  # at most one fit to finish
            self.consumer.close()
            self.dlq.producer.flush(10)

    def stop(self) -> None:
        self.stop_event.set()

    # -- partitions --------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.info("assigned partitions %s", sorted(tp.partition for tp in tps))
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=30)}
        for tp in tps:
            snap = self._retry(lambda tp=tp: self.store.load_snapshot(self.s.group_id, tp.topic, tp.partition))
            done = committed.get(tp.partition, -1)
            if snap is not None:
                offset, state = snap
                changed = state.reconfigure(self.params)  # raises if the state cannot take them
                tp.offset = offset
                log.info(
                    "partition %d: restored snapshot at offset %d (committed %d)%s",
                    tp.partition,
                    offset,
                    done,
                    f"; settings changed: {', '.join(changed)}" if changed else "",
                )
            else:
                offset, state = 0, PartitionState(self.params)
                tp.offset = OFFSET_BEGINNING
                log.info("partition %d: no snapshot, building state from the start of the log", tp.partition)
            state.executor = self._fits
            run = self.runs[tp.partition] = PartitionRun(tp.partition, state, offset, max(done, 0), offset)
            if self.s.samples:
                run.samples = self._sample_builder(state)
        consumer.assign(tps)

    def _sample_builder(self, state: PartitionState) -> SampleBuilder:
        """A sample builder whose user histories continue those of ``state`` (views still open
        when the previous owner stopped are not carried over: at worst a few negatives are lost)."""
        b = SampleBuilder(self.s.sample_params())
        b.seed_from(state)
        return b

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._settle(sync=True)
        revoked = [self.runs[tp.partition] for tp in tps if tp.partition in self.runs]
        for run in revoked:
            if run.next_offset != run.snapshot_offset:
                self._snapshot(run)
        if revoked:
            self._commit(sync=True, runs=revoked)
        for run in revoked:
            del self.runs[run.partition]
        consumer.unassign()

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        # Another worker may already own them: drop without snapshotting over its state.
        for tp in tps:
            self.runs.pop(tp.partition, None)
        log.warning("partitions lost: %s", [tp.partition for tp in tps])

    # -- the loop ----------------------------------------------------------------------------
    def _iteration(self) -> None:
        assert self.consumer is not None
        want = max(self.s.batch_size, 500)
        msgs = self.consumer.consume(num_messages=want, timeout=self.s.poll_timeout_ms / 1000)
        drained = len(msgs) < want  # the local fetch queue ran dry: all that has arrived is here
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.error("kafka error: %s", err)
                    if err.fatal():
                        raise RuntimeError(f"fatal Kafka error: {err}")
                continue
            run = self.runs.get(m.partition() or 0)
            if run is not None and offset_of(m) >= run.next_offset:
                run.buffer.append(m)
        t0 = time.perf_counter()
        self._settle(sync=False)  # the previous batch's outputs are in Redis: commit them
        now = time.monotonic()
        self._periodic_snapshots(now)  # the state now matches what Redis shows
        t1 = time.perf_counter()
        w = self.watcher
        # one model for the whole iteration, even if a new version lands meanwhile
        self._ranker = (w.rescorer, w.epsilon, w.label) if w is not None else (None, None, self.s.model_version)
        lists: list[RecList] = []
        processed: list[PartitionRun] = []
        for run in self.runs.values():
            while run.buffer:
                n = split_block(run.buffer, run.next_offset, self.s.batch_size, self._caught_up(run, drained))
                if n == 0:
                    break
                block, run.buffer = run.buffer[:n], run.buffer[n:]
                lists.extend(self._process(run, block))
                processed.append(run)
        sims = self._due_sims(now)
        if lists or sims or processed:
            trend = self._trending() if processed else None
            offsets = {r.partition: r.next_offset for r in processed}
            self._pending = PendingWrite(self._writer.submit(self._write, lists, sims, trend, self._ranker[2]), offsets)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "iteration: %d messages, %d blocks, %d lists, %d sims; models %.1f ms, waited for redis %.1f ms",
                    len(msgs),
                    len(processed),
                    len(lists),
                    len(sims),
                    1000 * (time.perf_counter() - t1),
                    1000 * (t1 - t0),
                )

    def _settle(self, sync: bool) -> None:
        """Wait for the in-flight Redis write (the writer retries outages itself), then commit
        the offsets it completed."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.future.result()
        assert self.consumer is not None and self.dlq is not None
        self.dlq.flush()
        self._commit_offsets(pending.offsets, sync)

    def _periodic_snapshots(self, now: float) -> None:
        """Snapshot partitions whose snapshot is older than the interval: in a forked child when
        possible (one at a time), else inline."""
        if self.forked is not None:
            done = self.forked.poll()
            if done is not None and done.partition in self.runs:
                run = self.runs[done.partition]
                run.snapshot_offset, run.snapshot_at = done.offset, done.started
                self.stats.snapshots += 1
                log.info(
                    "partition %d: snapshot at offset %d written in the background in %.0f ms",
                    done.partition,
                    done.offset,
                    1000 * (time.monotonic() - done.started),
                )
            if self.forked.busy():
                return
        due = [
            r
            for r in self.runs.values()
            if r.next_offset > r.snapshot_offset and now - r.snapshot_at >= self.s.snapshot_interval_s
        ]
        if not due:
            return
        if self.forked is not None:
            run = min(due, key=lambda r: r.snapshot_at)
            run.snapshot_at = now  # don't ask again while this one is being written
            self.forked.start(run.partition, run.next_offset, run.state)
        else:
            for run in due:
                self._snapshot(run)

    def _caught_up(self, run: PartitionRun, drained: bool) -> bool:
        """Whether to process a partial block now rather than wait for the rest of it.

        Yes when the buffer reaches the partition's high watermark, or when the fetch queue ran
        dry and less than a block is outstanding (live traffic: latency matters). A log that is
        already in the topic therefore always splits at multiples of ``batch_size``.
        """
        assert self.consumer is not None
        _, hi = self.consumer.get_watermark_offsets(TopicPartition(self.s.events_topic, run.partition), cached=True)
        lag = hi - (offset_of(run.buffer[-1]) + 1) if hi >= 0 else 0
        return lag <= 0 or (drained and lag < self.s.batch_size)

    def _process(self, run: PartitionRun, block: list[Message]) -> list[RecList]:
        assert self.dlq is not None
        events, bad = decode_block(self.schema, block)
        for m, reason in bad:
            if offset_of(m) >= run.dlq_from:  # an earlier run already dead-lettered the rest
                self.dlq.send(m.key(), m.value(), run.partition, offset_of(m), reason)
        if run.samples is not None:
            # before the state moves on: features as at event time. This runs ahead of the state's
            # event_id de-duplication, so a duplicated event also duplicates its samples.
            smp = run.samples.feed(events)
            self.dlq.send_samples(self.s.samples_topic, [(x.user_id.encode(), orjson.dumps(x.as_obj())) for x in smp])
            self.stats.samples += len(smp)
        if self.watcher is not None:
            cats = self.categories
            for e in events:
                c = e.props.get("category") if e.props else None
                if isinstance(c, str):
                    cats[e.item_id] = c
        rescorer, epsilon, _ = self._ranker
        out = step(
            run.state, events, blocked=self._blocked_items(), rescorer=rescorer, epsilon=epsilon, observer=run.samples
        )
        run.sim_dirty |= out.effect.items
        run.next_offset = offset_of(block[-1]) + 1
        st = self.stats
        st.events += out.effect.applied
        st.invalid += len(bad)
        st.duplicates += out.effect.duplicates
        st.lists += len(out.lists)
        st.batches += 1
        return out.lists

    def _blocked_items(self) -> set[str]:
        now = time.monotonic()
        if now - self._blocked_at >= 1.0:
            self._blocked = self._retry(self.store.unavailable)
            self._blocked_at = now
        return self._blocked

    def _due_sims(self, now: float, budget: int | None = None) -> list[tuple[str, list[tuple[str, float]]]]:
        """Neighbour lists of items that changed, at most ``sim_publish_batch`` per iteration, so
        that publishing them never stalls the event path (the rest wait for later iterations)."""
        if budget is None:
            if now - self._sims_at < self.s.sim_publish_interval_s:
                return []
            budget = self.s.sim_publish_batch
        out: list[tuple[str, list[tuple[str, float]]]] = []
        for run in self.runs.values():
            while run.sim_dirty and len(out) < budget:
                i = run.sim_dirty.pop()
                out.append((run.state.item_ids[i], sim_list(run.state, i, self.s.sim_publish_len)))
        if not any(run.sim_dirty for run in self.runs.values()):
            self._sims_at = now
        return out

    def _trending(self) -> list[tuple[str, float]]:
        """This worker's trending list: popularity summed over its partitions."""
        total: dict[str, float] = {}
        for run in self.runs.values():
            st = run.state
            for i, s in trending(st, st.params.trending_len):
                total[st.item_ids[i]] = total.get(st.item_ids[i], 0.0) + s
        return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[: self.params.trending_len]

    def _write(
        self, lists: list[RecList], sims: list[Any], trend: list[tuple[str, float]] | None, model: str | None = None
    ) -> None:
        label = model or self.s.model_version
        self._retry(lambda: self.store.write(lists, sims, trend, label))

    def _commit(self, sync: bool, runs: list[PartitionRun]) -> None:
        assert self.consumer is not None and self.dlq is not None
        self.dlq.flush()
        self._commit_offsets({r.partition: r.next_offset for r in runs or self.runs.values()}, sync)

    def _commit_offsets(self, offsets: dict[int, int], sync: bool) -> None:
        assert self.consumer is not None
        tps = [TopicPartition(self.s.events_topic, p, o) for p, o in offsets.items()]
        if not tps:
            return
        if sync:
            self.consumer.commit(offsets=tps, asynchronous=False)
        else:
            self.consumer.commit(offsets=tps, asynchronous=True)

    def _snapshot(self, run: PartitionRun) -> None:
        """Inline snapshot (revocation, shutdown, or no fork): waits for a background one first,
        so that an older snapshot can never overwrite a newer one."""
        if self.forked is not None and self.forked.busy():
            done = self.forked.poll(block=True)
            if done is not None and done.partition in self.runs:
                r = self.runs[done.partition]
                r.snapshot_offset, r.snapshot_at = done.offset, done.started
        t0 = time.monotonic()
        size = self._retry(
            lambda: self.store.save_snapshot(
                self.s.group_id, self.s.events_topic, run.partition, run.next_offset, run.state
            )
        )
        run.snapshot_offset, run.snapshot_at = run.next_offset, time.monotonic()
        self.stats.snapshots += 1
        log.info(
            "partition %d: snapshot at offset %d, %.1f MB in %.0f ms",
            run.partition,
            run.next_offset,
            size / 1e6,
            1000 * (run.snapshot_at - t0),
        )

    def _finish_all(self) -> None:
        """Graceful stop: publish pending neighbour lists, snapshot, commit. Buffered messages
        of an unfinished block are left for the next owner (they are not committed)."""
        self._settle(sync=True)
        sims = self._due_sims(time.monotonic(), budget=sum(len(r.sim_dirty) for r in self.runs.values()))
        if sims:
            self._write([], sims, None)
        for run in self.runs.values():
            if run.next_offset != run.snapshot_offset:
                self._snapshot(run)
        self._commit(sync=True, runs=[])

    def _retry(self, fn: Any) -> Any:
        """Redis outages stall the pipeline (nothing is committed meanwhile) instead of losing work."""
        delay = 0.1
        while True:
            try:
                return fn()
            except redis.exceptions.ConnectionError as e:
                if self.stop_event.is_set() and delay > 1.0:
                    raise
                log.warning("redis unavailable (%s); retrying in %.1fs", type(e).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _fit_process_init() -> None:
    """In the fit process: one BLAS thread (a second would only compete for the cores with the
    batch loop, the broker and Redis, and OpenBLAS threads spin while they wait), and no
    reaction to the SIGTERM or SIGINT sent to the worker's process group: the worker shuts the
    pool down itself, after the pipeline has stopped; a fit process that died first would leave
    the pool broken and the worker's exit hanging. If the worker dies outright, the fit process
    reads end-of-file from its queue and exits."""
    threadpool_limits(limits=1, user_api="blas")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
