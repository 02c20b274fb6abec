"""A head whose handler fails hands the job back through the retry tiers; attempts are counted and capped."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.settings import Settings
from router_worker.topics import Topics
from schemas.envelope import Job
from tests.helpers import make_router, read_topic, running, wait_until

pytestmark = pytest.mark.integration


async def test_a_failed_job_is_retried_and_succeeds_on_a_later_attempt(
    settings: Settings, redis: Redis
) -> None:
    attempts: dict[str, list[int]] = {}

    async def flaky(job: Job, ctx: JobContext) -> Any:
        attempts.setdefault(job.job_id, []).append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("GPU fell over")
        return "ok"

    worker = ModelWorker(settings, redis, WorkerConfig("m", head_id="h"), flaky)
    router = make_router(settings, redis)
    async with running(worker, router):
        async with JobProducer(settings) as p:
            for i in range(20):
                await p.submit("m", i, job_id=f"j{i}")
        await wait_until(
            lambda: len(attempts) == 20 and all(len(a) == 2 for a in attempts.values()), timeout=30
        )
    assert all(a == [1, 2] for a in attempts.values()), attempts
    assert router.stats.routed == 40, "each job routed twice: first try, then from the retry tier"
    assert router.stats.dead_lettered == 0


async def test_a_job_that_always_fails_is_dead_lettered_after_max_attempts(
    settings: Settings, redis: Redis
) -> None:
    s = settings.model_copy(update={"max_attempts": 3})
    seen: list[int] = []

    async def broken(job: Job, ctx: JobContext) -> Any:
        seen.append(ctx.attempt)
        raise ValueError("bad input for this model")

    worker = ModelWorker(s, redis, WorkerConfig("m", head_id="h"), broken)
    router = make_router(s, redis)
    async with running(worker, router):
        async with JobProducer(s) as p:
            await p.submit("m", "x", job_id="doomed")
        dead = await read_topic(s, Topics.from_settings(s).dlq, expect=1, timeout=30)
    assert seen == [1, 2, 3]
    assert len(dead) == 1
    h = dict(dead[0].headers)
    assert h["x-dlq-reason"] == b"max_attempts"
    assert h["x-route-attempt"] == b"4"
    assert h["x-original-topic"].startswith(s.topic_prefix.encode() + b"model.")
