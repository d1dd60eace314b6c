"""Kafka adapters: client configs, topic creation, and the dead-letter writer."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream_app import metrics
from stream_app.config import Settings

log = logging.getLogger(__name__)


KafkaConn = Settings | str  # the settings of a deployment, or a bare bootstrap address (PLAINTEXT; tests)


def kafka_common(s: Settings) -> dict[str, Any]:
    """What every client (consumer, producer, admin) needs to reach the brokers: their address
    and, unless the protocol is PLAINTEXT, the TLS and SASL settings. The one place that turns
    the ``kafka_*`` security settings into librdkafka keys."""
    cfg: dict[str, Any] = {"bootstrap.servers": s.kafka_bootstrap_servers}
    proto = s.kafka_security_protocol
    if proto == "PLAINTEXT":
        return cfg
    cfg["security.protocol"] = proto
    if proto.startswith("SASL_"):
        cfg["sasl.mechanism"] = s.kafka_sasl_mechanism
        cfg["sasl.username"] = s.kafka_sasl_username
        cfg["sasl.password"] = s.kafka_sasl_password.get_secret_value()
    if proto in ("SSL", "SASL_SSL"):
        for key, value in (
            ("ssl.ca.location", s.kafka_ssl_ca_location),
            ("ssl.certificate.location", s.kafka_ssl_certificate_location),
            ("ssl.key.location", s.kafka_ssl_key_location),
            ("ssl.key.password", s.kafka_ssl_key_password.get_secret_value()),
        ):
            if value:
                cfg[key] = value
    return cfg


def client_config(conn: KafkaConn) -> dict[str, Any]:
    """``kafka_common`` of settings; a bare bootstrap string is a PLAINTEXT broker."""
    return kafka_common(conn) if isinstance(conn, Settings) else {"bootstrap.servers": conn}


def consumer_config(
    s: Settings, group: str | None = None, queue_kbytes: int = 65536, fetch_wait_ms: int | None = None
) -> dict[str, Any]:
    """A consumer that commits only what was processed; it prefetches up to ``queue_kbytes``
    and waits ``fetch_wait_ms`` (default ``FETCH_WAIT_MAX_MS``) for a fetch to fill."""
    return {
        **kafka_common(s),
        "group.id": group or s.group_id,
        "enable.auto.commit": False,  # we commit only what is fully processed
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": s.fetch_wait_max_ms if fetch_wait_ms is None else fetch_wait_ms,
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": max(500, s.session_timeout_ms // 5),
        "queued.max.messages.kbytes": queue_kbytes,
    }


def producer_config(s: Settings, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        **kafka_common(s),
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    cfg.update(extra)
    return cfg


def topic_partitions(s: Settings, topic: str, timeout: float = 30.0) -> int:
    """How many partitions ``topic`` has (0 if it does not exist). Asked without naming the
    topic: a metadata request for one topic makes brokers with ``auto.create.topics.enable``
    (Tansu, Kafka's default) create it."""
    md = AdminClient(kafka_common(s)).list_topics(timeout=timeout)
    t = md.topics.get(topic)
    return 0 if t is None or t.error is not None else len(t.partitions)


def ensure_topics(s: Settings, partitions: int | None = None, timeout: float = 30.0) -> None:
    """Create the topics a deployment needs if they do not exist; existing ones are kept.

    The events topic (``partitions``, default ``topic_partitions``), its dead-letter topic, the
    samples topic when workers produce samples, and the two internal topics of the item stage:
    the deltas topic and the compacted table topic, with ``item_partitions`` partitions (default:
    as many as the events topic has).
    """
    admin = AdminClient(kafka_common(s))
    md = admin.list_topics(timeout=timeout)
    existing = set(md.topics)
    n_events = partitions or s.topic_partitions
    if s.events_topic in existing:
        n_events = len(md.topics[s.events_topic].partitions)
    n_items = s.item_partitions or n_events
    want = [NewTopic(s.events_topic, partitions or s.topic_partitions, 1), NewTopic(s.dlq, 1, 1)]
    if s.samples:
        want.append(NewTopic(s.samples_topic, partitions or s.topic_partitions, 1))
    want.append(NewTopic(s.deltas, n_items, 1))
    want.append(NewTopic(s.table, n_items, 1, config={"cleanup.policy": "compact"}))
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


class KafkaSink:
    """The messages a stage produces besides its Redis writes (dead letters, CTR samples, item
    deltas, table entries), on one producer, so that ``flush`` before an offset commit covers
    them all. Dead letters carry the raw bytes as value, the reason and source in headers."""

    def __init__(self, s: Settings, stage: str = "user") -> None:
        self.dlq_topic = s.dlq
        self.source = s.events_topic
        self.producer = Producer(producer_config(s))
        self.failed = 0
        self.sent = 0
        self.pending = 0
        self.produced = 0  # messages produced, ever: a mark for ``delivered_through``
        self._unacked: deque[int] = deque()  # sequence numbers in produce order, not yet known acked
        self._acked: set[int] = set()  # acknowledged (or failed) out of order, ahead of _unacked[0]
        self._errors = metrics.KAFKA_ERRORS.labels(stage)

    def _track(self) -> Callable[[Any, Any], None]:
        seq = self.produced
        self.produced += 1
        self.pending += 1
        self._unacked.append(seq)
        return partial(self._on_delivery, seq)

    def _on_delivery(self, seq: int, err: Any, msg: Any) -> None:
        self._acked.add(seq)
        if err is not None:
            self.failed += 1
            self._errors.inc()
            log.error("delivery to %s failed: %s", msg.topic(), err)
        else:
            self.sent += 1

    def delivered_through(self, mark: int) -> bool:
        """Whether every message produced before ``mark`` (a value of ``produced``) has been
        acknowledged, without waiting: an offset commit that needs only those need not flush
        what the stage produced since. Raises if a delivery failed (as ``flush`` does)."""
        self.producer.poll(0)  # serve the delivery callbacks that are due
        q, acked = self._unacked, self._acked
        while q and q[0] in acked:
            acked.discard(q.popleft())
        if self.failed:
            raise RuntimeError(f"{self.failed} messages failed delivery; not committing")
        return not q or q[0] >= mark

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        kw: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._track(), **kw)
                break
            except BufferError:
                self._unacked.pop()  # not produced after all
                self.produced -= 1
                self.pending -= 1
                self.producer.poll(0.1)  # the local queue is full: let deliveries drain, then retry

    def dead_letter(self, key: bytes | None, raw: bytes | None, partition: int, offset: int, reason: str) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", reason.encode()),
            ("source_topic", self.source.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
        ]
        self.producer.produce(self.dlq_topic, value=raw, key=key, headers=headers, on_delivery=self._track())
        self.producer.poll(0)

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything produced is acknowledged (done before offsets are committed)."""
        if self.pending:
            left = self.producer.flush(timeout)
            if left:
                raise RuntimeError(f"{left} messages not delivered within {timeout}s; not committing")
            self.pending = 0
            self._unacked.clear()
            self._acked.clear()
            if self.failed:
                raise RuntimeError(f"{self.failed} messages failed delivery; not committing")


def end_offsets(conn: KafkaConn, topic: str, partitions: int, timeout: float = 20.0) -> dict[int, int]:
    """The true end offset (high watermark) of each partition.

    Tansu 0.6's ListOffsets answers with the base offset of the last record *batch* plus one, so
    a plain ``get_watermark_offsets`` under-reports the end of a topic written in large batches.
    Fetch responses carry the right high watermark, so we fetch from that last batch and read it.
    """
    c = Consumer(
        {
            **client_config(conn),
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
