"""Two workers in one consumer group share the partitions; state moves with a partition."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import redis

from stream_app.kafka_io import end_offsets
from stream_app.processes import WorkerProcess, committed, wait_caught_up
from stream_app.redis_store import RedisStore
from tests.integration.conftest import settings_from
from tests.integration.harness import create_topics, produce

PARTS = 4


def test_a_second_worker_takes_over_partitions_with_their_state(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    worker_env["STREAMREC_BATCH_SIZE"] = "500"
    create_topics(broker, topic, PARTS)
    events = ml100k[:40_000]
    first, second = events[:20_000], events[20_000:]
    produce(broker, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in first])
    a = WorkerProcess(worker_env, tmp_path / "a.log").start()
    b = WorkerProcess(worker_env, tmp_path / "b.log")
    try:
        wait_caught_up(broker, group, topic, PARTS, a)
        b.start()
        # wait until the group has rebalanced: b restored some partitions from a's snapshots
        deadline = time.monotonic() + 60
        while "restored snapshot" not in b.log() and time.monotonic() < deadline:
            assert a.alive() and b.alive(), a.log()[-2000:] + b.log()[-2000:]
            time.sleep(0.3)
        assert "restored snapshot" in b.log(), b.log()[-3000:]
        produce(broker, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in second])
        wait_caught_up(broker, group, topic, PARTS, a)
        assert b.alive()
    finally:
        assert a.stop() == 0, a.log()[-3000:]
        if b.proc is not None:
            assert b.stop() == 0, b.log()[-3000:]
    s = settings_from(worker_env)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    ends = end_offsets(broker, topic, PARTS)
    assert committed(broker, group, topic, PARTS) == ends
    applied = 0
    for p in range(PARTS):
        snap = store.load_snapshot(group, topic, p)
        assert snap is not None and snap[0] == ends[p]
        applied += snap[1].events_applied
    assert applied == len(events)  # every event folded in exactly once, across both workers
    users = sorted({e["user_id"] for e in events})
    docs = store.r.mget([f"{s.redis_prefix}rec:{u}" for u in users])
    last = {e["user_id"]: e["ts"] for e in events}
    assert all(d is not None and orjson.loads(d)["event_ts"] == last[u] for u, d in zip(users, docs, strict=True))
