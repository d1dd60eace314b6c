import pytest
from pydantic import SecretStr

from stream_app.config import Settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "REDIS_PREFIX", "EVENTS_TOPIC", "GROUP_ID", "CONFIG"):
        monkeypatch.delenv(f"STREAMREC_{k}", raising=False)
    s = Settings()
    assert (s.kafka_bootstrap_servers, s.redis_url, s.redis_prefix, s.events_topic, s.group_id) == (
        "localhost:9092",
        "redis://localhost:6379/0",
        "streamrec:",
        "events",
        "streamrec",
    )
    assert s.dlq == "events.dlq"


def test_environment_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('epsilon = 0.3\nevents_topic = "clicks"\n[event_types]\nview = 1.0\nlike = 2.5\n')
    monkeypatch.setenv("STREAMREC_CONFIG", str(f))
    monkeypatch.setenv("STREAMREC_EPSILON", "0.05")
    s = Settings()
    assert s.epsilon == 0.05 and s.events_topic == "clicks" and s.dlq == "clicks.dlq"
    assert s.event_schema().types == frozenset({"view", "like"})
    assert s.params().type_weights == {"view": 1.0, "like": 2.5}


def test_bad_values_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_EPSILON", "1.5")
    with pytest.raises(ValueError, match="epsilon"):
        Settings()
    monkeypatch.delenv("STREAMREC_EPSILON")
    monkeypatch.setenv("STREAMREC_PAIR_WINDOW", "60")  # the window is the newest part of the history (50)
    with pytest.raises(ValueError, match=r"pair_window \(60\) must be at most history_len \(50\)"):
        Settings()
    monkeypatch.setenv("STREAMREC_HISTORY_LEN", "60")
    assert Settings().params().pair_window == 60
    for bad in ("gpu", "cuda:", "cuda:x", "cpu,cuda"):
        monkeypatch.setenv("STREAMREC_CTR_DEVICE", bad)
        with pytest.raises(ValueError, match="ctr_device must be cpu, cuda or cuda:N"):
            Settings()
    monkeypatch.setenv("STREAMREC_CTR_DEVICE", " cuda:1 ")
    assert Settings().ctr_device == "cuda:1"  # checked against the GPUs when the trainer starts


def test_secrets_are_masked_for_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_REDIS_URL", "redis://user:hunter2@cache:6379/0")
    assert "hunter2" not in str(Settings().safe_view())


def test_example_file_documents_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    for k in list(__import__("os").environ):
        if k.startswith("STREAMREC_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("STREAMREC_CONFIG", str(Path(__file__).parents[2] / "streamrec.example.toml"))
    from_file = Settings().model_dump()
    monkeypatch.delenv("STREAMREC_CONFIG")
    defaults = Settings().model_dump()
    assert from_file == defaults


def test_the_example_file_names_every_setting_with_its_default() -> None:
    import tomllib
    from pathlib import Path

    example = tomllib.loads((Path(__file__).parents[2] / "streamrec.example.toml").read_text())
    documented = set(example) - {"event_types"}
    # unset by default (TOML has no null): shown commented out
    unset = {"event_types", "model_dir", "data_dir", "config", "metrics_port", "item_metrics_port"}
    fields = set(Settings.model_fields) - unset
    assert documented == fields, (sorted(fields - documented), sorted(documented - fields))
    defaults = Settings.model_construct()

    def plain(x: object) -> object:  # passwords are SecretStr; the file holds their plain default ""
        return x.get_secret_value() if isinstance(x, SecretStr) else x

    assert {k: v for k, v in example.items() if k != "event_types" and plain(getattr(defaults, k)) != v} == {}


def test_the_worker_imports_neither_torch_nor_the_trainer() -> None:
    """torch alone costs a worker about 180 MiB; it is loaded only with W_CTR > 0."""
    import subprocess
    import sys

    code = "import sys, stream_app.app; print(sorted(m for m in ('torch', 'stream_app.trainer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_roles_are_checked() -> None:
    assert Settings(roles="user").role_set == frozenset({"user"})
    with pytest.raises(ValueError, match="roles"):
        Settings(roles="users,items")


def test_only_a_worker_with_both_roles_splits_its_stages() -> None:
    from stream_app.errors import UsageError
    from stream_app.item_process import ItemProcess

    assert Settings().item_process  # the default
    assert not Settings(split_stages=True, roles="user").item_process
    assert not Settings(split_stages=False).item_process
    with pytest.raises(UsageError, match="ITEM_METRICS_PORT=9108 is the worker's own"):
        ItemProcess(Settings(item_metrics_port=9108))
    assert ItemProcess(Settings(metrics_port=0, item_metrics_port=0)).port == 0
    # unset: a free port, picked when the worker starts (several workers may share a machine)
    a, b = ItemProcess(Settings()).port, ItemProcess(Settings()).port
    assert a > 0 and b > 0 and 9108 not in (a, b)


def test_only_the_events_consumer_fetches_with_fetch_wait_max_ms() -> None:
    """Tansu holds a fetch for its whole wait: the events consumer keeps the short one that
    lists wait on; the deltas consumer (and the table reader) use the internal one."""
    import redis

    from stream_app.item_stage import ItemStage
    from stream_app.kafka_io import consumer_config
    from stream_app.pipeline import Pipeline
    from stream_app.stage import StageLoop

    s = Settings(fetch_wait_max_ms=7, internal_fetch_wait_ms=70)
    item = ItemStage(s, redis.Redis())
    assert consumer_config(s, "g", 1024, item.fetch_wait_ms())["fetch.wait.max.ms"] == 70
    assert Pipeline.fetch_wait_ms is StageLoop.fetch_wait_ms and StageLoop.fetch_wait_ms(item) is None
    assert consumer_config(s, "g", 1024, None)["fetch.wait.max.ms"] == 7
