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
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from router_worker.security import (
    FILE_READABLE,
    SECRET_FIELDS,
    SecretFileError,
    file_variable,
    redact_text,
    redact_url,
    secrets_from_config,
    secrets_from_env,
)

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
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client connects: SSL and SASL_SSL use TLS, SASL_* log in."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (needs a SASL_* security protocol, a username and a password)."
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (or ..._FILE: a file).")
    kafka_ssl_cafile: str | None = Field(
        None,
        description="CA bundle (PEM) the brokers' certificates are checked against (unset: the system's).",
    )
    kafka_ssl_certfile: str | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    kafka_ssl_keyfile: str | None = Field(None, description="Private key (PEM) of the client certificate.")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="Password of an encrypted key file.")
    kafka_ssl_check_hostname: bool = Field(True, description="Check that a broker's certificate names it.")
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
    kafka_fetch_max_wait_ms: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Longest a fetch waits for records at the broker (5 on the embedded broker unless set).",
    )
    kafka_fetch_max_bytes: int = Field(
        52_428_800,
        ge=65_536,
        le=104_857_600,
        description="Most bytes one fetch response may carry, over all its partitions (at least one record "
        "batch comes whatever the size; never below one partition's limit). Kafka's default; lower it to "
        "bound what a consumer buffers where the broker ignores the per-partition limit (the embedded one "
        "does: one fetch of a backlogged partition carried 5.4 MB).",
    )
    kafka_max_message_bytes: int = Field(1_048_576, ge=1024, description="Jobs larger than this are refused.")
    kafka_replication_factor: int = Field(1, ge=1)

    # --- Redis -------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://, rediss:// for TLS, unix://). Unset: commands start the embedded stack.",
    )
    redis_username: str | None = Field(None, description="Redis ACL user (or in the URL, not both).")
    redis_password: SecretStr | None = Field(None, description="Redis password (or in the URL, not both).")
    redis_ssl_cafile: str | None = Field(None, description="CA (PEM) for rediss:// (unset: the system's).")
    redis_ssl_certfile: str | None = Field(None, description="Client certificate (PEM) for rediss://.")
    redis_ssl_keyfile: str | None = Field(None, description="Private key (PEM) of the client certificate.")
    redis_ssl_key_password: SecretStr | None = Field(None, description="Password of an encrypted key file.")
    redis_ssl_check_hostname: bool = Field(True, description="Check that the server's certificate names it.")
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
        description="Pause of a partition whose next job finds every head at its load limit (the first; "
        "it doubles while the partition stays stuck at that job, up to backpressure_max_ms).",
    )
    backpressure_max_ms: int = Field(
        100,
        ge=1,
        le=60_000,
        description="Longest pause of a partition stuck behind saturated heads (each resume fetches it again).",
    )
    gap_wait_ms: int = Field(
        3_000,
        ge=0,
        le=600_000,
        description="How long a consumer waits for a missing offset to appear before accepting the gap "
        "(above the broker's visibility delay; the embedded broker's can exceed a second).",
    )
    max_attempts: int = Field(6, ge=1, description="Routing attempts before a job is dead-lettered.")
    max_refusals: int = Field(
        50,
        ge=0,
        description="Busy refusals by heads (JobRefused('busy'): waits, not attempts) before a job is "
        "dead-lettered as no_capacity.",
    )
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
    gc_young_threshold: int = Field(
        50_000,
        ge=0,
        description="Allocations between two collections of the youngest generation in router and head processes "
        "(Python's default is 700: a router's batches of short-lived objects then trigger collections that "
        "scan every live object; see docs/performance.md). The objects of start-up are frozen out of "
        "collection too. 0: Python's defaults.",
    )
    heap_trim_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds between two returns of the heap's free pages to the system in router and head "
        "processes (glibc's malloc_trim; RSS then falls back after a backlog instead of keeping its peak). "
        "0: never; otherwise at least 1.",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="asyncio's event loop, or uvloop's (faster; `pip install 'router-worker[fast]'`). auto: uvloop "
        "when it is installed.",
    )

    @field_validator(
        "kafka_bootstrap_servers",
        "redis_url",
        "router_id",
        "admin_token",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_ssl_key_password",
        "redis_username",
        "redis_password",
        "redis_ssl_cafile",
        "redis_ssl_certfile",
        "redis_ssl_keyfile",
        "redis_ssl_key_password",
        mode="before",
    )
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
            if not _TOKEN_NAME.fullmatch(name):  # not echoed: it may be a token written where its name goes
                raise ValueError(f"a token name ({len(name)} characters, starting {name[:2]!r}) is not 1-64 of "
                                 "A-Z a-z 0-9 . _ @ -; pairs are written name=token")  # fmt: skip
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
            raise ValueError(f"{_var('kafka_enable_idempotence')} requires {_var('kafka_acks')}='all'")
        if self.kafka_heartbeat_interval_ms * 3 > self.kafka_session_timeout_ms:
            raise ValueError(
                f"{_var('kafka_heartbeat_interval_ms')} must be at most a third of "
                f"{_var('kafka_session_timeout_ms')}"
            )
        if self.head_heartbeat_ms * 2 > self.head_ttl_ms:
            raise ValueError(f"{_var('head_heartbeat_ms')} must be at most half of {_var('head_ttl_ms')}")
        if 0 < self.heap_trim_s < 1:
            raise ValueError(
                f"{_var('heap_trim_s')} must be 0 (never) or at least 1 s (each trim blocks the event loop)"
            )
        problem = security_problem(self) or naming_problem(self)
        if problem:
            raise ValueError(problem)
        if not self.retry_backoff_ms or any(ms < 0 for ms in self.retry_backoff_ms):
            raise ValueError(f"{_var('retry_backoff_ms')} must be a non-empty list of non-negative delays")
        longest_publish_ms = 2 * (self.publish_retry_max_s * 1000 + self.kafka_request_timeout_ms)
        if self.claim_ttl_ms < longest_publish_ms:
            raise ValueError(
                f"{_var('claim_ttl_ms')} must outlast a batch's longest publish (2 x ("
                f"{_var('publish_retry_max_s')} + {_var('kafka_request_timeout_ms')}) = {longest_publish_ms:.0f} "
                "ms), or a claim could lapse mid-publish"
            )
        if self.admin_token is not None and "admin" in self.admin_tokens:
            raise ValueError(
                f"{_var('admin_tokens')} names a token 'admin': that name is {_var('admin_token')}'s"
            )
        secrets = [t.get_secret_value() for t in self.admin_tokens.values()]
        if self.admin_token is not None:
            secrets.append(self.admin_token.get_secret_value())
        if len(set(secrets)) < len(secrets):
            raise ValueError(
                f"two admin tokens are equal ({_var('admin_tokens')}, {_var('admin_token')}): each name needs "
                "its own token (it is the actor)"
            )
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{}: "):
            raise ValueError(f"{_var('redis_prefix')} must be non-empty without '{{', '}}', ':' or spaces")
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
        # init (the file's values, see load_settings) < secrets read from ROUTER_*_FILE < env: the
        # environment always wins (a secret given both ways is refused).
        return (env_settings, _SecretFiles(settings_cls), init_settings)

    def __repr_args__(self) -> Any:
        """repr() and str() show the Redis URL without its password (SecretStr fields hide themselves)."""
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "redis_url" and isinstance(value, str) else value)

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
        if path:
            file_values = secrets_from_config(file_values, Path(path).parent)
        settings = Settings(**(file_values | overrides))  # overrides here too: checks that span settings
        if overrides:  # only what was given counts as set (a default the runtime may adapt stays a default)
            settings = Settings.model_validate({**settings.model_dump(exclude_unset=True), **overrides})
    except SecretFileError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"].removeprefix("Value error, ")) for e in exc.errors())
        # Not chained: the ValidationError's text holds the input values, secrets included.
        raise SettingsError(f"invalid settings: {problems}") from None
    return settings


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    """One setting's problem, led by its variable (a check across settings names its variables itself)."""
    where = ".".join(str(p) for p in loc)
    return f"{ENV_PREFIX}{where.upper()}: {message}" if where else message


