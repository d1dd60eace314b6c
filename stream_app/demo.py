"""``streamrec demo``: the whole path on one machine, with nothing but Python installed.

Starts a Tansu broker and a Redis unless they are configured, creates fresh topics, preloads a
seeded synthetic stream (or MovieLens-100K when it has been fetched), runs a real worker
subprocess until the consumer group has committed everything, prints a few users' lists, the
trending list and the measured throughput, then stops everything it started. With ``keep``, the
broker, Redis and the worker stay up (and the lists in Redis) until Ctrl-C, and it prints the
settings that point other ``streamrec`` commands, ``redis-cli`` and ``curl`` at them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import typer

from stream_app.config import Settings, mask_url, settings_from_env
from stream_app.datasets import ml100k_dir, read_log, synthetic_events
from stream_app.embedded import free_port
from stream_app.kafka_io import ensure_topics, producer_config
from stream_app.processes import CatchUp, WorkerProcess, wait_stages_caught_up
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore
from stream_app.replay import replay
from stream_app.services import isolated_env, local_services

DEMO_PARTITIONS = 2


def demo_events(settings: Settings, n: int, use_ml100k: bool) -> tuple[str, list[dict[str, Any]]]:
    events_file = ml100k_dir(settings.data_dir) / "events.jsonl"
    if use_ml100k and events_file.exists():
        return "MovieLens-100K", read_log(events_file, "jsonl")
    return f"synthetic (seed 7, {n} events)", synthetic_events(n_events=n)


def run_demo(settings: Settings, n_events: int, use_ml100k: bool, keep: bool = False) -> None:
    run = uuid.uuid4().hex[:8]
    name, events = demo_events(settings, n_events, use_ml100k)
    with local_services(settings) as svc:
        env = isolated_env(svc, f"demo-{run}")
        env["STREAMREC_METRICS_PORT"] = str(_port_or_free(settings.metrics_port_for(9108)))
        s = settings_from_env(env)
        typer.echo(
            f"broker {svc.bootstrap} ({'embedded Tansu' if svc.embedded_broker else 'configured'}), "
            f"redis {mask_url(svc.redis_url)} ({'embedded' if svc.embedded_redis else 'configured'})"
        )
        ensure_topics(s, DEMO_PARTITIONS)
        typer.echo(f"replaying {len(events):,} events from {name} ...")
        summary = replay(producer_config(s), s.events_topic, events)
        typer.echo(f"replay: {summary}")
        store = RedisStore(redis_client(s), s.redis_prefix)
        with tempfile.TemporaryDirectory() as tmp:
            worker = WorkerProcess(env, Path(tmp) / "worker.log").start()
            try:
                t0 = time.monotonic()
                caught = wait_stages_caught_up(s, DEMO_PARTITIONS, worker)
                wall = time.monotonic() - t0
                _show(store, events, caught, wall)
                if keep:
                    _keep_running(svc.embedded_redis, env, events, worker)
            finally:
                worker.stop()
                if worker.proc is not None and worker.proc.returncode not in (0, None):
                    typer.echo(worker.log()[-2000:], err=True)
        store.delete_all()


def _show(store: RedisStore, events: list[dict[str, Any]], caught: CatchUp, wall: float) -> None:
    """A few users' lists, trending, and the throughput."""
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


_SHOWN = (  # what the printed settings name: where the demo's data is, nothing secret
    "STREAMREC_KAFKA_BOOTSTRAP_SERVERS",
    "STREAMREC_REDIS_URL",
    "STREAMREC_REDIS_PREFIX",
    "STREAMREC_EVENTS_TOPIC",
    "STREAMREC_GROUP_ID",
)


def _keep_running(
    embedded_redis: bool, env: dict[str, str], events: list[dict[str, Any]], worker: WorkerProcess
) -> None:
    """Leave everything up until SIGINT/SIGTERM (or the worker exits), saying how to look at it."""
    exports = " ".join(f"{k}={shlex.quote(env[k] if k != 'STREAMREC_REDIS_URL' else mask_url(env[k]))}" for k in _SHOWN)
    prefix, user = env["STREAMREC_REDIS_PREFIX"], str(events[-1]["user_id"])
    item = str(events[-1]["item_id"])
    redis_port = env["STREAMREC_REDIS_URL"].rsplit(":", 1)[-1].split("/")[0]
    cli = f"redis-cli -p {redis_port}" if embedded_redis else "redis-cli"
    port = env["STREAMREC_METRICS_PORT"]
    typer.echo(
        "\nThe broker, Redis and the worker keep running until Ctrl-C (then the demo's keys are deleted).\n"
        "In another terminal:\n"
        f"  export {exports}\n"
        f"  streamrec recs {user}\n"
        f"  {cli} GET '{prefix}rec:{user}'\n"
        f"  {cli} GET '{prefix}sim:{item}'\n"
        f"  {cli} GET '{prefix}trending'\n"
        f"  curl -s localhost:{port}/metrics | grep '^streamrec_'\n"
        f"  curl -s localhost:{port}/readyz\n"
        "  streamrec replay YOUR_LOG.jsonl   # new events: the worker updates the lists as they arrive",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if not worker.alive():
            typer.echo("the worker exited:\n" + worker.log()[-2000:], err=True)
            break
    typer.echo("stopping ...")


def _port_or_free(port: int) -> int:
    """``port`` if nothing listens there (the documented one), else any free port."""
    if port == 0:
        return 0
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return free_port()
    return port
