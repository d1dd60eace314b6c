"""The faust-streaming app that a ``streamrec worker`` process runs.

faust hosts the process: lifecycle, signals, logging, timers, and agents for *low-rate* topics.
The high-rate events topic is consumed by ``Pipeline`` (a batched confluent-kafka loop in its own
thread), wrapped here as a faust Service, because faust's per-event overhead would cap a worker
far below the throughput target (see ``stream_app.pipeline``).

Low-rate topic: ``items`` (``STREAMREC_ITEMS_TOPIC``), catalogue updates
``{"item_id": "42", "available": false}``. Unavailable items are kept in the Redis set
``{prefix}unavailable`` (shared by every worker) and never recommended.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import faust
import orjson
import redis

from stream_app.config import Settings
from stream_app.kafka_io import ensure_topics
from stream_app.pipeline import Pipeline
from stream_app.redis_store import RedisStore

log = logging.getLogger(__name__)


def parse_catalog_update(raw: bytes) -> tuple[str, bool]:
    """``{"item_id": str|int, "available": bool}`` -> (item_id, available); ValueError if bad."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("catalogue update is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("catalogue update must be a JSON object")
    item, available = obj.get("item_id"), obj.get("available", True)
    if isinstance(item, int) and not isinstance(item, bool):
        item = str(item)
    if not isinstance(item, str) or not 1 <= len(item) <= 128:
        raise ValueError("catalogue update needs item_id, 1-128 chars")
    if not isinstance(available, bool):
        raise ValueError("available must be true or false")
    return item, available


def create_app(settings: Settings) -> faust.App:
    """Build the app: the pipeline service, the catalogue agent and a stats timer."""
    client = redis.Redis.from_url(settings.redis_url)
    store = RedisStore(client, settings.redis_prefix)
    pipeline = Pipeline(settings, client)
    app = faust.App(
        f"{settings.group_id}-catalog",
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
        web_enabled=False,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_ms / 5000),
        topic_disable_leader=True,
        topic_partitions=1,
    )
    items = app.topic(settings.items_topic, value_serializer="raw", partitions=1)

    @app.agent(items)
    async def catalog(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        async for raw in stream:
            try:
                item, available = parse_catalog_update(raw)
            except ValueError as e:
                log.warning("ignored catalogue update: %s", e)
                continue
            await loop.run_in_executor(None, store.set_availability, item, available)
            yield None

    @app.service
    class PipelineService(faust.Service):
        """Runs ``Pipeline.run`` in a thread; crashes the worker if the pipeline dies, so a
        supervisor restarts it instead of leaving a worker that silently stopped consuming."""

        thread: threading.Thread | None = None

        async def on_start(self) -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, ensure_topics, settings)
            self.thread = threading.Thread(target=self._run, name="streamrec-pipeline", daemon=True)
            self.thread.start()

        def _run(self) -> None:
            # errors are logged by the pipeline; the watchdog below then crashes the app
            with contextlib.suppress(BaseException):
                pipeline.run()

        @faust.Service.task
        async def _watchdog(self) -> None:
            while not self.should_stop:
                await asyncio.sleep(0.5)
                if self.thread is not None and not self.thread.is_alive() and not pipeline.stop_event.is_set():
                    err = pipeline.error or RuntimeError("pipeline thread exited")
                    await app.crash(err)
                    return

        async def on_stop(self) -> None:
            pipeline.stop()
            if self.thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 60)

    @app.timer(10.0)  # type: ignore[untyped-decorator]
    async def report() -> None:
        st = pipeline.stats
        log.info(
            "events=%d invalid=%d duplicates=%d lists=%d batches=%d snapshots=%d partitions=%s",
            st.events,
            st.invalid,
            st.duplicates,
            st.lists,
            st.batches,
            st.snapshots,
            sorted(pipeline.runs),
        )

    return app


def return_large_blocks_to_the_os(threshold: int = 10 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more with mmap, so that freeing them returns
    the memory. glibc otherwise raises that threshold as big blocks are freed and keeps them in
    its heap: the long-term model's fits (a few short-lived arrays of M x M) would leave the
    worker's RSS about 65 MiB higher for good. The dense scoring chunks (8 MB, every batch)
    stay below it: mapping them afresh each time costs page faults. No-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_worker(settings: Settings) -> Any:
    """Run the app until SIGTERM/SIGINT (faust's Worker installs the signal handlers)."""
    return_large_blocks_to_the_os()
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    return worker.execute_from_commandline()
