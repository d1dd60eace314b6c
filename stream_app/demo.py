"""``streamrec demo``: the whole path on one machine, with nothing but Python installed.

Starts a Tansu broker and a Redis unless they are configured, creates fresh topics, preloads a
seeded synthetic stream (or MovieLens-100K when it has been fetched), runs a real worker
subprocess until the consumer group has committed everything, prints a few users' lists, the
trending list and the measured throughput, then stops everything it started.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import typer

from stream_app.config import Settings, settings_from_env
from stream_app.datasets import ml100k_dir, read_log, synthetic_events
from stream_app.kafka_io import ensure_topics, producer_config
from stream_app.processes import WorkerProcess, wait_stages_caught_up
from stream_app.redis_store import RedisStore
from stream_app.replay import replay
from stream_app.services import isolated_env, local_services

DEMO_PARTITIONS = 2


def demo_events(settings: Settings, n: int, use_ml100k: bool) -> tuple[str, list[dict[str, Any]]]:
    events_file = ml100k_dir(settings.data_dir) / "events.jsonl"
    if use_ml100k and events_file.exists():
        return "MovieLens-100K", read_log(events_file, "jsonl")
    return f"synthetic (seed 7, {n} events)", synthetic_events(n_events=n)


def run_demo(settings: Settings, n_events: int, use_ml100k: bool) -> None:
    run = uuid.uuid4().hex[:8]
    name, events = demo_events(settings, n_events, use_ml100k)
    with local_services(settings) as svc:
        env = isolated_env(svc, f"demo-{run}")
        s = settings_from_env(env)
        typer.echo(
            f"broker {svc.bootstrap} ({'embedded Tansu' if svc.embedded_broker else 'configured'}), "
            f"redis {svc.redis_url} ({'embedded' if svc.embedded_redis else 'configured'})"
        )
        ensure_topics(s, DEMO_PARTITIONS)
        typer.echo(f"replaying {len(events):,} events from {name} ...")
        summary = replay(producer_config(s), s.events_topic, events)
        typer.echo(f"replay: {summary}")
        with tempfile.TemporaryDirectory() as tmp:
            worker = WorkerProcess(env, Path(tmp) / "worker.log").start()
            try:
                t0 = time.monotonic()
                caught = wait_stages_caught_up(s, DEMO_PARTITIONS, worker)
                wall = time.monotonic() - t0
            finally:
                worker.stop()
                if worker.proc is not None and worker.proc.returncode not in (0, None):
                    typer.echo(worker.log()[-2000:], err=True)
        store = RedisStore(redis.Redis.from_url(svc.redis_url), s.redis_prefix)
        users = sorted({str(e["user_id"]) for e in events})[:3]
        for u, doc in zip(users, store.get_recs(users), strict=True):
            if doc is None:
                continue
            typer.echo(f"\nuser {u} (version {doc['version']}, model {doc['model']}):")
            for it in doc["items"][:5]:
                flag = f" [explore p={it['p']:.3f}]" if it["explore"] else ""
                typer.echo(f"  {it['item_id']:>8}  {it['score']:.3f}  {it['reason']}{flag}")
        typer.echo("\ntrending: " + ", ".join(t["item_id"] for t in store.get_trending()[:10]))
        typer.echo(
            f"\nthroughput: {caught.events:,} events in {caught.seconds + caught.item_lag_s:.2f} s = "
            f"{caught.both_rate:,.0f} events/s end to end, both stages (one worker, {os.cpu_count()} cores; "
            f"{wall:.1f} s including start-up)"
        )
        store.delete_all()
