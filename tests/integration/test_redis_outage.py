"""A Redis outage longer than the staleness window: the router pauses (no dead letters for an outage), says so
on /readyz, and resumes by itself when Redis is back; writes it could not make are replayed then."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from producers.producer import JobProducer
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from router_worker.topics import Topics
from tests.helpers import Served, make_router, make_worker, read_topic, running, wait_until
from tests.procs import RedisServer

pytestmark = pytest.mark.integration


async def test_past_the_window_the_router_pauses_then_resumes_by_itself(
    settings: Settings, tmp_path: Path
) -> None:
    async with RedisServer(tmp_path / "redis") as server:
        s = settings.model_copy(update={"redis_url": server.url, "redis_staleness_ms": 1_500,
                                        "redis_timeout_s": 1.0, "head_ttl_ms": 60_000})  # fmt: skip
        redis = make_redis(server.url, 1.0)
        listener = make_redis(server.url, None)
        pubsub = listener.pubsub()
        try:
            served = Served()
            router = make_router(s, redis)
            worker = make_worker(s, redis, served, "m", head_id="h")
            async with running(worker, router), JobProducer(s) as producer:
                for i in range(20):
                    await producer.submit("m", i, job_id=f"before-{i}")
                await wait_until(lambda: len(served.rows) >= 20)
                assert router.is_ready()

                await server.stop()
                await wait_until(lambda: not router.is_ready(), timeout=20)
                assert router.stats.outage_pauses == 1
                assert router.metrics.redis_up._value.get() == 0
                for i in range(20):  # published while the router is paused: they wait in Kafka
                    await producer.submit("m", i, job_id=f"during-{i}")
                await producer.flush()
                await asyncio.sleep(1.0)
                during = len([r for r in served.rows if r[0].startswith("during-")])

                await server.start()
                await pubsub.subscribe(s.audit_channel)
                await wait_until(router.is_ready, timeout=20)
                await wait_until(lambda: len(served.rows) >= 40, timeout=30)
                await wait_until(lambda: router.metrics.redis_up._value.get() == 1, timeout=5)
                assert router.metrics.outage_buffered._value.get() == 0, "what waited for Redis was written"
            ids = [r[0] for r in served.rows]
            assert sorted(ids) == sorted(
                [f"before-{i}" for i in range(20)] + [f"during-{i}" for i in range(20)]
            )
            assert during == 0, "nothing is routed while paused past the window"
            dead = await read_topic(s, Topics.from_settings(s).dlq, expect=1, timeout=2)
            assert dead == [], "an outage dead-letters nothing"
            # routing records of the jobs held through the outage reach the channel once Redis answers
            got: list[dict[str, object]] = []
            for _ in range(50):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if msg is not None:
                    got.append(orjson.loads(msg["data"]))
            assert any(
                r.get("job_id", "").startswith("during-") for r in got if isinstance(r.get("job_id"), str)
            )
        finally:
            await pubsub.aclose()
            await listener.aclose()
            await redis.aclose()


async def test_a_redis_that_lost_its_scripts_is_served_again(settings: Settings) -> None:
    """Scripts are queued on pipelines by SHA, loaded once: after a restart or SCRIPT FLUSH, NOSCRIPT reloads
    them, for claims and for in-flight changes alike, and nothing is routed twice or lost."""
    assert settings.redis_url
    redis = make_redis(settings.redis_url)
    try:
        served = Served()
        router = make_router(settings, redis)
        worker = make_worker(settings, redis, served, "m", head_id="h")
        async with running(worker, router), JobProducer(settings) as producer:
            for i in range(10):
                await producer.submit("m", i, job_id=f"a-{i}")
            await wait_until(lambda: len(served.rows) >= 10)
            await redis.script_flush()
            for i in range(10):
                await producer.submit("m", i, job_id=f"b-{i}")
            await wait_until(lambda: len(served.rows) >= 20)
            await asyncio.sleep(0.5)
        assert sorted(r[0] for r in served.rows) == sorted(
            [f"a-{i}" for i in range(10)] + [f"b-{i}" for i in range(10)]
        )
        assert router.marks.errors == 0
        assert router.stats.routed == 20
    finally:
        await redis.aclose()
