"""Shared pieces of the integration tests: topics, producing, a worker subprocess, the reference run."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from threadpoolctl import threadpool_limits

from models.deltas import split
from models.events import EventSchema, InvalidEvent
from models.items import ItemPartition
from models.users import UserPartition
from stream_app.config import Settings
from stream_app.kafka_io import end_offsets


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


def reference_run(settings: Settings, values: list[bytes]) -> tuple[UserPartition, ItemPartition]:
    """The same models in-process over one partition's messages, cut into the worker's blocks:
    the user state, and the item state of one item partition that owns every item. BLAS on one
    thread as in the worker (a matrix product's rounding depends on it)."""
    with threadpool_limits(limits=1, user_api="blas"):
        schema: EventSchema = settings.event_schema()
        part = UserPartition(settings.params())
        items = ItemPartition(settings.params())
        b = settings.batch_size
        for start in range(0, len(values), b):
            chunk = values[start : start + b]
            events, offsets = [], []
            for k, raw in enumerate(chunk):
                with contextlib.suppress(InvalidEvent):
                    events.append(schema.decode(raw))
                    offsets.append(start + k)
            d = part.apply(events, offsets).deltas
            if d is not None and len(d):
                items.apply(split(d, 0, start, start + len(chunk), part.routes(1), 1))
        return part, items


def fingerprint(s: UserPartition) -> dict[str, Any]:
    """A user partition's state, comparable between runs."""
    return {
        "items": list(s.item_ids),
        "users": {
            st.uid: (st.history, st.seen, st.n_events, st.last_ts, None if st.vec is None else st.vec.tolist())
            for st in s.views()
        },
        "events": s.events_applied,
    }


def item_counts(parts: list[ItemPartition]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Popularity as of the newest event, and co-occurrence rows, by item id, over item
    partitions (each partition's landmark factored out, so runs compare whatever their landmarks)."""
    pop: dict[str, float] = {}
    rows: dict[str, dict[str, float]] = {}
    for st in parts:
        ids = st.item_ids
        scale = st.scale_now()
        for i, x in enumerate(ids):
            if st.own[i]:
                pop[x] = float(st.pop[i]) / scale
        for i in st.slot:
            rows[ids[i]] = {ids[j]: v / scale for j, v in st.row(i).items()}
    return pop, rows


def same_order_up_to_ties(a: list[tuple[str, float]], b: list[tuple[str, float]], tol: float) -> bool:
    """Whether two ranked lists agree: position by position the same score (within ``tol``), and
    within each group of equal scores the same items in any order; the last group may differ, as
    the tie can go on past the end of the lists."""
    if len(a) != len(b) or any(abs(x[1] - y[1]) > tol for x, y in zip(a, b, strict=True)):
        return False
    groups: list[tuple[int, int]] = []
    for k, (_, score) in enumerate(a):
        if groups and abs(score - a[groups[-1][0]][1]) <= tol:
            groups[-1] = (groups[-1][0], k + 1)
        else:
            groups.append((k, k + 1))
    return all({x for x, _ in a[i:j]} == {x for x, _ in b[i:j]} for i, j in groups[:-1])
