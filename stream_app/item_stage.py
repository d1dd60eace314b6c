"""The item stage: item-level deltas in, the global item state, and what every worker ranks from.

It consumes the deltas topic (keyed, that is partitioned, by item) as its own consumer group,
so the item partitions are shared among the workers that run this role. Per iteration and item
partition it folds the new delta messages in (``models.items``: each event exactly once, however
often a restarted user stage sends it), then publishes:

- table entries, to the compacted table topic: every item whose row weight or popularity grew by
  more than ``sim_refresh`` since its last entry (what the user stages rank from);
- ``sim:{item}`` lists, to Redis, fresh, for items that changed, at most ``sim_publish_batch``
  per ``sim_publish_interval_s`` (all of them on a graceful stop);
- ``trending`` (only the owner of item partition 0, which also keeps the long-term model's
  inputs, fits it in a process of its own and publishes each version to Redis).

Offsets of the deltas topic are committed once those outputs have landed; snapshots of the item
partitions carry the offsets they reflect (``stream_app.stage``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from threadpoolctl import threadpool_limits

from models.deltas import DeltaMessage, decode
from models.engine import item_step
from models.items import ItemPartition
from models.kernels import warm_up
from models.longterm import FitInput, ItemRegression, encode_model, fit
from models.table import WATERMARK_KEY, encode_watermark
from stream_app import metrics
from stream_app.config import Settings
from stream_app.kafka_io import topic_partitions
from stream_app.output import Output
from stream_app.stage import PartitionRun, StageLoop, offset_of

log = logging.getLogger(__name__)

_FIT_WAIT_S = 120.0  # on a graceful stop, how long to wait for a long-term fit to finish
_TRENDING_EVERY_S = 1.0  # the trending list is written at most this often (and on every handover)
# a partition also publishes once this share of ``table_max_lag`` events is unpublished, so that a
# user stage working through a backlog does not wait out the interval for the table (below)
_PUBLISH_SHARE = 0.25


@dataclass
class ItemStats:
    events: int = 0  # events applied
    skipped: int = 0  # events already applied (re-sent by a restarted user stage)
    messages: int = 0
    invalid: int = 0
    entries: int = 0  # table entries published
    sims: int = 0
    fits: int = 0


@dataclass
class PendingFit:
    version: int
    ids: list[str]  # the pool's item ids, as the inputs were taken
    future: Future[ItemRegression]


class ItemStage(StageLoop[ItemPartition]):
    name = "item stage"
    assigned_label = "item partitions"
    queue_kbytes = 16384  # delta messages are large and few,
    consume_batch = 16  # so a consume() call returns once a few have arrived: user stages may wait on it

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        super().__init__(settings, client, settings.deltas, settings.item_group_id)
        self.params = settings.params()
        self.partitions = 0  # of the deltas topic, read at start
        self.stats = ItemStats()
        self._sims_at = 0.0  # when the current round of sim: publications began
        self._sims_left = 0  # lists still to publish in this round
        self._trending_at = 0.0
        self._published_at = 0.0  # the last publication check (table entries and watermarks)
        self._fits: ProcessPoolExecutor | None = None
        self._pending_fits: list[PendingFit] = []
        self._waiting_fit: tuple[int, list[str], FitInput] | None = None  # due while a fit ran: started next

    def fetch_wait_ms(self) -> int:
        # Tansu answers a fetch only when this wait is up, even once data has arrived, so an
        # idle consumer costs the broker a fetch every wait; no list waits on the deltas
        return self.s.internal_fetch_wait_ms

    def prepare(self) -> None:
        warm_up()  # the kernels compiled (or loaded) before the first block, not in it
        self.partitions = topic_partitions(self.s, self.topic)
        if self.partitions == 0:
            raise RuntimeError(f"the deltas topic {self.topic} does not exist (the worker creates it at start)")

    def close(self) -> None:
        if self._fits is not None:
            self._fits.shutdown(wait=True, cancel_futures=True)  # at most one fit to finish

    def new_state(self, partition: int) -> ItemPartition:
        return ItemPartition(self.params, partition, self.partitions)

    def adopt(self, partition: int, state: Any) -> tuple[ItemPartition, list[str]]:
        if not isinstance(state, ItemPartition) or state.partition != partition:
            raise ValueError(f"the snapshot of item partition {partition} of {self.topic} holds something else")
        if state.partitions != self.partitions:
            raise ValueError(
                f"item partition {partition} was built for {state.partitions} item partitions, but {self.topic} "
                f"now has {self.partitions}: items would move between partitions. Recreate the internal topics "
                "and delete the item-stage snapshots to rebuild them from the log."
            )
        changed = state.reconfigure(self.params)
        if state.long is not None:
            state.long.refit_soon()  # a fit whose inputs were taken may not have been published
        return state, changed

    def attach(self, run: PartitionRun[ItemPartition]) -> None:
        if run.partition != 0:
            return
        self._pending_fits.clear()  # an earlier ownership's fits: a new owner numbers its own
        self._waiting_fit = None

    # -- an iteration ------------------------------------------------------------------------
    def process(self, drained: bool, now: float) -> Output | None:
        sink = self.sink
        assert sink is not None
        budget = self._sim_budget(now)
        want_trending = now - self._trending_at >= _TRENDING_EVERY_S
        every = now - self._published_at >= self.s.table_publish_interval_s
        if every:
            self._published_at = now
        by_volume = self.s.table_max_lag * _PUBLISH_SHARE
        sims: list[tuple[str, list[tuple[str, float]]]] = []
        trending: list[tuple[str, float]] | None = None
        st = self.stats
        for run in self.runs.values():
            msgs = self._decode(run) if run.buffer else []
            # Publication checks come every ``table_publish_interval_s``, and for a partition also
            # as soon as the source events past its last watermark reach ``by_volume``: a user
            # stage may run ``table_max_lag`` events ahead of the table, and in a backlog it covers
            # that in less than the interval (measured: about half its time, stages apart; history.md)
            unpublished = sum(m.end - m.start for m in msgs) + sum(
                a - run.published.get(src, 0) for src, a in run.state.applied.items()
            )
            publish = every or unpublished >= by_volume
            due = publish and run.state.applied != run.published
            if not msgs and not due and not (budget > len(sims) and run.state.sim_dirty):
                continue
            out = item_step(run.state, msgs, budget - len(sims), self.s.sim_publish_len, want_trending, publish)
            key_of = str.encode
            for e in out.entries:
                sink.send(self.s.table, e.encode(), key=key_of(e.item_id), partition=run.partition)
            if publish and run.state.applied != run.published:
                # after the entries: a user stage that reads it has read them
                sink.send(self.s.table, encode_watermark(run.state.applied), key=WATERMARK_KEY, partition=run.partition)
                run.published = dict(run.state.applied)
            sink.poll()
            sims.extend(out.sims)
            if out.trending is not None:
                trending, self._trending_at = out.trending, now
            if out.fit is not None:
                self._submit_fit(run.state, *out.fit)
            st.events += out.effect.applied
            st.skipped += out.effect.skipped
            st.messages += len(msgs)
            st.entries += len(out.entries)
            st.sims += len(out.sims)
            metrics.TABLE_ENTRIES.inc(len(out.entries))
            if out.effect.forgotten and run.state.long is not None:
                run.snapshot_soon = True  # its snapshot holds the forgotten users' long-term profiles
        self._sims_left = max(self._sims_left - len(sims), 0)
        models = self._finished_fits()
        if not sims and trending is None and not models:
            return None
        return lambda: self._write(sims, trending, models)

    def _sim_budget(self, now: float) -> int:
        """How many ``sim:`` lists to publish in this iteration. Every ``sim_publish_interval_s``
        a round starts with the items whose list is out of date then; they are published, oldest
        change first, at most ``sim_publish_batch`` per iteration so that the loop never stalls.
        An item that changes again waits for the next round: at most one list per item and round."""
        if self._sims_left == 0 and now - self._sims_at >= self.s.sim_publish_interval_s:
            self._sims_at = now
            self._sims_left = sum(len(r.state.sim_dirty) for r in self.runs.values())
        return min(self._sims_left, self.s.sim_publish_batch)

    def _decode(self, run: PartitionRun[ItemPartition]) -> list[DeltaMessage]:
        out = []
        for m in run.buffer:
            try:
                out.append(decode(m.value() or b""))
            except ValueError as e:
                # only our own workers write here: a message we cannot read comes from another
                # release; kept in the dead-letter topic for inspection, never applied
                self.stats.invalid += 1
                log.error("item stage: partition %d offset %d: %s", run.partition, offset_of(m), e)
                assert self.sink is not None
                self.sink.dead_letter(m.key(), m.value(), run.partition, offset_of(m), f"undecodable delta: {e}")
                metrics.DEAD_LETTERS.labels("undecodable delta").inc()
        run.next_offset = offset_of(run.buffer[-1]) + 1
        run.buffer = []
        return out

    def _write(
        self,
        sims: list[tuple[str, list[tuple[str, float]]]],
        trending: list[tuple[str, float]] | None,
        models: list[tuple[int, bytes]],
    ) -> None:
        self.store.write(sims=sims, trending=trending)
        metrics.SIM_WRITES.inc(len(sims))
        for version, blob in models:
            if self.store.publish_long_model(version, blob):
                log.info("published long-term model version %d (%.1f MB)", version, len(blob) / 1e6)

    def handover_output(self, runs: list[PartitionRun[ItemPartition]], stopping: bool) -> Output | None:
        """The ``sim:`` list of every item of ``runs`` from the final state (its neighbours'
        popularity moves a list too, so one written when the item last changed can be slightly
        stale: a partition's lists are exact whenever it changes hands), and trending. On a
        graceful stop, also the long-term fits still running (waited for: seconds at most)."""
        sims = []
        trending = None
        for run in runs:
            run.state.mark_all_sims()
            sims.extend(run.state.sim_lists(len(run.state.sim_dirty), self.s.sim_publish_len))
            if run.partition == 0:
                trending = run.state.trending(self.params.trending_len)
        if stopping:
            self._waiting_fit = None  # not started: the next owner fits from its own inputs
            for f in self._pending_fits:
                with contextlib.suppress(Exception):  # a failed fit is logged by _finished_fits
                    f.future.result(timeout=_FIT_WAIT_S)
        models = self._finished_fits()
        log.info(
            "item stage: wrote the sim: lists of %d items of partitions %s", len(sims), [r.partition for r in runs]
        )
        return lambda: self._write(sims, trending, models)

    # -- the long-term model (item partition 0) -----------------------------------------------
    def _submit_fit(self, state: ItemPartition, version: int, _install_at: int, inp: FitInput) -> None:
        """Fit in a process of its own (LAPACK holds the GIL); published when it is done, so the
        item stage never waits for it. One fit runs at a time: a fit that comes due meanwhile
        waits, and replaces one already waiting, so when fits take longer than the stream takes
        to make them due (the fit process yields the cores to the stages), the newest inputs are
        fitted next and nothing piles up. (Waiting here, not in the pool's queue: a future
        cancelled in the pool's queue breaks its shutdown on Python 3.11 when the pool breaks.)"""
        ids = [state.item_ids[j] for j in inp.pool.tolist()]
        if any(not f.future.done() for f in self._pending_fits):
            if self._waiting_fit is not None:
                log.info("long-term fit %d superseded by %d before it started", self._waiting_fit[0], version)
            self._waiting_fit = (version, ids, inp)
            return
        self._start_fit(version, ids, inp)

    def _start_fit(self, version: int, ids: list[str], inp: FitInput) -> None:
        if self._fits is None:
            self._fits = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_fit_process_init
            )
        try:
            fut = self._fits.submit(fit, inp)
        except Exception as e:  # e.g. a broken process pool: fit here, once
            log.warning("long-term fit process unavailable (%s); fitting inline", type(e).__name__)
            fut = Future()
            fut.set_result(fit(inp))
        self._pending_fits.append(PendingFit(version, ids, fut))
        self.stats.fits += 1

    def _finished_fits(self) -> list[tuple[int, bytes]]:
        out = []
        keep = []
        for f in self._pending_fits:
            if not f.future.done():
                keep.append(f)
                continue
            try:
                m = f.future.result()
            except Exception as e:
                log.error("long-term fit %d failed (%s); the current model stays", f.version, e)
                continue
            out.append((f.version, encode_model(f.version, f.ids, m.weights)))
        self._pending_fits = keep
        if self._waiting_fit is not None and not keep:
            self._start_fit(*self._waiting_fit)
            self._waiting_fit = None
        return out


def _fit_process_init() -> None:
    """In the fit process: one BLAS thread (a second would only compete for the cores with the
    batch loop, the broker and Redis, and OpenBLAS threads spin while they wait), a lower
    priority (nice 10: a fit is background work, and the stages' freshness must not wait behind
    its second or two of a core), and no reaction to the SIGTERM or SIGINT sent to the
    worker's process group: the worker shuts the pool down itself, after the stage has stopped;
    a fit process that died first would leave the pool broken and the worker's exit hanging.
    If the worker dies outright, the fit process reads end-of-file from its queue and exits."""
    threadpool_limits(limits=1, user_api="blas")
    os.nice(10)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
