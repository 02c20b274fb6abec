"""The imperative shell's wiring: settings -> (embedded stack if needed) -> clients, all passed explicitly."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.localstack import LocalStack, local_stack, wait_kafka_ready
from router_worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    redis: Redis
    stack: LocalStack | None

    def audit(self, with_file: bool = True) -> AuditSink:
        return AuditSink.from_settings(self.redis, self.settings, with_file)


def make_redis(url: str, timeout_s: float | None = 5.0) -> Redis:
    """A client whose calls fail after ``timeout_s`` instead of hanging on a Redis that stopped answering
    (a paused or partitioned server): the router's outage handling needs an answer, even a failure."""
    return Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_keepalive=True,
                          socket_timeout=timeout_s, socket_connect_timeout=timeout_s)  # fmt: skip


@contextlib.asynccontextmanager
async def runtime(settings: Settings, *, allow_embedded: bool = True) -> AsyncIterator[Runtime]:
    """Connect to the configured Kafka and Redis, or start the embedded stack when they are not given."""
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
        settings = settings.model_copy(
            update={
                "kafka_bootstrap_servers": settings.kafka_bootstrap_servers or stack.bootstrap_servers,
                "redis_url": settings.redis_url or stack.redis_url,
            }
        )
        log.info("embedded stack: kafka %s, redis %s", stack.bootstrap_servers, stack.redis_url)
    try:
        assert settings.kafka_bootstrap_servers
        assert settings.redis_url
        if stack is not None:
            await wait_kafka_ready(settings.kafka_bootstrap_servers)
        redis = make_redis(settings.redis_url, settings.redis_timeout_s)
        try:
            await redis.ping()
            yield Runtime(settings, redis, stack)
        finally:
            await redis.aclose()
    finally:
        if stack_cm is not None:
            stack_cm.__exit__(None, None, None)
