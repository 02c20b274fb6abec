"""One model with no head free must not stall other models' jobs that share its request partition: the job
waits in a retry tier (a wait, not an attempt) instead of holding the partition, and is routed once later."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def test_a_busy_model_does_not_stall_another_models_jobs_behind_it(
    settings: Settings, redis: Redis
) -> None:
    s = settings.model_copy(update={"requests_partitions": 1})  # every job in one partition, in order
    served = Served()
    router = make_router(s, redis)
    slow = make_worker(s, redis, served, "a", head_id="ha", capacity=1, delay_s=3.0)  # busy with one job
    fast = make_worker(s, redis, served, "b", head_id="hb")
    async with running(slow, fast, router), JobProducer(s) as producer:
        await producer.submit("a", 0, job_id="a-0")
        await producer.flush()
        await wait_until(lambda: router.stats.routed >= 1)
        await producer.submit("a", 1, job_id="a-1")  # its model's only head is busy
        for i in range(5):
            await producer.submit("b", i, job_id=f"b-{i}")  # behind it in the same partition
        await producer.flush()
        await wait_until(lambda: len(served.rows) >= 7, timeout=30)
    order = served.job_ids()
    assert sorted(order) == sorted(["a-0", "a-1"] + [f"b-{i}" for i in range(5)]), "each job served once"
    assert all(order.index(f"b-{i}") < order.index("a-0") for i in range(5)), (
        f"model b's jobs went while model a's head was busy with a-0, not after it: {order}"
    )
    assert router.stats.waited_aside >= 1
    a1 = next(r for r in served.rows if r[0] == "a-1")
    assert a1[4].get("x-route-attempt") == b"1", "waiting aside is not an attempt"


async def test_waits_aside_are_counted_by_model_and_reason(settings: Settings, redis: Redis) -> None:
    s = settings.model_copy(update={"requests_partitions": 1})
    served = Served()
    router = make_router(s, redis)
    slow = make_worker(s, redis, served, "a", head_id="ha", capacity=1, delay_s=2.0)
    fast = make_worker(s, redis, served, "b", head_id="hb")
    async with running(slow, fast, router), JobProducer(s) as producer:
        await producer.submit("a", 0, job_id="a-0")
        await producer.flush()
        await wait_until(lambda: router.stats.routed >= 1)
        await producer.submit("a", 1, job_id="a-1")
        await producer.submit("b", 0, job_id="b-0")
        await producer.flush()
        await wait_until(lambda: len(served.rows) >= 3, timeout=30)
    waits = router.metrics.waits_aside.labels("a", "saturated")._value.get()
    assert waits >= 1
    assert router.metrics.waits_aside.labels("b", "saturated")._value.get() == 0
    assert waits == router.stats.waited_aside, "counted once per job sent aside, once acknowledged"
