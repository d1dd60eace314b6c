"""What the user sees when something is wrong: one or two lines on stderr, no traceback, exit
code 2 for bad usage (settings, arguments, input files) and 1 for a service that cannot be
reached. The commands run as a user runs them: the installed ``streamrec`` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from models.events import EventSchema
from stream_app.config import Settings, settings_from_env
from stream_app.datasets import load_log
from stream_app.embedded import free_port, tansu
from stream_app.errors import ServiceUnreachable, UsageError
from stream_app.preflight import check_kafka, check_services
from stream_app.settings_errors import NOT_SETTINGS, unknown_variables

ROOT = Path(__file__).parents[2]
STREAMREC = str(Path(sys.executable).parent / "streamrec")
REDIS = "redis://127.0.0.1:6379/0"  # the machine's Redis (see .ci/run)
GOOD = {"user_id": "u1", "item_id": "a", "type": "view", "ts": 1_700_000_000_000}


def run(args: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMREC_")}
    return subprocess.run([STREAMREC, *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def error_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without log lines (timestamped): the error itself."""
    lines = [ln for ln in res.stderr.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", ln)]
    assert "Traceback" not in res.stderr
    assert 1 <= len(lines) <= 2, res.stderr
    assert lines[0].startswith("error: ")
    return lines


# settings ------------------------------------------------------------------------------------
def test_a_bad_integer_names_the_variable_the_value_the_rule_and_an_example() -> None:
    res = run(["recs", "u1"], STREAMREC_BATCH_SIZE="abc")
    assert res.returncode == 2
    assert error_lines(res) == [
        "error: STREAMREC_BATCH_SIZE=abc: expected an integer >= 1, e.g. STREAMREC_BATCH_SIZE=2000"
    ]


def test_event_types_that_are_not_json_ask_for_json() -> None:
    res = run(["recs", "u1"], STREAMREC_EVENT_TYPES="{view:1}")
    assert res.returncode == 2
    (line,) = error_lines(res)
    assert line.startswith("error: STREAMREC_EVENT_TYPES={view:1}: not valid JSON")
    assert """'{"view": 1, "click": 3}'""" in line


def test_several_bad_values_take_two_lines() -> None:
    res = run(["recs", "u1"], STREAMREC_EPSILON="2", STREAMREC_N_RECS="0", STREAMREC_ROLES="users")
    assert res.returncode == 2
    first, second = error_lines(res)
    assert "STREAMREC_" in first and second.startswith("also invalid: ")
    named = first + second
    assert all(v in named for v in ("STREAMREC_EPSILON", "STREAMREC_N_RECS", "STREAMREC_ROLES"))


def test_a_bad_value_in_the_toml_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('epsilon = 1.5\nsnapshot_fork = "maybe"\n')
    res = run(["recs", "u1", "--config", str(f)])
    assert res.returncode == 2
    first, second = error_lines(res)
    # in the order of the settings
    assert first == f'error: snapshot_fork = "maybe" in {f}: expected true or false, e.g. snapshot_fork = true'
    assert second == f"also invalid: epsilon in {f}"
    f.write_text("epsilon = 1.5\n")
    res = run(["recs", "u1", "--config", str(f)])
    assert error_lines(res) == [f"error: epsilon = 1.5 in {f}: expected a number from 0 to 1, e.g. epsilon = 0.1"]


def test_an_unknown_key_in_the_toml_file_gets_the_closest_name(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("batchsize = 10\n")
    res = run(["recs", "u1"], STREAMREC_CONFIG=str(f))
    assert res.returncode == 2
    assert error_lines(res) == [f"error: unknown setting batchsize in {f} (did you mean batch_size?)"]


def test_a_missing_or_broken_settings_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    res = run(["recs", "u1"], STREAMREC_CONFIG=str(missing))
    assert res.returncode == 2
    assert error_lines(res)[0].startswith(f"error: STREAMREC_CONFIG={missing}: no such file")
    res = run(["recs", "u1", "--config", str(missing)])
    assert res.returncode == 2
    assert error_lines(res)[0].startswith(f"error: --config {missing}: no such file")
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = \n")
    res = run(["recs", "u1", "--config", str(broken)])
    assert res.returncode == 2
    assert "not a readable TOML file" in error_lines(res)[0] and "line 1" in res.stderr


def test_a_bad_log_level_is_a_usage_error() -> None:
    res = run(["recs", "u1"], STREAMREC_LOG_LEVEL="loud")
    assert res.returncode == 2
    assert error_lines(res)[0].startswith("error: STREAMREC_LOG_LEVEL=loud: expected one of DEBUG, INFO")


def test_secrets_stay_out_of_settings_errors() -> None:
    res = run(["recs", "u1"], STREAMREC_REDIS_URL="localhost:6379?password=hunter2x", STREAMREC_BATCH_SIZE="x")
    assert res.returncode == 2
    assert "hunter2x" not in res.stderr


def test_unknown_variables_are_warned_about_with_the_closest_name() -> None:
    env = {
        "STREAMREC_BATCHSIZE": "10",
        "STREAMREC_EVENTS_TOPICS": "x",
        "STREAMREC_NOTHING_LIKE_IT": "1",
        "STREAMREC_BATCH_SIZE": "10",  # valid
        "streamrec_group_id": "g",  # valid: names are not case-sensitive
        # what Kubernetes sets for the Service streamrec-worker-metrics (deploy/metrics.yaml)
        "STREAMREC_WORKER_METRICS_SERVICE_HOST": "10.0.0.1",
        "STREAMREC_WORKER_METRICS_SERVICE_PORT": "9108",
        "STREAMREC_WORKER_METRICS_SERVICE_PORT_METRICS": "9108",
        "STREAMREC_WORKER_METRICS_PORT": "tcp://10.0.0.1:9108",
        "STREAMREC_WORKER_METRICS_PORT_9108_TCP": "tcp://10.0.0.1:9108",
        "STREAMREC_WORKER_METRICS_PORT_9108_TCP_PROTO": "tcp",
        "STREAMREC_WORKER_METRICS_PORT_9108_TCP_PORT": "9108",
        "STREAMREC_WORKER_METRICS_PORT_9108_TCP_ADDR": "10.0.0.1",
        "OTHER_BATCHSIZE": "1",
        **{name: "x" for name in NOT_SETTINGS},
    }
    assert unknown_variables(env) == [
        "unknown setting STREAMREC_BATCHSIZE (did you mean STREAMREC_BATCH_SIZE?)",
        "unknown setting STREAMREC_EVENTS_TOPICS (did you mean STREAMREC_EVENTS_TOPIC?)",
        "unknown setting STREAMREC_NOTHING_LIKE_IT (ignored; streamrec.example.toml lists every setting)",
    ]
    res = run(["recs", "u1"], STREAMREC_BATCHSIZE="10", STREAMREC_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    warnings = [ln for ln in res.stderr.splitlines() if "unknown setting" in ln]
    assert len(warnings) == 1 and warnings[0].endswith(
        "WARNING streamrec: unknown setting STREAMREC_BATCHSIZE (did you mean STREAMREC_BATCH_SIZE?)"
    )


def test_every_streamrec_variable_the_project_uses_is_a_setting_or_known() -> None:
    """The names in code, tests and deployment files draw no warning (new settings are fields,
    so they are known without a list to update)."""
    places = ["stream_app", "tests", "deploy", ".ci", "Dockerfile", "docker-compose.yml", "Makefile"]
    files = [p for name in places for p in ([ROOT / name] if (ROOT / name).is_file() else (ROOT / name).rglob("*"))]
    used = set()
    for f in files:
        if f.is_file() and f.name != Path(__file__).name and f.suffix not in (".pyc",):
            used |= set(re.findall(r"STREAMREC_[A-Z0-9_]*[A-Z0-9]", f.read_text(errors="ignore")))
    assert len(used) > 20
    assert unknown_variables(dict.fromkeys(used, "1")) == []


def test_settings_for_child_processes_skip_what_is_no_setting() -> None:
    """``settings_from_env`` (demo, bench, evaluate --served) reads the environment the way
    ``Settings()`` does: the tests' Redis variable and empty values are no error."""
    s = settings_from_env({"STREAMREC_TEST_REDIS_URL": REDIS, "STREAMREC_DLQ_TOPIC": "", "STREAMREC_BATCHSIZE": "1"})
    assert s.dlq_topic == "" and s.batch_size == Settings.model_fields["batch_size"].default


# services ------------------------------------------------------------------------------------
def test_a_worker_without_a_broker_says_so_in_one_line_within_seconds() -> None:
    port = free_port()
    t0 = time.monotonic()
    res = run(["worker"], STREAMREC_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", STREAMREC_REDIS_URL=REDIS)
    assert time.monotonic() - t0 < 20
    assert res.returncode == 1
    (line,) = error_lines(res)
    assert line.startswith(f"error: cannot reach Kafka at 127.0.0.1:{port} (STREAMREC_KAFKA_BOOTSTRAP_SERVERS)")
    assert "refused" in line


@pytest.mark.parametrize("command", [["worker"], ["trainer"], ["recs", "u1"]])
def test_commands_without_redis_say_so_in_one_line(command: list[str]) -> None:
    port = free_port()
    res = run(command, STREAMREC_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    assert res.returncode == 1
    (line,) = error_lines(res)
    assert line.startswith(f"error: cannot reach Redis at 127.0.0.1:{port}") and "STREAMREC_REDIS_URL" in line


def test_replay_without_a_broker_says_so_after_reading_the_log(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_bytes(orjson.dumps(GOOD) + b"\n")
    port = free_port()
    res = run(["replay", str(f)], STREAMREC_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    assert res.returncode == 1
    assert error_lines(res)[0].startswith(f"error: cannot reach Kafka at 127.0.0.1:{port}")


def test_the_checks_pass_against_real_services_and_name_a_dead_one() -> None:
    with tansu() as broker:
        check_services(Settings(kafka_bootstrap_servers=broker, redis_url=REDIS))
    t0 = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=f"cannot reach Kafka at {re.escape(broker)}"):
        check_kafka(Settings(kafka_bootstrap_servers=broker))
    assert time.monotonic() - t0 < 6


# logs ----------------------------------------------------------------------------------------
BAD_LOG = [
    orjson.dumps(GOOD),
    b"",  # blank lines are no rows, but count as lines
    b"{not json}",
    orjson.dumps({**GOOD, "type": "teleport"}),
    b"[1, 2]",
    orjson.dumps({**GOOD, "user_id": "u2", "ts": GOOD["ts"] - 5}),
    orjson.dumps({k: v for k, v in GOOD.items() if k != "item_id"}),
    orjson.dumps({**GOOD, "ts": "yesterday"}),
    orjson.dumps({**GOOD, "user_id": "x" * 200}),
]


def test_bad_rows_are_reported_with_their_real_line_numbers_and_skipped(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(BAD_LOG) + b"\n")
    res = run(["evaluate", str(f), "--baselines", "", "--split", "0"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    reported = re.findall(rf"{re.escape(str(f))}:(\d+): (.*); row skipped", res.stderr)
    assert reported == [
        ("3", "not valid JSON (unexpected character, expected a string key at column 2)"),
        ("4", "unknown event type: 'teleport'"),
        ("5", "expected a JSON object, got list"),
        ("7", "missing field: item_id"),
        ("8", "ts is not an ISO-8601 timestamp"),
    ]  # the first five; the sixth only in the summary
    assert f"{f}: skipped 6 of 8 rows: " in res.stderr
    assert "2 events" in res.stdout


def test_strict_stops_at_the_first_bad_row(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join(BAD_LOG) + b"\n")
    for command in (["replay", str(f), "--strict"], ["evaluate", str(f), "--strict"]):
        res = run(command)
        assert res.returncode == 2
        assert error_lines(res) == [
            f"error: {f}:3: not valid JSON (unexpected character, expected a string key at column 2) "
            "(--strict stops at the first bad row)"
        ]


def test_a_csv_without_the_event_columns_names_what_is_missing_and_what_was_found(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text("user,item_id,kind,ts\nu1,a,view,1700000000000\n")
    res = run(["replay", str(f), "--format", "csv"])
    assert res.returncode == 2
    first, second = error_lines(res)
    assert first == f"error: {f}: CSV lacks column(s) user_id, type; found: user, item_id, kind, ts"
    assert second.startswith("expected a header line such as user_id,item_id,type,ts")


def test_a_log_without_one_valid_event_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_text("user_id,item_id,type,ts\nu1,a,view,1700000000000\n")  # a CSV, given as JSON lines
    res = run(["evaluate", str(f)])
    assert res.returncode == 2
    first, second = error_lines(res)
    assert first.startswith(f"error: {f}: no valid events in 2 rows (not valid JSON")
    assert second == "the first line looks like a CSV header: give --format csv"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    res = run(["replay", str(empty)])
    assert res.returncode == 2
    assert error_lines(res)[0] == f"error: {empty}: no valid events in 0 rows (the file is empty)"


def test_rows_are_checked_by_the_workers_schema(tmp_path: Path) -> None:
    """What load_log keeps is exactly what a worker's ``EventSchema.decode`` accepts of the
    bytes a replay publishes: configured types and size limits included."""
    schema = EventSchema(types=frozenset({"like"}), max_bytes=256)
    rows = [
        {**GOOD, "type": "like"},
        {**GOOD, "type": "view"},  # not a configured type
        {**GOOD, "type": "like", "props": {"note": "x" * 300}},  # over max_bytes
        {**GOOD, "type": "like", "ts": "2023-11-14T22:13:19Z"},  # earlier, ISO
    ]
    f = tmp_path / "log.jsonl"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    log = load_log(f, "jsonl", schema)
    assert log.rows == [rows[3], rows[0]]  # in event time
    assert [e.ts for e in log.events] == [1_699_999_999_000, GOOD["ts"]]
    assert log.total == 4 and log.n_skipped == 2
    kept = [r for r in rows if _accepted(schema, orjson.dumps(r))]
    assert sorted(map(orjson.dumps, kept)) == sorted(map(orjson.dumps, log.rows))
    with pytest.raises(UsageError, match=r"log.jsonl:2: unknown event type: 'view'"):
        load_log(f, "jsonl", schema, strict=True)


def _accepted(schema: EventSchema, raw: bytes) -> bool:
    try:
        schema.decode(raw)
        return True
    except ValueError:
        return False


def test_csv_rows_report_their_physical_line(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text(
        'user_id,item_id,type,ts,props\nu1,a,view,1700000000000,\nu2,"b\nc",view,1700000000001,\n'
        "u3,a,view,1700000000002,{bad\nu4,a,view,1700000000003,,extra\nu5,a,view\n"
    )
    with pytest.raises(UsageError, match=r"log.csv:5: props is not valid JSON"):
        load_log(f, "csv", strict=True)
    log = load_log(f, "csv")
    assert [r["user_id"] for r in log.rows] == ["u1", "u2"]
    assert log.skipped == {"props is not valid JSON": 1, "6 fields, the header has 5": 1, "missing field: ts": 1}
