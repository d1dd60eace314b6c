"""The worker's threads under their own names at the OS level, and their CPU time.

CPython names its threads for Python only, so ``top -H``, ``ps -L`` and ``/proc`` show every
thread of a worker as ``python3``. A worker's threads take their Python name, less the
``streamrec-`` prefix (the OS keeps 15 bytes), when they start: ``user``, ``item``,
``user-redis_0`` (the user stage's Redis writer), ``rank_0`` (a ranking thread), ``long-model``,
``metrics``. ``thread_cpu`` reads them back per thread, and ``thread_waits`` how long each was
ready to run but had no core; ``streamrec bench`` reports both for its freshness traffic, and
``/metrics`` exports them (``streamrec_thread_cpu_seconds_total``,
``streamrec_thread_runqueue_seconds_total``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PREFIX = "streamrec-"
_OS_NAME_BYTES = 15  # Linux: 16 with the terminating NUL


@functools.cache
def _setname() -> Callable[[str], None] | None:
    """``pthread_setname_np`` for the calling thread, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.pthread_setname_np
        me = libc.pthread_self
    except (OSError, AttributeError):
        return None
    me.restype = ctypes.c_ulong
    fn.argtypes = [ctypes.c_ulong, ctypes.c_char_p]

    def set_name(name: str) -> None:
        fn(me(), name.encode()[:_OS_NAME_BYTES])

    return set_name


def os_name(name: str) -> str:
    """The OS-level name a thread called ``name`` in Python gets."""
    return name.removeprefix(_PREFIX).encode()[:_OS_NAME_BYTES].decode(errors="ignore")


def name_native() -> None:
    """Give the calling thread its Python name at the OS level (nothing where that is not
    possible): call it first thing in a thread, or as a thread pool's ``initializer``."""
    set_name = _setname()
    if set_name is not None:
        set_name(os_name(threading.current_thread().name))


def named(target: Callable[..., Any]) -> Callable[..., Any]:
    """``target``, naming its thread first (``name_native``)."""

    @functools.wraps(target)
    def run(*args: Any, **kwargs: Any) -> Any:
        name_native()
        return target(*args, **kwargs)

    return run


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid``'s threads so far, by OS thread name
    (librdkafka's threads together as ``librdkafka``); empty where ``/proc`` cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(task: Path) -> float:
        stat = (task / "stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()  # after the name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / tick

    return _by_thread(pid, cpu)


def thread_waits(pid: int) -> dict[str, float]:
    """Seconds process ``pid``'s threads have spent ready to run but waiting for a core (the
    scheduler's run queue), by OS thread name as ``thread_cpu``; empty where the kernel keeps
    no scheduler statistics. A thread that waits for a lock or the GIL sleeps: not counted."""
    return _by_thread(pid, lambda task: int((task / "schedstat").read_text().split()[1]) / 1e9)


def _by_thread(pid: int, read: Callable[[Path], float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            value = read(task)
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile; no such statistics
            continue
        out["librdkafka" if name.startswith("rdk:") else name] += value
    return dict(out)
