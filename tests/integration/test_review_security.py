"""Review of issue 10 (security): the process harness (routers, heads, the ledger, committed offsets, the group
probe) joins a deployment with its login and TLS, as every other client does; before, it built plain
aiokafka and Redis clients that ignored ROUTER_KAFKA_SASL_*/SSL_* and ROUTER_REDIS_USERNAME/PASSWORD."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from router_worker.harness.ledger import Ledger
from router_worker.harness.procs import Procs
from router_worker.settings import Settings, load_settings
from tests.integration import test_security
from tests.integration.test_security import DEFAULT_PASSWORD, SVC_PASSWORD
from tests.procs import committed_offsets

pytestmark = pytest.mark.integration

acl_redis = test_security.acl_redis  # the fixture: Valkey with requirepass and an ACL user


def _with(settings: Settings, **changes: object) -> Settings:
    return load_settings(**(settings.model_dump() | changes))


async def test_harness_redis_client_logs_in_with_the_deployments_user(
    settings: Settings, acl_redis: str, tmp_path: Path
) -> None:
    s = _with(settings, redis_url=acl_redis, redis_username="svc", redis_password=SVC_PASSWORD)
    async with Procs(s, tmp_path, quiet=True) as procs:
        assert await procs.redis.ping()
        assert await procs.redis.acl_whoami() == "svc"


async def test_harness_redis_client_with_requirepass_only(
    settings: Settings, acl_redis: str, tmp_path: Path
) -> None:
    s = _with(settings, redis_url=acl_redis, redis_password=DEFAULT_PASSWORD)
    async with Procs(s, tmp_path, quiet=True) as procs:
        assert await procs.redis.acl_whoami() == "default"


async def test_harness_kafka_clients_ask_for_the_deployments_sasl_login(
    settings: Settings, tmp_path: Path
) -> None:
    """The embedded broker speaks no SASL: a harness client that asks for it fails at once (it used to
    connect in plaintext, whatever the settings said)."""
    s = _with(settings, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
              kafka_sasl_username="svc", kafka_sasl_password="kafka-pass-review",
              kafka_request_timeout_ms=3000)  # fmt: skip
    async with Procs(s, tmp_path, quiet=True) as procs:
        for name, make in (
            ("ledger", lambda: Ledger(s).start(within_s=5)),
            ("committed_offsets", lambda: committed_offsets(s, [TopicPartition(f"{s.topic_prefix}x", 0)])),
            ("group_state", procs.group_state),
        ):
            t0 = time.monotonic()
            with pytest.raises(KafkaConnectionError):
                await asyncio.wait_for(make(), 30)
            assert time.monotonic() - t0 < 20, name
        assert procs._admin is None  # a failed start leaves no half-made client behind
