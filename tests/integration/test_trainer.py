"""Workers publish CTR samples; the trainer learns from them and publishes gated versions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from models.ctr.checkpoint import from_bytes, to_bytes
from models.ctr.features import N_DENSE
from stream_app.processes import WorkerProcess, wait_caught_up
from stream_app.redis_store import RedisStore
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
    single = [x for x in samples if "g" not in x]
    positives = [x for x in single if x["y"] == 1.0]
    assert len(positives) == sum(e["type"] in ("click", "purchase") for e in events)
    assert len(single) > 2 * len(positives)  # view negatives and sampled negatives
    first = {(e["user_id"], e["item_id"]): k for k, e in enumerate(events)}
    for x in positives[:2000]:  # features as at event time: history holds only earlier items
        k = first[(x["u"], x["i"])]
        assert all(first[(x["u"], h)] < k for h in x["h"])
    # list samples: the item taken from the candidates the worker ranked before the event, and
    # other candidates of that list, none of which the user had touched by then
    lists: dict[str, list[dict[str, Any]]] = {}
    for x in samples:
        if "g" in x:
            lists.setdefault(x["g"], []).append(x)
    # a replayed log arrives in full blocks, and a user's events in one block all follow the
    # same served list: only the first can make a list sample, so there are few of them here
    assert len(lists) >= 20, (len(lists), len(positives))
    for rows in list(lists.values())[:2000]:
        taken = [x for x in rows if x["y"] == 1.0]
        assert len(taken) == 1 and 2 <= len(rows) <= 1 + s.sample_list_negatives
        k = first[(taken[0]["u"], taken[0]["i"])]
        assert all(first.get((x["u"], x["i"]), len(events)) > k for x in rows if x["y"] == 0.0)
        assert all(len(x["d"]) == N_DENSE and 0 <= x["d"][0] <= 1 for x in rows)

    res = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "trainer", "--idle-exit", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "; 1 torch thread(s)" in res.stderr  # CTR_THREADS: one by default, beside the workers
    store = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix)
    m = store.ctr_metrics() or {}
    assert m["samples"] > 0.9 * len(samples) and m["version"] >= 2
    assert m["ctr"]["auc"] > 0.55, m
    assert m["lists"]["lists"] >= 0.8 * len(lists) * (1 - s.ctr_holdout), m  # scored before training
    version, model = from_bytes(store.ctr_model() or b"")
    assert version == m["version"] == store.ctr_model_version()
    assert len(list((tmp_path / "models").glob("ctr-*.pt"))) == min(version, 5)

    # a worker with the CTR model in its ranking picks up published versions without a restart
    more = ml100k[20_000:24_000]
    env2 = {**env, "STREAMREC_W_CTR": "0.5", "STREAMREC_CTR_POLL_S": "0.3", "STREAMREC_SAMPLES": "false"}
    w2 = WorkerProcess(env2, tmp_path / "worker2.log").start()
    try:
        produce(broker, s.events_topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in more[:2000]])
        wait_caught_up(broker, s.group_id, s.events_topic, 1, w2)
        doc = store.get_rec(more[1999]["user_id"]) or {}
        assert doc["model"] == f"{s.model_version}+ctr-v{version}", doc
        store.publish_ctr_model(version + 1, _republish(store.ctr_model(), version + 1))
        deadline = time.monotonic() + 30
        while f"CTR model version {version + 1} loaded" not in w2.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        produce(broker, s.events_topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in more[2000:]])
        wait_caught_up(broker, s.group_id, s.events_topic, 1, w2)
        doc = store.get_rec(more[-1]["user_id"]) or {}
        assert doc["model"] == f"{s.model_version}+ctr-v{version + 1}", doc
        seen = {e["item_id"] for e in ml100k[:24_000] if e["user_id"] == more[-1]["user_id"]}
        assert len(doc["items"]) == s.n_recs and not seen & {x["item_id"] for x in doc["items"]}
    finally:
        assert w2.stop() == 0, w2.log()[-3000:]


def _republish(blob: bytes | None, version: int) -> bytes:
    """The same weights under a new version number, as the trainer would publish them."""
    _, model = from_bytes(blob or b"")
    return to_bytes(model, version, {})
