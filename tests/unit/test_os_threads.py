"""Worker threads carry their names to the OS, and their CPU time is read back by name."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from stream_app.os_threads import name_native, named, os_name, thread_cpu


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def test_a_named_thread_shows_under_its_name_with_its_cpu_time() -> None:
    """A thread started through ``named`` is ``/proc``'s ``burner`` (the ``streamrec-`` prefix
    dropped), and ``thread_cpu`` gives it the CPU time it spent (clock ticks: to within 0.05 s)."""
    before = thread_cpu(os.getpid())
    t = threading.Thread(target=named(_burn), args=(0.3,), name="streamrec-burner")
    seen: list[str] = []
    t.start()
    while t.is_alive() and not seen:
        seen = [n for n in thread_cpu(os.getpid()) if n == "burner"]
        time.sleep(0.01)
    during = thread_cpu(os.getpid())
    t.join()
    assert seen == ["burner"], during
    assert "burner" not in before
    # read while it ran: most of its 0.3 s of CPU may still be ahead; read again from a live one
    pool = ThreadPoolExecutor(1, thread_name_prefix="streamrec-pool", initializer=name_native)
    try:
        pool.submit(_burn, 0.3).result()
        spent = thread_cpu(os.getpid())
    finally:
        pool.shutdown()
    assert 0.25 <= spent["pool_0"] <= 0.4, spent


def test_os_names_drop_the_prefix_and_keep_15_bytes() -> None:
    assert os_name("streamrec-user") == "user"
    assert os_name("streamrec-user-redis_0") == "user-redis_0"
    assert os_name("streamrec-a-very-long-thread-name") == "a-very-long-thr"
    assert os_name("Thread-3") == "Thread-3"
