"""Worker threads carry their names to the OS, and their CPU time is read back by name."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from stream_app.os_threads import name_native, named, os_name, thread_cpu, thread_waits


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


def test_threads_that_outnumber_the_cores_wait_for_one_and_it_is_read_back() -> None:
    """One more thread than there are cores, each hashing (hashlib lets go of the GIL for large
    inputs, so they run at once): the scheduler makes them take turns, and ``thread_waits`` gives
    the time they were ready but had no core."""
    n = (os.cpu_count() or 1) + 1
    stop = threading.Event()
    data = b"x" * (1 << 20)

    def hash_until_stopped() -> None:
        while not stop.is_set():
            hashlib.sha256(data).digest()

    threads = [
        threading.Thread(target=named(hash_until_stopped), name=f"streamrec-hasher-{k}", daemon=True) for k in range(n)
    ]
    pid = os.getpid()
    before = thread_waits(pid)
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        waited, cpu = thread_waits(pid), thread_cpu(pid)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not any(name.startswith("hasher") for name in before)
    names = [f"hasher-{k}" for k in range(n)]
    assert set(names) <= set(waited) and set(names) <= set(cpu)
    wait = sum(waited[x] for x in names)
    busy = sum(cpu[x] for x in names)
    # n threads wanted n cores for ``elapsed`` seconds and had at most n - 1: about
    # ``elapsed`` seconds of waiting between them, and no more than n - 1 cores' worth of CPU
    assert 0.3 * elapsed < wait < n * elapsed, (waited, cpu, elapsed)
    assert busy < (n - 1) * elapsed + 0.1, (waited, cpu, elapsed)
