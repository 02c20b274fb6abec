"""A head whose handler fails hands the job back through the retry tiers; attempts are counted and capped; a
nack the broker never acknowledges is never committed past."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from redis.asyncio import Redis

import consumers.worker as worker_module
from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from router_worker.topics import Topics
from schemas.envelope import Job
from tests.helpers import make_router, read_topic, running, wait_until
from tests.integration.test_worker_sdk import committed_offset, route_directly

pytestmark = pytest.mark.integration


async def test_a_failed_job_is_retried_and_succeeds_on_a_later_attempt(
    settings: Settings, redis: Redis
) -> None:
    """Every job fails once on the only head: its failures may open its breaker (when they are counted before the
    retries arrive), and then the retries wait for the half-open probe (held, no attempt spent) instead of
    running out of attempts; either way each job succeeds on its second attempt."""
    settings = settings.model_copy(update={"breaker_cooldown_s": 1.0})
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


async def test_a_nack_the_broker_never_takes_is_not_committed_past(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry tier is unreachable: the failed job's offset stays uncommitted, through shutdown too, and the
    next head on the partition serves it."""
    topics = Topics.from_settings(settings)

    async def retry_tier_down(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        if sends and sends[0].topic.startswith(topics.retry_prefix):
            for x in sends:
                x.error = KafkaTimeoutError("retry tier unreachable")
            return PublishReport(unsent=list(sends), tries=budget.attempts)
        return await real_publish(producer, sends, budget)

    monkeypatch.setattr(worker_module, "publish", retry_tier_down)
    done: list[str] = []

    async def fails_once(job: Job, ctx: JobContext) -> Any:
        if job.job_id == "j1" and ctx.head_id == "h1":
            raise RuntimeError("GPU fell over")
        done.append(job.job_id)
        return "ok"

    w1 = ModelWorker(settings, redis, WorkerConfig("m", head_id="h1", partition=0), fails_once)
    async with running(w1):
        await route_directly(settings, "m", 0, ["j0", "j1", "j2", "j3"])
        await wait_until(lambda: sorted(done) == ["j0", "j2", "j3"] and w1.stats.unsettled >= 1, timeout=20)
        await wait_until(lambda: w1._tracker.committed == 1, timeout=5)
        await asyncio.sleep(0.5)  # periodic commits keep running: none may pass offset 1
        assert await committed_offset(settings, "m", 0) == 1
    assert await committed_offset(settings, "m", 0) == 1, "the shutdown nack failed too: still not past it"
    assert w1.stats.unsettled >= 2

    monkeypatch.setattr(worker_module, "publish", real_publish)
    done.clear()
    w2 = ModelWorker(settings, redis, WorkerConfig("m", head_id="h2", partition=0), fails_once)
    async with running(w2):
        await wait_until(lambda: "j1" in done, timeout=20)
        await wait_until(lambda: w2._tracker.committed == 4, timeout=10)
    assert sorted(done) == ["j1", "j2", "j3"], "read again from the uncommitted offset (at least once)"
    assert await committed_offset(settings, "m", 0) == 4


async def test_the_refusal_bound_is_the_routers_setting(settings: Settings, redis: Redis) -> None:
    router = make_router(settings.model_copy(update={"max_refusals": 7}), redis)
    assert router._cfg.max_refusals == 7
