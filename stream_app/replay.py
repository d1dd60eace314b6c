"""Publish a recorded event log to Kafka in event-time order, as fast as possible or paced."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from models.events import InvalidEvent, parse_ts


@dataclass
class ReplaySummary:
    sent: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return f"sent={self.sent} failed={self.failed} seconds={self.seconds:.2f} events/s={self.rate:,.0f}"


def _key(e: Any) -> bytes | None:
    if isinstance(e, dict) and isinstance(e.get("user_id"), (str, int)):
        return str(e["user_id"]).encode()
    return None


def replay(
    producer_config: dict[str, Any],
    topic: str,
    events: Sequence[Any],
    rate: float | None = None,
    speed: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Produce ``events`` (already in event-time order), keyed by user.

    ``rate``: events per second; ``speed``: multiple of real time (gaps between event times are
    divided by it); neither: as fast as the producer goes. Every message gets a delivery callback;
    the summary counts what the broker acknowledged.
    """
    if rate is not None and speed is not None:
        raise ValueError("give --rate or --speed, not both")
    if (rate is not None and rate <= 0) or (speed is not None and speed <= 0):
        raise ValueError("--rate and --speed must be positive")
    sent = failed = 0
    errors: dict[str, int] = {}

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        nonlocal sent, failed
        if err is None:
            sent += 1
        else:
            failed += 1
            errors[str(err)] = errors.get(str(err), 0) + 1

    p = Producer(producer_config)
    t0 = time.monotonic()
    first_ts: int | None = None
    try:
        for k, e in enumerate(events):
            if rate is not None:
                _sleep_until(t0 + k / rate)
            elif speed is not None:
                ts = _event_ts(e)
                if ts is not None:
                    first_ts = ts if first_ts is None else first_ts
                    _sleep_until(t0 + (ts - first_ts) / 1000 / speed)
            value = e if isinstance(e, bytes) else orjson.dumps(e)
            while True:
                try:
                    p.produce(topic, value=value, key=_key(e), on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.05)  # local queue full: let deliveries drain
            if k % 1000 == 0:
                p.poll(0)
                if progress is not None:
                    progress(k)
    finally:
        left = p.flush(60)
        failed += left
    if progress is not None:
        progress(len(events))
    return ReplaySummary(sent, failed, time.monotonic() - t0)


def _event_ts(e: Any) -> int | None:
    try:
        return parse_ts(e.get("ts")) if isinstance(e, dict) else None
    except InvalidEvent:
        return None


def _sleep_until(deadline: float) -> None:
    d = deadline - time.monotonic()
    if d > 0:
        time.sleep(d)
