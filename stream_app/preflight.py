"""Before a command starts its clients: can it reach the broker and Redis?

Without this, a worker with no broker dies in a 59-line faust traceback and a Redis client
retries quietly; here each failure becomes a one-line ``ServiceUnreachable`` that names the
address and the setting to fix. The clients are built from the same configuration as the
commands' own (``kafka_io.kafka_common``, ``redis_io.redis_client``), so TLS and SASL settings
are checked too.
"""

from __future__ import annotations

import re
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from stream_app import redis_io
from stream_app.config import Settings, mask_url
from stream_app.errors import ServiceUnreachable, UsageError
from stream_app.kafka_io import kafka_common

KAFKA_TIMEOUT_S = 5.0
REDIS_TIMEOUT_S = 3.0
# errors that retrying within the timeout will not cure
_FINAL = {KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION, KafkaError._SSL}


def check_services(s: Settings, kafka: bool = True, redis: bool = True) -> None:
    """Raise ``ServiceUnreachable`` unless each service asked for answers."""
    if redis:
        check_redis(s)
    if kafka:
        check_kafka(s)


def check_redis(s: Settings, timeout: float = REDIS_TIMEOUT_S) -> None:
    """One PING with short socket timeouts (see ``redis_io.check_redis``)."""
    redis_io.check_redis(s, timeout)


def check_kafka(s: Settings, timeout: float = KAFKA_TIMEOUT_S) -> None:
    """Ask the brokers for their metadata. Gives up at once when every broker refused, could
    not be resolved, or failed TLS or SASL; else after ``timeout`` seconds without an answer.
    librdkafka's own log lines are silenced: the one error raised says it all."""
    errors: list[KafkaError] = []
    where = mask_url(s.kafka_bootstrap_servers)
    cfg: dict[str, Any] = {**kafka_common(s), "log_level": 0, "error_cb": errors.append}
    try:
        admin = AdminClient(cfg)
    except KafkaException as e:
        raise UsageError(f"Kafka client settings rejected: {_reason(e.args[0])}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=min(0.25, max(deadline - time.monotonic(), 0.01)))
            return
        except KafkaException as e:
            if e.args[0].code() not in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
                errors.append(e.args[0])
        admin.poll(0)  # serves error_cb
        if time.monotonic() >= deadline or any(e.code() in _FINAL for e in errors):
            break
    raise ServiceUnreachable(_message(where, errors, timeout))


def _message(where: str, errors: list[KafkaError], timeout: float) -> str:
    codes = {e.code() for e in errors}
    causes = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
    reason = _reason(causes[0]) if causes else f"no answer within {timeout:g} s"
    if KafkaError._AUTHENTICATION in codes:
        return (
            f"Kafka at {where} refused the SASL login: {reason}; check STREAMREC_KAFKA_SASL_USERNAME, "
            "STREAMREC_KAFKA_SASL_PASSWORD and STREAMREC_KAFKA_SASL_MECHANISM"
        )
    if KafkaError._SSL in codes:
        return (
            f"TLS with Kafka at {where} failed: {reason}; check STREAMREC_KAFKA_SECURITY_PROTOCOL "
            "and STREAMREC_KAFKA_SSL_CA_LOCATION"
        )
    if KafkaError._BAD_MSG in codes:
        return (
            f"{where} does not answer as a Kafka broker ({reason}); check STREAMREC_KAFKA_BOOTSTRAP_SERVERS "
            "and, for a TLS listener, STREAMREC_KAFKA_SECURITY_PROTOCOL"
        )
    return f"cannot reach Kafka at {where} (STREAMREC_KAFKA_BOOTSTRAP_SERVERS): {reason}"


def _reason(e: KafkaError) -> str:
    """librdkafka's text without the broker prefix and the state suffix it adds."""
    text = re.sub(r"^\S+/(bootstrap|\d+): ", "", e.str())
    return re.sub(r" \(after \d+ms in state \w+\)$", "", text)
