"""One fetch carries at most ``kafka_fetch_max_bytes`` (plus one record batch), on the real broker.

The embedded broker ignores the per-partition limit (``max_partition_fetch_bytes``), so at Kafka's default of
50 MiB one fetch of a backlogged partition carries megabytes; this setting is how an operator bounds it."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, TopicPartition

from router_worker.pipeline.kafka import ensure_topics, make_consumer
from router_worker.settings import Settings

RECORDS = 12_000
VALUE = b"v" * 400
BATCH_BYTES = 16_384


async def _first_fetch_bytes(settings: Settings, topic: str, cap: int) -> int:
    s = settings.model_copy(update={"kafka_fetch_max_bytes": cap})
    consumer = make_consumer(s, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[int] = []
        for _ in range(50):
            batch = await consumer.getmany(tp, timeout_ms=500)
            if batch.get(tp):
                got = [len(r.value) + len(r.key or b"") for r in batch[tp]]
                break
        assert got, "nothing fetched"
        return sum(got)
    finally:
        await consumer.stop()


async def test_one_fetch_carries_at_most_the_configured_bytes(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}fetch-bound"
    await ensure_topics(settings, [(topic, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, max_batch_size=BATCH_BYTES,
                                linger_ms=5, enable_idempotence=False)  # fmt: skip
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, VALUE, partition=0) for _ in range(RECORDS)])
    finally:
        await producer.stop()
    total = RECORDS * len(VALUE)
    small = await _first_fetch_bytes(settings, topic, 262_144)
    large = await _first_fetch_bytes(settings, topic, 8_388_608)
    # The consumer never asks for less than one partition's limit (the largest job must fit one fetch).
    partition_bytes = max(1_048_576, settings.kafka_max_message_bytes + 64 * 1024)
    assert small <= partition_bytes + BATCH_BYTES
    assert small < total
    assert large > small or large == total  # the setting is what bounds it
