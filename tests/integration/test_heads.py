"""Heads in Redis: registration, heartbeats with a TTL, listing, partition ownership, drain and removal."""

from __future__ import annotations

import asyncio
import random

import pytest
from redis.asyncio import Redis

from router_worker.clock import now_ms
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import HeadStatus, Outcome, RouterMemory
from router_worker.core.policy import DEFAULT_POLICY
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry, HeadStats
from router_worker.state.keys import Keys
from schemas.envelope import Job

pytestmark = pytest.mark.integration


def _registry(s: Settings, redis: Redis, ttl_ms: int = 400) -> HeadRegistry:
    return HeadRegistry(redis, Keys(s.redis_prefix), ttl_ms)


async def _route(reg: HeadRegistry, model: str) -> str | None:
    heads, profiles, inflight = await reg.snapshot()
    d = decide(Job(job_id="j", model_type=model), HeadIndex.build(heads, profiles), DEFAULT_POLICY,
               RouterMemory(pending=inflight), now_ms(), random.Random(0))  # fmt: skip
    return d.head.head_id if d.outcome is Outcome.ROUTED and d.head else None


async def test_register_list_and_heartbeat_keeps_a_head_a_candidate(settings: Settings, redis: Redis) -> None:
    reg = _registry(settings, redis)
    await reg.register(HeadRecord("h1", "m", "eu", capacity=4, partition=3, backend="gpu",
                                  quantizations=("int8",), families=("chat",)))  # fmt: skip
    heads, _, inflight = await reg.snapshot()
    assert [h.head_id for h in heads] == ["h1"]
    h = heads[0]
    assert (h.model_id, h.region, h.capacity, h.partition, h.backend) == ("m", "eu", 4, 3, "gpu")
    assert h.quantizations == frozenset({"INT8"})
    assert h.families == frozenset({"chat"})
    assert inflight == {"h1": 0}
    assert await _route(reg, "m") == "h1"
    assert await _route(reg, "chat") == "h1", "a head answers to its families"
    for _ in range(4):  # heartbeats keep it alive past several TTLs
        await asyncio.sleep(0.2)
        assert await reg.heartbeat("h1", HeadStats(inflight=1, latency_ms=12.5))
    assert await _route(reg, "m") == "h1"
    heads, _, _ = await reg.snapshot()
    assert heads[0].latency_ms == 12.5


async def test_a_head_whose_heartbeat_lapses_is_no_longer_a_candidate(
    settings: Settings, redis: Redis
) -> None:
    reg = _registry(settings, redis, ttl_ms=300)
    await reg.register(HeadRecord("h1", "m"))
    await reg.register(HeadRecord("h2", "m"))
    await asyncio.sleep(0.45)
    assert await reg.heartbeat("h2", HeadStats())
    for _ in range(20):
        assert await _route(reg, "m") == "h2", "only the heartbeating head is picked"
    await asyncio.sleep(0.45)
    assert await _route(reg, "m") is None, "no head heartbeats: no candidate"


async def test_drain_and_remove(settings: Settings, redis: Redis) -> None:
    reg = _registry(settings, redis, ttl_ms=5_000)
    await reg.register(HeadRecord("h1", "m"))
    await reg.register(HeadRecord("h2", "m"))
    assert await reg.set_status("h1", HeadStatus.DRAINING, "test")
    for _ in range(20):
        assert await _route(reg, "m") == "h2"
    assert await reg.remove("h2", "test")
    assert await _route(reg, "m") is None
    assert not await reg.heartbeat("h2", HeadStats()), "a removed head learns it on its next heartbeat"
    assert [h.head_id for h in (await reg.snapshot())[0]] == ["h1"]
    assert not await reg.remove("nope")


async def test_partitions_are_owned_by_one_live_head_each(settings: Settings, redis: Redis) -> None:
    reg = _registry(settings, redis, ttl_ms=300)
    got = [await reg.claim_partition(f"h{i}", "topic", 3, None) for i in range(3)]
    assert sorted(got) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="all 3 partitions"):
        await reg.claim_partition("h9", "topic", 3, None)
    assert await reg.claim_partition("h1", "topic", 3, got[1]) == got[1], "re-claiming your own is fine"
    await asyncio.sleep(0.4)  # owners stopped heartbeating: their partitions free up
    assert await reg.claim_partition("h9", "topic", 3, 2) == 2


async def test_events_announce_changes(settings: Settings, redis: Redis) -> None:
    reg = _registry(settings, redis)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(reg.keys.events)
    await reg.register(HeadRecord("h1", "m"))
    await reg.set_status("h1", HeadStatus.DEGRADED)
    await reg.remove("h1")
    events = []
    for _ in range(50):
        msg = await pubsub.get_message(timeout=0.1)
        if msg:
            events.append(msg["data"])
        if len(events) == 3:
            break
    await pubsub.aclose()
    assert [e.split('"event":"')[1].split('"')[0] for e in events] == ["head_registered", "head_status",
                                                                       "head_removed"]  # fmt: skip
