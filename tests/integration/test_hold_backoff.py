"""A partition stuck behind a saturated model is read again less and less often (up to
``backpressure_max_ms``), not every ``backpressure_ms``: each resume fetches the partition again."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration

STUCK_S = 2.0


async def test_a_saturated_partition_backs_off_and_its_jobs_still_go_once(
    settings: Settings, redis: Redis
) -> None:
    s = settings.model_copy(
        update={
            "requests_partitions": 1,
            "backpressure_ms": 5,
            "backpressure_max_ms": 100,
            "kafka_fetch_max_wait_ms": 5,  # as the embedded stack runs: a resume is read again at once
        }
    )
    served = Served()
    router = make_router(s, redis)
    busy = make_worker(s, redis, served, "a", head_id="ha", capacity=1, delay_s=STUCK_S + 1.5)
    async with running(busy, router), JobProducer(s) as producer:
        await producer.submit("a", 0, job_id="a-0")
        await producer.flush()
        await wait_until(lambda: router.stats.routed >= 1)
        for i in (1, 2):  # the same model behind a busy head, nothing else behind: the partition is held
            await producer.submit("a", i, job_id=f"a-{i}")
        await producer.flush()
        await wait_until(lambda: router.stats.saturated >= 1)
        before = router.stats.saturated
        await asyncio.sleep(STUCK_S)
        holds = router.stats.saturated - before
        streak = router.hold_times.streak(TopicPartition(router.topics.requests, 0))
        await wait_until(lambda: len(served.rows) >= 3, timeout=30)
    # 5, 10, 20, 40, 80 ms, then every 100 ms: about 24 holds in two seconds (without: one per fetch round trip).
    assert holds <= 5 + STUCK_S / 0.1 * 1.5, f"{holds} saturated holds in {STUCK_S} s"
    assert streak >= 5, "the hold doubled while the partition stayed stuck at the same job"
    assert sorted(served.job_ids()) == ["a-0", "a-1", "a-2"], "each job served once"
