"""Scale-out: item-level outputs do not depend on how many partitions and workers there are.

A full replay of MovieLens-100K into one partition with one worker is the reference. The same
log in four partitions gives the same popularity and co-occurrence counts (up to floating-point
rounding), the same ``trending`` list and the same ``sim:{item}`` lists (up to ties) in every
one of these cases: two workers from the start; a ``kill -9`` of a user-stage worker and later
of an item-stage worker, each restarted, mid-replay; a second worker joining mid-replay.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import redis

from stream_app.bench import counted, table_lag_reported
from stream_app.config import Settings
from stream_app.embedded import free_port
from stream_app.kafka_io import end_offsets, topic_partitions
from stream_app.processes import WorkerProcess, committed, local_get, wait_caught_up, wait_stages_caught_up
from stream_app.redis_store import RedisStore
from tests.integration.conftest import fresh_run, settings_from, worker_env_of
from tests.integration.harness import create_topics, item_counts, produce, same_order_up_to_ties

PARTS = 4
REL = 1e-9  # counts summed in another order differ by rounding only


@dataclass
class Outputs:
    """A run's item-level results: what the item stage published and its state."""

    pop: dict[str, float]
    rows: dict[str, dict[str, float]]
    trending: list[tuple[str, float]]
    sims: dict[str, list[tuple[str, float]]]
    events: int


def collect(env: dict[str, str], items: list[str]) -> Outputs:
    s = settings_from(env)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    states = []
    for q in range(topic_partitions(s, s.deltas)):
        snap = store.load_snapshot(s.group_id, s.deltas, q)
        assert snap is not None, f"no snapshot of item partition {q}"
        states.append(snap[1])
    assert len({st.events_applied for st in states}) == 1  # every item partition saw every event
    pop, rows = item_counts(states)
    docs = store.get_sims(items)
    sims = {x: [(d["item_id"], d["score"]) for d in doc] for x, doc in zip(items, docs, strict=True) if doc}
    trending = [(t["item_id"], t["score"]) for t in store.get_trending()]
    return Outputs(pop, rows, trending, sims, states[0].events_applied)


def assert_same(got: Outputs, want: Outputs) -> None:
    assert got.events == want.events
    assert got.pop.keys() == want.pop.keys()
    assert all(got.pop[x] == pytest.approx(want.pop[x], rel=REL) for x in got.pop)
    assert got.rows.keys() == want.rows.keys()
    for x, row in got.rows.items():
        assert row.keys() == want.rows[x].keys(), f"row {x}: other neighbours"
        assert all(v == pytest.approx(want.rows[x][j], rel=REL) for j, v in row.items()), f"row {x}: other counts"
    assert same_order_up_to_ties(got.trending, want.trending, 1.01e-3)  # scores rounded to 3 decimals
    assert got.sims.keys() == want.sims.keys()
    bad = [x for x in got.sims if not same_order_up_to_ties(got.sims[x], want.sims[x], 1.01e-6)]
    assert not bad, f"{len(bad)} sim: lists differ, e.g. {bad[0]}: {got.sims[bad[0]]} vs {want.sims[bad[0]]}"


def keyed(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]


def fresh_env(base: dict[str, str], name: str) -> dict[str, str]:
    env = dict(base)
    for k in ("EVENTS_TOPIC", "ITEMS_TOPIC", "GROUP_ID"):
        env[f"STREAMREC_{k}"] = f"{base[f'STREAMREC_{k}']}-{name}"
    env["STREAMREC_REDIS_PREFIX"] = f"{base['STREAMREC_REDIS_PREFIX']}{name}:"
    env["STREAMREC_SNAPSHOT_INTERVAL_S"] = "0.5"
    env["STREAMREC_BATCH_SIZE"] = "1000"
    return env


@pytest.fixture(scope="module")
def reference(
    broker: str, redis_url: str, ml100k: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outputs]:
    """One partition, one worker."""
    with fresh_run(redis_url) as rid:
        env = fresh_env(worker_env_of(broker, redis_url, rid), "ref")
        s = settings_from(env)
        create_topics(broker, s.events_topic, 1)
        produce(broker, s.events_topic, keyed(ml100k))
        w = WorkerProcess(env, tmp_path_factory.mktemp("ref") / "worker.log").start()
        try:
            wait_stages_caught_up(s, 1, w)
        finally:
            assert w.stop() == 0, w.log()[-3000:]
        yield collect(env, sorted({str(e["item_id"]) for e in ml100k}))


