"""The metrics server's own logic: batch histograms and the health checks."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_app import metrics
from stream_app.embedded import free_port
from stream_app.errors import UsageError
from stream_app.os_threads import named


def _samples(name: str) -> dict[str, float]:
    fams = text_string_to_metric_families(generate_latest(REGISTRY).decode())
    return {f"{s.name}{sorted(s.labels.items())}": s.value for f in fams if f.name == name for s in f.samples}


def test_batch_histogram_matches_prometheus_buckets() -> None:
    h = metrics.BatchHistogram("streamrec_test_hist_seconds", "test", (0.01, 0.1, 1.0), ["stage"])
    values = np.array([0.005, 0.01, 0.05, 0.1, 0.5, 2.0, 7.0])
    h.observe_many(values[:4], "user")
    h.observe_many(values[4:], "user")
    h.observe(0.02, "item")
    got = _samples("streamrec_test_hist_seconds")
    # buckets are cumulative and include their upper bound (le)
    assert got["streamrec_test_hist_seconds_bucket[('le', '0.01'), ('stage', 'user')]"] == 2
    assert got["streamrec_test_hist_seconds_bucket[('le', '0.1'), ('stage', 'user')]"] == 4
    assert got["streamrec_test_hist_seconds_bucket[('le', '1.0'), ('stage', 'user')]"] == 5
    assert got["streamrec_test_hist_seconds_bucket[('le', '+Inf'), ('stage', 'user')]"] == 7
    assert got["streamrec_test_hist_seconds_count[('stage', 'user')]"] == 7
    assert got["streamrec_test_hist_seconds_sum[('stage', 'user')]"] == sum(values)
    assert got["streamrec_test_hist_seconds_bucket[('le', '0.01'), ('stage', 'item')]"] == 0
    assert got["streamrec_test_hist_seconds_count[('stage', 'item')]"] == 1


@dataclass
class FakeLoop:
    """Just what the health checks read off a stage (``StageLoop`` itself needs a broker)."""

    name: str
    beat: float = 0.0
    label: str = field(init=False)
    ready: bool = False
    running: bool = True
    lag: dict[int, int] = field(default_factory=dict)
    partitions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.label = self.name.split()[0]

    def alive(self) -> bool:
        return self.running

    def snapshot_ages(self, now: float) -> dict[int, float]:
        return {p: 1.0 for p in self.partitions}


def test_threads_are_exported_by_name_with_their_cpu_time_and_their_wait_for_a_core() -> None:
    named_now, done = threading.Event(), threading.Event()

    def wait() -> None:
        named_now.set()  # ``named`` has given the thread its OS name
        done.wait()

    t = threading.Thread(target=named(wait), name="streamrec-exported", daemon=True)
    t.start()
    named_now.wait(5)
    try:
        cpu = _samples("streamrec_thread_cpu_seconds")
        runq = _samples("streamrec_thread_runqueue_seconds")
    finally:
        done.set()
        t.join()
    key = "streamrec_thread_{}_seconds_total[('thread', 'exported')]"
    assert key.format("cpu") in cpu and key.format("runqueue") in runq  # a sleeping thread: about 0 each
    assert sum(cpu.values()) > 0.1  # this process's threads together (the test run so far)


def test_health_and_readiness_over_http() -> None:
    user, item = FakeLoop("user stage"), FakeLoop("item stage", partitions=(1,))
    server = metrics.serve(free_port(), *metrics.stages_health([user, item], stale_s=5.0))
    assert server is not None
    try:
        get = lambda path: _get(server.port, path)  # noqa: E731
        assert get("/healthz") == (200, b"ok\n")  # starting up counts as alive
        code, body = get("/readyz")
        assert code == 503 and orjson.loads(body)["reason"].startswith("user stage, item stage not yet joined")
        user.ready, item.ready, user.partitions = True, True, (0, 2)
        code, body = get("/readyz")
        assert code == 200 and orjson.loads(body) == {"ready": True, "partitions": {"user": [0, 2], "item": [1]}}
        user.beat = time.monotonic() - 10  # the loop has not come round for 10 s
        code, body = get("/healthz")
        assert code == 503 and body.startswith(b"user stage loop last came round 10 s ago")
        user.beat, item.running = time.monotonic(), False
        assert get("/healthz") == (503, b"item stage thread is not running\n")
        code, body = get("/metrics")
        assert code == 200 and b"streamrec_up 1.0" in body
    finally:
        server.stop()


def test_a_port_in_use_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot serve metrics on port {port}.*STREAMREC_METRICS_PORT"):
            metrics.serve(port, *metrics.stages_health([], 5.0))


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_child_process_metrics_are_served_with_the_worker_s_own() -> None:
    """``SPLIT_STAGES``: one /metrics for both processes. A family both export is written once
    (Prometheus refuses a second HELP for a name), the child's samples carry process="item", and
    the worker's own metrics are served alone while the child does not answer."""
    metrics.EVENTS_CONSUMED.labels("user").inc(3)
    child = "\n".join(
        [
            "# HELP streamrec_events_consumed_total Messages consumed from the stage's topic",
            "# TYPE streamrec_events_consumed_total counter",
            'streamrec_events_consumed_total{stage="item"} 7.0',
            "# HELP streamrec_events_consumed_created Messages consumed from the stage's topic",
            "# TYPE streamrec_events_consumed_created gauge",
            'streamrec_events_consumed_created{stage="item"} 1.7e+09',
            "# HELP process_resident_memory_bytes Resident memory size in bytes.",
            "# TYPE process_resident_memory_bytes gauge",
            "process_resident_memory_bytes 2.5e+08",
            "# HELP streamrec_only_in_the_child_total a family this process does not have",
            "# TYPE streamrec_only_in_the_child_total counter",
            'streamrec_only_in_the_child_total{stage="item"} 2.0',
            "",
        ]
    )
    answers: list[str | None] = [child, None]
    server = metrics.serve(free_port(), *metrics.stages_health([], 5.0), child_metrics=lambda: answers.pop(0))
    assert server is not None
    try:
        code, body = _get(server.port, "/metrics")
        assert code == 200
        text = body.decode()
        helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
        assert len(helps) == len(set(helps))
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert got[("streamrec_events_consumed_total", (("stage", "user"),))] >= 3
        assert got[("streamrec_events_consumed_total", (("process", "item"), ("stage", "item")))] == 7
        assert ("streamrec_events_consumed_created", (("process", "item"), ("stage", "item"))) in got
        assert got[("streamrec_only_in_the_child_total", (("process", "item"), ("stage", "item")))] == 2
        mine = [v for (name, labels), v in got.items() if name == "process_resident_memory_bytes" and not labels]
        assert len(mine) == 1 and got[("process_resident_memory_bytes", (("process", "item"),))] == 2.5e8
        # the child not answering: this process's metrics alone
        code, body = _get(server.port, "/metrics")
        assert code == 200 and b'process="item"' not in body and b"streamrec_up 1.0" in body
    finally:
        server.stop()
