"""/metrics, /healthz and /readyz of a live worker and trainer, against the Grafana dashboard."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from stream_app.processes import WorkerProcess, wait_stages_caught_up
from stream_app.redis_store import RedisStore
from tests.dashboard import base_name, dashboard_metrics
from tests.integration.conftest import settings_from
from tests.integration.harness import create_topics, produce

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "streamrec.json"
INVALID = [b"not json", b'{"user_id": "u1"}', b'{"user_id": "u1", "item_id": "i", "type": "nope", "ts": 1}']


def scrape(proc: WorkerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the process's /metrics: name -> labels -> value."""
    code, body = proc.http_get("/metrics")
    assert code == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(body.decode()):
        for smp in fam.samples:
            out[smp.name][tuple(sorted(smp.labels.items()))] = smp.value
    return out


def total(samples: dict[str, dict[Any, float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


def by_stage(samples: dict[Any, float]) -> dict[Any, float]:
    """Samples labelled by stage, with the ``process`` label that a worker whose item stage runs in
    a child process (``SPLIT_STAGES``) gives that child's samples dropped."""
    return {tuple(kv for kv in labels if kv[0] != "process"): v for labels, v in samples.items()}


@pytest.mark.parametrize("split", [True, False], ids=["item-stage-process", "one-process"])
def test_worker_and_trainer_export_what_the_dashboard_shows(
    broker: str, worker_env: dict[str, str], ml100k: list[dict[str, Any]], tmp_path: Path, split: bool
) -> None:
    """The same metrics on the worker's port whichever way its stages run."""
    env = {
        **worker_env,
        "STREAMREC_SAMPLES": "true",
        "STREAMREC_SNAPSHOT_INTERVAL_S": "1",
        "STREAMREC_SPLIT_STAGES": str(split).lower(),
    }
    s = settings_from(env)
    create_topics(broker, s.events_topic, 2)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    trainer = WorkerProcess({**env, "STREAMREC_CTR_BATCH_SIZE": "256"}, tmp_path / "trainer.log", command="trainer")
    try:
        doc = worker.wait_ready(120)
        assert sorted(doc["partitions"]["user"]) == [0, 1] and sorted(doc["partitions"]["item"]) == [0, 1]
        assert worker.http_get("/healthz") == (200, b"ok\n")
        trainer.start()

        valid = ml100k[:3000]
        messages = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in valid]
        produce(broker, s.events_topic, messages + [(b"u1", raw) for raw in INVALID])
        wait_stages_caught_up(s, 2, worker)
        trainer.wait_ready(120)

        deadline = time.monotonic() + 60
        while True:  # the lag gauge is refreshed every second; the trainer reports every 5 s
            w, t = scrape(worker), scrape(trainer)
            lags = w.get("streamrec_consumer_lag", {})
            settled = len(lags) == 4 and not any(lags.values()) and t.get("streamrec_trainer_auc", {}).get(())
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        assert total(w, "streamrec_events_processed_total") == len(valid)
        assert total(w, "streamrec_events_invalid_total") == len(INVALID)
        assert total(w, "streamrec_dead_letters_total") == len(INVALID)
        assert total(w, "streamrec_events_consumed_total") >= len(valid) + len(INVALID)
        assert total(w, "streamrec_freshness_seconds_count") == len(valid)  # one arrival per valid event
        assert total(w, "streamrec_lists_written_total") > 0
        assert total(w, "streamrec_snapshot_writes_total") > 0
        assert by_stage(w["streamrec_partitions_assigned"]) == {(("stage", "item"),): 2, (("stage", "user"),): 2}
        if split:  # the item stage's samples come from its process, and say so
            assert (("process", "item"), ("stage", "item")) in w["streamrec_partitions_assigned"]
        lags = by_stage(lags)
        assert set(lags) == {(("partition", str(p)), ("stage", st)) for p in (0, 1) for st in ("item", "user")}
        assert not any(lags.values()), lags
        # the trainer exports what it reports to Redis (too few samples here for a useful model)
        reported = RedisStore(redis.Redis.from_url(s.redis_url), s.redis_prefix).ctr_metrics()
        assert reported is not None and 0.0 < reported["ctr"]["auc"] < 1.0
        assert t["streamrec_trainer_auc"][()] == pytest.approx(reported["ctr"]["auc"])
        assert t["streamrec_trainer_logloss"][()] == pytest.approx(reported["ctr"]["logloss"])
        assert total(t, "streamrec_trainer_samples_total") >= reported["samples"] > 0

        exported = {base_name(name) for name in (*w, *t)}
        missing = dashboard_metrics(DASHBOARD) - exported
        assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    finally:
        if trainer.proc is not None:
            trainer.stop()
        assert worker.stop() == 0


def test_readyz_answers_not_ready_until_the_worker_holds_its_partitions(
    broker: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    s = settings_from(worker_env)
    create_topics(broker, s.events_topic, 1)
    worker = WorkerProcess(worker_env, tmp_path / "worker.log").start()
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            code, body = worker.http_get("/readyz")
            if code:
                seen.add(code)
                doc = orjson.loads(body)
                assert doc["ready"] == (code == 200)
                if code == 200:
                    break
                assert "not yet joined" in doc["reason"]
            time.sleep(0.05)
        assert 200 in seen
        assert worker.http_get("/healthz")[0] == 200
        assert worker.http_get("/nope")[0] == 404
    finally:
        assert worker.stop() == 0
