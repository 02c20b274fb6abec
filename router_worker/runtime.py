"""The imperative shell's wiring: settings -> (embedded stack if needed) -> clients, all passed explicitly."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaConnectionError
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from router_worker.audit import AuditSink
from router_worker.localstack import EMBEDDED_FETCH_MAX_WAIT_MS, LocalStack, local_stack, wait_kafka_ready
from router_worker.security import redact_text, redact_url
from router_worker.settings import Settings

log = logging.getLogger(__name__)


class ConnectFailed(RuntimeError):
    """Kafka or Redis could not be reached or refused this client (login, TLS): one line for the operator,
    naming the settings to check and never a secret. The command line prints it and exits 2."""


@dataclass(slots=True)
class Runtime:
    settings: Settings
    redis: Redis
    stack: LocalStack | None

    def audit(self, with_file: bool = True) -> AuditSink:
        return AuditSink.from_settings(self.redis, self.settings, with_file)


def redis_options(s: Settings) -> dict[str, Any]:
    """Login and TLS options of every Redis client, from the settings (a URL's own user and password, and
    ``rediss://``, are read by the client from the URL itself; settings refuse the two given twice)."""
    opts: dict[str, Any] = {}
    if s.redis_username:
        opts["username"] = s.redis_username
    if s.redis_password is not None:
        opts["password"] = s.redis_password.get_secret_value()
    if (s.redis_url or "").lower().startswith("rediss://"):
        opts.update(ssl_cert_reqs="required", ssl_check_hostname=s.redis_ssl_check_hostname)
        if s.redis_ssl_cafile:
            opts["ssl_ca_certs"] = s.redis_ssl_cafile
        if s.redis_ssl_certfile:
            opts["ssl_certfile"] = s.redis_ssl_certfile
        if s.redis_ssl_keyfile:
            opts["ssl_keyfile"] = s.redis_ssl_keyfile
        if s.redis_ssl_key_password is not None:
            opts["ssl_password"] = s.redis_ssl_key_password.get_secret_value()
    return opts


def make_redis(url: str, timeout_s: float | None = 5.0, **options: Any) -> Redis:
    """A client whose calls fail after ``timeout_s`` instead of hanging on a Redis that stopped answering
    (a paused or partitioned server): the router's outage handling needs an answer, even a failure.

    A pooled connection that Redis closed (a restart, a proxy, ``CLIENT KILL``) is replaced before a command is
    sent on it: redis-py checks each connection it takes from the pool, but skips that check while its
    maintenance notifications (a Redis Cloud feature, RESP3 only) are on, and their default, "auto", counts
    as on. They are off here: else the first call on each pooled connection after a restart failed ("Connection
    closed by server"), and a batch whose claims failed was routed without them. Nothing is sent twice: a
    call that fails is not made again. Bytes that are not UTF-8 (another writer's, on the audit stream say)
    are read with replacement characters rather than failing the whole reply. ``options``: login and TLS (see
    :func:`redis_options`)."""
    options.setdefault("maint_notifications_config", MaintNotificationsConfig(enabled=False))
    options.setdefault("encoding_errors", "replace")
    return Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_keepalive=True,
                          socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **options)  # fmt: skip


def connect_redis(s: Settings, **extra: Any) -> Redis:
    """The Redis client of these settings: its URL, timeout, login and TLS (``extra``: more client options)."""
    if not s.redis_url:
        raise ValueError("redis_url is not set")
    return make_redis(s.redis_url, s.redis_timeout_s, **redis_options(s), **extra)


def describe_failure(exc: BaseException, s: Settings) -> str | None:
    """One line for a failure to reach or log in to Kafka or Redis, naming what to check; None for other
    errors. Pure: what the exception says, redacted, with the settings it is about."""
    if isinstance(exc, ConnectFailed):
        return str(exc)
    if isinstance(exc, KafkaConnectionError):
        how: str = s.kafka_security_protocol
        if s.kafka_sasl_mechanism:
            how += f" with SASL {s.kafka_sasl_mechanism} as {s.kafka_sasl_username!r}"
        return (f"Kafka at {s.kafka_bootstrap_servers} refused or did not answer {how} ({_text(exc)}): check "
                f"ROUTER_KAFKA_BOOTSTRAP_SERVERS, ROUTER_KAFKA_SECURITY_PROTOCOL, ROUTER_KAFKA_SASL_* and "
                f"ROUTER_KAFKA_SSL_*")  # fmt: skip
    where = f"Redis at {redact_url(s.redis_url or '')}"
    if isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS"))
    ):
        return (f"{where} refused the login ({_text(exc)}): check ROUTER_REDIS_USERNAME and "
                f"ROUTER_REDIS_PASSWORD (or the URL's user and password)")  # fmt: skip
    if isinstance(exc, NoPermissionError):
        return (f"{where} refused a command to this user ({_text(exc)}): its ACL must allow the commands, "
                f"the keys and channels under ROUTER_REDIS_PREFIX and the audit channel")  # fmt: skip
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ssl.SSLError):
        tls = " and ROUTER_REDIS_SSL_*" if (s.redis_url or "").lower().startswith("rediss://") else ""
        return f"{where} could not be reached ({_text(exc)}): check ROUTER_REDIS_URL{tls}"
    return None


def _text(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_text(text.rstrip("."))


@contextlib.asynccontextmanager
async def runtime(settings: Settings, *, allow_embedded: bool = True) -> AsyncIterator[Runtime]:
    """Connect to the configured Kafka and Redis, or start the embedded stack when they are not given.
    A failure to reach or log in to either, at start or later in the command, ends it with ConnectFailed."""
    stack_cm: contextlib.AbstractContextManager[LocalStack] | None = None
    stack: LocalStack | None = None
    if not settings.external:
        if not allow_embedded:
            raise RuntimeError(
                "set ROUTER_KAFKA_BOOTSTRAP_SERVERS and ROUTER_REDIS_URL: this command talks to a running "
                "deployment and would find nothing in a fresh embedded stack"
            )
        stack_cm = local_stack()
        stack = stack_cm.__enter__()
        update: dict[str, Any] = {
            "kafka_bootstrap_servers": settings.kafka_bootstrap_servers or stack.bootstrap_servers,
            "redis_url": settings.redis_url or stack.redis_url,
        }
        if (
            not settings.kafka_bootstrap_servers
            and "kafka_fetch_max_wait_ms" not in settings.model_fields_set
        ):
            update["kafka_fetch_max_wait_ms"] = EMBEDDED_FETCH_MAX_WAIT_MS
        settings = settings.model_copy(update=update)
        log.info("embedded stack: kafka %s, redis %s", stack.bootstrap_servers, redact_url(stack.redis_url))
    try:
        assert settings.kafka_bootstrap_servers
        assert settings.redis_url
        if stack is not None and settings.kafka_bootstrap_servers == stack.bootstrap_servers:
            await wait_kafka_ready(settings.kafka_bootstrap_servers)
        from router_worker.pipeline.kafka import kafka_options

        kafka_options(settings)  # TLS files and key password checked now, not at the first client
        redis = connect_redis(settings)
        try:
            try:
                await redis.ping()
                yield Runtime(settings, redis, stack)
            except Exception as exc:
                problem = describe_failure(exc, settings)
                if problem is None:
                    raise
                raise ConnectFailed(problem) from None
        finally:
            with contextlib.suppress(Exception):
                await redis.aclose()
    finally:
        if stack_cm is not None:
            stack_cm.__exit__(None, None, None)
