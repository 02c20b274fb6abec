"""Session fixtures: one real broker and one real Redis for the whole run; each test isolates itself by a
topic prefix, a Redis key prefix and a consumer group of its own."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router_worker.localstack import LocalStack, local_stack, wait_kafka_ready
from router_worker.runtime import connect_redis
from router_worker.settings import Settings, load_settings


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    kafka = os.environ.get("ROUTER_KAFKA_BOOTSTRAP_SERVERS")
    redis = os.environ.get("ROUTER_REDIS_URL")
    if kafka and redis:  # an external deployment: use it, start nothing
        yield LocalStack(kafka, redis, Path("."))
        return
    with local_stack() as st:
        asyncio.run(wait_kafka_ready(st.bootstrap_servers))
        yield st


@pytest.fixture
def settings(stack: LocalStack, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return load_settings(
        kafka_bootstrap_servers=stack.bootstrap_servers,
        redis_url=stack.redis_url,
        topic_prefix=f"t{tag}.",
        redis_prefix=f"t{tag}",
        group_id=f"router-{tag}",
        audit_file=str(tmp_path / "audit.log"),
        head_ttl_ms=2_000,
        head_heartbeat_ms=200,
        head_refresh_ms=200,
        kafka_session_timeout_ms=6_000,
        kafka_heartbeat_interval_ms=500,
        retry_backoff_ms=[100, 200, 400],
        requests_partitions=6,
        model_partitions=8,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[object]:
    assert settings.redis_url
    client = connect_redis(
        settings
    )  # the deployment's login and TLS, where the suite runs against a real one
    yield client
    await client.aclose()
