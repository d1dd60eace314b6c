"""Resolve the broker and Redis to use: the configured ones, or local embedded ones.

A setting counts as configured when its STREAMREC_* variable is set (or the TOML file sets it).
What this starts, it stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from stream_app.config import Settings
from stream_app.embedded import redis_server, tansu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    bootstrap: str
    redis_url: str
    embedded_broker: bool
    embedded_redis: bool


def _configured(name: str, settings: Settings) -> bool:
    return f"STREAMREC_{name.upper()}" in os.environ or name in settings.model_fields_set


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[Services]:
    with contextlib.ExitStack() as stack:
        if _configured("kafka_bootstrap_servers", settings):
            bootstrap, eb = settings.kafka_bootstrap_servers, False
        else:
            bootstrap, eb = stack.enter_context(tansu()), True
            log.info("started a local Tansu broker at %s", bootstrap)
        if _configured("redis_url", settings):
            url, er = settings.redis_url, False
        else:
            url, er = stack.enter_context(redis_server()), True
            log.info("started a local Redis at %s", url)
        yield Services(bootstrap, url, eb, er)


def isolated_env(svc: Services, name: str) -> dict[str, str]:
    """This process's environment plus STREAMREC_* settings for a throw-away run called ``name``:
    its own topics, consumer group and key prefix on the given services."""
    env = dict(os.environ)
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
