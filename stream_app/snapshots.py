"""Snapshots written by a forked child, so that serialising the state never pauses the pipeline.

``fork()`` gives the child a copy-on-write image of the state exactly as it is at a batch
boundary; the child pickles it, writes it to Redis with a connection of its own and exits with
``os._exit`` (no inherited client is touched, no cleanup runs). The parent keeps consuming and
only records the snapshot's offset once the child has exited successfully. This is the trick
Redis itself uses for BGSAVE.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import redis

from stream_app.redis_store import RedisStore

log = logging.getLogger(__name__)


@dataclass
class Pending:
    pid: int
    partition: int
    offset: int
    started: float


class ForkedSnapshots:
    """At most one snapshot child at a time; ``poll`` reports the ones that finished."""

    def __init__(self, redis_url: str, prefix: str, group: str, topic: str) -> None:
        self.redis_url, self.prefix, self.group, self.topic = redis_url, prefix, group, topic
        self.pending: Pending | None = None

    @staticmethod
    def available() -> bool:
        return hasattr(os, "fork")

    def busy(self) -> bool:
        return self.pending is not None

    def start(self, partition: int, offset: int, state: object) -> None:
        assert self.pending is None
        pid = os.fork()
        if pid == 0:  # the child: write and leave without running any of the parent's cleanup
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                store = RedisStore(redis.Redis.from_url(self.redis_url), self.prefix)
                store.save_snapshot(self.group, self.topic, partition, offset, state)
                code = 0
            finally:
                os._exit(code)
        self.pending = Pending(pid, partition, offset, time.monotonic())

    def poll(self, block: bool = False) -> Pending | None:
        """The finished snapshot, if the child has exited successfully; None otherwise."""
        if self.pending is None:
            return None
        pid, status = os.waitpid(self.pending.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        done, self.pending = self.pending, None
        if os.waitstatus_to_exitcode(status) != 0:
            log.error(
                "snapshot of partition %d failed in the child (exit status %s); will retry",
                done.partition,
                os.waitstatus_to_exitcode(status),
            )
            return None
        return done
