"""The worker SDK commits only what it completed, nacked or dead-lettered: nothing fetched is ever dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

import consumers.worker as worker_module
from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer, build_job
from router_worker.clock import now_ms
from router_worker.pipeline.kafka import make_consumer, make_producer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from router_worker.state import heads as heads_module
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from schemas.envelope import Job, encode_job
from tests.helpers import Served, make_router, make_worker, read_topic, running, wait_until

pytestmark = pytest.mark.integration


async def route_directly(s: Settings, model: str, partition: int, job_ids: Sequence[str], attempt: int = 1,
                         raw: dict[str, bytes] | None = None) -> None:  # fmt: skip
    """Write jobs to a model topic partition as a router would (routed headers), in one batch. ``raw`` maps a
    job id to bytes written instead of its envelope."""
    topic = Topics.from_settings(s).model(model)
    producer = make_producer(s)
    await producer.start()
    try:
        futures = []
        for job_id in job_ids:
            value = (raw or {}).get(job_id) or encode_job(build_job(model, {"n": job_id}, job_id=job_id))
            headers = [("content-type", b"application/msgpack"), ("x-job-id", job_id.encode()),
                       ("x-route-head", b"test"), ("x-route-strategy", b"test"),
                       ("x-route-attempt", str(attempt).encode()),
                       ("x-route-decided-at", str(now_ms()).encode())]  # fmt: skip
            futures.append(
                await producer.send(topic, value, key=job_id.encode(), partition=partition, headers=headers)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed_offset(s: Settings, model: str, partition: int) -> int | None:
    """The heads' consumer group offset of one model topic partition."""
    consumer = make_consumer(s, group_id=f"{s.group_id}.heads")
    await consumer.start()
    try:
        off = await consumer.committed(TopicPartition(Topics.from_settings(s).model(model), partition))
        return None if off is None else int(off)
    finally:
        await consumer.stop()