def settings_help() -> str:
    """A table of every setting for ``--help``: variable, default, meaning."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None or name in SECRET_FIELDS else repr(default)
        desc = f"  {field.description}" if field.description else ""
        if name in FILE_READABLE:
            desc += f" Or {file_variable(name)}: read from that file."
        lines.append(f"{ENV_PREFIX}{name.upper()}={shown}{desc}")
    return "\n".join(lines)


class _SecretFiles(PydanticBaseSettingsSource):
    """``ROUTER_<NAME>_FILE`` variables: a secret read from a file (a mounted secret), not the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is read at once in __call__

    def __call__(self) -> dict[str, Any]:
        try:
            return secrets_from_env(os.environ)
        except SecretFileError as exc:
            raise SettingsError(f"invalid settings: {exc}") from None


_KAFKA_SSL_FILES = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
_REDIS_SSL_FILES = ("redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile")


def _var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")
_TOPIC_MAX = 249
_MODEL_ROOM = 40
"""Characters a model topic keeps for its model id after the prefixes (a long id is shortened to 35)."""


def naming_problem(s: Settings) -> str | None:
    """What Apache Kafka would refuse in the topic names and group id these settings make (the embedded broker
    takes nearly anything, so a typo would only surface in production), naming the setting; None if all is
    well."""
    parts = ("topic_prefix", "model_topic_prefix", "retry_topic_prefix", "requests_topic", "dlq_topic",
             "results_topic")  # fmt: skip
    for name in parts:
        value = getattr(s, name)
        if not _TOPIC_CHARS.fullmatch(value):
            return f"{_var(name)}={value!r}: topic names hold only letters, digits, '.', '_' and '-'"
    for name in ("requests_topic", "dlq_topic", "results_topic"):
        full = s.topic_prefix + getattr(s, name)
        if not getattr(s, name) or full in (".", ".."):
            return f"{_var(name)}={getattr(s, name)!r} names no topic"
        if len(full) > _TOPIC_MAX:
            return (
                f"{_var(name)}: {_var('topic_prefix')} and it make a topic name of {len(full)} characters "
                f"(at most {_TOPIC_MAX})"
            )
    for name, room in (("retry_topic_prefix", 3), ("model_topic_prefix", _MODEL_ROOM)):
        length = len(s.topic_prefix + getattr(s, name))
        if length + room > _TOPIC_MAX:
            return (
                f"{_var(name)}: {_var('topic_prefix')} and it take {length} characters, leaving topic names "
                f"too little room (at most {_TOPIC_MAX - room})"
            )
    if not s.group_id.strip():
        return f"{_var('group_id')} is empty"
    return None


