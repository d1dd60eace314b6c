"""Shared pieces of the integration tests: topics, producing, a worker subprocess, the reference run."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from threadpoolctl import threadpool_limits

from models.engine import step
from models.events import EventSchema, InvalidEvent
from models.ranking import RecList
from models.state import PartitionState
from stream_app.config import Settings
from stream_app.kafka_io import end_offsets
from stream_app.redis_store import rec_doc


def create_topics(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futs = admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    for f in futs.values():
        f.result()


def produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]], partition: int | None = None
) -> None:
    """Produce in order and wait for every acknowledgement."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "enable.idempotence": True})
    failed: list[Any] = []
    for k, (key, value) in enumerate(messages):
        kw: dict[str, Any] = {"partition": partition} if partition is not None else {}
        p.produce(topic, value=value, key=key, on_delivery=lambda err, _m: failed.append(err) if err else None, **kw)
        if k % 2000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    assert not failed


def read_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 20.0) -> list[Any]:
    ends = end_offsets(bootstrap, topic, partitions)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < sum(ends.values()) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m)
    finally:
        c.close()
    return out


def reference_run(settings: Settings, values: list[bytes]) -> tuple[PartitionState, dict[str, RecList]]:
    """The same models in-process over one partition's messages, cut into the worker's blocks,
    with BLAS on one thread as in the worker (a matrix product's rounding depends on it)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _reference_run(settings, values)


def _reference_run(settings: Settings, values: list[bytes]) -> tuple[PartitionState, dict[str, RecList]]:
    schema: EventSchema = settings.event_schema()
    state = PartitionState(settings.params())
    lists: dict[str, RecList] = {}
    b = settings.batch_size
    for start in range(0, len(values), b):
        events = []
        for raw in values[start : start + b]:
            with contextlib.suppress(InvalidEvent):
                events.append(schema.decode(raw))
        for rl in step(state, events).lists:
            lists[rl.user_id] = rl
    return state, lists


def fingerprint(s: PartitionState) -> dict[str, Any]:
    n = s.n_items
    return {
        "items": list(s.item_ids),
        "cooc": [sorted(r.items()) for r in s.cooc],
        "pop": s.pop[:n].tolist(),
        "context": s.context[:n].tolist(),
        "users": {
            u: (list(st.history), list(st.seen), st.n_events, st.last_ts, None if st.vec is None else st.vec.tolist())
            for u, st in s.users.items()
        },
    }


def comparable_doc(raw: bytes) -> dict[str, Any]:
    d = orjson.loads(raw)
    d.pop("generated_at")
    return d


def reference_doc(rl: RecList, model: str) -> dict[str, Any]:
    return comparable_doc(rec_doc(rl, 0, model))
