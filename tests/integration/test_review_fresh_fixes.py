"""Adversarial review of two fresh fixes: the Redis-outage keep-alive poll giving back what it fetched
(``Router._unread``) and settings errors naming the ROUTER_ variables of a check across settings
(``settings._problem``)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from producers.producer import JobProducer
from router_worker.pipeline.kafka import make_consumer
from router_worker.runtime import make_redis
from router_worker.settings import Settings, SettingsError, load_settings
from tests.helpers import Served, make_router, make_worker, running, wait_until
from tests.procs import RedisServer


@pytest.mark.integration
async def test_a_keep_alive_poll_that_starts_past_a_not_yet_visible_record_does_not_lose_it(
    settings: Settings, tmp_path: Path
) -> None:
    """During a Redis-outage pause the keep-alive ``getmany`` can return records of a freshly assigned
    partition (aiokafka starts it unpaused; the listener pauses it only after reading its committed offsets).
    Its fetch reads from the committed offset C; on a broker that makes offsets visible out of order (the gap
    guard's reason to exist) that fetch may return C+1.. while C is not visible yet. ``_unread`` seeks to C+1
    and sets the gap guard's expectation to C+1: when C appears it is below the expectation, so the job at C is
    never read again, lost for good (not even a later record reveals it). The poll's result is simulated here
    (the real records C+1.. read by a side consumer), the router, broker and Redis are real."""
    async with RedisServer(tmp_path / "redis") as server:
        s = settings.model_copy(
            update={
                "redis_url": server.url,
                "redis_staleness_ms": 300,
                "redis_timeout_s": 0.5,
                "head_ttl_ms": 60_000,
                "requests_partitions": 1,
            }
        )
        redis = make_redis(server.url, 0.5)
        served = Served()
        router = make_router(s, redis)
        worker = make_worker(s, redis, served, "m", head_id="h")
        tp = TopicPartition(router.topics.requests, 0)
        try:
            async with running(worker, router), JobProducer(s) as producer:
                await producer.submit("m", 0, job_id="before")
                await producer.flush()
                await wait_until(lambda: served.job_ids() == ["before"], timeout=20)

                await server.stop()
                await wait_until(lambda: router._outage_paused, timeout=20)
                ids = [f"during-{i}" for i in range(3)]
                for i, job_id in enumerate(ids):
                    await producer.submit("m", i, job_id=job_id)
                await producer.flush()

                side = make_consumer(s, group_id=None, auto_offset_reset="earliest")
                await side.start()
                try:
                    side.assign([tp])
                    await side.seek_to_beginning(tp)
                    records: list[Any] = []
                    for _ in range(100):
                        got = await side.getmany(timeout_ms=200)
                        records += got.get(tp, [])
                        if len(records) >= 1 + len(ids):
                            break
                finally:
                    await side.stop()
                during = [r for r in records if r.offset > records[0].offset]
                assert len(during) == len(ids), records
                first_during = during[0].offset
                assert router.gaps.expected.get(tp) == first_during, "the guard expects the first waiting job"

                consumer = router._consumer
                assert consumer is not None
                real_getmany = consumer.getmany
                given: list[int] = []

                async def getmany(*args: Any, **kw: Any) -> dict[TopicPartition, list[Any]]:
                    got: dict[TopicPartition, list[Any]] = await real_getmany(*args, **kw)
                    if router._outage_paused and not given:
                        # The broker showed C+1.. before C: the keep-alive poll returns them.
                        given.extend(r.offset for r in during[1:])
                        return {tp: during[1:]}
                    return got

                consumer.getmany = getmany
                await wait_until(lambda: bool(given), timeout=20)
                assert not set(ids) & set(served.job_ids()), "nothing is routed while Redis is down"

                await server.start()
                await wait_until(router.is_ready, timeout=20)
                await producer.submit("m", 9, job_id="after")  # a later record: even the gap guard's cue
                await producer.flush()
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: {*ids, "after"} <= set(served.job_ids()), timeout=15)
                await asyncio.sleep(0)
                lost = sorted(set(ids) - set(served.job_ids()))
                assert not lost, (
                    f"jobs never routed after the keep-alive poll started past them: {lost} "
                    f"(guard expects {router.gaps.expected.get(tp)}, the first waiting job was at {first_during})"
                )
        finally:
            await redis.aclose()


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ({"topic_prefix": "prod/group_id."}, "'prod/group_id.'"),
        (
            {
                "kafka_bootstrap_servers": "kafka:9093",
                "kafka_security_protocol": "SSL",
                "kafka_ssl_cafile": "/nonexistent/certs/kafka_ssl_cafile.pem",
            },
            "/nonexistent/certs/kafka_ssl_cafile.pem",
        ),
    ],
    ids=["topic-prefix", "cafile-path"],
)
def test_a_cross_settings_error_shows_the_values_given_as_they_were_given(
    given: dict[str, str], shown: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check across settings names each ROUTER_ variable it mentions by replacing every field name, as a
    word, anywhere in the message: inside the value the operator gave too. A CA file named after its setting
    is reported as ``/nonexistent/certs/ROUTER_KAFKA_SSL_CAFILE.pem is not a file``, a file that nobody named;
    a topic prefix ``prod/group_id.`` as ``'prod/ROUTER_GROUP_ID.'``."""
    monkeypatch.delenv("ROUTER_CONFIG_FILE", raising=False)
    with pytest.raises(SettingsError) as caught:
        load_settings(**given)
    message = str(caught.value)
    assert message.startswith("invalid settings: ROUTER_"), message
    assert shown in message, message
