"""The worker on a real broker (Tansu) and a real Redis, compared with an in-process run."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from stream_app.kafka_io import end_offsets
from stream_app.processes import WorkerProcess as Worker
from stream_app.processes import committed, wait_caught_up
from stream_app.redis_store import RedisStore
from tests.integration.conftest import settings_from
from tests.integration.harness import (
    comparable_doc,
    create_topics,
    fingerprint,
    produce,
    read_topic,
    reference_doc,
    reference_run,
)

SLICE = 30_000  # the first 30k ml-100k events by time


def _keyed(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]


def _final_state(env: dict[str, str], partition: int = 0) -> Any:
    s = settings_from(env)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    snap = store.load_snapshot(s.group_id, s.events_topic, partition)
    assert snap is not None
    return snap


def _assert_matches_reference(env: dict[str, str], values: list[bytes]) -> None:
    s = settings_from(env)
    ref_state, ref_lists = reference_run(s, values)
    offset, state = _final_state(env)
    assert offset == len(values)
    assert state.events_applied == ref_state.events_applied
    got, want = fingerprint(state), fingerprint(ref_state)
    for part in ("items", "pop", "cooc", "context", "users"):
        assert got[part] == want[part], f"state differs in {part}"
    # the long-term model the worker fitted in its own process is the one fitted in-process
    assert state.long is not None and ref_state.long is not None
    assert np.array_equal(state.long.pool, ref_state.long.pool)
    assert np.array_equal(state.long.weights, ref_state.long.weights)
    r = redis.Redis.from_url(s.redis_url)
    users = sorted(ref_lists)
    docs = r.mget([f"{s.redis_prefix}rec:{u}" for u in users])
    assert all(d is not None for d in docs)
    for u, raw in zip(users, docs, strict=True):
        assert comparable_doc(raw) == reference_doc(ref_lists[u], s.model_version), f"list of user {u} differs"


def test_single_partition_replay_equals_in_process_run(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], log_path: Path
) -> None:
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    create_topics(broker, topic, 1)
    msgs = _keyed(ml100k[:SLICE])
    produce(broker, topic, msgs)
    w = Worker(worker_env, log_path).start()
    try:
        wait_caught_up(broker, group, topic, 1, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    _assert_matches_reference(worker_env, [v for _, v in msgs])
    s = settings_from(worker_env)
    r = redis.Redis.from_url(s.redis_url)
    trending = orjson.loads(r.get(f"{s.redis_prefix}trending"))
    assert len(trending) == 50 and trending[0]["score"] >= trending[-1]["score"]
    some_item = ml100k[0]["item_id"]
    sims = orjson.loads(r.get(f"{s.redis_prefix}sim:{some_item}"))
    assert 0 < len(sims) <= s.sim_publish_len and all(x["item_id"] != some_item for x in sims)


def test_kill_9_mid_replay_loses_nothing_and_ends_identical(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], log_path: Path
) -> None:
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    worker_env["STREAMREC_SNAPSHOT_INTERVAL_S"] = "0.3"
    worker_env["STREAMREC_BATCH_SIZE"] = "500"
    create_topics(broker, topic, 1)
    msgs = _keyed(ml100k[:SLICE])
    produce(broker, topic, msgs)
    w = Worker(worker_env, log_path).start()
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and w.alive():
        done = committed(broker, group, topic, 1).get(0, -1)
        if done >= SLICE // 3:
            w.kill9()
            killed_at = done
            break
        time.sleep(0.02)
    assert killed_at is not None and killed_at < SLICE, "the worker was not killed mid-replay"
    snap_offset, _ = _final_state(worker_env)
    assert 0 < snap_offset < SLICE
    w2 = Worker(worker_env, log_path).start()
    try:
        wait_caught_up(broker, group, topic, 1, w2)
    finally:
        assert w2.stop() == 0
    assert f"restored snapshot at offset {snap_offset}" in w2.log()
    _assert_matches_reference(worker_env, [v for _, v in msgs])


BAD = [
    b"{not json",
    b"",
    b"[]",
    b'{"user_id": "u1"}',
    b'{"user_id": 5, "item_id": "x", "type": "teleport", "ts": 1}',
    b'{"user_id": "", "item_id": "i", "type": "view", "ts": 1}',
    b'{"user_id": "u", "item_id": "i", "type": "view", "ts": "yesterday"}',
    ('{"user_id": "' + "x" * 100000 + '", "item_id": "i", "type": "view", "ts": 1}').encode(),
    b"\xff\xfe\x00garbage",
    b'{"user_id": {"nested": 1}, "item_id": "i", "type": "click", "ts": 1}',
]


def test_malformed_messages_go_to_the_dlq_and_no_valid_event_is_lost(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], log_path: Path
) -> None:
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    parts = 3
    create_topics(broker, topic, parts)
    valid = ml100k[:8000]
    rng = random.Random(1)
    msgs: list[tuple[bytes | None, bytes]] = []
    bad_sent = []
    for k, e in enumerate(valid):
        if k % 40 == 0:
            raw = BAD[len(bad_sent) % len(BAD)]
            bad_sent.append(raw)
            msgs.append((rng.choice([b"bad", None, b"u1"]), raw))
        msgs.append((str(e["user_id"]).encode(), orjson.dumps(e)))
    produce(broker, topic, msgs)
    w = Worker(worker_env, log_path).start()
    try:
        wait_caught_up(broker, group, topic, parts, w)
        assert w.alive()
    finally:
        assert w.stop() == 0
    dead = read_topic(broker, f"{topic}.dlq")
    assert sorted(m.value() or b"" for m in dead) == sorted(bad_sent)
    for m in dead:
        h = dict(m.headers())
        assert h["source_topic"].decode() == topic and h["reason"]
        assert int(h["source_partition"]) in range(parts) and int(h["source_offset"]) >= 0
    applied = sum(_final_state(worker_env, p)[1].events_applied for p in range(parts))
    assert applied == len(valid)
    s = settings_from(worker_env)
    users = sorted({e["user_id"] for e in valid})
    docs = redis.Redis.from_url(s.redis_url).mget([f"{s.redis_prefix}rec:{u}" for u in users])
    assert all(d is not None for d in docs)
    assert end_offsets(broker, topic, parts) == committed(broker, group, topic, parts)


def test_unavailable_items_from_the_catalogue_topic_are_not_recommended(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], log_path: Path
) -> None:
    topic, group = worker_env["STREAMREC_EVENTS_TOPIC"], worker_env["STREAMREC_GROUP_ID"]
    s = settings_from(worker_env)
    create_topics(broker, topic, 1)
    first, rest = ml100k[:5000], ml100k[5000:8000]
    produce(broker, topic, _keyed(first))
    w = Worker(worker_env, log_path).start()
    r = redis.Redis.from_url(s.redis_url)
    try:
        wait_caught_up(broker, group, topic, 1, w)
        top = orjson.loads(r.get(f"{s.redis_prefix}trending"))[0]["item_id"]
        produce(
            broker,
            worker_env["STREAMREC_ITEMS_TOPIC"],
            [(top.encode(), orjson.dumps({"item_id": top, "available": False}))],
        )
        deadline = time.monotonic() + 30
        while not r.sismember(f"{s.redis_prefix}unavailable", top) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.sismember(f"{s.redis_prefix}unavailable", top)
        time.sleep(1.5)  # the pipeline refreshes the set every second
        produce(broker, topic, _keyed(rest))
        wait_caught_up(broker, group, topic, 1, w)
    finally:
        assert w.stop() == 0
    users = {e["user_id"] for e in rest}
    for raw in r.mget([f"{s.redis_prefix}rec:{u}" for u in users]):
        assert top not in {it["item_id"] for it in orjson.loads(raw)["items"]}
