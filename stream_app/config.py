"""One settings object, read from ``STREAMREC_*`` environment variables and an optional TOML file.

Precedence: environment, then the TOML file named by ``STREAMREC_CONFIG`` (or ``--config``), then
the defaults below. Every field is documented in the README's configuration table.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from models.ctr.samples import SampleParams
from models.events import DEFAULT_TYPE_WEIGHTS, EventSchema
from models.params import ModelParams
from stream_app.errors import UsageError


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value (a URL with a password, say) never reaches an error message
    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="forbid", frozen=True, hide_input_in_errors=True)

    # contracts (names fixed by ARCHITECTURE.md)
    kafka_bootstrap_servers: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    redis_prefix: str = "streamrec:"
    events_topic: str = "events"
    group_id: str = "streamrec"
    dlq_topic: str = ""  # empty: "<events_topic>.dlq"
    items_topic: str = "items"
    # security (README "Security"); "" leaves a setting unset
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism of the SASL_* protocols"
    )
    kafka_sasl_username: str = Field("", description="SASL user; required by the SASL_* protocols")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password; required by the SASL_* protocols")
    kafka_ssl_ca_location: str = Field("", description="CA file that signed the brokers' certificates; '': system CAs")
    kafka_ssl_certificate_location: str = Field("", description="client certificate (PEM) for mutual TLS")
    kafka_ssl_key_location: str = Field("", description="the client certificate's private key (PEM)")
    kafka_ssl_key_password: SecretStr = Field(SecretStr(""), description="password of an encrypted private key")
    redis_ca_cert: str = Field("", description="CA file that signed the Redis server's certificate (rediss:// only)")
    redis_username: str = Field("", description="Redis ACL user; overrides a user in redis_url")
    redis_password: SecretStr = Field(SecretStr(""), description="Redis password; overrides one in redis_url")
    # the two stages (README "Scaling out")
    roles: str = Field("user,item", description="stages this worker runs: user, item, or both (comma-separated)")
    split_stages: bool = Field(
        True,
        description="with both roles: run the item stage in a child process of the worker, so that the stages "
        'share no interpreter (false: one process, less memory; README "Scaling out")',
    )
    item_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="/metrics, /healthz, /readyz of that child process (the worker's include them); unset: a free "
        "port picked at start; 0: off",
    )
    item_partitions: int = Field(0, ge=0, description="partitions of the internal topics; 0: as many as events")
    deltas_topic: str = ""  # empty: "<events_topic>.deltas"
    table_topic: str = ""  # empty: "<events_topic>.table"
    delta_max_bytes: int = Field(512 * 1024, ge=4096, description="larger delta messages are cut between events")
    long_poll_s: float = Field(2.0, gt=0, description="how often workers look for a new long-term model version")
    table_publish_interval_s: float = Field(
        0.1, ge=0, description="how often the item stage publishes due table entries and its watermark"
    )
    table_max_lag: int = Field(
        5000, ge=0, description="events of its partition the table may lag behind a block before the user stage waits"
    )
    table_wait_s: float = Field(5.0, ge=0, description="longest such wait; then the block is ranked anyway")
    # pipeline
    batch_size: int = Field(2000, ge=1, description="events per micro-batch and per partition")
    poll_timeout_ms: int = Field(20, ge=1, description="how long a consume call waits for a full block")
    block_delay_ms: float = Field(
        0.0,
        ge=0,
        description="live traffic: how long an arrived event waits for others to join its block "
        "(0: blocks are what has arrived; larger: fewer, bigger blocks, later lists)",
    )
    rank_threads: int = Field(
        2,
        ge=1,
        description="threads a block's users are ranked on: the ranking kernels release the GIL, so a "
        "second core takes part of every block (1: the stage's own thread only; lists are the same)",
    )
    fetch_wait_max_ms: int = Field(5, ge=0, description="librdkafka fetch.wait.max.ms of the events consumer")
    internal_fetch_wait_ms: int = Field(
        50,
        ge=0,
        description="fetch.wait.max.ms of the deltas and table consumers (lists do not wait on them: "
        "the table may lag TABLE_MAX_LAG events)",
    )
    session_timeout_ms: int = Field(10_000, ge=1000)
    snapshot_interval_s: float = Field(30.0, gt=0)
    snapshot_fork: bool = True  # write snapshots from a forked child (no pause); False: inline
    sim_publish_interval_s: float = Field(5.0, gt=0)
    sim_publish_batch: int = Field(100, ge=1)
    sim_publish_len: int = Field(30, ge=1)
    max_event_bytes: int = Field(16_384, ge=256)
    topic_partitions: int = Field(4, ge=1, description="used when the worker has to create the events topic")
    model_version: str = "cf-1"
    log_level: str = "INFO"
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="/metrics, /healthz, /readyz; default 9108 (worker), 9109 (trainer); 0: off"
    )
    health_stale_s: float = Field(60.0, gt=0, description="/healthz fails once a stage loop stalls this long")
    # models
    event_types: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TYPE_WEIGHTS))
    n_recs: int = Field(20, ge=1)
    rerank_pool: int = Field(120, ge=1, description="candidates per user a CTR re-ranker and its samples see")
    epsilon: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    half_life_hours: float = Field(24.0 * 90, gt=0)
    user_half_life_hours: float = Field(24.0 * 3, gt=0)
    history_len: int = Field(50, ge=1)
    pair_window: int = Field(20, ge=1)
    neighbours: int = Field(1000, ge=1, description="co-occurrence entries a row keeps (pruned back from 2x)")
    sim_list_len: int = Field(200, ge=1)
    sim_refresh: float = Field(0.2, gt=0, description="republish an item's entry once this share of its weight is new")
    sources: int = Field(10, ge=1)
    source_decay: float = Field(0.8, gt=0.0, le=1.0)
    sim_beta: float = Field(0.3, ge=0.0, le=1.0)
    pair_decay: float = Field(0.9, gt=0.0, le=1.0)
    w_cooc: float = Field(1.0, ge=0.0)
    w_vec: float = Field(0.0, ge=0.0)
    w_pop: float = Field(0.01, ge=0.0)
    w_long: float = Field(0.5, ge=0.0)
    long_items: int = Field(2000, ge=1)
    long_lambda: float = Field(200.0, gt=0.0)
    long_refit_events: int = Field(20_000, ge=1)
    long_users: int = Field(20_000, ge=1)
    long_half_life: float = Field(10.0, gt=0.0)
    long_candidates: int = Field(100, ge=1)
    max_users: int = Field(1_000_000, ge=1, le=16_777_214)
    max_seen: int = Field(10_000, ge=1)
    # CTR samples (produced by workers) and the trainer
    samples: bool = False  # workers publish CTR samples to samples_topic (turn on with a trainer)
    samples_topic: str = "samples"
    sample_window_s: float = Field(1800.0, gt=0, description="a view not clicked within this is a negative")
    sample_negatives: int = Field(4, ge=0, description="popularity-sampled negatives per positive")
    sample_list_negatives: int = Field(
        20, ge=0, description="candidates per list sample besides the item taken (0: no list samples)"
    )
    sample_served_users: int = Field(20_000, ge=1, description="users whose last served candidates are kept")
    sample_list_types: str = Field(
        "", description="comma-separated event types that take an item from a served list; empty: every type"
    )
    ctr_batch_size: int = Field(1024, ge=16)
    ctr_dim: int = Field(8, ge=2)
    ctr_buckets: int = Field(1 << 18, ge=1024)
    ctr_hist_len: int = Field(10, ge=1)
    ctr_lr: float = Field(0.01, gt=0)
    ctr_threads: int = Field(1, ge=0, description="torch threads of the trainer; 0: torch's default (every core)")
    ctr_device: str = Field(
        "cpu", description="where the trainer trains: cpu, cuda or cuda:N (workers re-rank on the CPU either way)"
    )
    ctr_publish_batches: int = Field(200, ge=1)
    ctr_publish_interval_s: float = Field(60.0, gt=0)
    ctr_holdout: float = Field(0.05, gt=0, lt=1, description="share of samples held back for the promotion gate")
    ctr_gate_tolerance: float = Field(0.01, ge=0, description="relative log-loss a new version may lose")
    ctr_drift_lr_boost: float = Field(3.0, ge=1.0)
    ctr_drift_batches: int = Field(100, ge=1)
    ctr_drift_epsilon: float = Field(0.3, ge=0.0, le=1.0)
    w_ctr: float = Field(0.0, ge=0.0, description="weight of the CTR score in the ranking; 0: no CTR model")
    ctr_poll_s: float = Field(5.0, gt=0, description="how often workers look for a new CTR model version")
    model_dir: Path | None = None  # trainer checkpoints; default <data_dir>/models/<group_id>
    # data
    data_dir: Path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamrec"

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("ctr_device")
    @classmethod
    def _torch_device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v.strip()):
            raise ValueError("ctr_device must be cpu, cuda or cuda:N (a GPU's index), e.g. 'cuda:0'")
        return v.strip()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// (TLS) or unix://")
        return v

    @model_validator(mode="after")
    def _window_in_history(self) -> Settings:
        if self.pair_window > self.history_len:
            raise ValueError(
                f"pair_window ({self.pair_window}) must be at most history_len ({self.history_len}): "
                "the pairing window is the newest part of a user's history"
            )
        return self

    @model_validator(mode="after")
    def _security_combinations(self) -> Settings:
        """Refuse settings that would silently not be used, or a SASL login without credentials."""
        proto = self.kafka_security_protocol
        sasl, tls = proto.startswith("SASL_"), proto in ("SSL", "SASL_SSL")
        has_password = bool(self.kafka_sasl_password.get_secret_value())
        if sasl and not (self.kafka_sasl_username and has_password):
            raise ValueError(
                f"kafka_security_protocol={proto} needs STREAMREC_KAFKA_SASL_USERNAME and STREAMREC_KAFKA_SASL_PASSWORD"
            )
        if not sasl and (self.kafka_sasl_username or has_password):
            raise ValueError(
                "kafka_sasl_username/kafka_sasl_password are set but kafka_security_protocol is "
                f"{proto}; set STREAMREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
            )
        ssl_files = {
            "kafka_ssl_ca_location": self.kafka_ssl_ca_location,
            "kafka_ssl_certificate_location": self.kafka_ssl_certificate_location,
            "kafka_ssl_key_location": self.kafka_ssl_key_location,
        }
        given = [k for k, v in ssl_files.items() if v]
        if self.kafka_ssl_key_password.get_secret_value():
            given.append("kafka_ssl_key_password")
        if given and not tls:
            raise ValueError(
                f"{', '.join(given)} set but kafka_security_protocol is {proto}; "
                "set STREAMREC_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL"
            )
        if bool(self.kafka_ssl_certificate_location) != bool(self.kafka_ssl_key_location):
            raise ValueError("kafka_ssl_certificate_location and kafka_ssl_key_location go together: set both")
        if self.kafka_ssl_key_password.get_secret_value() and not self.kafka_ssl_key_location:
            raise ValueError("kafka_ssl_key_password is set without kafka_ssl_key_location")
        if self.redis_ca_cert and not self.redis_url.startswith("rediss://"):
            raise ValueError("redis_ca_cert is set but redis_url is not rediss://; use rediss://host:port/db for TLS")
        for name, path in {**ssl_files, "redis_ca_cert": self.redis_ca_cert}.items():
            if path and not Path(path).is_file():
                raise ValueError(f"{name}={path} is not a readable file")
        return self

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: str) -> str:
        roles = {r.strip() for r in v.split(",") if r.strip()}
        if not roles or roles - {"user", "item"}:
            raise ValueError("roles must name user, item or both, e.g. 'user,item'")
        return v

    @field_validator("event_types")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w <= 0 for w in v.values()):
            raise ValueError("event_types needs at least one type, each with a positive weight")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("STREAMREC_CONFIG")
        if path:
            if not Path(path).is_file():
                raise UsageError(
                    f"STREAMREC_CONFIG={path}: no such file; expected a TOML settings file, "
                    "e.g. STREAMREC_CONFIG=streamrec.example.toml (or unset it)"
                )
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
                raise UsageError(f"STREAMREC_CONFIG={path} is not a readable TOML file: {e}") from None
        return tuple(sources)

    # derived values -------------------------------------------------------------------------
    def metrics_port_for(self, default: int) -> int:
        """The metrics port of a process whose own default is ``default``."""
        return default if self.metrics_port is None else self.metrics_port

    @property
    def dlq(self) -> str:
        return self.dlq_topic or f"{self.events_topic}.dlq"

    @property
    def deltas(self) -> str:
        """The internal topic of item-level deltas, keyed (partitioned) by item."""
        return self.deltas_topic or f"{self.events_topic}.deltas"

    @property
    def table(self) -> str:
        """The internal compacted topic of item table entries, keyed by item id."""
        return self.table_topic or f"{self.events_topic}.table"

    @property
    def item_group_id(self) -> str:
        """The item stage's consumer group (on the deltas topic)."""
        return f"{self.group_id}.items"

    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.roles.split(",") if r.strip())

    @property
    def item_process(self) -> bool:
        """Whether this worker runs its item stage in a child process (``split_stages``)."""
        return self.split_stages and self.role_set == {"user", "item"}

    def event_schema(self) -> EventSchema:
        return EventSchema(types=frozenset(self.event_types), max_bytes=self.max_event_bytes)

    def sample_params(self) -> SampleParams:
        """How workers (and the evaluator) turn events into CTR samples."""
        return SampleParams(
            hist_len=self.ctr_hist_len,
            window_ms=int(self.sample_window_s * 1000),
            sampled_negatives=self.sample_negatives,
            list_negatives=self.sample_list_negatives,
            served_users=self.sample_served_users,
            list_types=frozenset(t.strip() for t in self.sample_list_types.split(",") if t.strip()) or None,
            seed=self.seed,
        )

    def params(self) -> ModelParams:
        return ModelParams(
            type_weights=dict(self.event_types),
            half_life_h=self.half_life_hours,
            user_half_life_h=self.user_half_life_hours,
            history_len=self.history_len,
            pair_window=self.pair_window,
            neighbours=self.neighbours,
            sim_list_len=self.sim_list_len,
            sim_refresh=self.sim_refresh,
            sources=self.sources,
            source_decay=self.source_decay,
            sim_beta=self.sim_beta,
            pair_decay=self.pair_decay,
            w_cooc=self.w_cooc,
            w_vec=self.w_vec,
            w_pop=self.w_pop,
            w_long=self.w_long,
            long_items=self.long_items,
            long_lambda=self.long_lambda,
            long_refit_events=self.long_refit_events,
            long_users=self.long_users,
            long_half_life=self.long_half_life,
            long_candidates=self.long_candidates,
            n_recs=self.n_recs,
            rerank_pool=self.rerank_pool,
            epsilon=self.epsilon,
            seed=self.seed,
            max_users=self.max_users,
            max_seen=self.max_seen,
        )

    def safe_view(self) -> dict[str, Any]:
        """Settings fit for a log line: passwords (SecretStr dumps as "**********") and credentials
        in URLs are masked."""
        d = self.model_dump(mode="json")
        for k in URL_FIELDS:
            d[k] = mask_url(d[k])
        return d

    def __repr_args__(self) -> Any:
        """``repr``/``str`` mask URL credentials too, so a settings object logged by accident leaks nothing."""
        for k, v in super().__repr_args__():
            yield k, mask_url(v) if k in URL_FIELDS and isinstance(v, str) else v


URL_FIELDS = ("redis_url", "kafka_bootstrap_servers")  # may carry credentials: masked wherever shown


def mask_url(url: str) -> str:
    """``url`` with its user info and any ``password``/``username`` query value replaced by ``***``."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL we can take apart: show none of it
        return "***"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in ("password", "username") else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings from a ``STREAMREC_*`` mapping alone (not ``os.environ``): for the processes we
    start ourselves, whose environment we build. JSON values (objects, lists) are parsed."""
    values: dict[str, Any] = {}
    for k, v in env.items():
        name = k[len("STREAMREC_") :].lower()
        # names that are no setting are skipped, as Settings() skips them in os.environ
        if k.upper().startswith("STREAMREC_") and name in Settings.model_fields:
            try:
                values[name] = orjson.loads(v) if v[:1] in ("{", "[") else v
            except orjson.JSONDecodeError:
                raise SettingsError(f'error parsing value for field "{name}" from source "settings_from_env"') from None
    return Settings.model_validate(values)
