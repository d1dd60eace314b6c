"""Resolve the broker and Redis to use: the configured ones, or local embedded ones.

A setting counts as configured when its STREAMREC_* variable is set (or the TOML file sets it).
What this starts, it stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import SecretStr

from stream_app.config import Settings
from stream_app.embedded import redis_server, tansu
from stream_app.preflight import check_kafka, check_redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    bootstrap: str
    redis_url: str
    embedded_broker: bool
    embedded_redis: bool
    # the security settings of the configured services as STREAMREC_* variables, so that processes
    # started with ``isolated_env`` (and settings read back from it) have them even when they came
    # from the TOML file
    security_env: dict[str, str] = field(default_factory=dict)


_KAFKA_SECURITY = (
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_ca_location",
    "kafka_ssl_certificate_location",
    "kafka_ssl_key_location",
    "kafka_ssl_key_password",
)
_REDIS_SECURITY = ("redis_username", "redis_password", "redis_ca_cert")


def _security_env(settings: Settings, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        v = getattr(settings, name)
        v = v.get_secret_value() if isinstance(v, SecretStr) else str(v)
        if _configured(name, settings):
            out[f"STREAMREC_{name.upper()}"] = v
    return out


def _configured(name: str, settings: Settings) -> bool:
    return f"STREAMREC_{name.upper()}" in os.environ or name in settings.model_fields_set


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[Services]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_unwinds())
        # security settings mean a real service: an embedded one would refuse them
        if _configured("kafka_bootstrap_servers", settings) or settings.kafka_security_protocol != "PLAINTEXT":
            bootstrap, eb = settings.kafka_bootstrap_servers, False
            check_kafka(settings)  # one line naming the address, not a traceback minutes later
        else:
            bootstrap, eb = stack.enter_context(tansu()), True
            log.info("started a local Tansu broker at %s", bootstrap)
        if any(_configured(k, settings) for k in ("redis_url", "redis_username", "redis_password", "redis_ca_cert")):
            url, er = settings.redis_url, False
            check_redis(settings)
        else:
            url, er = stack.enter_context(redis_server()), True
            log.info("started a local Redis at %s", url)
        security = {} if eb else _security_env(settings, _KAFKA_SECURITY)
        if not er:
            security.update(_security_env(settings, _REDIS_SECURITY))
        yield Services(bootstrap, url, eb, er, security)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit for the duration, so that the block unwinds and stops the
    services it started: they run in sessions of their own (Ctrl-C reaches only the command),
    and Python's default SIGTERM would exit without stopping them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def isolated_env(svc: Services, name: str) -> dict[str, str]:
    """This process's environment plus STREAMREC_* settings for a throw-away run called ``name``:
    its own topics, consumer group and key prefix on the given services."""
    env = dict(os.environ)
    env.update(svc.security_env)
    env.update(
        {
            "STREAMREC_KAFKA_BOOTSTRAP_SERVERS": svc.bootstrap,
            "STREAMREC_REDIS_URL": svc.redis_url,
            "STREAMREC_REDIS_PREFIX": f"{name}:",
            "STREAMREC_EVENTS_TOPIC": f"{name}-events",
            "STREAMREC_ITEMS_TOPIC": f"{name}-items",
            "STREAMREC_SAMPLES_TOPIC": f"{name}-samples",
            "STREAMREC_GROUP_ID": name,
            "STREAMREC_SESSION_TIMEOUT_MS": "6000",  # group joins take about half of it on Tansu
        }
    )
    return env
