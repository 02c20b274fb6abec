"""One typed settings object for every command.

Values come, lowest precedence first, from defaults, an optional config file (TOML, YAML or JSON, named by
``ROUTER_CONFIG_FILE`` or ``--config``), then ``ROUTER_*`` environment variables. Bad values are refused at
start-up with the field named, never discovered mid-stream.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "ROUTER_"
CONFIG_FILE_ENV = "ROUTER_CONFIG_FILE"


_TOKEN_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class SettingsError(ValueError):
    """Configuration that can not run: the message names the field."""


class Settings(BaseSettings):
    """Every knob of router-worker. The environment variable is ``ROUTER_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- Kafka -------------------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...). Unset: commands start the embedded stack."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_client_id: str = "router-worker"
    kafka_enable_idempotence: bool = Field(
        False, description="Idempotent producer. Keep off against the embedded broker (no InitProducerId)."
    )
    kafka_acks: Literal["0", "1", "all"] = "all"
    kafka_linger_ms: int = Field(2, ge=0, le=1000)
    kafka_request_timeout_ms: int = Field(30_000, ge=1000)
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(2_000, ge=100)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=1000)
    kafka_fetch_max_wait_ms: int = Field(50, ge=0, le=10_000)
    kafka_max_message_bytes: int = Field(1_048_576, ge=1024, description="Jobs larger than this are refused.")
    kafka_replication_factor: int = Field(1, ge=1)

    # --- Redis -------------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis URL. Unset: commands start the embedded stack.")
    redis_prefix: str = Field("rw", description="Prefix of every Redis key and channel this deployment owns.")
    redis_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A Redis call that gets no answer this long fails (never hangs)."
    )

    # --- Topics ------------------------------------------------------------------------------------------
    topic_prefix: str = Field("", description="Common prefix of every topic name.")
    requests_topic: str = "router.requests"
    model_topic_prefix: str = "model."
    retry_topic_prefix: str = "router.retry."
    dlq_topic: str = "router.dlq"
    results_topic: str = "router.results"
    requests_partitions: int = Field(12, ge=1)
    model_partitions: int = Field(
        16, ge=1, description="Partitions of each model topic: heads a model can have."
    )

    # --- Router ------------------------------------------------------------------------------------------
    group_id: str = "router-worker"
    router_id: str | None = Field(None, description="Unique id of this router process. Default: host-pid.")
    batch_max_records: int = Field(500, ge=1, le=100_000, description="Most jobs routed per batch.")
    batch_timeout_ms: int = Field(20, ge=0, le=10_000, description="Longest wait to fill a batch.")
    default_strategy: str = Field(
        "least_loaded", description="Strategy of the policy in force until one is stored (`policy set`)."
    )

    head_refresh_ms: int = Field(1_000, ge=50, description="Full resync of the head snapshot from Redis.")
    publish_retry_attempts: int = Field(
        5, ge=1, description="Tries of a publish failing with retriable errors before it is left unsent."
    )
    publish_retry_max_s: float = Field(
        30.0, gt=0, description="Longest time retriable publish errors are retried in one batch."
    )
    claim_ttl_ms: int = Field(
        300_000,
        ge=1_000,
        description="How long a router's claim on a job id lasts before another router may take it over.",
    )
    claim_wait_ms: int = Field(
        200, ge=1, description="Pause of a partition whose next job is claimed by a job still in progress."
    )
    redis_staleness_ms: int = Field(
        30_000,
        ge=0,
        description="While Redis is unreachable, route from the last snapshot this long, then pause.",
    )
    outage_buffer_max: int = Field(
        200_000, ge=0, description="Marks and audit records kept for Redis while it is unreachable."
    )
    dlq_keep_bytes: int = Field(
        4096, ge=0, description="Bytes of a too-large job kept in its (truncated) dead letter."
    )
    shutdown_timeout_s: float = Field(10.0, gt=0)
    retry_backoff_ms: list[int] = Field(
        default_factory=lambda: [500, 2_000, 10_000],
        description="Delay of each retry tier router.retry.1, .2, ... (JSON list); the last tier repeats.",
    )
    backpressure_ms: int = Field(
        5,
        ge=1,
        le=10_000,
        description="Pause of a partition whose next job finds every head at its load limit.",
    )
    gap_wait_ms: int = Field(
        3_000,
        ge=0,
        le=600_000,
        description="How long a consumer waits for a missing offset to appear before accepting the gap "
        "(above the broker's visibility delay; the embedded broker's can exceed a second).",
    )
    max_attempts: int = Field(6, ge=1, description="Routing attempts before a job is dead-lettered.")
    dedupe_ttl_s: int = Field(86_400, ge=0, description="How long a routed job_id is remembered (0: off).")

    # --- Circuit breakers (a policy's `breaker` section overrides these) ---------------------------------
    breaker_enabled: bool = Field(True, description="Circuit breakers per head, shared by every router.")
    breaker_window_s: float = Field(10.0, ge=0.5, le=3600, description="Window of outcomes a breaker counts.")
    breaker_min_volume: int = Field(20, ge=1, description="Outcomes in the window before a breaker may open.")
    breaker_error_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Failure share over the window that opens a head's breaker."
    )
    breaker_cooldown_s: float = Field(
        30.0, ge=0, le=86_400, description="An open breaker stays open at least this long (never shortened)."
    )
    breaker_half_open_probes: int = Field(
        1, ge=1, le=1000, description="Jobs let through a half-open breaker."
    )
    breaker_poll_ms: int = Field(
        250,
        ge=10,
        le=60_000,
        description="How often a router re-reads breakers while nothing announced a change.",
    )

    # --- Heads -------------------------------------------------------------------------------------------
    head_ttl_ms: int = Field(5_000, ge=200, description="A head whose heartbeat is older is not a candidate.")
    head_heartbeat_ms: int = Field(1_000, ge=50)
    head_release_ms: int = Field(5, ge=1, description="How often a head releases finished jobs' in-flight.")

    # --- Admin, audit, logs ------------------------------------------------------------------------------
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(0, ge=0, le=65535, description="HTTP: /metrics, /healthz, admin API. 0: off.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the admin API, named 'admin' (mutations are refused while no token is set).",
    )
    admin_tokens: Annotated[dict[str, SecretStr], NoDecode] = Field(
        {},
        description="More named admin API tokens: name=token,name=token; the name is the audit record's actor.",
    )
    admin_reads_public: bool = Field(
        True,
        description="Admin API reads without a token (false: they need one too). /metrics, /healthz, /readyz "
        "and /openapi.json are always open.",
    )
    audit_file: str = Field(
        "./var/log/routing_audit.log", description="Audit log file ('' to disable the file sink)."
    )
    audit_channel: str = Field("audit:routing:logs", description="Redis pub/sub channel of audit records.")
    audit_file_max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    audit_file_backups: int = Field(5, ge=0)
    audit_decisions: bool = Field(True, description="Audit every routing decision (not only admin events).")
    audit_stream_maxlen: int = Field(
        10_000,
        ge=0,
        description="Entries (one per routed batch) kept, approximately, in the Redis stream `audit tail "
        "--since` replays (0: no stream).",
    )
    audit_sample: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of plain decision records audited, chosen by job id (fallbacks, retries, dead "
        "letters and admin operations are always audited).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="asyncio's event loop, or uvloop's (faster; `pip install 'router-worker[fast]'`). auto: uvloop "
        "when it is installed.",
    )

    @field_validator("kafka_bootstrap_servers", "redis_url", "router_id", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("admin_tokens", mode="before")
    @classmethod
    def _named_tokens(cls, value: Any) -> Any:
        """``name=token,name=token`` (the environment's form) to a mapping; a mapping (a file's) as it is."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("{"):  # JSON, as pydantic-settings reads other mappings
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc}); or use name=token,name=token") from None
        out: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, token = item.partition("=")
            if not sep:
                raise ValueError(f"expected name=token, got an item without '=' (item {len(out) + 1})")
            if name.strip() in out:
                raise ValueError(f"token name {name.strip()!r} given twice")
            out[name.strip()] = token.strip()
        return out

    @field_validator("admin_tokens")
    @classmethod
    def _token_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in value.items():
            if not _TOKEN_NAME.fullmatch(name):
                raise ValueError(f"token name {name!r} must be 1-64 of A-Z a-z 0-9 . _ @ -")
            if not token.get_secret_value():
                raise ValueError(f"token {name!r} is empty")
        return value

    @field_validator("default_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from router_worker.core.policy import STRATEGIES

        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r} (one of {', '.join(sorted(STRATEGIES))})")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.kafka_enable_idempotence and self.kafka_acks != "all":
            raise ValueError("kafka_enable_idempotence requires kafka_acks='all'")
        if self.kafka_heartbeat_interval_ms * 3 > self.kafka_session_timeout_ms:
            raise ValueError(
                "kafka_heartbeat_interval_ms must be at most a third of kafka_session_timeout_ms"
            )
        if self.head_heartbeat_ms * 2 > self.head_ttl_ms:
            raise ValueError("head_heartbeat_ms must be at most half of head_ttl_ms")
        if self.kafka_sasl_mechanism and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError("kafka_sasl_mechanism needs kafka_sasl_username and kafka_sasl_password")
        if not self.retry_backoff_ms or any(ms < 0 for ms in self.retry_backoff_ms):
            raise ValueError("retry_backoff_ms must be a non-empty list of non-negative delays")
        longest_publish_ms = 2 * (self.publish_retry_max_s * 1000 + self.kafka_request_timeout_ms)
        if self.claim_ttl_ms < longest_publish_ms:
            raise ValueError(
                f"claim_ttl_ms must outlast a batch's longest publish (2 x (publish_retry_max_s + "
                f"kafka_request_timeout_ms) = {longest_publish_ms:.0f} ms), or a claim could lapse mid-publish"
            )
        if self.admin_token is not None and "admin" in self.admin_tokens:
            raise ValueError("admin_tokens names a token 'admin': that name is ROUTER_ADMIN_TOKEN's")
        secrets = [t.get_secret_value() for t in self.admin_tokens.values()]
        if self.admin_token is not None:
            secrets.append(self.admin_token.get_secret_value())
        if len(set(secrets)) < len(secrets):
            raise ValueError("two admin tokens are equal: each name needs its own token (it is the actor)")
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{}: "):
            raise ValueError("redis_prefix must be non-empty without '{', '}', ':' or spaces")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the file's values, see load_settings) < env: the environment always wins.
        return (env_settings, init_settings)

    @property
    def external(self) -> bool:
        """True when both Kafka and Redis are given: nothing embedded is started."""
        return bool(self.kafka_bootstrap_servers and self.redis_url)

    @property
    def effective_router_id(self) -> str:
        return self.router_id or f"{os.uname().nodename}-{os.getpid()}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON settings file into a flat mapping of field names."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SettingsError(f"config file {p} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {p} must hold a mapping of settings")
    return {str(k).lower().removeprefix("router_"): v for k, v in data.items()}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from file + environment + explicit overrides (highest), refusing bad values clearly."""
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get(CONFIG_FILE_ENV)
    if path:
        file_values = read_config_file(path)
    try:
        settings = Settings(**file_values)
        if overrides:
            settings = Settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper() or '<settings>'}: {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
    return settings


def settings_help() -> str:
    """A table of every setting for ``--help``: variable, default, meaning."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else repr(default)
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"{ENV_PREFIX}{name.upper()}={shown}{desc}")
    return "\n".join(lines)
