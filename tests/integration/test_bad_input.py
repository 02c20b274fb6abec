"""Malformed jobs never stop the stream: they are logged, dead-lettered with their reason, and committed."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import orjson
import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.pipeline.kafka import make_consumer, make_producer
from router_worker.settings import Settings
from router_worker.topics import Topics
from tests.helpers import Served, make_router, make_worker, read_topic, running, wait_until

pytestmark = pytest.mark.integration

BAD = [
    (b"\xc1\xff not msgpack", None, "decode_error", "not valid MessagePack"),
    (msgpack.packb({"job_id": 7, "model_type": "m"}), None, "schema_error", "job_id: Input should be a valid string"),
    (msgpack.packb({"model_type": "m", "payload": "x"}), None, "schema_error", "job_id: Field required"),
    (msgpack.packb([1, 2, 3]), None, "schema_error", "envelope must be a map"),
    (b"{not json", b"application/json", "decode_error", "not valid JSON"),
    (orjson.dumps({"job_id": "x", "model_type": "m"}), b"text/csv", "decode_error", "unsupported content-type"),
    (msgpack.packb({"job_id": "s", "model_type": "m", "strategy": "fastest"}), None, "schema_error",
     "unknown strategy 'fastest'"),
    (msgpack.packb({"job_id": "old", "model_type": "m", "deadline_ms": 1}), None, "expired", "deadline 1 passed"),
]  # fmt: skip


async def test_malformed_jobs_are_skipped_logged_dead_lettered_and_the_offset_advances(
    settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    topics = Topics.from_settings(settings)
    served = Served()
    router = make_router(settings, redis)
    worker = make_worker(settings, redis, served, "m")
    caplog.set_level(logging.WARNING, logger="router_worker.pipeline.router")
    async with running(worker, router):
        producer = make_producer(settings)
        await producer.start()
        try:
            # All on one partition, interleaved with good jobs: the good ones after the bad still flow.
            async with JobProducer(settings) as good:
                await good.submit("m", "before", job_id="good-0")
                await good.flush()
                for i, (value, ctype, _, _) in enumerate(BAD):
                    headers = [("content-type", ctype)] if ctype else []
                    await producer.send_and_wait(topics.requests, value, partition=0, headers=headers)
                    await producer.send_and_wait(topics.requests, msgpack.packb(
                        {"job_id": f"good-after-{i}", "model_type": "m"}),
                        partition=0)  # fmt: skip
        finally:
            await producer.stop()
        await wait_until(lambda: len(served.rows) >= 1 + len(BAD), timeout=30)
        dead = await read_topic(settings, topics.dlq, expect=len(BAD))
        committed = await _wait_committed(settings, TopicPartition(topics.requests, 0), 2 * len(BAD))

    assert len(dead) == len(BAD)
    by_value = {r.value: dict(r.headers) for r in dead}
    for value, _, reason, detail in BAD:
        h = by_value[value]  # the dead letter carries the original bytes, untouched
        assert h["x-dlq-reason"] == reason.encode()
        assert detail.encode() in h["x-dlq-error"], h["x-dlq-error"]
        assert h["x-original-topic"] == topics.requests.encode()
        assert h["x-original-partition"] == b"0"
        assert int(h["x-original-offset"]) >= 0
        assert h["x-route-attempt"] == b"1"
    # every good job got through, and the offset moved past every bad one
    assert len(served.rows) == 1 + len(BAD)
    assert committed == 2 * len(BAD), "partition 0 holds the bad jobs and the good ones after them"
    logged = [r.getMessage() for r in caplog.records if "bad job" in r.getMessage()]
    assert any("not valid MessagePack" in m for m in logged)
    assert any("job_id: Field required" in m for m in logged)


async def _wait_committed(s: Settings, tp: TopicPartition, expect: int) -> int | None:
    """The group's committed offset of ``tp`` once it reaches ``expect`` (or what it is after 10 s)."""
    consumer = make_consumer(s, group_id=s.group_id)
    await consumer.start()
    try:
        committed = None
        for _ in range(100):
            committed = await consumer.committed(tp)
            if committed == expect:
                break
            await asyncio.sleep(0.1)
        return committed
    finally:
        await consumer.stop()


async def test_a_job_for_a_model_with_no_head_is_retried_then_dead_lettered(settings: Settings, redis: Redis
                                                                            ) -> None:  # fmt: skip
    s = settings.model_copy(update={"max_attempts": 3})
    topics = Topics.from_settings(s)
    router = make_router(s, redis)
    async with running(router):
        async with JobProducer(s) as p:
            await p.submit("nobody-serves-this", "x", job_id="lonely")
        dead = await read_topic(s, topics.dlq, expect=1, timeout=30)
    assert len(dead) == 1
    h = dict(dead[0].headers)
    assert h["x-dlq-reason"] == b"unknown_model"
    assert h["x-route-attempt"] == b"3"
    assert b"after 3 attempts" in h["x-dlq-error"]
    assert h["x-original-topic"] == topics.requests.encode(), "origin survives the retry tiers"
    assert router.stats.retried == 2


async def test_a_head_on_a_partition_its_topic_lacks_is_never_picked(
    settings: Settings, redis: Redis
) -> None:
    """A head registered (by hand, by a stale tool) on partition 999 of an 8-partition topic: routers leave it
    out and say why, instead of dying on aiokafka's 'Unrecognized partition'."""
    from router_worker.state.heads import HeadRecord, HeadRegistry
    from router_worker.state.keys import Keys

    served = Served()
    router = make_router(settings, redis)
    worker = make_worker(settings, redis, served, "m", head_id="real")
    registry = HeadRegistry(redis, Keys(settings.redis_prefix), settings.head_ttl_ms * 100)
    await registry.register(HeadRecord(head_id="ghost", model_id="m", partition=999, capacity=1000))
    async with running(worker, router):
        async with JobProducer(settings) as p:
            for i in range(30):
                await p.submit("m", i, job_id=f"g{i}")
        await wait_until(lambda: len(served.rows) >= 30, timeout=30)
        assert "ghost" in router.invalid_heads
        assert "out of range" in router.invalid_heads["ghost"]
    assert {r[1] for r in served.rows} == {"real"}
    assert router.stats.publish_errors == 0
