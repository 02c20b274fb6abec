"""Adversarial review of the router's hot path (loop, holds, rewinds, commits, rebalances, the Redis-outage
pause): lost jobs, duplicates, crashes and stalls, each shown against the real broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import orjson
import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.clock import now_ms
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until
from tests.procs import RedisServer, committed_offsets, wait_committed

pytestmark = pytest.mark.integration


async def test_jobs_fetched_during_a_redis_outage_pause_after_a_rebalance_are_routed_when_redis_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    """Past the staleness window ``_outage_hold`` pauses every assigned partition and polls only to keep the
    group membership alive. A rebalance during the outage (another member joins the group) gives the router a
    fresh assignment, which aiokafka starts unpaused: the keep-alive poll used to fetch the waiting jobs and throw
    them away, leaving the consumer's position past them, and when Redis was back they waited until a later
    record on the partition let the gap guard see the hole. The fresh assignment is paused too, and what a
    keep-alive poll returns is given back."""
    async with RedisServer(tmp_path / "redis") as server:
        s = settings.model_copy(
            update={
                "redis_url": server.url,
                "redis_staleness_ms": 300,
                "redis_timeout_s": 0.5,
                "head_ttl_ms": 60_000,
                "requests_partitions": 1,
            }
        )
        redis = make_redis(server.url, 0.5)
        other = f"{s.topic_prefix}unrelated"
        await ensure_topics(s, [(other, 1)])
        served = Served()
        router = make_router(s, redis)
        worker = make_worker(s, redis, served, "m", head_id="h")
        try:
            async with running(worker, router), JobProducer(s) as producer:
                await producer.submit("m", 0, job_id="before")
                await producer.flush()
                await wait_until(lambda: served.job_ids() == ["before"], timeout=20)

                await server.stop()
                await wait_until(lambda: not router.is_ready(), timeout=20)
                ids = [f"during-{i}" for i in range(5)]
                for i, job_id in enumerate(ids):
                    await producer.submit("m", i, job_id=job_id)
                await producer.flush()
                await asyncio.sleep(0.5)

                # Another member joins the group (on a topic of its own) and leaves: two rebalances a time. The
                # router is given its partitions afresh (unpaused by aiokafka) while its outage loop polls.
                for _ in range(2):
                    member = make_consumer(s, other, group_id=s.group_id)
                    await member.start()
                    try:
                        for _ in range(40):
                            await member.getmany(timeout_ms=100)
                            if member.assignment():
                                break
                        await asyncio.sleep(1.0)
                    finally:
                        await member.stop()
                    await asyncio.sleep(1.5)
                assert router._outage_paused, "the rebalances happened during the outage pause"
                assert not set(ids) & set(served.job_ids()), "nothing is routed while Redis is down"

                await server.start()
                await wait_until(router.is_ready, timeout=20)
                with contextlib.suppress(
                    AssertionError
                ):  # nothing more is produced: they must go by themselves
                    await wait_until(lambda: set(ids) <= set(served.job_ids()), timeout=10)
                stalled = sorted(set(ids) - set(served.job_ids()))
                # Not lost: a later record on the partition lets the gap guard see the hole and read them again.
                await producer.submit("m", 9, job_id="after")
                await producer.flush()
                await wait_until(lambda: {*ids, "after"} <= set(served.job_ids()), timeout=20)
                assert not stalled, f"jobs stalled until another job came to their partition: {stalled}"
        finally:
            await redis.aclose()


async def _send_retry(s: Settings, topic: str, job_id: str, not_before: int) -> None:
    producer = make_producer(s)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, orjson.dumps({"job_id": job_id, "model_type": "m"}), partition=0,
            headers=[("content-type", b"application/json"), ("x-route-attempt", b"1"),
                     ("x-retry-not-before", str(not_before).encode())],
        )  # fmt: skip
    finally:
        await producer.stop()


async def test_a_rebalance_and_a_stop_during_a_not_due_hold_neither_skip_nor_stall_the_held_job(
    settings: Settings, redis: Redis
) -> None:
    """A retry tier's partition holds a routed record and then one not due for seconds: the batch mixes a route
    and a hold. A rebalance while it holds drops the hold (the partition comes back unpaused, read from the
    committed offset): the record is held again, not routed early and not skipped, and the request partition
    is not left paused. Meanwhile the tier is committed up to the held record, never past it; the job goes once,
    when due, and stopping commits past it."""
    s = settings.model_copy(update={"requests_partitions": 1, "retry_backoff_ms": [100, 200, 20_000]})
    served = Served()
    worker = make_worker(s, redis, served, "m", head_id="h", capacity=100)
    other = f"{s.topic_prefix}unrelated"
    await ensure_topics(s, [(other, 1)])
    async with running(worker):
        router = make_router(s, redis)
        tier = TopicPartition(router.topics.retry(1), 0)
        requests = TopicPartition(router.topics.requests, 0)
        async with running(router):
            await _send_retry(s, tier.topic, "due", now_ms() - 1)
            due_at = now_ms() + 12_000  # room for two rebalances on a busy two-core machine
            await _send_retry(s, tier.topic, "late", due_at)
            await wait_until(lambda: "due" in served.job_ids() and router.stats.deferred >= 1, timeout=20)
            deferred = router.stats.deferred
            member = make_consumer(s, other, group_id=s.group_id)  # joins, then leaves: two rebalances
            await member.start()
            try:
                for _ in range(60):
                    await member.getmany(timeout_ms=100)
                    if member.assignment():
                        break
                assert member.assignment(), "the other member joined"
            finally:
                await member.stop()
            await wait_until(lambda: router.stats.deferred > deferred, timeout=20)  # read again, held again
            consumer = router._consumer
            assert consumer is not None
            async with JobProducer(s) as producer:
                await producer.submit("m", 1, job_id="fresh")
            await wait_until(lambda: "fresh" in served.job_ids(), timeout=20)
            assert requests not in consumer.paused(), "the request partition is not left paused"
            # Held again once the member's leave has been rebalanced too (mid-rebalance, the old assignment's
            # pause outlives the revoked hold for a moment, and the next assignment starts unpaused).
            await wait_until(lambda: tier in consumer.paused() and tier in router.paused_until, timeout=5)
            assert now_ms() < due_at - 500, "checked while the job is held (else the machine was too slow)"
            assert "late" not in served.job_ids(), "not routed before its time"
            committed = await wait_committed(s, {tier: 1, requests: 1})
            assert now_ms() < due_at, "checked while the job was held"
            assert committed == {tier: 1, requests: 1}, "committed up to the held record, never past it"
            await wait_until(lambda: "late" in served.job_ids(), timeout=20)
            assert now_ms() >= due_at
        assert await committed_offsets(s, [tier]) == {tier: 2}, "stopping commits what was settled"
    assert sorted(served.job_ids()) == ["due", "fresh", "late"], "each job once"