def items_of(events: list[dict[str, Any]]) -> list[str]:
    return sorted({str(e["item_id"]) for e in events})


def wait_until(cond: Callable[[], bool], workers: list[WorkerProcess], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for w in workers:
            assert w.proc is None or w.alive() or w.proc.returncode == -9, w.log()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def progress(broker: str, s: Settings, partitions: int = PARTS) -> int:
    return sum(max(o, 0) for o in committed(broker, s.group_id, s.events_topic, partitions).values())


def finish(broker: str, s: Settings, workers: list[WorkerProcess], partitions: int = PARTS) -> None:
    """Wait for both stages to be done with the log, then stop every worker gracefully."""
    live = [w for w in workers if w.alive()]
    try:
        wait_stages_caught_up(s, partitions, live[0])
    finally:
        for w in live:
            assert w.stop() == 0, w.log()[-3000:]


def preloaded(
    broker: str, worker_env: dict[str, str], events: list[dict[str, Any]], name: str
) -> tuple[dict[str, str], Settings]:
    """A run of its own (topics, group, keys) with ``events`` already in a 4-partition topic."""
    env = fresh_env(worker_env, name)
    s = settings_from(env)
    create_topics(broker, s.events_topic, PARTS)
    produce(broker, s.events_topic, keyed(events))
    return env, s


def test_four_partitions_two_workers_equal_one_partition(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], reference: Outputs, tmp_path: Path
) -> None:
    env, s = preloaded(broker, worker_env, ml100k, "two")
    workers = [WorkerProcess(env, tmp_path / f"w{k}.log").start() for k in range(2)]
    finish(broker, s, workers)
    assert all("assigned item partitions" in w.log() for w in workers)
    assert_same(collect(env, items_of(ml100k)), reference)


