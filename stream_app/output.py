"""The output writer: an iteration's Redis writes on a thread of their own.

The writes of one iteration overlap the next iteration's consume and model work; the offsets an
iteration completes are handed back only once its writes have landed (the writes retry Redis
outages themselves), so that the stage commits nothing before its outputs are out.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stream_app.os_threads import name_native

Output = Callable[[], object]  # one iteration's Redis writes


@dataclass
class PendingWrite:
    """An iteration's writes in flight, and the offsets they complete once they land."""

    future: Future[Any]
    offsets: dict[int, int]


class OutputWriter:
    """At most one iteration's writes in flight."""

    def __init__(self, name: str, retry: Callable[[Output], object]) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"streamrec-{name}-redis", initializer=name_native
        )
        self._retry = retry
        self._pending: PendingWrite | None = None

    def submit(self, out: Output | None, offsets: dict[int, int]) -> None:
        """Write ``out`` in the background; ``offsets`` are what it completes. Call ``settle``
        first: one write at a time, in order."""
        assert self._pending is None, "settle the previous write first"
        self._pending = PendingWrite(self._pool.submit(self._retry, out or _nothing), offsets)

    def settle(self) -> dict[int, int] | None:
        """Wait for the write in flight; the offsets it completed (None if there was none)."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        pending.future.result()
        return pending.offsets

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _nothing() -> None:
    return None
