"""Review of the performance changes on the real stack: producer batches on the real broker (several per
partition in one round, a producer stopped mid-round) and the audit channel's one-argument publishing script
on the real Redis (records with line breaks of every kind in their text)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka.errors import ProducerClosed
from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.pipeline.kafka import ensure_topics, make_producer
from router_worker.pipeline.publish import RetryBudget, Send, publish
from router_worker.settings import Settings
from tests.helpers import read_topic

pytestmark = pytest.mark.integration


async def test_several_producer_batches_per_partition_in_one_round_arrive_once_and_in_order(
    settings: Settings,
) -> None:
    """900 records of 3 KB over three partitions: about 900 KB a partition, so each partition's records need
    several producer batches (256 KB each) in one round, and each ``send_batch`` after the first waits for the
    one before to drain. Every record is acknowledged once and lands once, in order, in its partition."""
    topic = f"{settings.topic_prefix}multibatch"
    await ensure_topics(settings, [(topic, 3)])
    producer = make_producer(settings)
    await producer.start()
    try:
        sends = [Send(topic, b"%05d." % i + b"x" * 3000, b"k%d" % i, i % 3, [("x-route-head", b"h")])
                 for i in range(900)]  # fmt: skip
        report = await publish(producer, sends, RetryBudget(attempts=3, max_s=20))
    finally:
        await producer.stop()
    assert report.fatal == []
    assert report.unsent == []
    assert len(report.acked) == 900
    got = await read_topic(settings, topic, expect=900, timeout=30)
    assert len(got) == 900
    for p in range(3):
        seq = [int(r.value[:5]) for r in sorted(got, key=lambda r: r.offset) if r.partition == p]
        assert seq == list(range(p, 900, 3)), f"partition {p}: out of order, lost or doubled"


async def test_a_producer_stopped_mid_round_leaves_records_unsent_never_dead_lettered(
    settings: Settings,
) -> None:
    """The producer stops (a router shutting down) while a round is enqueuing its batches: every record is
    acknowledged or unsent (read again by the next owner), none is fatal (a dead letter), publish returns, and
    what was acknowledged is in the topic exactly once."""
    topic = f"{settings.topic_prefix}stopped"
    await ensure_topics(settings, [(topic, 4)])
    producer = make_producer(settings)
    await producer.start()
    sends = [Send(topic, b"%05d." % i + b"y" * 4000, None, i % 4, []) for i in range(1200)]
    sends += [Send(topic, b"free-%d" % i, b"f%d" % i, None, []) for i in range(50)]

    async def stop_soon() -> None:
        await asyncio.sleep(0)  # once the round has begun
        await producer.stop()

    stopper = asyncio.create_task(stop_soon())
    report = await asyncio.wait_for(publish(producer, sends, RetryBudget(attempts=3, max_s=10)), 60)
    await stopper
    assert report.fatal == [], [(s.value[:8] if s.value else None, s.error) for s in report.fatal[:5]]
    assert len(report.acked) + len(report.unsent) == len(sends)
    assert all(isinstance(s.error, ProducerClosed) for s in report.unsent), Counter(
        type(s.error).__name__ for s in report.unsent
    )
    acked = Counter(s.value for s in report.acked)
    if acked:
        got = await read_topic(settings, topic, expect=len(acked), timeout=20)
        assert Counter(r.value for r in got) == acked


async def test_audit_records_with_line_breaks_in_their_text_reach_the_channel_whole(
    settings: Settings, redis: Redis
) -> None:
    """The channel script splits one argument at newlines: a record whose text holds a newline, a carriage
    return, a NUL, a Unicode line separator, an empty string or a lone backslash-n must still arrive as one
    message, equal to what was written, and as many messages as records."""
    sink = AuditSink(redis, f"{settings.redis_prefix}:audit-ch", None)
    texts = ["a\nb", "\r\n", "\n", "", "x\x00y", "line\u2028sep\u2029para", "\\n", "ünïcødé ☃", "\n\n\n"]
    # 1,350 records: more than one 1,000-record chunk of the script
    records: list[dict[str, Any]] = [
        {"ts": i, "event": "route", "router_id": "r", "reason": t, "job_id": f"j{i}"}
        for i, t in enumerate(texts * 150)
    ]
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(sink.channel)
    got: list[bytes] = []
    try:
        await sink.emit_many(records)
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < len(records) and asyncio.get_running_loop().time() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is not None:
                got.append(msg["data"])
        await asyncio.sleep(0.2)
        while (msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)) is not None:
            got.append(msg["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert sink.failures == 0
    assert len(got) == len(records)
    assert [orjson.loads(g) for g in got] == records
