"""The embedded stack's runtime: its consumers poll the broker every few milliseconds, because the embedded
broker answers a waiting fetch only at the end of its wait (a setting the operator gave is kept)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import TopicPartition

from router_worker.localstack import EMBEDDED_FETCH_MAX_WAIT_MS
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.runtime import runtime
from router_worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration


async def _one_hop_ms(s: Settings, topic: str) -> float:
    """The longest produce-to-arrival time of 10 records sent 50 ms apart (each into an idle partition)."""
    await ensure_topics(s, [(topic, 1)])
    tp = TopicPartition(topic, 0)
    consumer = make_consumer(s, group_id=None)
    consumer.assign([tp])
    producer = make_producer(s, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"warm", partition=0)
        await consumer.getone()
        worst = 0.0
        for _ in range(10):
            await asyncio.sleep(0.05)  # the consumer's fetch is waiting at the broker when the record comes
            t0 = time.perf_counter()
            await producer.send(topic, b"x", partition=0)
            await asyncio.wait_for(consumer.getone(), 10)
            worst = max(worst, (time.perf_counter() - t0) * 1000)
        return worst
    finally:
        await producer.stop()
        await consumer.stop()


async def test_the_embedded_stack_fetches_with_a_short_wait_unless_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "ROUTER_REDIS_URL", "ROUTER_KAFKA_FETCH_MAX_WAIT_MS"):
        monkeypatch.delenv(name, raising=False)
    async with runtime(load_settings()) as rt:
        assert rt.stack is not None
        assert rt.settings.kafka_fetch_max_wait_ms == EMBEDDED_FETCH_MAX_WAIT_MS
        slow = await _one_hop_ms(
            rt.settings.model_copy(update={"kafka_fetch_max_wait_ms": 1000}), "long-wait"
        )
    # What the short wait is for: with a long one, a record that comes while a fetch waits waits with it.
    assert slow > 200, (
        f"the embedded broker answered a waiting fetch early ({slow:.0f} ms): revisit the default"
    )
    monkeypatch.setenv("ROUTER_KAFKA_FETCH_MAX_WAIT_MS", "40")
    async with runtime(load_settings()) as rt:
        assert rt.settings.kafka_fetch_max_wait_ms == 40, "the operator's setting is kept"
