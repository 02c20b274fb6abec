"""Heads in Redis: registration, heartbeats with a TTL, listing, partition ownership, drain and removal."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest
from redis.asyncio import Redis

from router_worker.clock import now_ms
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import HeadStatus, Outcome, RouterMemory
from router_worker.core.policy import DEFAULT_POLICY
from router_worker.pipeline.kafka import ensure_topics
from router_worker.pipeline.topology import topic_partitions
from router_worker.settings import Settings
from router_worker.state.heads import (
    HeadRecord,
    HeadRegistry,
    HeadStats,
    HeartbeatResult,
    PartitionOutOfRange,
)
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from schemas.envelope import Job
from tests.helpers import cli_env

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


def _model_topic(s: Settings, model: str) -> str:
    return Topics.from_settings(s).model(model)


async def _cli(
    s: Settings, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process of this test's deployment, with its ROUTER_MODEL_PARTITIONS."""
    env = cli_env(s, ROUTER_MODEL_PARTITIONS=str(s.model_partitions))
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "router_worker.cli", *args], env=env,
                                   capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


async def test_register_refuses_a_partition_the_model_topic_can_not_have(
    settings: Settings, redis: Redis
) -> None:
    reg = _registry(settings, redis)
    # No topic yet: it will be created with ROUTER_MODEL_PARTITIONS (8 here).
    proc = await _cli(
        settings, "heads", "register", "ghost", "--model", "m1", "--partition", "999", check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "partition 999 out of range" in lines[0]
    assert "8 partitions" in lines[0]
    assert "not registered" in lines[0]
    assert (await reg.snapshot())[0] == [], "nothing registered"
    assert await _model_topic_partitions(settings, "m1") is None, "the check creates no topic"

    # A topic created earlier with fewer partitions than ROUTER_MODEL_PARTITIONS: its real count is the bound.
    await ensure_topics(settings, [(_model_topic(settings, "m2"), 2)])
    proc = await _cli(settings, "heads", "register", "h5", "--model", "m2", "--partition", "5", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"partition 5 out of range: {_model_topic(settings, 'm2')} has 2 partitions" in proc.stderr
    assert (await reg.snapshot())[0] == []
    await _cli(settings, "heads", "register", "h1", "--model", "m2", "--partition", "1")
    assert [(h.head_id, h.partition) for h in (await reg.snapshot())[0]] == [("h1", 1)]


async def _model_topic_partitions(s: Settings, model: str) -> int | None:
    return await topic_partitions(s, _model_topic(s, model))


async def test_worker_refuses_a_partition_the_model_topic_can_not_have(
    settings: Settings, redis: Redis
) -> None:
    # Must exit by itself, before starting anything.
    proc = await _cli(settings, "worker", "--model", "m1", "--partition", "999", check=False, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "partition 999 out of range" in proc.stderr
    assert (await _registry(settings, redis).snapshot())[0] == [], "no head started"


async def test_heads_ls_shows_whether_each_head_can_be_addressed(settings: Settings, redis: Redis) -> None:
    reg = _registry(settings, redis, ttl_ms=60_000)
    await reg.register(HeadRecord("ghost", "m1", partition=999))  # bypassing the CLI's check
    await reg.register(HeadRecord("good", "m1", partition=3))
    proc = await _cli(settings, "heads", "ls", "--json")
    rows = {r["head_id"]: r for r in json.loads(proc.stdout)}
    reason = f"partition 999 out of range: {_model_topic(settings, 'm1')} has 8 partitions"
    assert (rows["ghost"]["valid"], rows["ghost"]["invalid_reason"]) == (False, reason)
    assert (rows["good"]["valid"], rows["good"]["invalid_reason"]) == (True, None)
    proc = await _cli(settings, "heads", "ls")
    lines = proc.stdout.splitlines()
    assert "valid" in next(ln for ln in lines if "head" in ln and "model" in ln), "a validity column"
    ghost_line = next(ln for ln in lines if "ghost" in ln)
    assert "partition 999 out of range" in ghost_line
    assert "valid" in next(ln for ln in lines if "good" in ln)


async def test_a_heartbeat_never_overwrites_a_slot_another_head_took(
    settings: Settings, redis: Redis
) -> None:
    reg = _registry(settings, redis, ttl_ms=5_000)
    slot_key = reg.keys.slot("topic", 1)
    await reg.register(HeadRecord("A", "m", partition=1), slot_topic="topic")
    assert await reg.claim_partition("A", "topic", 3, 1) == 1
    await redis.delete(slot_key)  # A missed its renewal window: its slot lapsed
    await reg.register(HeadRecord("B", "m", partition=1), slot_topic="topic")
    assert await reg.claim_partition("B", "topic", 3, 1) == 1, "the free slot goes to B"
    before = await redis.hget(reg.keys.head("A"), "expires_at")

    result = await reg.heartbeat("A", HeadStats(inflight=3), ("topic", 1))
    assert result is HeartbeatResult.SLOT_LOST
    assert not result, "falsy: a caller that only checks truth stops too"
    assert await redis.get(slot_key) == "B", "B's slot is untouched"
    assert await redis.hget(reg.keys.head("A"), "expires_at") == before, "A's deadline is not extended"
    assert await reg.heartbeat("B", HeadStats(), ("topic", 1)) is HeartbeatResult.OK
    assert await redis.pttl(slot_key) > 4_000

    # A stops and deregisters: B keeps its slot.
    assert await reg.remove("A")
    assert await redis.get(slot_key) == "B"
    assert await reg.remove("B")
    assert await redis.get(slot_key) is None, "an owner's removal frees its slot"


async def test_a_lapsed_slot_nobody_took_is_taken_back_by_its_heartbeat(
    settings: Settings, redis: Redis
) -> None:
    reg = _registry(settings, redis, ttl_ms=300)
    slot_key = reg.keys.slot("topic", 2)
    await reg.register(HeadRecord("A", "m", partition=2), slot_topic="topic")
    assert await reg.claim_partition("A", "topic", 3, 2) == 2
    await asyncio.sleep(0.4)
    assert await redis.get(slot_key) is None, "lapsed"
    assert await reg.heartbeat("A", HeadStats(), ("topic", 2)) is HeartbeatResult.OK
    assert await redis.get(slot_key) == "A"
    assert 0 < await redis.pttl(slot_key) <= 300
    await redis.set(reg.keys.slot("topic", 0), "X")
    await redis.set(reg.keys.slot("topic", 1), "Y")
    with pytest.raises(RuntimeError, match="all 3 partitions"):
        await reg.claim_partition("B", "topic", 3, 2)  # slot 2 is A's again: B does not get it
    assert await reg.heartbeat("gone", HeadStats(), ("topic", 5)) is HeartbeatResult.REMOVED
    assert await redis.get(reg.keys.slot("topic", 5)) is None, "a removed head takes no slot"


async def test_claim_partition_is_bounded_by_the_real_partition_count(
    settings: Settings, redis: Redis
) -> None:
    reg = _registry(settings, redis, ttl_ms=5_000)
    with pytest.raises(PartitionOutOfRange, match="partition 5 out of range: topic has 2 partitions"):
        await reg.claim_partition("h1", "topic", 8, 5, valid_partitions=2)
    with pytest.raises(PartitionOutOfRange):
        await reg.claim_partition("h1", "topic", 8, -1)
    got = [await reg.claim_partition(f"h{i}", "topic", 8, None, valid_partitions=2) for i in range(2)]
    assert sorted(got) == [0, 1]
    with pytest.raises(RuntimeError, match="all 2 partitions"):
        await reg.claim_partition("h9", "topic", 8, None, valid_partitions=2)
    assert await redis.get(reg.keys.slot("topic", 2)) is None, "nothing claimed past the real count"
