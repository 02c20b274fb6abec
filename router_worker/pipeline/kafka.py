"""Kafka client factories and topic management: the one place that turns Settings into aiokafka objects."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from router_worker.settings import Settings

log = logging.getLogger(__name__)


def kafka_options(s: Settings) -> dict[str, Any]:
    """The options every aiokafka client gets (producers, consumers, admin clients): address, client id,
    timeouts, and the security settings (SASL login, TLS with CA and client certificate). Every client the
    project creates is built from these, so a deployment that needs a login or TLS gets it everywhere."""
    if not s.kafka_bootstrap_servers:
        raise ValueError("kafka_bootstrap_servers is not set")
    opts: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap_servers,
        "client_id": s.kafka_client_id,
        "request_timeout_ms": s.kafka_request_timeout_ms,
        "security_protocol": s.kafka_security_protocol,
    }
    if s.kafka_sasl_mechanism:
        password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None
        opts.update(  # aiokafka takes the SCRAM login under the same two names as PLAIN's
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=password,
        )
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = kafka_ssl_context(s)
    return opts


_common = kafka_options  # the name older callers import


def kafka_ssl_context(s: Settings) -> ssl.SSLContext:
    """TLS for Kafka: the brokers' certificates checked against ``kafka_ssl_cafile`` (or the system's CAs),
    host names checked unless turned off, and the client certificate presented when one is set."""
    key_password = s.kafka_ssl_key_password.get_secret_value() if s.kafka_ssl_key_password else None
    try:
        ctx: ssl.SSLContext = create_ssl_context(
            cafile=s.kafka_ssl_cafile,
            certfile=s.kafka_ssl_certfile,
            keyfile=s.kafka_ssl_keyfile,
            password=key_password,
        )
    except (ssl.SSLError, OSError) as exc:
        raise KafkaSecurityError(
            f"Kafka TLS files (ROUTER_KAFKA_SSL_*) can not be used: {_ssl_reason(exc)}"
        ) from None
    ctx.check_hostname = s.kafka_ssl_check_hostname
    return ctx


class KafkaSecurityError(RuntimeError):
    """TLS settings whose files can not be loaded (a wrong key password, a file that is no PEM)."""


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} (a wrong key password, or a file that is not PEM)"
    return getattr(exc, "strerror", None) or type(exc).__name__


def make_producer(s: Settings, **overrides: Any) -> AIOKafkaProducer:
    acks: int | str = "all" if s.kafka_acks == "all" else int(s.kafka_acks)
    opts = kafka_options(s) | {
        "acks": acks,
        "linger_ms": s.kafka_linger_ms,
        "enable_idempotence": s.kafka_enable_idempotence,
        "max_request_size": s.kafka_max_message_bytes + 64 * 1024,
        "max_batch_size": 256 * 1024,
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_admin(s: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**(kafka_options(s) | overrides))


def make_consumer(s: Settings, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    partition_bytes = max(1_048_576, s.kafka_max_message_bytes + 64 * 1024)  # the largest job fits one fetch
    opts = kafka_options(s) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": s.kafka_session_timeout_ms,
        "heartbeat_interval_ms": s.kafka_heartbeat_interval_ms,
        "max_poll_interval_ms": s.kafka_max_poll_interval_ms,
        "fetch_max_wait_ms": s.kafka_fetch_max_wait_ms,
        "max_partition_fetch_bytes": partition_bytes,
        "fetch_max_bytes": max(s.kafka_fetch_max_bytes, partition_bytes),
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


async def ensure_topics(s: Settings, topics: Iterable[tuple[str, int]]) -> None:
    """Create the topics that do not exist yet, each with the given partitions. Existing ones are left be
    (growing partitions needs CreatePartitions, which the embedded broker lacks)."""
    wanted = dict(topics)
    if not wanted:
        return
    admin = make_admin(s)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, num_partitions=n, replication_factor=s.kafka_replication_factor)
            for name, n in wanted.items()
            if name not in existing
        ]
        if new:
            # Another process may create one between our list and create: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()
