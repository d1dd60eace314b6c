"""Workers publish CTR samples; the trainer learns from them and publishes gated versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import redis

from stream_app.processes import WorkerProcess, wait_caught_up
from stream_app.trainer import from_bytes, metrics_key, model_key
from tests.integration.conftest import settings_from
from tests.integration.harness import create_topics, produce, read_topic


def test_worker_samples_feed_the_trainer_which_publishes_versions(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path
) -> None:
    env = {
        **worker_env,
        "STREAMREC_SAMPLES": "true",
        "STREAMREC_SAMPLES_TOPIC": worker_env["STREAMREC_EVENTS_TOPIC"] + "-samples",
        "STREAMREC_MODEL_DIR": str(tmp_path / "models"),
        "STREAMREC_CTR_BUCKETS": "16384",
        "STREAMREC_CTR_BATCH_SIZE": "512",
        "STREAMREC_CTR_PUBLISH_BATCHES": "20",
    }
    s = settings_from(env)
    create_topics(broker, s.events_topic, 1)
    create_topics(broker, s.samples_topic, 1)
    events = ml100k[:20_000]
    produce(broker, s.events_topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events])
    w = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        wait_caught_up(broker, s.group_id, s.events_topic, 1, w)
    finally:
        assert w.stop() == 0, w.log()[-3000:]

    samples = [orjson.loads(m.value()) for m in read_topic(broker, s.samples_topic)]
    positives = [x for x in samples if x["y"] == 1.0]
    assert len(positives) == sum(e["type"] in ("click", "purchase") for e in events)
    assert len(samples) > 2 * len(positives)  # view negatives and sampled negatives
    first = {(e["user_id"], e["item_id"]): k for k, e in enumerate(events)}
    for x in positives[:2000]:  # features as at event time: history holds only earlier items
        k = first[(x["u"], x["i"])]
        assert all(first[(x["u"], h)] < k for h in x["h"])

    res = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "trainer", "--idle-exit", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = redis.Redis.from_url(s.redis_url)
    m = orjson.loads(r.get(metrics_key(s)) or b"{}")
    assert m["samples"] > 0.9 * len(samples) and m["version"] >= 2
    assert m["ctr"]["auc"] > 0.55, m
    version, model = from_bytes(r.hget(model_key(s), "blob") or b"")
    assert version == m["version"] == int(r.hget(model_key(s), "version") or 0)
    assert len(list((tmp_path / "models").glob("ctr-*.pt"))) == min(version, 5)
