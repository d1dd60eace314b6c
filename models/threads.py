"""A block's users split across threads for the ranking kernels.

The kernels (``models.kernels``) release the GIL (``nogil``) and rank each user independently
of the others, with scratch of their own per call, so a chunk's users can be cut into
contiguous parts ranked at the same time on different cores: the same arrays, row for row, as
one call would give. A stage's Python work holds the interpreter, and on a machine whose other
core is not busy (a worker at 10,000 live events/s left about half of one idle, on two cores
shared with the broker and Redis) the kernels' share of a block is what the extra thread buys.

The thread count is process-wide (``set_threads``): the worker sets it from
``STREAMREC_RANK_THREADS``; it changes how fast lists are made, never what they hold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Fewer users than this per part are not worth a thread's wake-up (tens of microseconds,
# against 10-30 µs per user for the kernels on MovieLens-100K).
MIN_USERS_PER_PART = 16

_lock = threading.Lock()
_threads = 1
_pool: ThreadPoolExecutor | None = None


def set_threads(n: int, initializer: Callable[[], None] | None = None) -> None:
    """Rank with ``n`` threads from now on (1: in the caller's thread only); each extra thread
    runs ``initializer`` first (the worker names its threads for the OS)."""
    global _threads, _pool
    if n < 1:
        raise ValueError(f"rank threads must be at least 1, not {n}")
    with _lock:
        if n == _threads:
            return
        old = _pool
        _pool = ThreadPoolExecutor(n - 1, "streamrec-rank", initializer) if n > 1 else None
        _threads = n
    if old is not None:
        old.shutdown(wait=True)


def by_users(nu: int, call: Callable[[int, int], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """``call(r0, r1)`` ranks users ``[r0, r1)`` and returns per-user arrays (first axis the
    users); this runs it over ``[0, nu)`` in up to as many contiguous parts as threads at once and
    joins the parts' arrays in user order. One part runs in the caller's thread."""
    pool, n = _pool, _threads
    parts = min(n, nu // MIN_USERS_PER_PART) if pool is not None else 1
    if parts <= 1:
        return call(0, nu)
    cuts = [nu * p // parts for p in range(parts + 1)]
    assert pool is not None
    futures = [pool.submit(call, a, b) for a, b in zip(cuts[:-2], cuts[1:-1], strict=True)]
    last = call(cuts[-2], cuts[-1])
    outs = [f.result() for f in futures] + [last]
    return tuple(np.concatenate(col) for col in zip(*outs, strict=True))
