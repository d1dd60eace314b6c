"""The faust-streaming app that a ``streamrec worker`` process runs.

faust hosts the process: lifecycle, signals, logging, timers, and agents for *low-rate* topics.
The high-rate topics are consumed by the stages this worker runs (``STREAMREC_ROLES``): the user
stage (``stream_app.pipeline``, the events topic) and the item stage (``stream_app.item_stage``,
the internal deltas topic), each a batched confluent-kafka loop in its own thread, wrapped here
as a faust Service, because faust's per-event overhead would cap a worker far below the
throughput target (see ``stream_app.stage``). With ``SPLIT_STAGES`` the item stage runs in a
child process instead (``stream_app.item_process``), which this process starts and watches.

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
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

import faust
import orjson
from faust.types.auth import CredentialsT

from stream_app import metrics
from stream_app.config import Settings
from stream_app.item_process import ItemProcess
from stream_app.item_stage import ItemStage
from stream_app.kafka_io import ensure_topics
from stream_app.os_threads import named
from stream_app.pipeline import Pipeline
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore
from stream_app.stage import StageLoop

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


def create_app(settings: Settings, item_process: ItemProcess | None = None) -> faust.App:
    """Build the app: the stages' service, the catalogue agent and a stats timer. With an
    ``item_process`` (``SPLIT_STAGES``), the item stage runs there and this process watches it."""
    client = redis_client(settings)
    store = RedisStore(client, settings.redis_prefix)
    roles = settings.role_set
    stages: list[StageLoop[Any]] = []
    pipeline = Pipeline(settings, client) if "user" in roles else None
    if pipeline is not None and item_process is not None:
        pipeline.item_stage_ready = item_process.ready  # blocks wait for it at start
    items = ItemStage(settings, redis_client(settings)) if "item" in roles and item_process is None else None
    stages = [x for x in (pipeline, items) if x is not None]
    healthz, readyz = metrics.stages_health(stages, settings.health_stale_s)
    if item_process is not None:
        healthz, readyz = with_item_process(healthz, readyz, item_process)
    # bound before faust starts, so that a port in use is a one-line error, not a crash
    child_metrics = item_process.metrics_text if item_process is not None else None
    server = metrics.serve(settings.metrics_port_for(9108), healthz, readyz, child_metrics)
    faust_dir = settings.data_dir / "faust" / settings.group_id
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.group_id}-catalog",
        # faust's own state (we keep none there) under DATA_DIR, not in the current directory
        datadir=str(faust_dir),
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=broker_credentials(settings),
        web_enabled=False,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_ms / 5000),
        topic_disable_leader=True,
        topic_partitions=1,
    )
    catalogue = app.topic(settings.items_topic, value_serializer="raw", partitions=1)

    @app.agent(catalogue)
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
    class StagesService(faust.Service):
        """Runs each stage's ``run`` in a thread; crashes the worker if a stage dies, so a
        supervisor restarts it instead of leaving a worker that silently stopped consuming."""

        threads: list[threading.Thread] = []

        async def on_start(self) -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, ensure_topics, settings)
            for st in stages:
                t = threading.Thread(target=named(_quiet(st.run)), name=f"streamrec-{st.name.split()[0]}", daemon=True)
                t.start()
                self.threads.append(t)

        @faust.Service.task
        async def _watchdog(self) -> None:
            while not self.should_stop:
                await asyncio.sleep(0.5)
                for st, t in zip(stages, self.threads, strict=False):
                    if not t.is_alive() and not st.stop_event.is_set():
                        await app.crash(st.error or RuntimeError(f"{st.name} thread exited"))
                        return
                if item_process is not None and not item_process.stopping:
                    code = item_process.exit_code()
                    if code is not None:  # a supervisor restarts the worker, and with it the child
                        await app.crash(RuntimeError(f"the item stage process exited with code {code}"))
                        return

        async def on_stop(self) -> None:
            for st in stages:
                st.stop()
            if item_process is not None:  # alongside the user stage's own graceful stop
                await asyncio.get_running_loop().run_in_executor(None, item_process.stop)
            for t in self.threads:
                await asyncio.get_running_loop().run_in_executor(None, t.join, 60)
            log_stats()  # the last report: what happened since the previous one
            if server is not None:
                server.stop()

    @app.timer(10.0)  # type: ignore[untyped-decorator]
    async def report() -> None:
        log_stats()

    def log_stats() -> None:
        if pipeline is not None:
            st = pipeline.stats
            log.info(
                "user stage: events=%d invalid=%d duplicates=%d lists=%d batches=%d deltas=%d forgets=%d "
                "partitions=%s table_items=%d table_lag_events p50=%d p99=%d max=%d",
                st.events,
                st.invalid,
                st.duplicates,
                st.lists,
                st.batches,
                st.deltas,
                st.forgets,
                sorted(pipeline.runs),
                pipeline.table.n_items,
                *st.table_lag_quantiles(),
            )
            st.table_lag.clear()  # each report covers the blocks since the last
        if items is not None:
            it = items.stats
            log.info(
                "item stage: events=%d skipped=%d messages=%d entries=%d sims=%d fits=%d partitions=%s",
                it.events,
                it.skipped,
                it.messages,
                it.entries,
                it.sims,
                it.fits,
                sorted(items.runs),
            )

    return app


def with_item_process(
    healthz: metrics.Check, readyz: metrics.Check, child: ItemProcess
) -> tuple[metrics.Check, metrics.Check]:
    """This process's ``/healthz`` and ``/readyz`` with those of its item stage process: healthy
    and ready only when both are; the partitions of both stages in one document."""

    def health() -> tuple[bool, str]:
        ok, why = healthz()
        if not ok:
            return ok, why
        return child.healthz()

    def ready() -> tuple[bool, str]:
        ok, body = readyz()
        doc = orjson.loads(body)
        child_ok, child_doc = child.readyz()
        doc["partitions"].update(child_doc.get("partitions", {}))
        if not child_ok:
            why = child_doc.get("reason", "item stage process not ready")
            doc["reason"] = f"{doc['reason']}; {why}" if "reason" in doc else why
        doc["ready"] = ok and child_ok
        return doc["ready"], orjson.dumps(doc).decode()

    return health, ready


def broker_credentials(s: Settings) -> CredentialsT | None:
    """The ``kafka_*`` security settings as faust (aiokafka) takes them, so that its consumer of
    the catalogue topic reaches the same brokers as the stages' librdkafka clients
    (``kafka_io.kafka_common``). None for PLAINTEXT."""
    proto = s.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    context = None
    if proto in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.kafka_ssl_ca_location or None)
        if s.kafka_ssl_certificate_location:
            context.load_cert_chain(
                s.kafka_ssl_certificate_location,
                s.kafka_ssl_key_location,
                password=s.kafka_ssl_key_password.get_secret_value() or None,
            )
    if proto == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password.get_secret_value(),
        ssl_context=context,
        mechanism=s.kafka_sasl_mechanism,
    )


def _quiet(run: Any) -> Any:
    def target() -> None:
        # errors are logged by the stage; the watchdog then crashes the app
        with contextlib.suppress(BaseException):
            run()

    return target


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
    """Run the app until SIGTERM/SIGINT (faust's Worker installs the signal handlers). A broker
    or Redis that does not answer ends it first, with one line (``ServiceUnreachable``)."""
    from stream_app.preflight import check_services

    check_services(settings)
    return_large_blocks_to_the_os()
    child = ItemProcess(settings) if settings.item_process else None
    if child is not None:
        child.start()  # before this process starts threads of its own
    try:
        app = create_app(settings, child)
        worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
        return worker.execute_from_commandline()
    finally:
        if child is not None:  # stopped already on a graceful stop; not when the worker crashed
            child.stop()
