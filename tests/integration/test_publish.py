"""Every publish result is classified per record, on the real broker: acknowledged, fatal, or unsent."""

from __future__ import annotations

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from router_worker.pipeline.kafka import ensure_topics, make_producer
from router_worker.pipeline.messages import Headers
from router_worker.pipeline.publish import RetryBudget, Send, is_retriable, publish
from router_worker.settings import Settings
from tests.helpers import read_topic

pytestmark = pytest.mark.integration


async def test_one_bad_record_does_not_fail_the_others(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}pub"
    await ensure_topics(settings, [(topic, 2)])
    producer = make_producer(settings)
    await producer.start()
    try:
        sends = [
            Send(topic, b"ok-0", None, 0, []),
            Send(topic, b"bad-partition", None, 99, []),  # the topic has 2: aiokafka asserts
            Send(
                topic, b"x" * (settings.kafka_max_message_bytes + 128 * 1024), None, 1, []
            ),  # over max_request_size
            Send(topic, b"ok-1", None, 1, [("h", None)]),  # a null header value is legal
        ]
        report = await publish(producer, sends, RetryBudget(attempts=2, max_s=5))
    finally:
        await producer.stop()
    assert [s.value for s in report.acked] == [b"ok-0", b"ok-1"]
    assert [s.value[:13] for s in report.fatal if s.value] == [b"bad-partition", b"x" * 13]
    assert isinstance(report.fatal[0].error, AssertionError)
    assert isinstance(report.fatal[1].error, MessageSizeTooLargeError)
    assert report.unsent == []
    assert report.tries == 1, "fatal errors are not retried"
    got = await read_topic(settings, topic, expect=2)
    assert sorted(r.value for r in got) == [b"ok-0", b"ok-1"]


def test_classification_of_errors() -> None:
    from aiokafka.errors import (
        KafkaConnectionError,
        KafkaTimeoutError,
        NotLeaderForPartitionError,
        ProducerClosed,
    )

    for exc in (KafkaTimeoutError(), KafkaConnectionError(), NotLeaderForPartitionError(), ProducerClosed()):
        assert is_retriable(exc), exc
    for exc in (MessageSizeTooLargeError(), AssertionError("Unrecognized partition"), TypeError("bad")):
        assert not is_retriable(exc), exc


async def test_records_for_one_partition_travel_as_batches_in_order(settings: Settings) -> None:
    """Hundreds of records over two partitions (several producer batches each), records without a partition,
    and three records for a partition the topic lacks: every good one acknowledged once, in its partition in
    the order given; each bad one fatal with its own error."""
    topic = f"{settings.topic_prefix}batched"
    await ensure_topics(settings, [(topic, 2)])
    producer = make_producer(settings)
    await producer.start()
    headers: Headers = [("content-type", b"application/msgpack"), ("x-route-head", b"h1")]
    try:
        sends = [Send(topic, b"%d" % i + b"." * 300, b"k%d" % i, i % 2, headers) for i in range(400)]
        sends += [Send(topic, b"bad-%d" % i, None, 7, []) for i in range(3)]
        sends += [Send(topic, b"free-%d" % i, b"f%d" % i, None, []) for i in range(5)]
        report = await publish(producer, sends, RetryBudget(attempts=2, max_s=5))
    finally:
        await producer.stop()
    assert len(report.acked) == 405
    assert report.unsent == []
    assert sorted(s.value or b"" for s in report.fatal) == [b"bad-0", b"bad-1", b"bad-2"]
    assert all(isinstance(s.error, AssertionError) for s in report.fatal)
    got = await read_topic(settings, topic, expect=405)
    assert len(got) == 405
    for p in (0, 1):
        seq = [int(r.value.split(b".")[0]) for r in sorted(got, key=lambda r: r.offset)
               if r.partition == p and not r.value.startswith(b"free")]  # fmt: skip
        assert seq == list(range(p, 400, 2)), f"partition {p} out of order or incomplete"
        assert all(dict(r.headers).get("x-route-head") == b"h1" for r in got if r.partition == p
                   and not r.value.startswith(b"free"))  # fmt: skip
