"""A Redis outage in the middle of a replay stalls the worker; nothing is lost when Redis returns."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from stream_app.embedded import free_port, redis_binary
from stream_app.processes import WorkerProcess, committed, wait_caught_up
from tests.integration.conftest import settings_from
from tests.integration.harness import create_topics, produce


def _redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis did not start")


def test_worker_rides_out_a_redis_outage(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    port = free_port()
    server = _redis(port, tmp_path)
    worker_env["STREAMREC_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    worker_env["STREAMREC_BATCH_SIZE"] = "500"
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    events = ml100k[:20_000]
    create_topics(broker, topic, 1)
    first, second = events[:10_000], events[10_000:]
    produce(broker, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in first])
    w = WorkerProcess(worker_env, tmp_path / "worker.log").start()
    try:
        wait_caught_up(broker, group, topic, 1, w)
        server.terminate()  # a clean shutdown: the append-only file keeps what was written
        server.wait(10)
        produce(broker, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in second])
        time.sleep(3)
        assert w.alive()
        assert committed(broker, group, topic, 1)[0] == len(first)  # nothing committed while Redis is down
        server = _redis(port, tmp_path)
        wait_caught_up(broker, group, topic, 1, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
        assert "redis unavailable" in w.log()
    s = settings_from(worker_env)
    r = redis.Redis(port=port)
    try:
        snap = r.get(f"{s.redis_prefix}state:{group}:{topic}:0")
        assert snap is not None
        users = sorted({e["user_id"] for e in events})
        docs = r.mget([f"{s.redis_prefix}rec:{u}" for u in users])
        assert all(d is not None for d in docs)
        last = {e["user_id"]: e["ts"] for e in events}
        assert all(orjson.loads(d)["event_ts"] == last[u] for u, d in zip(users, docs, strict=True))
    finally:
        server.terminate()
        server.wait(10)
