"""The operator commands, run as a user runs them: `streamrec replay` and `streamrec demo`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from models.ranking import Candidates
from stream_app.datasets import synthetic_events
from tests.integration.harness import create_topics, read_topic


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_replay_publishes_a_csv_log_in_event_time_order_keyed_by_user(
    broker: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    topic = worker_env["STREAMREC_EVENTS_TOPIC"]
    create_topics(broker, topic, 1)
    events = synthetic_events(n_users=20, n_items=50, n_events=400, seed=3)
    shuffled = events[::-1]  # the file is out of order; replay must sort by event time
    f = tmp_path / "log.csv"
    f.write_text(
        "user_id,item_id,type,ts\n"
        + "".join(f"{e['user_id']},{e['item_id']},{e['type']},{e['ts']}\n" for e in shuffled)
    )
    res = _run(["replay", str(f), "--format", "csv"], worker_env)
    assert res.returncode == 0, res.stderr
    assert "sent=400 failed=0" in res.stdout
    got = read_topic(broker, topic)
    values = [orjson.loads(m.value()) for m in got]
    assert [v["ts"] for v in values] == sorted(e["ts"] for e in events)
    assert all(m.key().decode() == v["user_id"] for m, v in zip(got, values, strict=True))


def test_replay_rate_paces_the_stream(broker: str, worker_env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in synthetic_events(n_events=300, seed=4)))
    res = _run(["replay", str(f), "--rate", "200", "--partitions", "2"], worker_env)
    assert res.returncode == 0, res.stderr
    # 300 events at 200 events/s cannot take less than 1.5 s; the summary reports the real rate
    seconds = float(res.stdout.split("seconds=")[1].split()[0])
    assert seconds >= 1.49
    assert "sent=300 failed=0" in res.stdout


def test_demo_runs_with_nothing_configured(tmp_path: Path) -> None:
    """The README's demo: no STREAMREC_* settings, so it starts its own broker and Redis."""
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["XDG_CACHE_HOME"] = str(tmp_path)  # no cached ml-100k: the synthetic stream
    res = _run(["demo", "--events", "5000"], env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "embedded Tansu" in out and "(embedded)" in out
    assert "synthetic (seed 7, 5000 events)" in out
    assert out.count("\nuser ") == 3
    assert "throughput:" in out and "events/s end to end" in out


def test_evaluate_served_scores_the_lists_in_redis(broker: str, worker_env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_bytes(
        b"".join(orjson.dumps(e) + b"\n" for e in synthetic_events(n_users=50, n_items=100, n_events=3000, seed=6))
    )
    out = tmp_path / "served.json"
    res = _run(["evaluate", str(f), "--served", "--rate", "1500", "--json", str(out)], worker_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = orjson.loads(out.read_bytes())
    served, inproc = doc["served"], doc["in_process"]
    assert served["evaluated"] == inproc["evaluated"] > 0
    assert 0 < served["hr@10"] <= 1 and 0 < inproc["hr@10"] <= 1
    assert doc["rate_achieved"] <= 1500 * 1.05


def test_bench_measures_one_and_two_workers_and_writes_json(worker_env: dict[str, str], tmp_path: Path) -> None:
    """A short ``streamrec bench`` against the test broker and Redis: every figure is present,
    positive and consistent, and every freshness probe was seen in Redis."""
    out = tmp_path / "bench.json"
    args = ["bench", "--events", "20000", "--rate", "500", "--seconds", "3", "--observe", "1", "--json", str(out)]
    res = _run(args, worker_env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["machine"]["cores"] == os.cpu_count()
    assert doc["machine"]["broker"] == "configured" and doc["events"] == 20000
    assert doc["raw_ceiling_events_per_s"] > doc["end_to_end_events_per_s"] > 0
    scale = doc["scale_out_events_per_s"]
    assert scale["partitions"] == 4 and scale["workers_1"] > 0 and scale["workers_2"] > 0
    assert 0 < doc["worker_rss_mb"] < 4096
    f = doc["freshness"]
    assert f["events"] == f["sampled"] == 1500 and f["observed"] == 1500 and f["unobserved"] == 0
    assert 0 < f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"] <= f["max_ms"]
    assert "| end to end, 4 partitions: one worker / two workers |" in res.stdout
    # the worker's threads by name, each stage's among them, with the share of a core each took
    # (in clock ticks: a thread that worked less than one in the run reads 0)
    cpu = doc["worker_cpu_by_thread"]["worker"]
    assert {"user", "item", "user-redis_0", "item-redis_0", "long-model"} <= set(cpu)
    assert cpu["user"] > 0 and 0 < sum(cpu.values()) < os.cpu_count()
    assert "| worker process CPU during the freshness traffic, by thread (share of one core) |" in res.stdout
    # ... the share of the run each waited for a core, and each stage for the other's block
    runq = doc["worker_runqueue_by_thread"]["worker"]
    assert {"user", "item"} <= set(runq) and all(0 <= x < 1 for x in runq.values()), runq
    locks = doc["stage_lock_wait"]["worker"]
    assert set(locks) == {"user", "item"} and all(0 <= x < 1 for x in locks.values()), locks
    assert 0 <= doc["user_stage_table_wait"]["worker"][""] < 1
    # ... and every process on the machine, in cores
    m = doc["machine_cpu"]
    assert m["machine"] > m["worker process"] > 0 and m["load generator (this process)"] > 0, m
    assert m["machine"] <= os.cpu_count() + 0.1, m
    assert f"| the machine during the freshness traffic: cores busy, of {os.cpu_count()} |" in res.stdout
    assert "| worker process threads waiting for a core during the freshness traffic (share of it) |" in res.stdout
    assert "| worker process stages waiting for the other stage's block during the freshness traffic" in res.stdout
    assert "| worker process: the user stage holding blocks back for the item table during the" in res.stdout


def test_bench_split_roles_runs_the_stages_as_two_processes(worker_env: dict[str, str], tmp_path: Path) -> None:
    """``streamrec bench --split-roles --scale-partitions 0``: a user-stage and an item-stage
    process (as deploy/ runs them) take the log and the freshness run; no scale runs."""
    out = tmp_path / "bench.json"
    args = ["bench", "--events", "20000", "--rate", "400", "--seconds", "2", "--split-roles", "--scale-partitions", "0"]
    res = _run([*args, "--json", str(out)], worker_env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["split_roles"] is True and doc["scale_out_events_per_s"] is None
    assert doc["end_to_end_events_per_s"] > 0
    f = doc["freshness"]  # the default sample of the users: every event of theirs, and no other, seen
    assert f["events"] == 800 and 0 < f["sampled"] < 400 and f["observed"] == f["sampled"] and f["unobserved"] == 0
    assert f["watched_users"] > 0 and f["observe"] == 0.1
    user_log = Path(doc["worker_log"]).read_text()
    item_log = Path(doc["worker_log"]).with_suffix(".item.log").read_text()
    assert "user stage consuming" in user_log and "item stage consuming" not in user_log
    assert "item stage consuming" in item_log and "user stage consuming" not in item_log
    assert "one worker, the stages in two processes" in res.stdout
    cpu = doc["worker_cpu_by_thread"]
    assert cpu["user"]["user"] > 0 and "item" not in cpu["user"]
    assert "item" in cpu["item"] and "user" not in cpu["item"]
    # each process holds one stage: nothing to wait for but a core
    assert set(doc["stage_lock_wait"]["user"]) == {"user"} and set(doc["stage_lock_wait"]["item"]) == {"item"}
    assert "waiting for the other stage's block" not in res.stdout
    assert "| user process: the user stage holding blocks back for the item table" in res.stdout
    assert "| item process: the user stage" not in res.stdout
    assert "partitions: one worker / two workers" not in res.stdout


def test_stage_profile_times_live_traffic_after_the_log(tmp_path: Path) -> None:
    """``bench --stages --live N`` builds the state from the log untimed, then times N events
    drawn as live traffic: far more lists per event than the log, whose bursts share lists."""
    from stream_app.config import Settings
    from stream_app.datasets import fetch_ml100k
    from stream_app.stage_profile import profile_stages

    s = Settings()
    path = fetch_ml100k(s.data_dir)
    log = profile_stages(s, path, block=200, n_events=6000)
    live = profile_stages(s, path, block=200, n_events=6000, live=1000)
    assert log["events"] == 6000 and live["events"] == 1000
    # the first 6,000 events hold few users, so live blocks repeat them; still ten times the log's
    assert live["lists"] / live["events"] > 10 * log["lists"] / log["events"]
    assert {"ranking", "user state", "item state and due entries"} <= set(live["phases"])


def test_stage_profile_reranks_with_a_ctr_model_of_the_configured_size_when_w_ctr_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``W_CTR=1 streamrec bench --stages``: every ranked chunk goes through a CTR re-ranker (at
    its initial weights: the cost is what is measured), with the deeper pool it scores."""
    from models.ctr.rescorer import CtrRescorer
    from stream_app.config import Settings
    from stream_app.datasets import fetch_ml100k
    from stream_app.stage_profile import profile_stages

    scored: list[tuple[int, int]] = []
    score = CtrRescorer.score

    def counted(self: CtrRescorer, c: Candidates) -> np.ndarray:
        scored.append(c.ids.shape)
        out: np.ndarray = score(self, c)
        return out

    monkeypatch.setattr(CtrRescorer, "score", counted)
    s = Settings(w_ctr=1.0)
    res = profile_stages(s, fetch_ml100k(s.data_dir), block=100, n_events=3000, live=300)
    assert res["lists"] > 0 and sum(u for u, _ in scored) >= res["lists"]
    assert max(w for _, w in scored) == s.params().look_pool > s.n_recs


def test_bench_with_a_trainer_trains_beside_every_worker_run(worker_env: dict[str, str], tmp_path: Path) -> None:
    """``streamrec bench --with-trainer``: the workers publish samples, a trainer trains on them
    while the worker runs, and the workers load the version it publishes (``W_CTR > 0``)."""
    out = tmp_path / "bench.json"
    env = {
        **worker_env,
        "STREAMREC_W_CTR": "1",
        "STREAMREC_CTR_POLL_S": "0.5",
        "STREAMREC_CTR_BUCKETS": "16384",
        "STREAMREC_CTR_PUBLISH_BATCHES": "5",
    }
    args = ["bench", "--events", "8000", "--rate", "300", "--seconds", "3", "--with-trainer", "--json", str(out)]
    res = _run(args, env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["samples"] is True and doc["w_ctr"] == 1.0
    assert doc["trainer"]["samples"] > 8000 and doc["trainer"]["versions"] >= 1
    assert doc["end_to_end_events_per_s"] > 0 and doc["freshness"]["unobserved"] == 0
    assert res.stdout.count("beside a trainer that trained on") == 2  # both scale-out runs
    assert doc["ctr_versions_loaded"] >= 1  # the worker ranked with the trainer's model
    assert re.search(r"CTR model version \d+ loaded", Path(doc["worker_log"]).read_text())


def test_bench_with_a_pretrained_ctr_model_reranks_from_the_first_block(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """``streamrec bench --pretrained-ctr``: a model trained on a first pass over the log is
    published before the measured worker starts; the worker loads it before it consumes, sets
    ``W_CTR`` 1 itself, and no trainer or samples run beside it."""
    out = tmp_path / "bench.json"
    env = {**worker_env, "STREAMREC_CTR_BUCKETS": "16384"}
    args = ["bench", "--events", "8000", "--rate", "300", "--seconds", "3", "--pretrained-ctr", "--scale-partitions"]
    res = _run([*args, "0", "--json", str(out)], env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    version = doc["pretrained_ctr_version"]
    assert version >= 1 and doc["w_ctr"] == 1.0 and doc["samples"] is False and doc["trainer"] is None
    assert doc["end_to_end_events_per_s"] > 0 and doc["freshness"]["unobserved"] == 0
    log = Path(doc["worker_log"]).read_text()
    loaded, consuming = log.find(f"CTR model version {version} loaded"), log.find("user stage consuming")
    assert 0 <= loaded < consuming and doc["ctr_versions_loaded"] == 1


def test_demo_keep_leaves_the_lists_up_until_interrupted(tmp_path: Path) -> None:
    """`streamrec demo --keep`: the printed settings reach the demo's Redis and worker; Ctrl-C
    (SIGINT) stops everything and deletes the demo's keys."""
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_app.cli", "demo", "--events", "3000", "--keep"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("  curl -s localhost:") and "/readyz" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "the demo ended before keeping anything up:\n" + "".join(lines) + proc.stderr.read()[-2000:]
            lines.append(line)
        out = "".join(lines)
        exports = dict(kv.split("=", 1) for kv in re.search(r"export (.*)", out).group(1).split())  # type: ignore[union-attr]
        user = re.search(r"streamrec recs (\S+)", out).group(1)  # type: ignore[union-attr]
        port = re.search(r"curl -s localhost:(\d+)/readyz", out).group(1)  # type: ignore[union-attr]
        looking = {**env, **exports}
        res = _run(["recs", user], looking)
        assert res.returncode == 0, res.stderr
        doc = orjson.loads(res.stdout)
        assert doc["user_id"] == user and "fallback" not in doc and doc["items"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert orjson.loads(r.read())["ready"] is True
        r_url = exports["STREAMREC_REDIS_URL"]
        prefix = exports["STREAMREC_REDIS_PREFIX"]
        client = redis.Redis.from_url(r_url)
        assert client.exists(f"{prefix}rec:{user}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
        with pytest.raises(redis.exceptions.ConnectionError):  # the demo's own Redis is gone too
            client.ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
