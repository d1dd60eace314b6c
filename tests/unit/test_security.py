"""Security settings: what they turn into for librdkafka, faust (aiokafka) and redis-py, the
combinations refused, and that no secret reaches a log line, a repr or ``--help``.

The Kafka clients are real: librdkafka parses and loads (CA, certificate, key) the config at
construction, so building a Producer proves the keys and files are accepted. Connecting needs a
TLS/SASL broker, which the test broker (Tansu) is not."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr
from typer.testing import CliRunner

from stream_app.app import broker_credentials, create_app
from stream_app.cli import app as cli_app
from stream_app.config import Settings, mask_url
from stream_app.kafka_io import consumer_config, kafka_common, producer_config
from stream_app.redis_io import redis_address, redis_connection
from tests.certs import KEY_PASSWORD, Pki, make_pki

SASL_PASSWORD = "sasl-pw-93f1"
REDIS_PASSWORD = "redis-pw-7c2e"
SECRETS = (SASL_PASSWORD, REDIS_PASSWORD, KEY_PASSWORD, "url-pw-55aa")
NOWHERE = "127.0.0.1:1"  # the clients are built, never connected


@pytest.fixture(autouse=True)
def _no_streamrec_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("STREAMREC_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def sasl_ssl(pki: Pki, **kw: Any) -> Settings:
    return Settings(
        kafka_bootstrap_servers=NOWHERE,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="streamrec",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_ca_location=str(pki.ca),
        **kw,
    )


def mutual_tls(pki: Pki, key_password: str = KEY_PASSWORD) -> Settings:
    return Settings(
        kafka_bootstrap_servers=NOWHERE,
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=str(pki.ca),
        kafka_ssl_certificate_location=str(pki.client_cert),
        kafka_ssl_key_location=str(pki.client_key),
        kafka_ssl_key_password=key_password,
    )


# -- Kafka -------------------------------------------------------------------------------------
def test_plaintext_default_leaves_the_client_configs_as_they_were() -> None:
    s = Settings(kafka_bootstrap_servers="b1:9092,b2:9092")
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert kafka_common(s) == {"bootstrap.servers": "b1:9092,b2:9092"}
    for cfg in (consumer_config(s), producer_config(s)):
        assert not [k for k in cfg if k.split(".")[0] in ("security", "sasl", "ssl")]
        assert cfg["bootstrap.servers"] == "b1:9092,b2:9092"
    assert broker_credentials(s) is None


def test_sasl_ssl_reaches_every_client_config_and_librdkafka_accepts_it(pki: Pki) -> None:
    s = sasl_ssl(pki)
    want = {
        "bootstrap.servers": NOWHERE,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "streamrec",
        "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": str(pki.ca),
    }
    assert kafka_common(s) == want
    consumer, producer = consumer_config(s, "g"), producer_config(s, **{"linger.ms": 1})
    assert want.items() <= consumer.items() and want.items() <= producer.items()
    assert consumer["group.id"] == "g" and producer["linger.ms"] == 1
    Producer(producer).flush(0)
    Consumer(consumer).close()
    AdminClient(kafka_common(s))


def test_librdkafka_reads_the_files_it_is_given(pki: Pki, tmp_path: Path) -> None:
    """The keys are not just carried: a CA file that is not a certificate fails at construction."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        Producer(producer_config(sasl_ssl(pki).model_copy(update={"kafka_ssl_ca_location": str(junk)})))


def test_mutual_tls_with_an_encrypted_client_key(pki: Pki) -> None:
    s = mutual_tls(pki)
    cfg = kafka_common(s)
    assert cfg["security.protocol"] == "SSL" and "sasl.username" not in cfg
    assert cfg["ssl.certificate.location"] == str(pki.client_cert)
    assert cfg["ssl.key.password"] == KEY_PASSWORD
    Producer(producer_config(s)).flush(0)
    with pytest.raises(KafkaException, match="ssl.key"):  # librdkafka decrypts the key at construction
        Producer(producer_config(mutual_tls(pki, key_password="wrong")))
    creds = broker_credentials(s)  # faust's side loads the same certificate chain
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SSL" and isinstance(auth["ssl_context"], ssl.SSLContext)
    with pytest.raises(ssl.SSLError):
        broker_credentials(mutual_tls(pki, key_password="wrong"))


