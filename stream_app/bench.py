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
import math
import os
import random
import re
import statistics
import tempfile
import threading
import time
import tracemalloc
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import typer
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from threadpoolctl import threadpool_limits

from models.deltas import split
from models.items import ItemPartition
from models.table import ItemTable, TableEntry
from models.users import UserPartition
from stream_app.config import Settings, settings_from_env
from stream_app.demo import demo_events
from stream_app.kafka_io import end_offsets, ensure_topics, kafka_common, producer_config, topic_partitions
from stream_app.os_threads import thread_cpu, thread_waits
from stream_app.processes import CatchUp, WorkerProcess, wait_stages_caught_up
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore
from stream_app.replay import replay
from stream_app.services import isolated_env, local_services


def raw_ceiling(s: Settings, topic: str, partitions: int) -> dict[str, float]:
    """Consume the whole topic and decode every value: the floor of per-event cost."""
    ends = end_offsets(s, topic, partitions)
    total = sum(ends.values())
    c = Consumer(
        {
            **kafka_common(s),
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
    """The q-quantile of ``xs`` (nan when there is none, e.g. no event after a 2 s warm-up)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class TableProbe:
    """How soon an event's co-occurrence reaches the table every user stage ranks from.

    Every ``every`` seconds a new user takes two new items, a then b. Their pair goes user stage
    -> deltas topic -> item stage -> table topic; a reader of that topic (as a user stage reads
    it) sees entries for a and b, each listing the other. The latency of a probe is the time from
    just before producing b to the first such entry.
    """

    def __init__(self, s: Settings, start_ts: int, every: float = 0.1) -> None:
        self.s, self.start_ts, self.every = s, start_ts, every
        self.pending: dict[str, tuple[str, float]] = {}  # item -> (its partner, time sent)
        self.lat: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.deadline = float("inf")
        self.sent = 0
        n = topic_partitions(s, s.table)
        self.c = Consumer(
            {
                **kafka_common(s),
                "group.id": f"bench-probe-{uuid.uuid4().hex[:6]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
            }
        )
        self.c.assign([TopicPartition(s.table, p, OFFSET_END) for p in range(n)])
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> TableProbe:
        self.thread.start()
        return self

    def send(self, p: Producer, k: int, wall0: float) -> None:
        user, a, b = f"bench-probe-{k}", f"bench-probe-{k}-a", f"bench-probe-{k}-b"
        ts = self.start_ts + int((time.time() - wall0) * 1000)
        p.produce(self.s.events_topic, key=user.encode(), value=orjson.dumps(_probe_event(user, a, ts)))
        t = time.perf_counter()
        with self.lock:
            self.pending[a] = (b, t)
            self.pending[b] = (a, t)
        p.produce(self.s.events_topic, key=user.encode(), value=orjson.dumps(_probe_event(user, b, ts + 1)))
        self.sent += 1

    def _read(self) -> None:
        while not self.done.is_set() or (self.pending and time.perf_counter() < self.deadline):
            for m in self.c.consume(500, 0.05):
                v = m.value()
                if m.error() is not None or v is None or b"bench-probe-" not in v:
                    continue
                now = time.perf_counter()
                e = TableEntry.decode(v)
                with self.lock:
                    got = self.pending.get(e.item_id)
                    if got is not None and got[0] in e.neighbours:
                        self.lat.append(now - got[1])
                        self.pending.pop(e.item_id, None)
                        self.pending.pop(got[0], None)

    def finish(self, drain: float = 10.0) -> dict[str, Any]:
        self.deadline = time.perf_counter() + drain
        self.done.set()
        self.thread.join(drain + 5)
        self.c.close()
        ms = [x * 1000 for x in self.lat]
        return {
            "probes": self.sent,
            "observed": len(ms),
            "p50_ms": percentile(ms, 0.50) if ms else None,
            "p99_ms": percentile(ms, 0.99) if ms else None,
            "max_ms": max(ms) if ms else None,
        }


def _probe_event(user: str, item: str, ts: int) -> dict[str, Any]:
    return {"user_id": user, "item_id": item, "type": "click", "ts": ts}


def freshness(
    s: Settings,
    users: list[str],
    items: list[str],
    rate: int,
    seconds: float,
    start_ts: int,
    seed: int = 11,
    observe: float = 0.1,
    sent: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Produce at ``rate`` events/s for ``seconds``; measure produce -> list visible in Redis,
    and (``TableProbe``) event -> neighbour list in the table. ``sent`` is called once every
    event is produced, before the last lists are waited for.

    Users and items are drawn from the preloaded log (so by activity and popularity), and event
    time continues the log's clock from ``start_ts`` at wall-clock pace. Freshness is measured
    on the events of a fixed sample of about ``observe`` of the users (by a hash of the id, so
    independent of their activity; 1: every event): the reader is told about each of their list
    writes, and at 2,000 events/s reading every list's notification took this process a tenth
    of a core, on the two cores the worker has.
    """
    rng = random.Random(seed)
    distinct = sorted(set(users))
    watched = (
        set(distinct) if observe >= 1 else {u for u in distinct if zlib.crc32(u.encode()) % 10_000 < observe * 10_000}
    )
    if not watched:
        raise ValueError(f"no user is in a sample of {observe:g} of {len(distinct)} users: raise --observe")
    r = redis_client(s)
    store = RedisStore(r, s.redis_prefix)
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
    ps = r.pubsub(ignore_subscribe_messages=True)
    channel = f"__keyspace@{db}__:"
    if len(watched) == len(distinct):
        ps.psubscribe(channel + store.rec_key("*"))
    else:
        ps.subscribe(*[channel + store.rec_key(u) for u in sorted(watched)])
    cut = len(channel + store.rec_key(""))

    def reader() -> None:
        # every notification that has arrived, then their keys in one MGET: one round trip per
        # burst, not per list (at 10,000 lists/s, a GET each cost this process most of a core,
        # which the worker on the same two cores then lacked)
        while not done.is_set() or (pending and time.perf_counter() < deadline_drain):
            msg = ps.get_message(timeout=0.05)
            if msg is None:
                continue
            burst = {msg["channel"][cut:].decode()}
            while len(burst) < 2000 and (msg := ps.get_message(timeout=0.0)) is not None:
                burst.add(msg["channel"][cut:].decode())
            us = list(burst)
            raws = r.mget([store.rec_key(u) for u in us])
            now = time.perf_counter()
            with lock:
                for u, raw in zip(us, raws, strict=True):
                    if raw is None:
                        continue
                    ets = _event_ts(raw)
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
    probe = TableProbe(s, start_ts).start()
    deadline_drain = float("inf")
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    n = int(rate * seconds)
    last_ts: dict[str, int] = {}
    t0 = time.perf_counter()
    wall0 = time.time()
    probe_every = max(int(rate * probe.every), 1)
    k = sampled = 0
    while k < n:
        # the events due by now, then a sleep of at least 1 ms: a sleep per event at 10,000
        # events/s cost the load generator more CPU than the worker it shares two cores with
        ahead = t0 + k / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(max(ahead, 0.001))
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        now_ts = start_ts + int((time.time() - wall0) * 1000)
        while k < due:
            u = rng.choice(users)
            ts = max(now_ts, last_ts.get(u, 0) + 1)
            last_ts[u] = ts
            ev = {"user_id": u, "item_id": rng.choice(items), "type": "click", "ts": ts, "event_id": f"bench-{k}-{ts}"}
            t_sent = time.perf_counter()
            if u in watched:
                sampled += 1
                with lock:
                    pending.setdefault(u, []).append((ts, t_sent))
            p.produce(s.events_topic, key=u.encode(), value=orjson.dumps(ev))
            if k % probe_every == 0:
                probe.send(p, k, wall0)
            k += 1
        p.poll(0)
    p.flush(30)
    achieved = n / (time.perf_counter() - t0)
    if sent is not None:
        sent()
    deadline_drain = time.perf_counter() + 10
    done.set()
    th.join(15)
    table = probe.finish()
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
        "observe": observe,
        "watched_users": len(watched),
        "sampled": sampled,  # events of the watched users
        "observed": len(ms),
        "unobserved": lost,
        "p50_ms": percentile(ms, 0.50),
        "p95_ms": percentile(ms, 0.95),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "table": table,
    }


def _event_ts(doc: bytes | str) -> int:
    """A list document's ``event_ts``, read without decoding its items: decoding whole documents
    cost the load generator's reader thread most of its CPU at 10,000 events/s, on the cores the
    worker needs. Falls back to a full decode if the field is not where ``rec_doc`` puts it."""
    if isinstance(doc, str):  # a client set to decode responses
        doc = doc.encode()
    at = doc.rfind(b'"event_ts":')
    if at >= 0:
        end = doc.find(b",", at)
        try:
            return int(doc[at + 11 : end if end >= 0 else None])
        except ValueError:
            pass
    return int(orjson.loads(doc)["event_ts"])


def wait_assigned(workers: list[WorkerProcess], partitions: int, quiet: float = 2.0, timeout: float = 120.0) -> None:
    """Wait until the workers' latest assignments split all partitions between them and nothing
    has been reassigned for ``quiet`` seconds."""
    last: tuple[tuple[int, ...], ...] = ()
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        for w in workers:
            if not w.alive():
                raise RuntimeError("worker exited:\n" + w.log()[-3000:])
        docs = [w.readiness() for w in workers]  # /readyz: the partitions each stage holds
        latest = tuple(tuple(d["partitions"].get("user", ())) if d else () for d in docs)
        if latest != last:
            last, since = latest, time.monotonic()
        owned = sorted(p for ps in latest for p in ps)
        ready = all(d is not None and d["ready"] for d in docs)
        if ready and owned == list(range(partitions)) and time.monotonic() - since >= quiet:
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
        m = RedisStore(redis_client(s), s.redis_prefix).ctr_metrics()
        if code != 0 or m is None:
            raise RuntimeError(f"the trainer failed (exit {code}):\n" + t.log()[-3000:])
        out.update(samples=int(m["samples"]), versions=int(m["version"]))


def with_samples(env: dict[str, str], enabled: bool) -> dict[str, str]:
    """``env`` with workers publishing CTR samples, for a trainer beside them."""
    return {**env, "STREAMREC_SAMPLES": "true"} if enabled else env


def with_reranker(env: dict[str, str], model: tuple[int, bytes] | None) -> dict[str, str]:
    """``env`` with workers re-ranking by a CTR model (``W_CTR`` 1 unless set above 0), if there
    is one (``pretrained_ctr``'s)."""
    if model is None or settings_from_env(env).w_ctr > 0:
        return env
    return {**env, "STREAMREC_W_CTR": "1"}


def pretrained_ctr(svc: Any, events: list[dict[str, Any]], run: str) -> tuple[int, bytes]:
    """A CTR model trained on a first pass over ``events``, as (version, blob): a worker with
    samples on replays them on topics and keys of its own, and a trainer trains on its samples
    until it has published a version. With it published before a measured run, the worker
    re-ranks from its first block and no trainer shares the machine with the run."""
    env = {**with_samples(isolated_env(svc, f"bench-{run}-ctr"), True), "STREAMREC_CTR_PUBLISH_BATCHES": "5"}
    s = settings_from_env(env)
    ensure_topics(s, 1)
    replay(producer_config(s), s.events_topic, events)
    store = RedisStore(redis_client(s), s.redis_prefix)
    logs = Path(tempfile.gettempdir())
    with trainer_beside(env, True, logs / f"streamrec-bench-{run}-ctr-trainer.log"):
        w = WorkerProcess(env, logs / f"streamrec-bench-{run}-ctr.log").start()
        try:
            wait_stages_caught_up(s, 1, w)
        finally:
            w.stop()
        deadline = time.monotonic() + 300
        while store.ctr_model_version() is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the trainer published no CTR model within 300 s of the worker's pass")
            time.sleep(0.5)
    version, blob = store.ctr_model_version(), store.ctr_model()  # the trainer has stopped
    store.delete_all()
    if version is None or blob is None:
        raise RuntimeError("the published CTR model disappeared")
    return version, blob


def publish_model(env: dict[str, str], model: tuple[int, bytes] | None) -> None:
    """Publish ``model`` (a CTR model's version and blob) under ``env``'s key prefix, if any."""
    if model is not None:
        s = settings_from_env(env)
        RedisStore(redis_client(s), s.redis_prefix).publish_ctr_model(*model)


_TABLE_LAG = re.compile(r"table_lag_events p50=(\d+) p99=(\d+) max=(\d+)")


def worker_processes(pid: int) -> list[psutil.Process]:
    """A worker process and the item stage process it started, if any (``SPLIT_STAGES``); not
    the long-term fit processes (Python's multiprocessing, not ``stream_app.cli``)."""
    p = psutil.Process(pid)
    out = [p]
    for c in p.children():
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            if "stream_app.cli" in c.cmdline():
                out.append(c)
    return out


def worker_threads(read: Callable[[int], dict[str, float]], pid: int) -> dict[str, float]:
    """``read`` (``thread_cpu``, ``thread_waits``: by thread name) of a worker and of its item
    stage process, if any (``SPLIT_STAGES``): the stages' threads have names of their own; other
    threads of the child whose names the worker's threads have too (``metrics``, librdkafka's)
    get " (item process)" after theirs."""
    try:
        children = worker_processes(pid)[1:]
    except psutil.Error:  # the worker is gone: ``read`` tells so (empty)
        children = []
    out = read(pid)
    for child in children:
        for name, v in read(child.pid).items():
            out[f"{name} (item process)" if name in out else name] = v
    return out


def machine_cpu(workers: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the processes on this machine, by role: the worker processes (named
    as in ``workers``), their child processes (the long-term fits), this process (the load
    generator), the kernel's threads, the others by process name; and ``machine``, the busy time
    of every core (interrupts and processes that ended meanwhile included)."""
    t = psutil.cpu_times()
    out: dict[str, float] = defaultdict(float)
    out["machine"] = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    role = {pid: name for name, pid in workers.items()}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "ppid", "name", "cpu_times"]):
        ct = p.info["cpu_times"]
        if ct is None:  # gone, or not ours to read
            continue
        pid, ppid = p.info["pid"], p.info["ppid"]
        if pid in role:
            label = f"{role[pid]} process"
        elif ppid in role:
            label = f"{role[ppid]}'s child processes"
        elif pid == me:
            label = "load generator (this process)"
        elif 2 in (pid, ppid):  # kthreadd and its threads, whose names change with their work
            label = "kernel threads"
        else:
            label = p.info["name"] or "?"
        out[label] += ct.user + ct.system
    return dict(out)


def counted(p: WorkerProcess, family: str) -> dict[str, float]:
    """A counter of worker process ``p``'s /metrics by its ``stage`` label ("" without one);
    empty if it does not answer or does not export it."""
    code, body = p.http_get("/metrics", timeout=5.0)
    if code != 200:
        return {}
    return {
        smp.labels.get("stage", ""): smp.value
        for fam in text_string_to_metric_families(body.decode())
        if fam.name == family
        for smp in fam.samples
        if smp.name.endswith("_total")
    }


# what the bench reads of each worker process before and after its freshness traffic: each
# thread's CPU and wait for a core, each stage's wait for the other's block and for the table
_READINGS: tuple[Callable[[WorkerProcess], dict[str, float]], ...] = (
    lambda p: worker_threads(thread_cpu, p.pid),
    lambda p: worker_threads(thread_waits, p.pid),
    lambda p: counted(p, "streamrec_block_lock_wait_seconds"),
    lambda p: counted(p, "streamrec_table_wait_seconds"),
)


def cpu_shares(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], seconds: float
) -> dict[str, dict[str, float]]:
    """Per process, each key's growth between two readings ``seconds`` apart, per second (for
    seconds of CPU or of waiting: its share of one core, or of the time), largest first."""
    out = {}
    for proc, now in after.items():
        was = before.get(proc, {})
        shares = {name: (t - was.get(name, 0.0)) / seconds for name, t in now.items()}
        out[proc] = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    return out


def table_lag_reported(log: str) -> dict[str, int] | None:
    """The table lag a worker reported in ``log`` (its stats lines, every 10 s): how many of a
    partition's events the table missed when a block was ranked; the median of the reports'
    p50s, and the largest p99 and maximum."""
    found = [tuple(map(int, m)) for m in _TABLE_LAG.findall(log)]
    found = [x for x in found if x[2] > 0] or found
    if not found:
        return None
    p50s = sorted(x[0] for x in found)
    return {"p50": p50s[len(p50s) // 2], "p99": max(x[1] for x in found), "max": max(x[2] for x in found)}


def scale_run(
    svc: Any,
    events: list[dict[str, Any]],
    workers: int,
    partitions: int,
    run: str,
    with_trainer: bool = False,
    ctr_model: tuple[int, bytes] | None = None,
) -> CatchUp:
    """End-to-end throughput of ``workers`` workers on a ``partitions``-partition topic."""
    env = with_reranker(with_samples(isolated_env(svc, f"bench-{run}-w{workers}"), with_trainer), ctr_model)
    s = settings_from_env(env)
    ensure_topics(s, partitions)
    publish_model(env, ctr_model)
    logs = Path(tempfile.gettempdir())
    with trainer_beside(env, with_trainer, logs / f"streamrec-bench-{run}-w{workers}-trainer.log") as trainer:
        procs = [WorkerProcess(env, logs / f"streamrec-bench-{run}-w{workers}-{k}.log").start() for k in range(workers)]
        try:
            wait_assigned(procs, partitions)
            replay(producer_config(s), s.events_topic, events)  # the rate is taken after this returns
            caught = wait_stages_caught_up(s, partitions, procs[0])
            if not all(w.alive() for w in procs):
                raise RuntimeError("a worker exited during the run")
            owners = [(w.readiness() or {}).get("partitions", {}).get("user") for w in procs]
        finally:
            for w in procs:
                w.stop()
    typer.echo(
        f"end to end, {workers} worker(s), {partitions} partitions: {caught.both_rate:,.0f} events/s "
        f"(user stage {caught.rate:,.0f}) {owners}"
    )
    if trainer:
        typer.echo(f"  beside a trainer that trained on {trainer['samples']:,} samples")
    RedisStore(redis_client(s), s.redis_prefix).delete_all()
    return caught


def run_bench(
    settings: Settings,
    n_events: int,
    rate: int,
    seconds: float,
    partitions: int = 1,
    with_trainer: bool = False,
    scale_partitions: int = 4,
    split_roles: bool = False,
    observe: float = 0.1,
    pretrained: bool = False,
) -> dict[str, Any]:
    """``streamrec bench``'s worker runs. ``pretrained``: the workers re-rank with a CTR model
    published before they start (``pretrained_ctr``), with no trainer beside them unless
    ``with_trainer``."""
    run = uuid.uuid4().hex[:8]
    name, events = demo_events(settings, n_events or 100_000, use_ml100k=True)
    if n_events:
        events = events[:n_events]
    with local_services(settings) as svc:
        ctr_model = None
        if pretrained:
            typer.echo(f"training a CTR model on a first pass over {len(events):,} events ({name}) ...")
            ctr_model = pretrained_ctr(svc, events, run)
            typer.echo(f"CTR model version {ctr_model[0]} trained ({len(ctr_model[1]) / 1e6:.1f} MB)")
        env = with_reranker(with_samples(isolated_env(svc, f"bench-{run}"), with_trainer), ctr_model)
        s = settings_from_env(env)
        ensure_topics(s, partitions)
        publish_model(env, ctr_model)
        typer.echo(f"preloading {len(events):,} events ({name}) into {partitions} partition(s) ...")
        replay(producer_config(s), s.events_topic, events)
        raw = raw_ceiling(s, s.events_topic, partitions)
        typer.echo(f"raw ceiling: {raw['events_per_s']:,.0f} events/s")
        log_path = Path(tempfile.gettempdir()) / f"streamrec-bench-worker-{run}.log"
        typer.echo(f"worker log: {log_path}")
        with trainer_beside(env, with_trainer, log_path.with_suffix(".trainer.log")) as trainer:
            # one process with both stages, or (split_roles) a user-stage and an item-stage
            # process, as deploy/ and docker-compose.yml run them
            w = WorkerProcess({**env, "STREAMREC_ROLES": "user"} if split_roles else env, log_path).start()
            wi = None
            if split_roles:
                wi = WorkerProcess({**env, "STREAMREC_ROLES": "item"}, log_path.with_suffix(".item.log")).start()
            try:
                caught = wait_stages_caught_up(s, partitions, w, item_worker=wi)
                typer.echo(
                    f"end to end: {caught.both_rate:,.0f} events/s (user stage {caught.rate:,.0f}; the item "
                    f"stage done {caught.item_lag_s:.1f} s after it)"
                )
                if caught.events == 0:
                    typer.echo(
                        "(the whole log was committed before the first commit was seen: too short to measure a "
                        "rate; preload more --events)"
                    )
                rss = sum(p.memory_info().rss for x in (w, wi) if x is not None for p in worker_processes(x.pid))
                users = [str(e["user_id"]) for e in events]
                items = [str(e["item_id"]) for e in events]
                start_ts = max(int(e["ts"]) for e in events) + 1000
                before = len(w.log())
                procs = {"user": w, "item": wi} if wi is not None else {"worker": w}
                # the worker's threads while the traffic flows (not while the last lists are awaited)
                pids = {k: x.pid for k, x in procs.items()}
                t_cpu = time.monotonic()
                before_run = [{k: read(x) for k, x in procs.items()} for read in _READINGS]
                before_run.append({"machine": machine_cpu(pids)})
                after_run: list[dict[str, dict[str, float]]] = []
                traffic_s: list[float] = []

                def traffic_over() -> None:
                    traffic_s.append(time.monotonic() - t_cpu)
                    after_run.extend({k: read(x) for k, x in procs.items()} for read in _READINGS)
                    after_run.append({"machine": machine_cpu(pids)})

                fresh = freshness(s, users, items, rate, seconds, start_ts, observe=observe, sent=traffic_over)
                cpu, waits, locks, tables, machine = (
                    cpu_shares(b, a, traffic_s[0]) for b, a in zip(before_run, after_run, strict=True)
                )
                typer.echo(
                    f"freshness at {fresh['rate_achieved']:,.0f} events/s: p50 {fresh['p50_ms']:.0f} ms, "
                    f"p99 {fresh['p99_ms']:.0f} ms; event -> table p50 {fresh['table']['p50_ms'] or math.nan:.0f} ms"
                )
                time.sleep(10.5)  # one more stats report of the worker's, covering the end of the run
                fresh["table_lag_events"] = table_lag_reported(w.log()[before:])
            finally:
                w.stop()
                if wi is not None:
                    wi.stop()
        RedisStore(redis_client(s), s.redis_prefix).delete_all()
        scale = (
            {n: scale_run(svc, events, n, scale_partitions, run, with_trainer, ctr_model) for n in (1, 2)}
            if scale_partitions
            else {}
        )
    res = {
        "machine": {
            "cores": os.cpu_count(),
            "broker": "embedded Tansu" if svc.embedded_broker else "configured",
            "redis": "embedded" if svc.embedded_redis else "configured",
        },
        "dataset": name,
        "events": len(events),
        "partitions": partitions,
        "split_roles": split_roles,
        "raw_ceiling_events_per_s": raw["events_per_s"],
        "end_to_end_events_per_s": caught.both_rate,
        "user_stage_events_per_s": caught.rate,
        "item_stage_lag_s": caught.item_lag_s,
        "scale_out_events_per_s": {
            "partitions": scale_partitions,
            "workers_1": scale[1].both_rate,
            "workers_2": scale[2].both_rate,
            "user_stage_workers_1": scale[1].rate,
            "user_stage_workers_2": scale[2].rate,
        }
        if scale
        else None,
        "worker_rss_mb": rss / 2**20,
        "freshness": fresh,
        # share of one core per worker thread (OS names, ``stream_app.os_threads``) over the traffic
        "worker_cpu_by_thread": cpu,
        # ... the share of the run each thread was ready to run but had no core
        "worker_runqueue_by_thread": waits,
        # ... the share of the run each stage's blocks waited for the other stage's block
        "stage_lock_wait": locks,
        # ... the share of the run the user stage held blocks back for the item table
        "user_stage_table_wait": tables,
        # ... every process on the machine, in cores ("machine": all of them, busy)
        "machine_cpu": machine["machine"],
        "worker_log": str(log_path),
        "ctr_versions_loaded": len(re.findall(r"CTR model version \d+ loaded", w.log())),
        "trainer": trainer or None,  # samples trained on beside the one-worker runs (with_trainer)
        "samples": s.samples,
        "w_ctr": s.w_ctr,
        "pretrained_ctr_version": ctr_model[0] if ctr_model is not None else None,
    }
    f = fresh
    who = "one worker, the stages in two processes" if split_roles else "one worker"
    typer.echo("\n| measure | value |\n|---|---|")
    typer.echo(f"| raw ceiling (consume + orjson decode) | {res['raw_ceiling_events_per_s']:,.0f} events/s |")
    typer.echo(
        f"| end to end, {who} (both stages done) | {caught.both_rate:,.0f} events/s "
        f"({res['end_to_end_events_per_s'] / res['raw_ceiling_events_per_s']:.1%} of the raw ceiling) |"
    )
    typer.echo(f"| the user stage alone | {caught.rate:,.0f} events/s |")
    if scale:
        typer.echo(
            f"| end to end, {scale_partitions} partitions: one worker / two workers | "
            f"{scale[1].both_rate:,.0f} / {scale[2].both_rate:,.0f} events/s |"
        )
    typer.echo(f"| resident memory ({who}) after {len(events):,} events | {res['worker_rss_mb']:.0f} MiB |")
    typer.echo(
        f"| freshness at {f['rate_achieved']:,.0f} events/s: p50 / p95 / p99 / max | "
        f"{f['p50_ms']:.1f} / {f['p95_ms']:.1f} / {f['p99_ms']:.1f} / {f['max_ms']:.1f} ms |"
    )
    typer.echo(
        f"| same, events sent after the first 2 s: p50 / p99 | {f['steady_p50_ms']:.1f} / {f['steady_p99_ms']:.1f} ms |"
    )
    typer.echo(
        f"| events whose list update was seen | {f['observed']:,} of the {f['sampled']:,} sent for the "
        f"{f['watched_users']:,} users watched ({f['events']:,} events in all) |"
    )
    lag = f.get("table_lag_events")
    if lag:
        typer.echo(
            f"| table lag when a block was ranked: p50 / p99 / max | {lag['p50']:,} / {lag['p99']:,} / "
            f"{lag['max']:,} events |"
        )
    t = f["table"]
    if t["observed"]:
        typer.echo(
            f"| event -> its neighbour list in the table: p50 / p99 / max | "
            f"{t['p50_ms']:.1f} / {t['p99_ms']:.1f} / {t['max_ms']:.1f} ms ({t['observed']} of {t['probes']} probes) |"
        )
    for proc, shares in cpu.items():
        if shares:
            busy = ", ".join(f"{name} {x:.0%}" for name, x in shares.items() if x >= 0.01)
            typer.echo(
                f"| {proc} process CPU during the freshness traffic, by thread (share of one core) | "
                f"{sum(shares.values()):.0%}: {busy} |"
            )
    for proc, shares in waits.items():
        if shares:
            short = ", ".join(f"{name} {x:.0%}" for name, x in shares.items() if x >= 0.01) or "none above 1%"
            typer.echo(
                f"| {proc} process threads waiting for a core during the freshness traffic (share of it) | {short} |"
            )
    cores = dict(machine["machine"])
    if cores:
        total = cores.pop("machine", 0.0)
        cores["other"] = total - sum(cores.values())
        each = ", ".join(f"{name} {x:.2f}" for name, x in sorted(cores.items(), key=lambda kv: -kv[1]) if x >= 0.01)
        typer.echo(
            f"| the machine during the freshness traffic: cores busy, of {os.cpu_count()} | {total:.2f}: {each} |"
        )
    for proc, shares in tables.items():
        if shares and proc != "item":  # the processes with a user stage
            typer.echo(
                f"| {proc} process: the user stage holding blocks back for the item table during the freshness "
                f"traffic (share of it) | {shares.get('', 0.0):.0%} |"
            )
    for proc, shares in locks.items():
        if len(shares) > 1:  # both stages in one process
            both = ", ".join(f"{name} stage {x:.0%}" for name, x in shares.items())
            typer.echo(
                f"| {proc} process stages waiting for the other stage's block during the freshness traffic "
                f"(share of it) | {both} |"
            )
    if trainer:
        typer.echo(f"| beside a trainer: samples it trained on, one-worker runs | {trainer['samples']:,} |")
    if s.w_ctr > 0:
        typer.echo(f"| CTR model versions the worker loaded (W_CTR={s.w_ctr:g}) | {res['ctr_versions_loaded']} |")
    typer.echo(f"\n{os.cpu_count()} cores; dataset {name}; broker and Redis on this machine.")
    return res


def table_memory(settings: Settings, n_items: int, n_events: int) -> dict[str, Any]:
    """The item table a user-stage worker holds, in memory, once caught up: for MovieLens-100K
    (when fetched) and for a synthetic catalogue of ``n_items`` items (``catalogue_events``).

    In-process, with the worker's own code: the events go through a user partition and one item
    partition that owns every item; every item's entry is then encoded and decoded as on the
    table topic and applied to a fresh table. Memory is what ``tracemalloc`` sees allocated for
    the table (its arrays, lists and strings); the item partition's counts are reported beside.
    """
    from stream_app.datasets import catalogue_events, ml100k_dir, read_log

    out: dict[str, Any] = {}
    p = settings.params()
    schema = settings.event_schema()
    sources: list[tuple[str, Iterator[list[dict[str, Any]]]]] = []
    ml = ml100k_dir(settings.data_dir) / "events.jsonl"
    if ml.exists():
        rows = read_log(ml, "jsonl")
        sources.append(("MovieLens-100K", iter([rows[k : k + 10_000] for k in range(0, len(rows), 10_000)])))
    sources.append(
        (f"synthetic catalogue ({n_items:,} items, {n_events:,} events)", catalogue_events(n_items, n_events=n_events))
    )
    for name, blocks in sources:
        t0 = time.perf_counter()
        part, items = UserPartition(p), ItemPartition(p)
        offset = 0
        with threadpool_limits(limits=1, user_api="blas"):
            for block in blocks:
                events = [schema.from_obj(e) for e in block]
                d = part.apply(events, list(range(offset, offset + len(events)))).deltas
                if d is not None and len(d):
                    items.apply(split(d, 0, offset, offset + len(events), part.routes(1), 1))
                offset += len(events)
        blobs = [e.encode() for e in items.all_entries()]
        tracemalloc.start()
        table = ItemTable(p.dim)
        table.apply(TableEntry.decode(b) for b in blobs)
        arrays = table.memory_bytes()  # parses every neighbour list, as ranking with each would
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res = {
            "items": table.n_items,
            "events": offset,
            "table_mib": size / 2**20,
            "table_arrays_mib": arrays / 2**20,
            "neighbours_per_item": sum(len(table.sim_top(i)[0]) for i in range(table.n_items)) / max(table.n_items, 1),
            "item_counts_mib": items.counts.nbytes() / 2**20,
            "cooccurrence_entries": len(items.counts),
            "seconds": time.perf_counter() - t0,
        }
        out[name] = res
        typer.echo(
            f"| {name} | {res['items']:,} items, {res['neighbours_per_item']:.0f} neighbours each | "
            f"{res['table_mib']:.1f} MiB | {res['item_counts_mib']:.1f} MiB ({res['cooccurrence_entries']:,} entries) |"
        )
    return out
