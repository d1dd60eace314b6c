"""``streamrec evaluate --served``: score the lists readers actually get from the running system.

The log is replayed through the real pipeline (broker, worker, Redis) at a fixed rate. Before
publishing each event, we read that user's list from Redis the way a reader does (one ``GET``,
falling back to ``trending``) and score its first K items with the prequential rules. The same
events also go through the same models in-process, with the worker's settings (exploration
included), so the gap between the two HR@K is what staleness costs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from models.baselines import Streamrec, ndcg_at
from models.evaluation import prequential
from stream_app.config import Settings, settings_from_env
from stream_app.evaluate import load_events
from stream_app.kafka_io import ensure_topics, producer_config
from stream_app.processes import WorkerProcess, wait_caught_up
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore
from stream_app.services import isolated_env, local_services


def run_served(settings: Settings, path: Path, fmt: str, k: int, rate: float, strict: bool = False) -> dict[str, Any]:
    events, bad = load_events(path, fmt, settings, strict)
    run = f"served-{uuid.uuid4().hex[:8]}"
    with local_services(settings) as svc, tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(svc, run)
        s = settings_from_env(env)
        ensure_topics(s, 1)
        worker = WorkerProcess(env, Path(tmp) / "worker.log").start()
        store = RedisStore(redis_client(s), s.redis_prefix)
        try:
            worker.wait_ready(60)
            p = Producer(producer_config(s))
            seen: dict[str, set[str]] = {}
            hits, gain, evaluated, served_items = 0, 0.0, 0, set()
            t0 = time.monotonic()
            for n, ev in enumerate(events):
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                had = seen.setdefault(ev.user_id, set())
                if ev.item_id not in had:
                    top = store.top_items(ev.user_id, k)  # a reader falls back to trending
                    evaluated += 1
                    served_items.update(top)
                    if ev.item_id in top:
                        hits += 1
                        gain += ndcg_at(top.index(ev.item_id))
                had.add(ev.item_id)
                p.produce(s.events_topic, key=ev.user_id.encode(), value=orjson.dumps(ev.to_dict()))
                p.poll(0)
            p.flush(60)
            achieved = len(events) / (time.monotonic() - t0)
            wait_caught_up(s, s.group_id, s.events_topic, 1, worker)
        finally:
            worker.stop()
            store.delete_all()
    # the same models in-process, with the worker's settings (exploration included)
    params = dataclasses.replace(s.params(), n_recs=max(k, s.n_recs))
    inproc = (
        prequential(events, [Streamrec(params)], k=k).scores["streamrec"].as_dict(k, len({e.item_id for e in events}))
    )
    m = max(evaluated, 1)
    return {
        "events": len(events),
        "invalid_rows_skipped": bad,
        "k": k,
        "rate_target": rate,
        "rate_achieved": achieved,
        "served": {
            f"hr@{k}": hits / m,
            f"ndcg@{k}": gain / m,
            "evaluated": evaluated,
            "coverage": len(served_items) / max(len({e.item_id for e in events}), 1),
        },
        "in_process": inproc,
    }
