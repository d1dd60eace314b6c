"""Prometheus metrics and the health endpoints of a worker or trainer process.

One small HTTP server per process (``STREAMREC_METRICS_PORT``; workers default to 9108, the
trainer to 9109; 0 turns it off) serves:

- ``/metrics``: the counters, gauges and histograms below, plus prometheus-client's process
  metrics;
- ``/healthz``: 200 while every stage thread is alive and its loop has come round within
  ``STREAMREC_HEALTH_STALE_S`` (a stage still starting up counts as alive), else 503 and why;
- ``/readyz``: 200 once every stage has prepared (kernels, item table), joined its consumer group
  and restored the partitions it was given, else 503; the body is JSON: ``ready``, the
  partitions each stage holds, and a ``reason`` when not ready.

Why our own histogram: the stages observe whole blocks at once (a block's freshness is one
value per event), and prometheus-client's ``Histogram.observe`` costs a lock and a bucket search
per value; ``BatchHistogram.observe_many`` bins a numpy array in one call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from stream_app.errors import UsageError
from stream_app.os_threads import named, thread_cpu, thread_waits

log = logging.getLogger(__name__)


class BatchHistogram(Collector):
    """A labelled histogram that takes many observations per call (cumulative buckets, seconds
    or counts, as Prometheus expects)."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def _get(self, labels: tuple[str, ...]) -> tuple[np.ndarray, list[float]]:
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = (np.zeros(len(self.bounds) + 1, dtype=np.int64), [0.0])
        return s

    def observe_many(self, values: np.ndarray | Sequence[float], *labels: str) -> None:
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            return
        # bucket i counts values <= bounds[i]; the last one is +Inf
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.bounds) + 1)
        total = float(v.sum())
        with self._lock:
            c, s = self._get(tuple(labels))
            c += counts
            s[0] += total

    def observe(self, value: float, *labels: str) -> None:
        self.observe_many(np.array([value]), *labels)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            series = [(k, c.copy(), s[0]) for k, (c, s) in self._series.items()]
        for labels, counts, total in series:
            cum = np.cumsum(counts)
            buckets = [(_le(b), float(n)) for b, n in zip(self.bounds, cum[:-1], strict=True)]
            buckets.append(("+Inf", float(cum[-1])))
            fam.add_metric(list(labels), buckets, total)
        yield fam

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)]


def _le(b: float) -> str:
    return repr(float(b))


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FRESHNESS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_BLOCK = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)

# -- the worker ---------------------------------------------------------------------------------
EVENTS_CONSUMED = Counter("streamrec_events_consumed", "Messages consumed from the stage's topic", ["stage"])
EVENTS_PROCESSED = Counter("streamrec_events_processed", "Valid events applied to user state")
EVENTS_INVALID = Counter("streamrec_events_invalid", "Messages that broke the event contract", ["reason"])
EVENTS_DUPLICATE = Counter("streamrec_events_duplicate", "Events dropped as duplicates of an event_id")
DEAD_LETTERS = Counter("streamrec_dead_letters", "Messages produced to the dead-letter topic", ["reason"])
LISTS_WRITTEN = Counter("streamrec_lists_written", "Recommendation lists written to Redis")
SIM_WRITES = Counter("streamrec_sim_writes", "sim:{item} keys written to Redis")
TABLE_ENTRIES = Counter("streamrec_table_entries", "Item table entries published to the table topic")
DELTAS_PRODUCED = Counter("streamrec_deltas_produced", "Delta messages produced to the item stage")
SNAPSHOT_WRITES = Counter("streamrec_snapshot_writes", "State snapshots written to Redis", ["stage"])
REDIS_ERRORS = Counter("streamrec_redis_errors", "Redis connection errors (each is retried)", ["stage"])
KAFKA_ERRORS = Counter("streamrec_kafka_errors", "Errors reported by the Kafka consumer or producer", ["stage"])
FORGETS = Counter("streamrec_forgets", "Users forgotten on request (streamrec forget)")
BLOCK_LOCK_WAIT = Counter(
    "streamrec_block_lock_wait_seconds",
    "Time a stage's block waited for the other stage's block in the same process (one block's work at a time)",
    ["stage"],
)
TABLE_WAIT = Counter(
    "streamrec_table_wait_seconds",
    "Time the user stage held blocks back until the item table came within TABLE_MAX_LAG of them",
)
CTR_MODEL_VERSION = Gauge("streamrec_ctr_model_version", "CTR model version the worker ranks with (0: none)")
UP = Gauge("streamrec_up", "1 while the process runs")

