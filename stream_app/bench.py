"""``streamrec bench``: throughput, freshness and memory of a real worker, in one run.

1. Preload the log (ml-100k when fetched, else a synthetic stream) into a fresh topic.
2. Raw ceiling: confluent-kafka ``consume()`` + orjson decode of that same topic, no other work.
3. End to end: start ``streamrec worker``; the rate is taken from the consumer group's committed
   offsets, from the first commit to the last (start-up and group joins excluded). The same for
   one and for two workers sharing a topic of ``scale_partitions`` (4) partitions: the workers join first, and once the
   group is stable the log is produced to them at full speed (so that no rebalance falls inside
   the run); the rate is taken from the first commit seen after the log is in to the last.
4. Resident memory of the worker, now holding the whole log's state.
5. Freshness: produce new events at a fixed rate while a reader polls Redis; the latency of an
   event is the time from just before ``produce()`` to the moment a reader's ``MGET`` sees its
   user's list with ``event_ts`` at or past that event.

With ``with_trainer`` the workers publish CTR samples and a ``streamrec trainer`` process trains
on them beside every worker run (3 to 5), as in a deployment with the CTR model; how many
samples it trained on is reported beside the figures.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import typer
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_app.config import Settings, settings_from_env
from stream_app.demo import demo_events
from stream_app.kafka_io import end_offsets, ensure_topics, producer_config
from stream_app.processes import WorkerProcess, wait_caught_up
from stream_app.redis_store import RedisStore
from stream_app.replay import replay
from stream_app.services import isolated_env, local_services


def raw_ceiling(bootstrap: str, topic: str, partitions: int) -> dict[str, float]:
    """Consume the whole topic and decode every value: the floor of per-event cost."""
    ends = end_offsets(bootstrap, topic, partitions)
    total = sum(ends.values())
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    n = 0
    t0 = time.perf_counter()
    try:
        while n < total:
            for m in c.consume(10_000, 1.0):
                if m.error() is None:
                    orjson.loads(m.value() or b"null")
                    n += 1
    finally:
        c.close()
    secs = time.perf_counter() - t0
    return {"events": n, "seconds": secs, "events_per_s": n / secs}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def freshness(
    bootstrap: str,
    redis_url: str,
    s: Settings,
    users: list[str],
    items: list[str],
    rate: int,
    seconds: float,
    start_ts: int,
    seed: int = 11,
) -> dict[str, Any]:
    """Produce at ``rate`` events/s for ``seconds``; measure produce -> list visible in Redis.

    Users and items are drawn from the preloaded log (so by activity and popularity), and event
    time continues the log's clock from ``start_ts`` at wall-clock pace.
    """
    rng = random.Random(seed)
    r = redis.Redis.from_url(redis_url)
    pending: dict[str, list[tuple[int, float]]] = {}
    lock = threading.Lock()
    lat: list[float] = []
    sent_at: list[float] = []
    done = threading.Event()

    # The reader is told about every list write by keyspace notifications and then reads that one
    # key, as a downstream service reacting to updates would; polling every pending user's key
    # instead would load Redis and the CPU that the worker needs.
    db = r.connection_pool.connection_kwargs.get("db", 0)
    old_conf = str(r.config_get("notify-keyspace-events").get("notify-keyspace-events") or "")
    r.config_set("notify-keyspace-events", "K$")
    ps = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    ps.psubscribe(f"__keyspace@{db}__:{s.redis_prefix}rec:*")
    cut = len(f"__keyspace@{db}__:{s.redis_prefix}rec:")

    def reader() -> None:
        while not done.is_set() or (pending and time.perf_counter() < deadline_drain):
            msg = ps.get_message(timeout=0.05)
            if msg is None:
                continue
            u = msg["channel"][cut:].decode()
            raw = r.get(f"{s.redis_prefix}rec:{u}")
            now = time.perf_counter()
            if raw is None:
                continue
            ets = orjson.loads(raw)["event_ts"]
            with lock:
                keep = []
                for ts, t_sent in pending.get(u, []):
                    if ets >= ts:
                        lat.append(now - t_sent)
                        sent_at.append(t_sent)
                    else:
                        keep.append((ts, t_sent))
                if keep:
                    pending[u] = keep
                else:
                    pending.pop(u, None)

    p = Producer(producer_config(s, **{"linger.ms": 5}))
    # warm the producer up (metadata, producer id) so that its start-up is not counted as latency
    p.produce(
        s.events_topic,
        key=b"bench-warmup",
        value=orjson.dumps({"user_id": "bench-warmup", "item_id": items[0], "type": "view", "ts": start_ts}),
    )
    p.flush(30)
    deadline_drain = float("inf")
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    n = int(rate * seconds)
    last_ts: dict[str, int] = {}
    t0 = time.perf_counter()
    wall0 = time.time()
    for k in range(n):
        target = t0 + k / rate
        d = target - time.perf_counter()
        if d > 0:
            time.sleep(d)
        u = rng.choice(users)
        ts = max(start_ts + int((time.time() - wall0) * 1000), last_ts.get(u, 0) + 1)
        last_ts[u] = ts
        ev = {"user_id": u, "item_id": rng.choice(items), "type": "click", "ts": ts, "event_id": f"bench-{k}-{ts}"}
        t_sent = time.perf_counter()
        with lock:
            pending.setdefault(u, []).append((ts, t_sent))
        p.produce(s.events_topic, key=u.encode(), value=orjson.dumps(ev))
        p.poll(0)
    p.flush(30)
    achieved = n / (time.perf_counter() - t0)
    deadline_drain = time.perf_counter() + 10
    done.set()
    th.join(15)
    ps.close()
    r.config_set("notify-keyspace-events", old_conf)
    lost = sum(len(v) for v in pending.values())
    ms = [x * 1000 for x in lat]
    # the same, for events sent after the first 2 s: the worker has just caught up with the
    # preloaded log when the run starts, and is still publishing neighbour lists
    steady = [x * 1000 for x, t in zip(lat, sent_at, strict=True) if t >= t0 + 2.0]
    return {
        "steady_p50_ms": percentile(steady, 0.50),
        "steady_p99_ms": percentile(steady, 0.99),
        "rate_target": rate,
        "rate_achieved": achieved,
        "events": n,
        "observed": len(ms),
        "unobserved": lost,
        "p50_ms": percentile(ms, 0.50),
        "p95_ms": percentile(ms, 0.95),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
    }


_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")


def wait_assigned(workers: list[WorkerProcess], partitions: int, quiet: float = 2.0, timeout: float = 120.0) -> None:
    """Wait until the workers' latest assignments split all partitions between them and nothing
    has been reassigned for ``quiet`` seconds."""
    last: tuple[list[str], ...] = ()
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        for w in workers:
            if not w.alive():
                raise RuntimeError("worker exited:\n" + w.log()[-3000:])
        latest = tuple(_ASSIGNED.findall(w.log()) for w in workers)
        if latest != last:
            last, since = latest, time.monotonic()
        owned = [int(x) for found in latest if found for x in found[-1].replace(" ", "").split(",") if x]
        if all(latest) and sorted(owned) == list(range(partitions)) and time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the group did not settle on {partitions} partitions: {last}")


@contextlib.contextmanager
def trainer_beside(env: dict[str, str], enabled: bool, log_path: Path) -> Iterator[dict[str, int]]:
    """With ``enabled``, a ``streamrec trainer`` on ``env``'s samples topic for the block's
    duration; yields a dict that holds, afterwards, how many samples it trained on."""
    out: dict[str, int] = {}
    if not enabled:
        yield out
        return
    s = settings_from_env(env)
    with tempfile.TemporaryDirectory() as models:
        t = WorkerProcess({**env, "STREAMREC_MODEL_DIR": models}, log_path, command="trainer").start()
        try:
            yield out
        finally:
            code = t.stop()
        m = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix).ctr_metrics()
        if code != 0 or m is None:
            raise RuntimeError(f"the trainer failed (exit {code}):\n" + t.log()[-3000:])
        out.update(samples=int(m["samples"]), versions=int(m["version"]))


def with_samples(env: dict[str, str], enabled: bool) -> dict[str, str]:
    """``env`` with workers publishing CTR samples, for a trainer beside them."""
    return {**env, "STREAMREC_SAMPLES": "true"} if enabled else env


def scale_run(
    svc: Any, events: list[dict[str, Any]], workers: int, partitions: int, run: str, with_trainer: bool = False
) -> float:
    """End-to-end events/s of ``workers`` workers on a ``partitions``-partition topic."""
    env = with_samples(isolated_env(svc, f"bench-{run}-w{workers}"), with_trainer)
    s = settings_from_env(env)
    ensure_topics(s, partitions)
    logs = Path(tempfile.gettempdir())
    with trainer_beside(env, with_trainer, logs / f"streamrec-bench-{run}-w{workers}-trainer.log") as trainer:
        procs = [WorkerProcess(env, logs / f"streamrec-bench-{run}-w{workers}-{k}.log").start() for k in range(workers)]
        try:
            wait_assigned(procs, partitions)
            replay(producer_config(s), s.events_topic, events)  # the rate is taken after this returns
            caught = wait_caught_up(svc.bootstrap, s.group_id, s.events_topic, partitions, procs[0])
            if not all(w.alive() for w in procs):
                raise RuntimeError("a worker exited during the run")
            owners = [_ASSIGNED.findall(w.log())[-1] for w in procs]
        finally:
            for w in procs:
                w.stop()
    typer.echo(f"end to end, {workers} worker(s), {partitions} partitions: {caught.rate:,.0f} events/s {owners}")
    if trainer:
        typer.echo(f"  beside a trainer that trained on {trainer['samples']:,} samples")
    _clear(svc.redis_url, s.redis_prefix)
    return caught.rate


def _clear(redis_url: str, prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    for k in r.scan_iter(f"{prefix}*", count=1000):
        r.delete(k)


def run_bench(
    settings: Settings,
    n_events: int,
    rate: int,
    seconds: float,
    partitions: int = 1,
    with_trainer: bool = False,
    scale_partitions: int = 4,
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    name, events = demo_events(settings, n_events or 100_000, use_ml100k=True)
    if n_events:
        events = events[:n_events]
    with local_services(settings) as svc:
        env = with_samples(isolated_env(svc, f"bench-{run}"), with_trainer)
        s = settings_from_env(env)
        ensure_topics(s, partitions)
        typer.echo(f"preloading {len(events):,} events ({name}) into {partitions} partition(s) ...")
        replay(producer_config(s), s.events_topic, events)
        raw = raw_ceiling(svc.bootstrap, s.events_topic, partitions)
        typer.echo(f"raw ceiling: {raw['events_per_s']:,.0f} events/s")
        log_path = Path(tempfile.gettempdir()) / f"streamrec-bench-worker-{run}.log"
        typer.echo(f"worker log: {log_path}")
        with trainer_beside(env, with_trainer, log_path.with_suffix(".trainer.log")) as trainer:
            w = WorkerProcess(env, log_path).start()
            try:
                caught = wait_caught_up(svc.bootstrap, s.group_id, s.events_topic, partitions, w)
                typer.echo(f"end to end: {caught.rate:,.0f} events/s")
                rss = psutil.Process(w.pid).memory_info().rss
                users = [str(e["user_id"]) for e in events]
                items = [str(e["item_id"]) for e in events]
                start_ts = max(int(e["ts"]) for e in events) + 1000
                fresh = freshness(svc.bootstrap, svc.redis_url, s, users, items, rate, seconds, start_ts)
            finally:
                w.stop()
        _clear(svc.redis_url, s.redis_prefix)
        scale = {n: scale_run(svc, events, n, scale_partitions, run, with_trainer) for n in (1, 2)}
    res = {
        "machine": {
            "cores": os.cpu_count(),
            "broker": "embedded Tansu" if svc.embedded_broker else "configured",
            "redis": "embedded" if svc.embedded_redis else "configured",
        },
        "dataset": name,
        "events": len(events),
        "partitions": partitions,
        "raw_ceiling_events_per_s": raw["events_per_s"],
        "end_to_end_events_per_s": caught.rate,
        "scale_out_events_per_s": {"partitions": scale_partitions, "workers_1": scale[1], "workers_2": scale[2]},
        "worker_rss_mb": rss / 2**20,
        "freshness": fresh,
        "worker_log": str(log_path),
        "ctr_versions_loaded": len(re.findall(r"CTR model version \d+ loaded", w.log())),
        "trainer": trainer or None,  # samples trained on beside the one-worker runs (with_trainer)
        "samples": s.samples,
        "w_ctr": s.w_ctr,
    }
    f = fresh
    typer.echo("\n| measure | value |\n|---|---|")
    typer.echo(f"| raw ceiling (consume + orjson decode) | {res['raw_ceiling_events_per_s']:,.0f} events/s |")
    typer.echo(f"| end to end, one worker | {caught.rate:,.0f} events/s |")
    typer.echo(
        f"| end to end, {scale_partitions} partitions: one worker / two workers | "
        f"{scale[1]:,.0f} / {scale[2]:,.0f} events/s |"
    )
    typer.echo(f"| worker resident memory after {len(events):,} events | {res['worker_rss_mb']:.0f} MiB |")
    typer.echo(
        f"| freshness at {f['rate_achieved']:,.0f} events/s: p50 / p95 / p99 / max | "
        f"{f['p50_ms']:.1f} / {f['p95_ms']:.1f} / {f['p99_ms']:.1f} / {f['max_ms']:.1f} ms |"
    )
    typer.echo(
        f"| same, events sent after the first 2 s: p50 / p99 | {f['steady_p50_ms']:.1f} / {f['steady_p99_ms']:.1f} ms |"
    )
    typer.echo(f"| events whose list update was seen | {f['observed']:,} of {f['events']:,} |")
    if trainer:
        typer.echo(f"| beside a trainer: samples it trained on, one-worker runs | {trainer['samples']:,} |")
    if s.w_ctr > 0:
        typer.echo(f"| CTR model versions the worker loaded (W_CTR={s.w_ctr:g}) | {res['ctr_versions_loaded']} |")
    typer.echo(f"\n{os.cpu_count()} cores; dataset {name}; broker and Redis on this machine.")
    return res