def security_problem(s: Settings) -> str | None:
    """What is wrong with the Kafka and Redis security settings together, naming the settings; None if all
    is well. Pure but for checking that the named certificate files exist."""
    protocol = s.kafka_security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    if sasl and not s.kafka_sasl_mechanism:
        return f"{_var('kafka_security_protocol')}={protocol} needs {_var('kafka_sasl_mechanism')}"
    if s.kafka_sasl_mechanism and not sasl:
        return (f"{_var('kafka_sasl_mechanism')} needs {_var('kafka_security_protocol')}=SASL_SSL (or "
                f"SASL_PLAINTEXT), not {protocol}")  # fmt: skip
    if sasl and not (s.kafka_sasl_username and s.kafka_sasl_password):
        return f"{_var('kafka_sasl_mechanism')} needs {_var('kafka_sasl_username')} and {_var('kafka_sasl_password')}"
    if not sasl and (s.kafka_sasl_username or s.kafka_sasl_password):
        which = "kafka_sasl_username" if s.kafka_sasl_username else "kafka_sasl_password"
        return f"{_var(which)} is set but {_var('kafka_security_protocol')}={protocol} does not log in"
    tls_given = [n for n in (*_KAFKA_SSL_FILES, "kafka_ssl_key_password") if getattr(s, n)]
    if tls_given and not tls:
        return f"{_var(tls_given[0])} needs {_var('kafka_security_protocol')}=SSL or SASL_SSL, not {protocol}"
    if protocol != "PLAINTEXT" and not s.kafka_bootstrap_servers:
        return (f"{_var('kafka_security_protocol')}={protocol} needs {_var('kafka_bootstrap_servers')} (the "
                f"embedded broker is plaintext)")  # fmt: skip
    problem = _key_pair_problem(s, "kafka")
    if problem:
        return problem
    return _redis_problem(s)


def _key_pair_problem(s: Settings, system: str) -> str | None:
    cert, key, pw = (f"{system}_ssl_certfile", f"{system}_ssl_keyfile", f"{system}_ssl_key_password")
    if getattr(s, key) and not getattr(s, cert):
        return f"{_var(key)} needs {_var(cert)}"
    if getattr(s, pw) and not getattr(s, cert):
        return f"{_var(pw)} needs {_var(cert)} (and {_var(key)} unless the key is in it)"
    for name in _KAFKA_SSL_FILES if system == "kafka" else _REDIS_SSL_FILES:
        path = getattr(s, name)
        if path and not Path(path).is_file():
            return f"{_var(name)}: {path} is not a file"
    return None


def _redis_problem(s: Settings) -> str | None:
    url = s.redis_url
    given = [n for n in ("redis_username", "redis_password", *_REDIS_SSL_FILES, "redis_ssl_key_password")
             if getattr(s, n)]  # fmt: skip
    if url is None:
        if given:
            return f"{_var(given[0])} needs {_var('redis_url')} (the embedded Redis has no password nor TLS)"
        return None
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss", "unix"):
        return f"{_var('redis_url')} must start with redis://, rediss:// or unix:// (got {redact_url(url)})"
    try:
        parts = urlsplit(url)
        in_url_user, in_url_password = parts.username, parts.password
    except ValueError as exc:
        return f"{_var('redis_url')} is not a valid URL ({exc}): {redact_url(url)}"
    try:  # what the client will make of it (a port, the query's options), checked now, not at the first call
        from redis.asyncio.connection import parse_url

        options = parse_url(url)
    except ValueError as exc:
        return f"{_var('redis_url')} is not a valid Redis URL ({redact_text(str(exc))}): {redact_url(url)}"
    in_url_user = in_url_user or options.get("username")
    in_url_password = in_url_password or options.get("password")
    if in_url_password is not None and s.redis_password is not None:
        return f"the Redis password is given twice: in {_var('redis_url')} and {_var('redis_password')}"
    if in_url_user and s.redis_username:
        return f"the Redis user is given twice: in {_var('redis_url')} and {_var('redis_username')}"
    tls_given = [n for n in (*_REDIS_SSL_FILES, "redis_ssl_key_password") if getattr(s, n)]
    if tls_given and scheme.lower() != "rediss":
        return f"{_var(tls_given[0])} needs a rediss:// {_var('redis_url')} (TLS), not {scheme}://"
    return _key_pair_problem(s, "redis")
