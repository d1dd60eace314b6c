"""Redis with a password, an ACL user and TLS: real ``redis-server`` processes started here.

The clients (``redis_io.redis_client``), the preflight check (``check_redis``), a forked snapshot
child, ``streamrec recs`` and a worker all log in with the settings, and none of them writes a
credential to its output."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from pydantic import SecretStr

from stream_app.config import Settings, settings_from_env
from stream_app.datasets import synthetic_events
from stream_app.embedded import free_port, redis_binary
from stream_app.errors import ServiceUnreachable
from stream_app.processes import WorkerProcess, wait_caught_up
from stream_app.redis_io import check_redis, redis_client
from stream_app.redis_store import RedisStore
from stream_app.services import isolated_env, local_services
from stream_app.snapshots import ForkedSnapshots
from tests.certs import Pki, make_pki
from tests.integration.harness import create_topics, produce

DEFAULT_PASSWORD = "default-pw-1e4b"
ALICE_PASSWORD = "alice-pw-9d0c"
SECRETS = (DEFAULT_PASSWORD, ALICE_PASSWORD, "wrong-pw-3f3f")


@contextlib.contextmanager
def redis_process(args: list[str], ping: redis.Redis) -> Iterator[None]:
    """A throw-away ``redis-server`` with ``args``; ready once ``ping`` gets an answer."""
    proc = subprocess.Popen(
        [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                ping.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server {args} did not start") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def acl_port() -> Iterator[int]:
    """A Redis whose default user needs DEFAULT_PASSWORD and with an ACL user alice."""
    port = free_port()
    acl = ["--user", "alice", "on", f">{ALICE_PASSWORD}", "~*", "&*", "+@all"]
    with redis_process(
        ["--port", str(port), "--requirepass", DEFAULT_PASSWORD, *acl],
        redis.Redis(port=port, password=DEFAULT_PASSWORD),
    ):
        yield port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(pki: Pki) -> Iterator[int]:
    """A TLS-only Redis (certificate signed by the throw-away CA) with a password."""
    port = free_port()
    tls = ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)]
    tls += ["--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no"]
    ping = redis.Redis(port=port, password=DEFAULT_PASSWORD, ssl=True, ssl_ca_certs=str(pki.ca))
    with redis_process(["--port", "0", "--tls-port", str(port), "--requirepass", DEFAULT_PASSWORD, *tls], ping):
        yield port


def whoami(s: Settings) -> str:
    r = redis_client(s)
    try:
        return str(r.acl_whoami())
    finally:
        r.close()


def test_the_client_logs_in_with_the_username_and_password_settings(acl_port: int) -> None:
    s = Settings(
        redis_url=f"redis://127.0.0.1:{acl_port}/0", redis_username="alice", redis_password=SecretStr(ALICE_PASSWORD)
    )
    assert whoami(s) == "alice"
    check_redis(s)
    password_only = s.model_copy(update={"redis_username": "", "redis_password": SecretStr(DEFAULT_PASSWORD)})
    assert whoami(password_only) == "default"


def test_the_client_logs_in_with_credentials_in_the_url(acl_port: int) -> None:
    assert whoami(Settings(redis_url=f"redis://alice:{ALICE_PASSWORD}@127.0.0.1:{acl_port}/0")) == "alice"
    assert whoami(Settings(redis_url=f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{acl_port}/0")) == "default"


def test_the_settings_override_the_credentials_in_the_url(acl_port: int) -> None:
    s = Settings(redis_url=f"redis://bob:wrong-pw-3f3f@127.0.0.1:{acl_port}/0", redis_username="alice",
                 redis_password=SecretStr(ALICE_PASSWORD))  # fmt: skip
    assert whoami(s) == "alice"


@pytest.mark.parametrize(
    ("url", "username", "password", "says"),
    [
        ("redis://127.0.0.1:{port}/0", "alice", "wrong-pw-3f3f", "refused the credentials"),
        ("redis://alice:wrong-pw-3f3f@127.0.0.1:{port}/0", "", "", "refused the credentials"),
        ("redis://127.0.0.1:{port}/0", "", "wrong-pw-3f3f", "refused the credentials"),
        ("redis://127.0.0.1:{port}/0", "", "", "requires a password; set STREAMREC_REDIS_PASSWORD"),
    ],
)
def test_refused_credentials_are_a_one_line_error_without_the_secret(
    acl_port: int, url: str, username: str, password: str, says: str
) -> None:
    s = Settings(redis_url=url.format(port=acl_port), redis_username=username, redis_password=SecretStr(password))
    with pytest.raises(ServiceUnreachable, match=says) as e:
        check_redis(s)
    msg = str(e.value)
    assert "\n" not in msg and f"Redis at 127.0.0.1:{acl_port}" in msg and "STREAMREC_REDIS_PASSWORD" in msg
    assert not [x for x in SECRETS if x in msg]
    assert e.value.exit_code == 1


def test_an_unreachable_redis_is_a_one_line_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ServiceUnreachable, match=f"cannot reach Redis at 127.0.0.1:{port}") as e:
        check_redis(Settings(redis_url=f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{port}/0"), timeout=2)
    assert "\n" not in str(e.value) and DEFAULT_PASSWORD not in str(e.value)


def test_rediss_with_a_private_ca(tls_port: int, pki: Pki) -> None:
    s = Settings(redis_url=f"rediss://127.0.0.1:{tls_port}/0", redis_ca_cert=str(pki.ca),
                 redis_password=SecretStr(DEFAULT_PASSWORD))  # fmt: skip
    check_redis(s)
    r = redis_client(s)
    r.set("tls-probe", b"1")
    assert r.get("tls-probe") == b"1"
    r.close()
    # without the CA the server's certificate is not trusted
    with pytest.raises(ServiceUnreachable, match="STREAMREC_REDIS_CA_CERT") as e:
        check_redis(s.model_copy(update={"redis_ca_cert": ""}), timeout=5)
    assert "\n" not in str(e.value) and DEFAULT_PASSWORD not in str(e.value)


def test_a_forked_snapshot_child_logs_in_with_the_settings(acl_port: int) -> None:
    s = Settings(redis_url=f"redis://127.0.0.1:{acl_port}/0", redis_username="alice",
                 redis_password=SecretStr(ALICE_PASSWORD), redis_prefix="forked:")  # fmt: skip
    forked = ForkedSnapshots(lambda: redis_client(s), s.redis_prefix)

    def write(store: RedisStore) -> int:
        return store.save_snapshot("g", "t", 0, 42, {"written": "by the child"})

    forked.start(("user", 0, 42), write)
    assert forked.poll(block=True) is not None  # the child exited 0: it logged in and wrote
    loaded = RedisStore(redis_client(s), s.redis_prefix).load_snapshot("g", "t", 0)
    assert loaded == (42, {"written": "by the child"})


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_recs_logs_in_and_prints_no_secret(acl_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(
        STREAMREC_REDIS_URL=f"redis://127.0.0.1:{acl_port}/0",
        STREAMREC_REDIS_USERNAME="alice",
        STREAMREC_REDIS_PASSWORD=ALICE_PASSWORD,
        STREAMREC_REDIS_PREFIX="recs-cli:",
        STREAMREC_LOG_LEVEL="DEBUG",
    )
    res = _cli(["recs", "someuser"], env)
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout) == {"user_id": "someuser", "fallback": "trending", "items": []}
    assert not [x for x in SECRETS if x in res.stdout + res.stderr]
    res = _cli(["recs", "someuser"], {**env, "STREAMREC_REDIS_PASSWORD": "wrong-pw-3f3f"})
    assert res.returncode != 0
    assert not [x for x in SECRETS if x in res.stdout + res.stderr]


def test_a_worker_logs_in_and_logs_no_secret(
    acl_port: int, broker: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **worker_env,
        "STREAMREC_REDIS_URL": f"redis://127.0.0.1:{acl_port}/0",
        "STREAMREC_REDIS_USERNAME": "alice",
        "STREAMREC_REDIS_PASSWORD": ALICE_PASSWORD,
        "STREAMREC_LOG_LEVEL": "DEBUG",
        "STREAMREC_SNAPSHOT_INTERVAL_S": "0.2",  # forked snapshot children write (and log in) during the run
        "STREAMREC_BATCH_SIZE": "200",
        "STREAMREC_METRICS_PORT": "0",
    }
    topic, group = env["STREAMREC_EVENTS_TOPIC"], env["STREAMREC_GROUP_ID"]
    events = synthetic_events(n_users=50, n_items=100, n_events=3000, seed=5)
    create_topics(broker, topic, 1)
    produce(broker, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events])
    w = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        wait_caught_up(broker, group, topic, 1, w)
        # a forked child writes the state of the caught-up partition once the interval is over
        # (the log may be consumed faster than that)
        deadline = time.monotonic() + 30
        while "written in the background" not in w.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert w.stop() == 0, w.log()[-3000:]
    log = w.log()
    # forked children wrote snapshots (they logged in); a failed login would exit them with status 1
    assert "written in the background" in log and "failed in the child (exit status 1)" not in log
    assert not [x for x in SECRETS if x in log]
    s = Settings(redis_url=env["STREAMREC_REDIS_URL"], redis_username="alice",
                 redis_password=SecretStr(ALICE_PASSWORD), redis_prefix=env["STREAMREC_REDIS_PREFIX"])  # fmt: skip
    store = RedisStore(redis_client(s), s.redis_prefix)
    users = sorted({str(e["user_id"]) for e in events})
    assert all(doc is not None for doc in store.get_recs(users))
    assert store.load_snapshot(group, topic, 0) is not None


def test_demo_and_bench_carry_credentials_from_the_settings_file(
    acl_port: int, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``local_services``/``isolated_env`` (demo, bench, evaluate --served) build the settings of
    their runs from the environment; credentials set only in the TOML file reach them too."""
    for k in list(os.environ):
        if k.startswith("STREAMREC_"):
            monkeypatch.delenv(k)
    toml = tmp_path / "s.toml"
    toml.write_text(
        f'kafka_bootstrap_servers = "{broker}"\nredis_url = "redis://127.0.0.1:{acl_port}/0"\n'
        f'redis_username = "alice"\nredis_password = "{ALICE_PASSWORD}"\n'
    )
    monkeypatch.setenv("STREAMREC_CONFIG", str(toml))
    with local_services(Settings()) as svc:
        assert not svc.embedded_redis and not svc.embedded_broker
        env = isolated_env(svc, "sec-run")
    assert whoami(settings_from_env(env)) == "alice"