def test_kill_9_of_each_stage_mid_replay_changes_nothing(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], reference: Outputs, tmp_path: Path
) -> None:
    """The stages run as separate workers here, so that each can be killed alone."""
    env, s = preloaded(broker, worker_env, ml100k, "kill")
    user_env, item_env = {**env, "STREAMREC_ROLES": "user"}, {**env, "STREAMREC_ROLES": "item"}
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    users = WorkerProcess(user_env, tmp_path / "user.log").start()
    items = WorkerProcess(item_env, tmp_path / "item.log").start()
    wait_until(lambda: progress(broker, s) >= len(ml100k) // 4, [users, items], "a quarter of the log")
    users.kill9()
    users = WorkerProcess(user_env, tmp_path / "user2.log").start()
    deltas = s.deltas

    def item_stage_mid_way() -> bool:
        done = committed(broker, s.item_group_id, deltas, PARTS)
        snaps = all(store.load_snapshot(s.group_id, deltas, q) is not None for q in range(PARTS))
        return snaps and progress(broker, s) >= len(ml100k) // 2 and sum(max(o, 0) for o in done.values()) > 0

    wait_until(item_stage_mid_way, [users, items], "the item stage mid-way")
    assert progress(broker, s) < len(ml100k), "the replay ended before the item stage was killed"
    items.kill9()
    items = WorkerProcess(item_env, tmp_path / "item2.log").start()
    finish(broker, s, [users, items])
    assert "restored snapshot" in users.log() and "restored snapshot" in items.log()
    assert_same(collect(env, items_of(ml100k)), reference)


def test_a_second_worker_joining_mid_replay_changes_nothing(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], reference: Outputs, tmp_path: Path
) -> None:
    env, s = preloaded(broker, worker_env, ml100k, "join")
    a = WorkerProcess(env, tmp_path / "a.log").start()
    wait_until(lambda: progress(broker, s) >= len(ml100k) // 3, [a], "a third of the log")
    b = WorkerProcess(env, tmp_path / "b.log").start()
    wait_until(lambda: "restored snapshot" in b.log(), [a, b], "the second worker to take over partitions")
    finish(broker, s, [a, b])
    ends = end_offsets(broker, s.events_topic, PARTS)
    assert committed(broker, s.group_id, s.events_topic, PARTS) == ends
    got = collect(env, items_of(ml100k))
    assert_same(got, reference)
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    applied = 0
    for p in range(PARTS):
        snap = store.load_snapshot(s.group_id, s.events_topic, p)
        assert snap is not None and snap[0] == ends[p]
        applied += snap[1].events_applied
    assert applied == len(ml100k)  # every event folded in exactly once, across both workers
    users = sorted({str(e["user_id"]) for e in ml100k})
    last = {str(e["user_id"]): e["ts"] for e in ml100k}
    assert all(d is not None and d["event_ts"] == last[u] for u, d in zip(users, store.get_recs(users), strict=True))


def test_the_table_lag_bound_holds_and_a_user_stage_alone_goes_on_after_waiting(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    """With both stages, no block is ranked with a table more than TABLE_MAX_LAG of its
    partition's events behind; with no item stage at all, the user stage waits TABLE_WAIT_S,
    says so, and ranks on."""
    env = {**fresh_env(worker_env, "lag"), "STREAMREC_TABLE_MAX_LAG": "3000", "STREAMREC_TABLE_WAIT_S": "30"}
    s = settings_from(env)
    create_topics(broker, s.events_topic, 1)
    produce(broker, s.events_topic, keyed(ml100k[:20_000]))
    w = WorkerProcess(env, tmp_path / "both.log").start()
    finish(broker, s, [w], partitions=1)
    lag = table_lag_reported(w.log())  # the worker's own stats lines
    assert lag is not None and lag["max"] <= 3000, lag
    assert "item table is more than" not in w.log()

    alone = {**fresh_env(worker_env, "alone"), "STREAMREC_ROLES": "user", "STREAMREC_TABLE_WAIT_S": "1"}
    s = settings_from(alone)
    create_topics(broker, s.events_topic, 1)
    produce(broker, s.events_topic, keyed(ml100k[:20_000]))
    u = WorkerProcess(alone, tmp_path / "user.log").start()
    try:
        wait_caught_up(broker, s.group_id, s.events_topic, 1, u)
        waited = counted(u, "streamrec_table_wait_seconds")  # exported for operators
    finally:
        assert u.stop() == 0, u.log()[-3000:]
    assert "the item table is more than 5000 events behind" in u.log()
    assert 0.5 <= waited[""] < 30, waited  # about TABLE_WAIT_S, then no more waiting


def test_a_backlog_does_not_wait_out_the_publish_interval_for_the_table(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The item stage publishes its watermark once a partition's unpublished events reach a
    quarter of TABLE_MAX_LAG, not only every TABLE_PUBLISH_INTERVAL_S: with an interval longer
    than the run, a user stage taking a backlog still finds the table within the bound (it
    would otherwise wait TABLE_WAIT_S and rank with a stale table)."""
    env = {
        **fresh_env(worker_env, "volume"),
        "STREAMREC_TABLE_MAX_LAG": "3000",
        "STREAMREC_TABLE_PUBLISH_INTERVAL_S": "3600",
        "STREAMREC_TABLE_WAIT_S": "30",
    }
    s = settings_from(env)
    create_topics(broker, s.events_topic, 1)
    produce(broker, s.events_topic, keyed(ml100k[:20_000]))
    w = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        wait_stages_caught_up(s, 1, w)
        waited = counted(w, "streamrec_table_wait_seconds")
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    lag = table_lag_reported(w.log())  # the worker's own stats lines
    assert lag is not None and lag["max"] <= 3000, lag
    assert "item table is more than" not in w.log()
    assert waited[""] < 15, waited  # the table kept up: never a TABLE_WAIT_S of 30 s


def _item_child(w: WorkerProcess) -> psutil.Process:
    """The worker's item stage process (``SPLIT_STAGES``), once it has started: exec'd, with the
    environment the worker gives it (between fork and exec it still has the worker's)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = psutil.Process(w.pid).children()
        if kids:
            (kid,) = kids  # the long-term fits run in the child's own children, not here
            with contextlib.suppress(psutil.Error):
                if kid.environ().get("STREAMREC_SPLIT_STAGES") == "false":
                    return kid
        time.sleep(0.05)
    raise AssertionError("no item stage process started:\n" + w.log()[-3000:])


def test_a_worker_with_its_item_stage_in_a_child_process_gives_the_same_outputs(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], reference: Outputs, tmp_path: Path
) -> None:
    """``SPLIT_STAGES=true``: one command, the item stage in a child process with ``ROLES=item``;
    the same item-level outputs as the reference, both stages' partitions in the worker's
    ``/readyz``, and a graceful stop of both."""
    env, s = preloaded(broker, worker_env, ml100k, "split")
    env = {**env, "STREAMREC_SPLIT_STAGES": "true", "STREAMREC_ITEM_METRICS_PORT": str(free_port())}
    w = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        child = _item_child(w)
        assert child.environ()["STREAMREC_ROLES"] == "item"
        doc = w.wait_ready()
        assert sorted(doc["partitions"]) == ["item", "user"], doc
        assert sorted(doc["partitions"]["user"]) == sorted(doc["partitions"]["item"]) == list(range(PARTS))
        wait_stages_caught_up(s, PARTS, w)
    finally:
        code = w.stop()  # also when an assertion failed: no worker outlives the test
    assert code == 0, w.log()[-3000:]
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    log = w.log()
    assert "assigned item partitions" in log and "item stage: started as process" in log
    assert_same(collect(env, items_of(ml100k)), reference)


def test_the_user_stage_waits_for_its_item_stage_process_to_start(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    """``SPLIT_STAGES=true`` with a backlog: the user stage commits no block before the item
    stage process is ready (it would otherwise run TABLE_MAX_LAG events ahead of an item stage
    still starting and wait there, or past TABLE_WAIT_S rank against an empty table), and
    meanwhile takes no more of the backlog into memory than its next block needs."""
    port = free_port()
    env = {
        **fresh_env(worker_env, "childstart"),
        "STREAMREC_SPLIT_STAGES": "true",
        "STREAMREC_ITEM_METRICS_PORT": str(port),
    }
    s = settings_from(env)
    create_topics(broker, s.events_topic, 1)
    produce(broker, s.events_topic, keyed(ml100k[:20_000]))
    w = WorkerProcess(env, tmp_path / "w.log").start()
    started = time.monotonic()
    held = 0  # the most events the user stage had consumed while the child was not ready
    held_s = 0.0  # for how long it was seen so
    try:
        deadline = time.monotonic() + 120
        while progress(broker, s, 1) == 0:  # the first commit; then, the child must be ready already
            assert w.alive() and time.monotonic() < deadline, w.log()[-3000:]
            consumed = counted(w, "streamrec_events_consumed").get("user", 0.0)
            if local_get(port, "/readyz")[0] != 200:  # not ready after the reading: so before it
                held, held_s = max(held, int(consumed)), time.monotonic() - started
            time.sleep(0.02)
        assert local_get(port, "/readyz")[0] == 200, w.log()[-3000:]
        wait_stages_caught_up(s, 1, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    log = w.log()
    assert "user stage: the item stage process is ready" in log
    assert "item table is more than" not in log
    # a consume call takes up to a block (BATCH_SIZE) while less than one is buffered, then one
    # message a second keeps the consumer polling; the rest of the backlog of 20,000 waits in
    # the broker
    assert 0 < held < 2 * s.batch_size + held_s + 1, (held, held_s)


def test_the_item_stage_process_goes_with_its_worker_and_the_worker_with_it(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    """kill -9 of the worker: its item stage process stops too (and snapshots, on SIGTERM from
    the kernel). The item stage process dying: the worker crashes, for a supervisor to restart."""
    env, s = preloaded(broker, worker_env, ml100k[:20_000], "orphan")
    env = {**env, "STREAMREC_SPLIT_STAGES": "true", "STREAMREC_ITEM_METRICS_PORT": str(free_port())}
    w = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        child = _item_child(w)
        w.wait_ready()
    finally:
        if w.alive():
            w.kill9()
    child.wait(60)  # stopping on the SIGTERM the kernel sent it (not our child: no exit code here)
    assert not child.is_running()

    w = WorkerProcess(env, tmp_path / "w2.log").start()
    try:
        child = _item_child(w)
        w.wait_ready()
        child.kill()
        assert w.proc is not None and w.proc.wait(60) != 0
    finally:
        w.stop()  # no worker outlives the test
    assert "the item stage process exited with code -9" in w.log()
