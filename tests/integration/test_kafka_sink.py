"""The stage's Kafka sink against the test broker: what an offset commit may rely on."""

from __future__ import annotations

import time

from confluent_kafka import Producer

from stream_app.kafka_io import KafkaSink, ensure_topics, producer_config
from tests.integration.conftest import settings_from


def test_delivered_through_tells_which_produced_messages_are_acknowledged(worker_env: dict[str, str]) -> None:
    """A mark taken after some messages is reached once those are acknowledged, without a flush;
    messages produced after the mark do not hold it back, and a later mark waits for them."""
    s = settings_from(worker_env)
    ensure_topics(s, 2)
    sink = KafkaSink(s)
    # messages wait 200 ms in the producer before they are sent: none can be acknowledged at once
    sink.producer = Producer(producer_config(s, **{"linger.ms": 200}))
    assert sink.delivered_through(sink.produced)  # nothing produced: nothing to wait for
    for k in range(20):
        sink.send(s.deltas, b"x%d" % k, key=b"k", partition=k % 2)
    mark = sink.produced
    assert mark == 20 and not sink.delivered_through(mark)  # none acknowledged yet
    deadline = time.monotonic() + 30
    while not sink.delivered_through(mark):
        assert time.monotonic() < deadline, "the broker never acknowledged the messages"
        time.sleep(0.01)
    assert sink.sent == 20 and sink.failed == 0
    sink.send(s.deltas, b"late", key=b"k", partition=0)
    assert sink.delivered_through(mark)  # the later message is not needed for this mark
    assert not sink.delivered_through(sink.produced)
    sink.flush()
    assert sink.delivered_through(sink.produced) and sink.sent == 21