BLOCK_EVENTS = BatchHistogram("streamrec_block_events", "Messages per processed block", _BLOCK, ["stage"])
BLOCK_SECONDS = BatchHistogram(
    "streamrec_block_seconds", "Model work of one loop iteration (all its blocks)", _LATENCY, ["stage"]
)
FRESHNESS = BatchHistogram(
    "streamrec_freshness_seconds", "Event arrival (its Kafka timestamp) to its user's list written in Redis", _FRESHNESS
)
REDIS_WRITE_SECONDS = BatchHistogram(
    "streamrec_redis_write_seconds", "One iteration's Redis writes", _LATENCY, ["stage"]
)
SNAPSHOT_SECONDS = BatchHistogram("streamrec_snapshot_seconds", "Writing one snapshot", _LATENCY, ["stage"])

# -- the trainer --------------------------------------------------------------------------------
TRAINER_SAMPLES = Counter("streamrec_trainer_samples", "CTR samples trained on (held-back ones included)")
TRAINER_AUC = Gauge("streamrec_trainer_auc", "Progressive (test-then-train) ROC AUC of the CTR model")
TRAINER_LOGLOSS = Gauge("streamrec_trainer_logloss", "Progressive log-loss of the CTR model")
TRAINER_GATE = Counter("streamrec_trainer_gate_decisions", "Promotion gate decisions", ["decision"])
TRAINER_DRIFTS = Counter("streamrec_trainer_drift_events", "Concept drifts detected (ADWIN)")
TRAINER_VERSION = Gauge("streamrec_trainer_model_version", "Last CTR model version published")


def invalid_reason(reason: str) -> str:
    """A bounded label for an InvalidEvent reason (the text before any detail)."""
    return reason.split(":", 1)[0][:48]


class Stage(Protocol):
    """What the collector and the health checks read off a running stage."""

    name: str
    label: str  # "user" or "item": the ``stage`` label
    lag: dict[int, int]
    beat: float
    ready: bool

    def snapshot_ages(self, now: float) -> dict[int, float]: ...

    def alive(self) -> bool: ...


_stages: weakref.WeakSet[Any] = weakref.WeakSet()


def track(stage: Stage) -> None:
    """Export a stage's per-partition gauges (lag, assignment, snapshot age)."""
    _stages.add(stage)


class _StageCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "streamrec_consumer_lag", "Messages behind the partition's high watermark", labels=["stage", "partition"]
        )
        assigned = GaugeMetricFamily("streamrec_partitions_assigned", "Partitions assigned", labels=["stage"])
        age = GaugeMetricFamily(
            "streamrec_snapshot_age_seconds",
            "Seconds since the partition's last snapshot",
            labels=["stage", "partition"],
        )
        now = time.monotonic()
        for st in list(_stages):
            stage = st.label
            ages = st.snapshot_ages(now)
            assigned.add_metric([stage], len(ages))
            for p, n in dict(st.lag).items():
                if p in ages:
                    lag.add_metric([stage, str(p)], n)
            for p, a in ages.items():
                age.add_metric([stage, str(p)], a)
        yield from (lag, assigned, age)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


REGISTRY.register(_StageCollector())


