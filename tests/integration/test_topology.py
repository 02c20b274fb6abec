"""ModelTopology and topic_partitions against the real broker: counts of model topics from its metadata."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from router_worker.core.model import Head
from router_worker.core.validity import METADATA_UNKNOWN, split_valid
from router_worker.localstack import local_stack, wait_kafka_ready
from router_worker.pipeline.kafka import _common, ensure_topics, make_producer
from router_worker.pipeline.topology import (
    ModelTopology,
    check_head_partition,
    topic_partitions,
    topics_partitions,
)
from router_worker.settings import Settings
from router_worker.topics import Topics

pytestmark = pytest.mark.integration


async def test_counts_are_known_after_ensure_and_a_missing_topic_is_created(settings: Settings) -> None:
    topics = Topics.from_settings(settings)
    small, missing = topics.model("small"), topics.model("meta-llama/Missing-7B")
    await ensure_topics(settings, [(small, 2)])
    assert await topic_partitions(settings, missing) is None, "looking a topic up does not create it"
    producer = make_producer(settings)
    await producer.start()
    try:
        topo = ModelTopology(settings, producer)
        assert topo.partitions(small) is None, "nothing is known before ensure()"
        await topo.ensure([small, missing])
        assert topo.partitions(small) == 2, "an existing topic keeps its own count"
        assert topo.partitions(missing) == settings.model_partitions == 8, "a missing one is created"
        assert await topic_partitions(settings, missing) == 8
        assert topo.known() == {small: 2, missing: 8}

        heads = [Head("a", "small", partition=1), Head("b", "small", partition=5),
                 Head("c", "meta-llama/Missing-7B", partition=7), Head("d", "unseen", partition=0)]  # fmt: skip
        valid, invalid = split_valid(heads, topo.partitions, topics.model)
        assert [h.head_id for h in valid] == ["a", "c"]
        assert [(h.head_id, r) for h, r in invalid] == [
            ("b", f"partition 5 out of range: {small} has 2 partitions"),
            ("d", METADATA_UNKNOWN),
        ]
        # What ModelTopology calls valid, the producer accepts.
        await (await producer.send(missing, b"x", partition=7))
    finally:
        await producer.stop()


async def test_a_grown_topic_is_seen_after_refresh_s(settings: Settings) -> None:
    """The embedded broker can not add partitions, so the topic is deleted and created again, bigger."""
    topic = Topics.from_settings(settings).model("grows")
    await ensure_topics(settings, [(topic, 2)])
    producer = make_producer(settings)
    await producer.start()
    admin = AIOKafkaAdminClient(**_common(settings))
    await admin.start()
    try:
        now = [0.0]
        topo = ModelTopology(settings, producer, refresh_s=30, clock=lambda: now[0])
        await topo.ensure([topic])
        assert topo.partitions(topic) == 2
        await admin.delete_topics([topic])
        await admin.create_topics([NewTopic(topic, num_partitions=5, replication_factor=1)])
        assert await topic_partitions(settings, topic) == 5
        now[0] = 29.0
        await topo.ensure([topic])
        assert topo.partitions(topic) == 2, "not re-fetched before refresh_s"
        now[0] = 31.0
        await topo.ensure([topic])
        assert topo.partitions(topic) == 5, "re-fetched once refresh_s passed"
    finally:
        await admin.close()
        await producer.stop()


async def test_broker_errors_keep_the_last_known_counts_and_never_raise(settings: Settings) -> None:
    with local_stack() as st:  # a broker of this test's own, to stop under the topology
        await wait_kafka_ready(st.bootstrap_servers)
        s = settings.model_copy(update={"kafka_bootstrap_servers": st.bootstrap_servers,
                                        "kafka_request_timeout_ms": 1000})  # fmt: skip
        topic, later = Topics.from_settings(s).model("m"), Topics.from_settings(s).model("later")
        producer = make_producer(s)
        await producer.start()
        topo = ModelTopology(s, producer, refresh_s=0, retry_s=60)
        await topo.ensure([topic])
        assert topo.partitions(topic) == 8
    try:  # the broker is gone
        await asyncio.wait_for(topo.ensure([topic, later]), 20)
        assert topo.partitions(topic) == 8, "the last known count is kept"
        assert topo.partitions(later) is None, "an unreadable topic stays unknown"
        with pytest.raises(Exception):  # noqa: B017, PT011 - the admin client's own error
            await topics_partitions(s, [topic])
        assert await check_head_partition(s, "m", 7) is None, "no broker: bounded by ROUTER_MODEL_PARTITIONS"
        assert "out of range" in (await check_head_partition(s, "m", 8) or "")
    finally:
        await asyncio.wait_for(producer.stop(), 20)


async def test_check_head_partition_messages(settings: Settings) -> None:
    topic = Topics.from_settings(settings).model("two")
    assert await check_head_partition(settings, "two", 7) is None, (
        "a topic to be created has model_partitions"
    )
    msg = await check_head_partition(settings, "two", 8)
    assert msg is not None
    assert "does not exist yet" in msg
    assert "8 partitions" in msg
    await ensure_topics(settings, [(topic, 2)])
    assert await check_head_partition(settings, "two", 1) is None
    assert await check_head_partition(settings, "two", 5) == (
        f"partition 5 out of range: {topic} has 2 partitions (valid: 0..1)"
    )
    assert await check_head_partition(settings, "two", -1) == "partition -1 is negative"