async def start(worker: ModelWorker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    assert worker.ready.is_set(), "worker not ready in time"
    return task


async def test_stop_nacks_every_unfinished_job_and_commits_exactly_those(
    settings: Settings, redis: Redis
) -> None:
    s = settings.model_copy(update={"shutdown_timeout_s": 0.5})
    topics = Topics.from_settings(s)
    started: list[str] = []

    async def slow(job: Job, ctx: JobContext) -> Any:
        started.append(job.job_id)
        await asyncio.sleep(5)
        return "too late"

    # capacity 2: two jobs in handlers, four queued, one fetched and waiting for room in the queue
    worker = ModelWorker(s, redis, WorkerConfig("m", head_id="h", capacity=2, partition=0), slow)
    task = await start(worker)
    ids = [f"j{i}" for i in range(7)]
    await route_directly(s, "m", worker.partition, ids)
    await wait_until(lambda: len(started) == 2 and worker.stats.fetched == 7, timeout=20)
    t0 = asyncio.get_running_loop().time()
    worker.stop()
    await asyncio.wait_for(task, 20)
    assert asyncio.get_running_loop().time() - t0 < 4, "shutdown waited for the handlers past its timeout"

    nacked = await read_topic(s, topics.retry(1), expect=8, timeout=5)
    assert len(nacked) == 7, [r.offset for r in nacked]
    by_offset = {}
    for rec in nacked:
        h = dict(rec.headers)
        assert h["x-retry-reason"] == b"head_shutdown: h"
        assert h["x-route-attempt"] == b"1", "the attempt the job was routed as: the router counts the next"
        assert int(h["x-retry-not-before"]) <= now_ms(), "a job given back at shutdown waits for nothing"
        assert h["x-original-topic"] == topics.model("m").encode()
        assert h["x-original-partition"] == str(worker.partition).encode()
        by_offset[int(h["x-original-offset"])] = msgpack.unpackb(rec.value)["job_id"]
    assert by_offset == {i: f"j{i}" for i in range(7)}
    assert await committed_offset(s, "m", worker.partition) == 7, "committed: exactly the nacked jobs"
    assert await read_topic(s, topics.results, expect=1, timeout=1) == [], "no job completed"
    assert worker.stats.nacked == 7
    assert not await redis.exists(Keys(s.redis_prefix).head("h")), "the head deregistered"


async def test_an_undecodable_job_is_dead_lettered_and_committed(settings: Settings, redis: Redis) -> None:
    topics = Topics.from_settings(settings)
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", partition=1)
    garbage = b"\xc1 this is not MessagePack"
    async with running(worker):
        await route_directly(settings, "m", 1, ["bad", "good"], attempt=2, raw={"bad": garbage})
        dead = await read_topic(settings, topics.dlq, expect=1, timeout=20)
        await wait_until(lambda: served.job_ids() == ["good"], timeout=20)
        await wait_until(lambda: worker._tracker.committed == 2, timeout=10)
    assert len(dead) == 1
    h = dict(dead[0].headers)
    assert h["x-dlq-reason"] == b"decode_error"
    assert b"MessagePack" in h["x-dlq-error"]
    assert h["x-original-topic"] == topics.model("m").encode()
    assert h["x-original-partition"] == b"1"
    assert h["x-original-offset"] == b"0"
    assert h["x-route-attempt"] == b"2"
    assert dead[0].value == garbage, "the original bytes, untouched"
    assert await committed_offset(settings, "m", 1) == 2
    assert worker.stats.dead_lettered == 1


async def test_a_failing_handler_is_nacked_with_back_off(settings: Settings, redis: Redis) -> None:
    topics = Topics.from_settings(settings)

    async def broken(job: Job, ctx: JobContext) -> Any:
        raise RuntimeError("GPU fell over")

    worker = ModelWorker(settings, redis, WorkerConfig("m", head_id="h", partition=2), broken)
    async with running(worker):
        before = now_ms()
        await route_directly(settings, "m", 2, ["x"])
        nacked = await read_topic(settings, topics.retry(1), expect=1, timeout=20)
        await wait_until(lambda: worker._tracker.committed == 1, timeout=10)
    assert len(nacked) == 1
    h = dict(nacked[0].headers)
    assert h["x-retry-reason"] == b"head_error: RuntimeError: GPU fell over"
    assert h["x-route-attempt"] == b"1"
    assert int(h["x-retry-not-before"]) >= before + settings.retry_backoff_ms[0]
    assert await read_topic(settings, topics.results, expect=1, timeout=1) == [], "nacked, not completed"


async def test_an_exception_in_the_completion_path_does_not_lose_the_job(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics.from_settings(settings)
    broke: list[str] = []

    async def flaky_publish(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        if sends and sends[0].topic == topics.results and not broke:
            broke.append(sends[0].topic)
            raise RuntimeError("completion path blew up")
        return await real_publish(producer, sends, budget)

    monkeypatch.setattr(worker_module, "publish", flaky_publish)
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h")
    router = make_router(settings, redis)
    async with running(worker, router):
        async with JobProducer(settings) as p:
            await p.submit("m", "hello", job_id="precious")
        done = await read_topic(settings, topics.results, expect=1, timeout=30)
        nacked = await read_topic(settings, topics.retry(1), expect=1, timeout=10)
    assert broke, "the completion publish was made to fail"
    assert served.job_ids() == ["precious", "precious"], "served again after the SDK's failure"
    assert [r[4]["x-route-attempt"] for r in served.rows] == [b"1", b"2"]
    assert len(done) == 1
    assert msgpack.unpackb(done[0].value)["attempt"] == 2
    assert dict(nacked[0].headers)["x-retry-reason"].startswith(b"head_sdk_error: RuntimeError")


@pytest.mark.skipif(
    not hasattr(heads_module, "HeartbeatResult"), reason="heartbeat() does not report SLOT_LOST"
)
async def test_a_head_that_loses_its_slot_stops_at_once_without_nacking_or_committing(
    settings: Settings, redis: Redis
) -> None:
    topics = Topics.from_settings(settings)
    started: list[str] = []

    async def slow(job: Job, ctx: JobContext) -> Any:
        started.append(job.job_id)
        await asyncio.sleep(5)

    worker = ModelWorker(settings, redis, WorkerConfig("m", head_id="h", capacity=2, partition=3), slow)
    task = await start(worker)
    await route_directly(settings, "m", 3, ["a", "b", "c"])
    await wait_until(lambda: len(started) == 2, timeout=20)
    slot = Keys(settings.redis_prefix).slot(topics.model("m"), 3)
    await redis.set(slot, "usurper", px=10_000)  # another head took the partition
    await asyncio.wait_for(task, 5)
    assert await read_topic(settings, topics.retry(1), expect=1, timeout=1) == [], "the new owner serves them"
    assert await committed_offset(settings, "m", 3) is None
    assert await redis.get(slot) == "usurper", "the new owner's slot is untouched"
    assert not await redis.exists(Keys(settings.redis_prefix).head("h"))