class _ThreadCollector(Collector):
    """Each thread's CPU time and run-queue wait, read from ``/proc`` at scrape time (nothing on
    the hot path): a thread short of cores shows in the second, a busy one in the first."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        pid = os.getpid()
        for name, doc, values in (
            ("streamrec_thread_cpu_seconds", "CPU time of the process's threads, by OS name", thread_cpu(pid)),
            (
                "streamrec_thread_runqueue_seconds",
                "Time the process's threads were ready to run but had no core, by OS name",
                thread_waits(pid),
            ),
        ):
            fam = CounterMetricFamily(name, doc, labels=["thread"])
            for thread, v in sorted(values.items()):
                fam.add_metric([thread], v)
            yield fam

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


REGISTRY.register(_ThreadCollector())


# -- the HTTP server ----------------------------------------------------------------------------
Check = Callable[[], tuple[bool, str]]


def stages_health(stages: Sequence[Stage], stale_s: float) -> tuple[Check, Check]:
    """``/healthz`` and ``/readyz`` checks over a worker's stages."""

    def healthz() -> tuple[bool, str]:
        now = time.monotonic()
        for st in stages:
            if not st.alive():
                return False, f"{st.name} thread is not running"
            if st.beat and now - st.beat > stale_s:
                return False, f"{st.name} loop last came round {now - st.beat:.0f} s ago"
        return True, "ok"

    def readyz() -> tuple[bool, str]:
        # JSON, so that our own tools read the assignment from here rather than from log lines
        now = time.monotonic()
        assigned = {st.label: sorted(st.snapshot_ages(now)) for st in stages}
        waiting = [st.name for st in stages if not st.ready]
        body: dict[str, Any] = {"ready": not waiting, "partitions": assigned}
        if waiting:
            body["reason"] = f"{', '.join(waiting)} not yet joined with its partitions restored"
        return not waiting, orjson.dumps(body).decode()

    return healthz, readyz


def merged_exposition(own: Iterable[Metric], other: str, label: tuple[str, str]) -> bytes:
    """This process's metric families with those of another process's ``/metrics`` text, in one
    exposition: a family both export is written once (Prometheus rejects a name twice), and every
    sample of the other process carries ``label`` (e.g. ``process="item"``), so that no series of
    one process shadows the same series of the other (its memory, a shared counter)."""
    key, value = label
    families = {f.name: f for f in own}
    for fam in text_string_to_metric_families(other):
        samples = [s._replace(labels={**s.labels, key: value}) for s in fam.samples]
        # the text format writes a counter's ``_created`` samples as a gauge of their own, which
        # this process's counter family holds (and writes so) itself
        base = families.get(fam.name.removesuffix("_created"))
        if fam.name.endswith("_created") and base is not None and base.type in ("counter", "histogram"):
            base.samples.extend(samples)
            continue
        mine = families.get(fam.name)
        if mine is not None and mine.type == fam.type:
            mine.samples.extend(samples)
        elif mine is None:
            fam.samples = samples
            families[fam.name] = fam
        # else: the same name with another type (another release?): this process's family only

    class _Families(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread. ``child_metrics``: the
    ``/metrics`` text of a child process to serve with this one's (None while it has none)."""

    def __init__(
        self,
        port: int,
        healthz: Check,
        readyz: Check,
        host: str = "0.0.0.0",
        child_metrics: Callable[[], str | None] | None = None,
    ) -> None:
        routes: dict[str, Check] = {"/healthz": healthz, "/readyz": readyz}

        def exposition() -> bytes:
            other = child_metrics() if child_metrics is not None else None
            if other is None:
                return generate_latest(REGISTRY)
            return merged_exposition(REGISTRY.collect(), other, ("process", "item"))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    code, body, ctype = 200, exposition(), CONTENT_TYPE_LATEST
                elif path in routes:
                    ok, why = routes[path]()
                    code, body, ctype = (200 if ok else 503), (why + "\n").encode(), "text/plain; charset=utf-8"
                else:
                    code, body, ctype = 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
                return  # probes every few seconds: not worth a log line

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=named(self.httpd.serve_forever), name="streamrec-metrics", daemon=True)

    def start(self) -> MetricsServer:
        UP.set(1)
        self.thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(
    port: int, healthz: Check, readyz: Check, child_metrics: Callable[[], str | None] | None = None
) -> MetricsServer | None:
    """Start the server on ``port`` (None when 0: turned off)."""
    if port == 0:
        return None
    try:
        server = MetricsServer(port, healthz, readyz, child_metrics=child_metrics)
    except OSError as e:
        raise UsageError(
            f"cannot serve metrics on port {port} ({e.strerror}): set STREAMREC_METRICS_PORT to a free port, "
            "or 0 to turn metrics off"
        ) from None
    return server.start()
