"""``streamrec forget USER_ID`` against a real broker (Tansu) and a real Redis: after it, no Redis
key, no snapshot and no later CTR sample holds the user's id, and everyone else is untouched."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import redis

from models.events import forget_message
from models.simulation import user_partition
from stream_app.embedded import free_port
from stream_app.kafka_io import end_offsets, topic_partitions
from stream_app.processes import WorkerProcess as Worker
from stream_app.processes import wait_stages_caught_up
from stream_app.redis_store import RedisStore
from tests.integration.conftest import settings_from
from tests.integration.harness import create_topics, produce, read_topic

PARTITIONS = 2
T0 = 1_700_000_000_000
MIN = 60_000
TYPES = ("view", "view", "click", "purchase")


def _events(users: list[str], first: int, n: int, t0: int, types: tuple[str, ...] = TYPES) -> list[dict[str, Any]]:
    """``n`` events per user, interleaved; event ids and props as producers send them (the event
    id embeds the user id, as ml-100k's does)."""
    out = []
    for k in range(first, first + n):
        for j, u in enumerate(users):
            item = (k * 7 + j * 3) % 40
            out.append(
                {
                    "user_id": u,
                    "item_id": f"item-{item}",
                    "type": types[(k + j) % len(types)],
                    "ts": t0 + (k * len(users) + j) * MIN,
                    "event_id": f"{u}/{k}",
                    "props": {"category": f"c{item % 5}"},
                }
            )
    return out


def _keyed(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def _everything_under(r: redis.Redis, store: RedisStore, prefix: str) -> dict[bytes, list[bytes]]:
    """Every key under ``prefix`` with its raw values, plus the snapshots and the item table
    unpickled and pickled again (so that a compressed blob would not hide anything)."""
    out: dict[bytes, list[bytes]] = {}
    for k in r.scan_iter(f"{prefix}*", count=1000):
        kind = r.type(k)
        if kind == b"string":
            vals = [r.get(k) or b""]
        elif kind == b"hash":
            vals = [x for kv in r.hgetall(k).items() for x in kv]
        elif kind == b"set":
            vals = list(r.smembers(k))
        else:
            raise AssertionError(f"unexpected key type {kind!r} at {k!r}")
        out[k] = vals
        name = k.decode()[len(prefix) :]
        parts = name.split(":")
        if parts[0] == "state":
            snap = store.load_snapshot(":".join(parts[1:-2]), parts[-2], int(parts[-1]))
            assert snap is not None
            out[k].append(pickle.dumps(snap, protocol=5))
        elif parts[0] == "table":
            table = store.load_table(parts[1], parts[2])
            assert table is not None
            out[k].append(pickle.dumps(table, protocol=5))
    return out


def _snapshot_offset(store: RedisStore, group: str, topic: str, partition: int) -> int:
    snap = store.load_snapshot(group, topic, partition)
    return -1 if snap is None else snap[0]


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_forget_removes_the_user_from_redis_snapshots_and_later_samples(
    broker: str, worker_env: dict[str, str], run_id: str, log_path: Path
) -> None:
    env = worker_env
    gone = f"zz-forget-me-{run_id}"
    others = [f"u{k}" for k in range(6)]
    port = free_port()
    env.update(
        {
            "STREAMREC_SAMPLES": "true",
            "STREAMREC_SAMPLES_TOPIC": f"samples-{run_id}",
            # snapshots only on shutdown and, after a forget, at once: so the test sees that a
            # forget brings the next snapshot forward
            "STREAMREC_SNAPSHOT_INTERVAL_S": "3600",
            "STREAMREC_LONG_REFIT_EVENTS": "100",
            "STREAMREC_METRICS_PORT": str(port),
            # small blocks: a backlog is many blocks in one loop iteration (step 4)
            "STREAMREC_BATCH_SIZE": "4",
        }
    )
    s = settings_from(env)
    topic = s.events_topic
    r = redis.Redis.from_url(s.redis_url)
    store = RedisStore(r, s.redis_prefix)
    p_gone = user_partition(gone, PARTITIONS)
    create_topics(broker, topic, PARTITIONS)
    users = [gone, *others]

    # 1. a worker learns everyone, then stops: its snapshots hold the user
    produce(broker, topic, _keyed(_events(users, 0, 30, T0)))
    w = Worker(env, log_path).start()
    try:
        wait_stages_caught_up(s, PARTITIONS, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    assert store.get_rec(gone) is not None
    before = _everything_under(r, store, s.redis_prefix)
    assert any(gone.encode() in v for vals in before.values() for v in vals)  # the search can see it
    item_snap = _snapshot_offset(store, s.group_id, s.deltas, 0)
    assert item_snap > 0

    # a request for a topic that does not exist is refused (bad settings), not published
    nope = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "forget", gone],
        env={**env, "STREAMREC_EVENTS_TOPIC": f"nope-{run_id}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nope.returncode == 2 and "does not exist" in nope.stderr, nope.stderr

    # 2. a new worker restores them; the user has views still open (pending CTR samples) when
    #    the forget arrives
    w = Worker(env, log_path).start()
    try:
        t1 = T0 + 10_000 * MIN
        produce(broker, topic, _keyed(_events(users, 30, 5, t1, types=("view",))))
        wait_stages_caught_up(s, PARTITIONS, w)
        n_samples = topic_partitions(s, s.samples_topic)
        samples_before = end_offsets(broker, s.samples_topic, n_samples)
        early = [orjson.loads(m.value()) for m in read_topic(broker, s.samples_topic, n_samples)]
        assert any(x["u"] == gone for x in early)  # samples are on, and had the user

        cli = subprocess.run(
            [sys.executable, "-m", "stream_app.cli", "forget", gone, "--wait", "60"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert f"{topic} partition {p_gone} offset" in cli.stdout  # the user's own partition
        assert gone not in cli.stdout + cli.stderr
        forget_offset = int(cli.stdout.split(" offset ")[1].split()[0])

        # 3. more traffic from the others, three hours later: every view open before the forget is
        #    settled now, and would be published as a negative if the user were still known
        produce(broker, topic, _keyed(_events(others, 35, 10, t1 + 180 * MIN)))
        wait_stages_caught_up(s, PARTITIONS, w)

        # the next snapshots of the user's partition and of item partition 0 came without waiting
        # for the interval (an hour)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            _snapshot_offset(store, s.group_id, topic, p_gone) > forget_offset
            and _snapshot_offset(store, s.group_id, s.deltas, 0) > item_snap
        ):
            time.sleep(0.2)
        assert _snapshot_offset(store, s.group_id, topic, p_gone) > forget_offset
        assert _snapshot_offset(store, s.group_id, s.deltas, 0) > item_snap

        # nothing under the run's prefix holds the id: key names, values, snapshots, table, models
        after = _everything_under(r, store, s.redis_prefix)
        assert after.keys() >= {k for k in before if gone.encode() not in k}
        leaks = [k for k, vals in after.items() if gone.encode() in k or any(gone.encode() in v for v in vals)]
        assert leaks == []
        assert store.get_rec(gone) is None

        # no sample published after the forget holds it, and samples kept coming
        later = [
            m
            for m in read_topic(broker, s.samples_topic, n_samples)
            if (m.offset() or 0) >= samples_before.get(m.partition() or 0, 0)
        ]
        assert later and all(gone.encode() not in m.value() for m in later)
        assert {orjson.loads(m.value())["u"] for m in later} <= set(others)

        # everyone else's list is there and current (the other partition's snapshot is the old one)
        snap = store.load_snapshot(s.group_id, topic, p_gone)
        assert snap is not None and gone not in snap[1].users
        for u in others:
            doc = store.get_rec(u)
            assert doc is not None and doc["version"] == 45, u
            if user_partition(u, PARTITIONS) == p_gone:
                assert snap[1].user(u).n_events >= 35  # the snapshot came right after the forget

        assert _metric(port, "streamrec_forgets_total") == 1.0

        # 4. the user comes back and is forgotten again, in one burst: the lists ranked for them
        #    in the blocks before the forget (same loop iteration) are never written
        again = _keyed(_events([gone], 50, 7, t1 + 300 * MIN))
        again.append((gone.encode(), forget_message(gone)))
        again += _keyed(_events(others[:2], 50, 1, t1 + 310 * MIN))
        produce(broker, topic, again)
        wait_stages_caught_up(s, PARTITIONS, w)
        assert store.get_rec(gone) is None
        assert _metric(port, "streamrec_forgets_total") == 2.0
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    # no user id, no payload in the worker's INFO logs
    text = w.log()
    assert "forgotten on request" in text
    assert gone not in text and '"item_id"' not in text
