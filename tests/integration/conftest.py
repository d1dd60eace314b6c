from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from stream_app.config import Settings
from stream_app.datasets import fetch_ml100k
from stream_app.embedded import redis_server, tansu

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    with tansu() as addr:
        yield addr


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """STREAMREC_TEST_REDIS_URL, else the Redis on 127.0.0.1:6379, else one started for the run."""
    url = os.environ.get("STREAMREC_TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).ping()
        yield url
        return
    try:
        redis.Redis(socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        with redis_server() as started:
            yield started
        return
    yield "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def ml100k() -> list[dict[str, Any]]:
    path = fetch_ml100k(Settings().data_dir)
    events = [orjson.loads(line) for line in path.open("rb")]
    events.sort(key=lambda e: e["ts"])
    return events


@pytest.fixture
def run_id(redis_url: str) -> Iterator[str]:
    with fresh_run(redis_url) as rid:
        yield rid


@contextlib.contextmanager
def fresh_run(redis_url: str) -> Iterator[str]:
    """A new run id; the run's Redis keys are deleted afterwards."""
    rid = uuid.uuid4().hex[:10]
    try:
        yield rid
    finally:
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(f"t{rid}:*", count=1000):
            r.delete(k)


@pytest.fixture
def worker_env(broker: str, redis_url: str, run_id: str) -> dict[str, str]:
    return worker_env_of(broker, redis_url, run_id)


def worker_env_of(broker: str, redis_url: str, run_id: str) -> dict[str, str]:
    """A worker's environment: this process's, with STREAMREC_* settings of its own (topics,
    group and key prefix named after ``run_id``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(
        {
            "STREAMREC_KAFKA_BOOTSTRAP_SERVERS": broker,
            "STREAMREC_REDIS_URL": redis_url,
            "STREAMREC_REDIS_PREFIX": f"t{run_id}:",
            "STREAMREC_EVENTS_TOPIC": f"events-{run_id}",
            "STREAMREC_ITEMS_TOPIC": f"items-{run_id}",
            "STREAMREC_GROUP_ID": f"g-{run_id}",
            "STREAMREC_SESSION_TIMEOUT_MS": "6000",
        }
    )
    return env


def settings_from(env: dict[str, str]) -> Settings:
    keys = {k[len("STREAMREC_") :].lower(): v for k, v in env.items() if k.startswith("STREAMREC_")}
    return Settings(**keys)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"