def test_the_faust_app_logs_in_as_the_stages_do(pki: Pki) -> None:
    s = sasl_ssl(pki, roles="item", metrics_port=0)
    app = create_app(s)
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials)
    assert {k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username")} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "streamrec",
    }
    assert auth["sasl_plain_password"] == SASL_PASSWORD
    ctx = auth["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    plain = credentials_to_aiokafka_auth(broker_credentials(sasl_ssl(pki).model_copy(
        update={"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_ssl_ca_location": ""})))  # fmt: skip
    assert plain["security_protocol"] == "SASL_PLAINTEXT" and plain["ssl_context"] is None
    assert plain["sasl_mechanism"] == "SCRAM-SHA-512"


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "STREAMREC_KAFKA_SASL_USERNAME and STREAMREC_KAFKA_SASL_PASSWORD"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"}, "STREAMREC_KAFKA_SASL_PASSWORD"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": SASL_PASSWORD}, "SECURITY_PROTOCOL=SASL_SSL"),
        ({"kafka_ssl_ca_location": "/etc/hosts"}, "SECURITY_PROTOCOL=SSL or SASL_SSL"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_certificate_location": "/etc/hosts"},
            "kafka_ssl_certificate_location and kafka_ssl_key_location go together",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_key_password": KEY_PASSWORD},
            "kafka_ssl_key_password is set without kafka_ssl_key_location",
        ),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_location": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
        ({"redis_ca_cert": "/etc/hosts"}, "redis_url is not rediss://"),
        ({"redis_url": "rediss://h:6380/0", "redis_ca_cert": "/nonexistent"}, "redis_ca_cert=/nonexistent is not"),
        ({"redis_url": "http://u:url-pw-55aa@h:6379/0"}, "redis_url must start with redis://, rediss://"),
    ],
)
def test_combinations_that_cannot_work_are_refused_clearly(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says) as e:
        Settings(**settings)
    assert not [x for x in SECRETS if x in str(e.value)]  # the rejected input is not echoed


def test_protocol_and_mechanism_are_case_insensitive() -> None:
    s = Settings(kafka_security_protocol="sasl_plaintext", kafka_sasl_mechanism="scram-sha-256",
                 kafka_sasl_username="u", kafka_sasl_password=SASL_PASSWORD)  # fmt: skip
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-256")


# -- Redis -------------------------------------------------------------------------------------
def test_redis_credentials_leave_the_url_and_settings_override_them() -> None:
    s = Settings(redis_url="redis://bob:url-pw-55aa@cache:6380/3?health_check_interval=5&password=x")
    assert redis_connection(s) == (
        "redis://cache:6380/3?health_check_interval=5",
        {"username": "bob", "password": "url-pw-55aa"},
    )
    s = s.model_copy(update={"redis_username": "alice", "redis_password": SecretStr("p2")})
    assert redis_connection(s)[1] == {"username": "alice", "password": "p2"}
    assert redis_address(s) == "cache:6380"


def test_rediss_takes_the_ca(pki: Pki) -> None:
    s = Settings(redis_url="rediss://:url-pw-55aa@[::1]:6390/0", redis_ca_cert=str(pki.ca))
    assert redis_connection(s) == ("rediss://[::1]:6390/0", {"password": "url-pw-55aa", "ssl_ca_certs": str(pki.ca)})
    assert redis_address(s) == "[::1]:6390"


# -- nothing secret in logs, reprs, --help -----------------------------------------------------
def test_the_safe_view_and_the_repr_mask_every_credential(pki: Pki) -> None:
    s = sasl_ssl(
        pki,
        redis_url="rediss://bob:url-pw-55aa@cache:6380/0?password=url-pw-55aa",
        redis_username="alice",
        redis_password=REDIS_PASSWORD,
    )
    view = s.safe_view()
    assert view["redis_url"] == "rediss://***@cache:6380/0?password=***"
    assert view["kafka_sasl_password"] == view["redis_password"] == "**********"
    assert view["kafka_sasl_username"] == "streamrec"  # names are not secrets: operators need them
    for text in (str(view), repr(s), str(s), f"{s}"):  # model_dump stays whole: it is not for logs
        assert not [x for x in SECRETS if x in text], text
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"


def test_help_shows_no_secret(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    env = {
        "STREAMREC_REDIS_URL": "redis://bob:url-pw-55aa@cache:6379/0",
        "STREAMREC_REDIS_PASSWORD": REDIS_PASSWORD,
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA_SASL_USERNAME": "u",
        "STREAMREC_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "STREAMREC_KAFKA_SSL_CA_LOCATION": str(pki.ca),
    }
    runner = CliRunner()
    names = [c.name or c.callback.__name__ for c in cli_app.registered_commands if c.callback]
    commands: list[list[str]] = [[], *([n] for n in names), ["datasets"], ["datasets", "fetch"]]
    for cmd in commands:
        res = runner.invoke(cli_app, [*cmd, "--help"], env=env)
        assert res.exit_code == 0, (cmd, res.output)
        assert not [x for x in SECRETS if x in res.output], cmd
