"""Kafka client factories and topic management: the one place that turns Settings into aiokafka objects."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from router_worker.settings import Settings

log = logging.getLogger(__name__)


def _common(s: Settings) -> dict[str, Any]:
    if not s.kafka_bootstrap_servers:
        raise ValueError("kafka_bootstrap_servers is not set")
    opts: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap_servers,
        "client_id": s.kafka_client_id,
        "request_timeout_ms": s.kafka_request_timeout_ms,
        "security_protocol": s.kafka_security_protocol,
    }
    if s.kafka_sasl_mechanism:
        opts.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password,
        )
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(cafile=s.kafka_ssl_cafile)
    return opts


def make_producer(s: Settings, **overrides: Any) -> AIOKafkaProducer:
    acks: int | str = "all" if s.kafka_acks == "all" else int(s.kafka_acks)
    opts = _common(s) | {
        "acks": acks,
        "linger_ms": s.kafka_linger_ms,
        "enable_idempotence": s.kafka_enable_idempotence,
        "max_request_size": s.kafka_max_message_bytes + 64 * 1024,
        "max_batch_size": 256 * 1024,
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_consumer(s: Settings, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    opts = _common(s) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": s.kafka_session_timeout_ms,
        "heartbeat_interval_ms": s.kafka_heartbeat_interval_ms,
        "max_poll_interval_ms": s.kafka_max_poll_interval_ms,
        "fetch_max_wait_ms": s.kafka_fetch_max_wait_ms,
        "max_partition_fetch_bytes": max(1_048_576, s.kafka_max_message_bytes + 64 * 1024),
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


async def ensure_topics(s: Settings, topics: Iterable[tuple[str, int]]) -> None:
    """Create the topics that do not exist yet, each with the given partitions. Existing ones are left be
    (growing partitions needs CreatePartitions, which the embedded broker lacks)."""
    wanted = dict(topics)
    if not wanted:
        return
    admin = AIOKafkaAdminClient(**_common(s))
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
