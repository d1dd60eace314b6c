"""Snapshot scheduling: which partition to snapshot when, written so that the loop never pauses.

A snapshot is written by a forked child when the platform can fork: ``fork()`` gives the child a
copy-on-write image of the state exactly as it is at a batch boundary; the child pickles it,
writes it to Redis with a connection of its own and exits with ``os._exit`` (no inherited client
is touched, no cleanup runs). The parent keeps consuming and only records the snapshot once the
child has exited successfully. This is the trick Redis itself uses for BGSAVE. At most one child
runs at a time per scheduler; an inline write (on revocation and shutdown) first waits for it,
so an older snapshot never overwrites a newer one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from stream_app.redis_store import RedisStore

Connect = Callable[[], redis.Redis]  # makes a new client of the deployment's Redis (redis_io.redis_client)

log = logging.getLogger(__name__)

Write = Callable[[RedisStore], int]  # writes one snapshot through the store; returns bytes written
Tag = tuple[str, int, Any]  # what a snapshot is of: (kind, partition, the position it reflects)


@dataclass
class Pending:
    pid: int
    tag: Tag
    started: float


class ForkedSnapshots:
    """At most one snapshot child at a time; ``poll`` reports the one that finished."""

    def __init__(self, connect: Connect, prefix: str) -> None:
        self.connect, self.prefix = connect, prefix
        self.pending: Pending | None = None

    @staticmethod
    def available() -> bool:
        return hasattr(os, "fork")

    def busy(self) -> bool:
        return self.pending is not None

    def start(self, tag: Tag, write: Write) -> None:
        assert self.pending is None
        pid = os.fork()
        if pid == 0:  # the child: write and leave without running any of the parent's cleanup
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                write(RedisStore(self.connect(), self.prefix))
                code = 0
            finally:
                os._exit(code)
        self.pending = Pending(pid, tag, time.monotonic())

    def poll(self, block: bool = False) -> Pending | None:
        """The finished snapshot, if the child has exited successfully; None otherwise."""
        if self.pending is None:
            return None
        pid, status = os.waitpid(self.pending.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        done, self.pending = self.pending, None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("snapshot %s failed in the child (exit status %s); will retry", done.tag, code)
            return None
        return done


@dataclass
class Snapshottable:
    """What the scheduler needs to know of a partition (or of any state with an offset)."""

    tag: Tag
    position: object  # the offset (or offsets) the state reflects now
    saved: object  # the position of its newest snapshot
    saved_at: float  # monotonic time of its newest snapshot


class SnapshotScheduler:
    """Snapshots every state whose newest snapshot is older than ``interval`` seconds and
    behind its position: in a forked child when possible (one at a time), else inline."""

    def __init__(self, store: RedisStore, connect: Connect, interval: float, fork: bool) -> None:
        self.store = store
        self.interval = interval
        self.forked = ForkedSnapshots(connect, store.prefix) if fork and ForkedSnapshots.available() else None
        self.written = 0
        self._done: list[Pending] = []

    def finished(self, block: bool = False) -> list[Pending]:
        """The background snapshots that completed since the last call."""
        if self.forked is not None:
            done = self.forked.poll(block)
            if done is not None:
                self.written += 1
                self._done.append(done)
        out, self._done = self._done, []
        return out

    def due(self, items: list[Snapshottable], now: float) -> list[Snapshottable]:
        """The states to snapshot now (at most one while writing in the background)."""
        if self.forked is not None and self.forked.busy():
            return []
        due = [x for x in items if x.position != x.saved and now - x.saved_at >= self.interval]
        if self.forked is not None and due:
            return [min(due, key=lambda x: x.saved_at)]
        return due

    def write(self, tag: Tag, write: Write, background: bool) -> int | None:
        """Write one snapshot: forked if ``background`` and possible (returns None; see
        ``finished``), else inline after any background one (returns its size)."""
        if background and self.forked is not None:
            self.forked.start(tag, write)
            return None
        if self.forked is not None and self.forked.busy():
            done = self.forked.poll(block=True)  # reported by the next ``finished``
            if done is not None:
                self.written += 1
                self._done.append(done)
        size = write(self.store)
        self.written += 1
        return size
