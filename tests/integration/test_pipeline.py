"""The worker on a real broker (Tansu) and a real Redis, compared with an in-process run."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from models.longterm import decode_model
from stream_app.kafka_io import end_offsets, topic_partitions
from stream_app.processes import WorkerProcess as Worker
from stream_app.processes import committed, wait_caught_up, wait_stages_caught_up
from stream_app.redis_store import RedisStore
from tests.integration.conftest import settings_from
from tests.integration.harness import (
    create_topics,
    fingerprint,
    item_counts,
    produce,
    read_topic,
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


def _item_states(env: dict[str, str]) -> list[Any]:
    s = settings_from(env)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    out = []
    for q in range(topic_partitions(s, s.deltas)):
        snap = store.load_snapshot(s.group_id, s.deltas, q)
        assert snap is not None
        out.append(snap[1])
    return out


def _assert_matches_reference(env: dict[str, str], values: list[bytes]) -> None:
    """The worker's user and item state equal the same models run in-process; its lists are
    complete and well-formed (their order depends on when neighbour lists reached the table)."""
    s = settings_from(env)
    ref_user, ref_items = reference_run(s, values)
    offset, state = _final_state(env)
    assert offset == len(values)
    assert fingerprint(state) == fingerprint(ref_user)
    items = _item_states(env)
    assert sum(x.events_applied for x in items) // len(items) == ref_user.events_applied
    pop, rows = item_counts(items)
    ref_pop, ref_rows = item_counts([ref_items])
    assert pop.keys() == ref_pop.keys() and rows.keys() == ref_rows.keys()
    assert all(pop[x] == pytest.approx(ref_pop[x], rel=1e-12) for x in pop)
    for x, row in rows.items():
        assert row.keys() == ref_rows[x].keys(), f"row {x} differs"
        assert all(v == pytest.approx(ref_rows[x][j], rel=1e-12) for j, v in row.items())
    # the long-term model the item stage fitted in its own process was published
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    blob = store.long_model()
    assert blob is not None and decode_model(blob)[0] >= 1
    users = sorted(state.users)
    last = {e.user_id: e for e in (s.event_schema().decode(v) for v in values)}
    full = 0
    for u, doc in zip(users, store.get_recs(users), strict=True):
        assert doc is not None, f"no list for user {u}"
        st = state.user(u)
        assert doc["version"] == st.n_events and doc["event_ts"] == st.last_ts == last[u].ts
        ids = [it["item_id"] for it in doc["items"]]
        assert doc["model"] == s.model_version and len(ids) == len(set(ids)) <= s.n_recs
        assert not {state.item_ids[i] for i in st.seen} & set(ids)
        full += len(ids) == s.n_recs
    # a list ranked before the item table held anything (the log's very first block) can be short
    assert full >= 0.98 * len(users), (full, len(users))


def test_single_partition_replay_equals_in_process_run(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], log_path: Path
) -> None:
    topic = worker_env["STREAMREC_EVENTS_TOPIC"]
    create_topics(broker, topic, 1)
    msgs = _keyed(ml100k[:SLICE])
    produce(broker, topic, msgs)
    w = Worker(worker_env, log_path).start()
    try:
        wait_stages_caught_up(settings_from(worker_env), 1, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    _assert_matches_reference(worker_env, [v for _, v in msgs])
    s = settings_from(worker_env)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    (items,) = _item_states(worker_env)
    trending = store.get_trending()
    assert [(t["item_id"], t["score"]) for t in trending] == [(x, round(v, 3)) for x, v in items.trending(50)]
    some_item = ml100k[0]["item_id"]
    sims = store.get_sim(some_item)
    assert sims is not None and 0 < len(sims) <= s.sim_publish_len and all(x["item_id"] != some_item for x in sims)


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
        wait_stages_caught_up(settings_from(worker_env), 1, w2)
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
        wait_stages_caught_up(settings_from(worker_env), 1, w)  # trending comes from the item stage
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
