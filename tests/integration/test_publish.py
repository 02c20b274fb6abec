"""Every publish result is classified per record, on the real broker: acknowledged, fatal, or unsent."""

from __future__ import annotations

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from router_worker.pipeline.kafka import ensure_topics, make_producer
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
