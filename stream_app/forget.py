"""``streamrec forget USER_ID``: a forget request on the events topic, and waiting for it.

The request is a control message (``models.events.forget_message``) keyed by the user id and
partitioned the way producers partition the user's events, so it lands in the user's partition
and the worker that owns it meets it in order with the user's events: what came before is
applied, then dropped; what comes after starts a new user. Deleting through the log, rather than
in Redis from the command line, is what makes it safe against a worker that is about to write the
user's list or snapshot again, and what keeps a replay of the log deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer

from models.events import forget_message
from stream_app.config import Settings
from stream_app.kafka_io import end_offsets, producer_config, topic_partitions
from stream_app.processes import committed

# librdkafka's partitioners. consistent_random (CRC-32 of the key) is librdkafka's default, so
# that of streamrec replay and of producers on librdkafka (confluent-kafka for Python, Go, .NET,
# C); Java clients hash keys with murmur2 (murmur2_random here).
PARTITIONERS = ("consistent_random", "consistent", "murmur2_random", "murmur2", "fnv1a_random", "fnv1a")


@dataclass(frozen=True)
class Published:
    topic: str
    partition: int
    offset: int


def publish_forget(
    s: Settings, user_id: str, partitioner: str = "consistent_random", timeout: float = 30.0
) -> Published:
    """Produce the forget request for ``user_id`` and wait for the broker's acknowledgement."""
    got: list[Any] = []
    p = Producer(producer_config(s, partitioner=partitioner))
    p.produce(
        s.events_topic,
        key=user_id.encode(),
        value=forget_message(user_id, int(time.time() * 1000)),
        on_delivery=lambda err, msg: got.append((err, msg)),
    )
    left = p.flush(timeout)
    if left or not got:
        raise RuntimeError(f"the broker did not acknowledge the request within {timeout:.0f} s")
    err, msg = got[0]
    if err is not None:
        raise RuntimeError(f"the broker refused the request: {err}")
    return Published(msg.topic(), msg.partition(), msg.offset())


def wait_applied(s: Settings, req: Published, timeout: float) -> str | None:
    """Wait until the user stage has committed past the request (its state and ``rec:`` key are
    gone) and the item stage has applied what the user stage sent up to then (the long-term
    profile is gone); None when done, else what is still missing."""
    deadline = time.monotonic() + timeout
    n = topic_partitions(s, req.topic)
    while committed(s, s.group_id, req.topic, n).get(req.partition, -1) <= req.offset:
        if time.monotonic() >= deadline:
            return f"the user stage (group {s.group_id}) has not processed partition {req.partition} past it yet"
        time.sleep(0.2)
    # the user stage flushes the request's deltas before it commits: the end of item partition 0
    # (which keeps the long-term profiles) now covers them
    target = end_offsets(s, s.deltas, 1)[0]
    while committed(s, s.item_group_id, s.deltas, 1).get(0, -1) < target:
        if time.monotonic() >= deadline:
            return f"the item stage (group {s.item_group_id}) has not applied it yet"
        time.sleep(0.2)
    return None
