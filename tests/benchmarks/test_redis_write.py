"""Benchmark of the user stage's Redis write (pytest-benchmark, no threshold): the client's CPU
for a block's lists, timed on the writing thread (``time.thread_time``), so that the Redis
server's share of the round trip, on the same cores, is not counted. Against a real Redis."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from models.ranking import RecList
from stream_app.redis_store import RedisStore
from tests.integration.conftest import fresh_run, redis_url  # noqa: F401 (a fixture)

LISTS = 500  # a live block's lists at 10,000 events/s (README "Measured")


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:  # noqa: F811 (the fixture)
    with fresh_run(redis_url) as rid:
        yield RedisStore(redis.Redis.from_url(redis_url), f"t{rid}:")


def _lists(version: int) -> list[RecList]:
    rng = random.Random(7)
    return [
        RecList(
            str(u),
            version,
            1_700_000_000_000 + u,
            [str(rng.randrange(1682)) for _ in range(10)],
            [rng.random() for _ in range(10)],
            [False] * 9 + [True],
            [0.9] * 9 + [0.1],
            ["similar to 50"] * 5 + ["trending"] * 4 + ["exploration"],
        )
        for u in range(LISTS)
    ]


@pytest.mark.benchmark(timer=time.thread_time)
def test_writing_a_block_of_lists(benchmark: BenchmarkFixture, store: RedisStore) -> None:
    """500 lists of 10 items in one write (documents, the guarded script's arguments, the round
    trip); each round a newer version, so that every list is set."""
    versions = iter(range(1, 1_000_000))
    written = benchmark.pedantic(
        lambda lists: store.write(lists, model="m"), setup=lambda: ((_lists(next(versions)),), {}), rounds=30
    )
    assert written == LISTS
    doc = store.get_rec("7")
    assert doc is not None and len(doc["items"]) == 10 and doc["version"] > 1
