"""Kafka adapters: client configs, topic creation, and the dead-letter writer."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream_app.config import Settings

log = logging.getLogger(__name__)


def consumer_config(s: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": s.kafka_bootstrap_servers,
        "group.id": s.group_id,
        "enable.auto.commit": False,  # we commit only what is fully processed
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": s.fetch_wait_max_ms,
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": max(500, s.session_timeout_ms // 5),
        "queued.max.messages.kbytes": 65536,
    }


def producer_config(s: Settings, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap.servers": s.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    cfg.update(extra)
    return cfg


def ensure_topics(s: Settings, partitions: int | None = None, timeout: float = 30.0) -> None:
    """Create the events and dead-letter topics (and the samples topic when workers produce
    samples) if they do not exist; existing ones are kept."""
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout).topics)
    want = [NewTopic(s.events_topic, partitions or s.topic_partitions, 1), NewTopic(s.dlq, 1, 1)]
    if s.samples:
        want.append(NewTopic(s.samples_topic, partitions or s.topic_partitions, 1))
    new = [t for t in want if t.topic not in existing]
    if not new:
        return
    for topic, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result()
            log.info("created topic %s", topic)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


class DeadLetters:
    """Sends invalid messages to the DLQ: the raw bytes as value, the reason and source in headers."""

    def __init__(self, s: Settings) -> None:
        self.topic = s.dlq
        self.source = s.events_topic
        self.producer = Producer(producer_config(s, **{"compression.type": "none"}))
        self.failed = 0
        self.sent = 0
        self.pending = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("dead-letter delivery failed: %s", err)
        else:
            self.sent += 1

    def send(self, key: bytes | None, raw: bytes | None, partition: int, offset: int, reason: str) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", reason.encode()),
            ("source_topic", self.source.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
        ]
        self.producer.produce(self.topic, value=raw, key=key, headers=headers, on_delivery=self._on_delivery)
        self.producer.poll(0)
        self.pending += 1

    def send_samples(self, topic: str, samples: list[tuple[bytes, bytes]]) -> None:
        """CTR samples (key, value) on the same producer, so ``flush`` covers them too."""
        for key, value in samples:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
            except BufferError:
                self.producer.poll(1.0)  # the local queue is full: let deliveries drain, then retry
                self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
        self.producer.poll(0)
        self.pending += len(samples)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every dead letter (and sample) is acknowledged (done before offsets are
        committed)."""
        if self.pending:
            left = self.producer.flush(timeout)
            if left:
                raise RuntimeError(f"{left} dead letters not delivered within {timeout}s")
            self.pending = 0
            if self.failed:
                raise RuntimeError(f"{self.failed} dead letters failed; not committing")


def end_offsets(bootstrap: str, topic: str, partitions: int, timeout: float = 20.0) -> dict[int, int]:
    """The true end offset (high watermark) of each partition.

    Tansu 0.6's ListOffsets answers with the base offset of the last record *batch* plus one, so
    a plain ``get_watermark_offsets`` under-reports the end of a topic written in large batches.
    Fetch responses carry the right high watermark, so we fetch from that last batch and read it.
    """
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "streamrec-probe",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        listed = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in range(partitions)}
        out = {p: 0 for p, hi in listed.items() if hi <= 0}
        todo = {p: hi for p, hi in listed.items() if hi > 0}
        if todo:
            c.assign([TopicPartition(topic, p, hi - 1) for p, hi in todo.items()])
            deadline = time.monotonic() + timeout
            while todo and time.monotonic() < deadline:
                for m in c.consume(100, 0.2):
                    p = m.partition()
                    if m.error() is None and p is not None and p in todo:
                        del todo[p]
                        out[p] = c.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1]
            if todo:
                raise RuntimeError(f"could not read the end offsets of {topic} partitions {sorted(todo)}")
        return out
    finally:
        c.close()
