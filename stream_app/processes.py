"""Running and watching workers from the outside: used by the demo, the bench and the tests.

Progress is read the way an operator reads it: from the consumer group's committed offsets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from stream_app.config import Settings
from stream_app.embedded import free_port
from stream_app.kafka_io import KafkaConn, client_config, end_offsets, topic_partitions


def committed(conn: KafkaConn, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (-1001 where nothing is committed)."""
    c = Consumer({**client_config(conn), "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def local_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` of a process's endpoints on this machine's ``port``: (status, body); (0, b"")
    while nothing listens there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


@dataclass
class WorkerProcess:
    """``streamrec worker`` (or another ``command``, e.g. ``trainer``) as a subprocess in its own
    process group (so kill -9 hits it all). Unless ``env`` names one, it gets a free port of its
    own for /metrics, /healthz and /readyz (several run side by side), and one for its item stage
    process, should it start one (``SPLIT_STAGES``)."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    command: str = "worker"

    def start(self) -> WorkerProcess:
        self.env = {
            "STREAMREC_METRICS_PORT": str(free_port()),
            "STREAMREC_ITEM_METRICS_PORT": str(free_port()),
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_app.cli", self.command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait: the worker snapshots its state and commits before it exits."""
        assert self.proc is not None
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def metrics_port(self) -> int:
        return int(self.env["STREAMREC_METRICS_PORT"])

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """GET one of the process's endpoints: (status, body); (0, b"") while nothing listens."""
        return local_get(self.metrics_port, path, timeout)

    def readiness(self) -> dict[str, Any] | None:
        """The /readyz document (``ready``, ``partitions`` per stage), None while not serving."""
        code, body = self.http_get("/readyz")
        return orjson.loads(body) if code in (200, 503) else None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for /readyz to say ready; the document it answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.readiness()
            if doc is not None and doc.get("ready"):
                return doc
            if not self.alive():
                raise RuntimeError(f"{self.command} exited:\n" + self.log()[-3000:])
            time.sleep(0.1)
        raise TimeoutError(f"{self.command} not ready within {timeout:.0f} s:\n" + self.log()[-3000:])


@dataclass
class CatchUp:
    events: int  # events consumed between the first and the last observation
    seconds: float
    item_lag_s: float = 0.0  # how much later the item stage was done with them too

    @property
    def rate(self) -> float:
        """Events/s of the user stage."""
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def both_rate(self) -> float:
        """Events/s until both stages were done."""
        t = self.seconds + self.item_lag_s
        return self.events / t if t > 0 else 0.0


def wait_caught_up(
    conn: KafkaConn,
    group: str,
    topic: str,
    partitions: int,
    worker: WorkerProcess,
    timeout: float = 300.0,
    poll: float = 0.05,
) -> CatchUp:
    """Wait until the group has committed every partition's end offset.

    The rate is measured from the first commit seen (the worker has joined and processed its
    first batch) to the last, so start-up and group joins are not counted.
    """
    ends = end_offsets(conn, topic, partitions)
    total = sum(ends.values())
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError("worker exited:\n" + worker.log()[-3000:])
        com = committed(conn, group, topic, partitions)
        done = sum(max(0, com.get(p, 0)) for p in ends)
        now = time.monotonic()
        if first is None and done > 0:
            first = (now, done)
        if done >= total:
            t0, d0 = first if first is not None else (now, done)
            return CatchUp(total - d0, now - t0)
        time.sleep(poll)
    raise TimeoutError(
        f"group {group} not caught up after {timeout}s ({committed(conn, group, topic, partitions)}"
        f" of {ends})\n" + worker.log()[-3000:]
    )


def wait_stages_caught_up(
    s: Settings,
    partitions: int,
    worker: WorkerProcess,
    timeout: float = 300.0,
    item_worker: WorkerProcess | None = None,
) -> CatchUp:
    """Wait until the user stage has committed the end of the events topic (``partitions``
    partitions) and then the item stage the end of the deltas topic, which is final once the
    user stage is done: every event's effects are then in Redis and in the table. Returns the
    user stage's catch-up, with how much later the item stage was done. ``item_worker``: the
    item stage runs in a process of its own."""
    caught = wait_caught_up(s, s.group_id, s.events_topic, partitions, worker, timeout)
    t0 = time.monotonic()
    n = topic_partitions(s, s.deltas)
    wait_caught_up(s, s.item_group_id, s.deltas, n, item_worker or worker, timeout, poll=0.02)
    caught.item_lag_s = time.monotonic() - t0
    return caught
