"""A head that dies with jobs in flight (kill -9): once its heartbeat lapsed past the grace, a reaper re-routes
every job it left unfinished, exactly once, and removes it. A head that was only paused finds itself removed
and stops without rewinding anything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.clock import now_ms
from router_worker.pipeline.kafka import ensure_topics, make_producer
from router_worker.pipeline.reaper import Reaper
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from tests.helpers import Served, cli_env, make_router, make_worker, read_topic, running, wait_until
from tests.integration.test_worker_sdk import committed_offset, route_directly

pytestmark = pytest.mark.integration


def registry_of(s: Settings, redis: Redis) -> HeadRegistry:
    return HeadRegistry(redis, Keys(s.redis_prefix), s.head_ttl_ms)


@pytest.fixture
async def reaper(settings: Settings, redis: Redis) -> AsyncIterator[Reaper]:
    producer = make_producer(settings)
    await producer.start()
    try:
        yield Reaper(settings, redis, registry_of(settings, redis), producer, "test-router")
    finally:
        await producer.stop()


@pytest.fixture
def head_process(settings: Settings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started head processes, killed at the end whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                os.kill(p.pid, sig)
            p.wait(10)


def spawn_head(s: Settings, procs: list[subprocess.Popen[bytes]], log: Path, head_id: str, partition: int,
               capacity: int = 4) -> subprocess.Popen[bytes]:  # fmt: skip
    env = cli_env(s, ROUTER_HEAD_TTL_MS=str(s.head_ttl_ms), ROUTER_HEAD_HEARTBEAT_MS=str(s.head_heartbeat_ms),
                  ROUTER_MODEL_PARTITIONS=str(s.model_partitions),
                  ROUTER_REQUESTS_PARTITIONS=str(s.requests_partitions), ROUTER_SHUTDOWN_TIMEOUT_S="1")  # fmt: skip
    with log.open("wb") as out:
        args = ["worker", "--model", "m", "--head-id", head_id, "--service-ms", "2000", "--capacity", str(capacity),
                "--partition", str(partition)]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "router_worker.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    procs.append(proc)
    return proc


async def until_registered(
    redis: Redis, s: Settings, head_id: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    key = Keys(s.redis_prefix).head(head_id)
    for _ in range(600):
        if await redis.exists(key):
            return
        assert proc.poll() is None, log.read_text()
        await asyncio.sleep(0.05)
    raise AssertionError(f"head {head_id} never registered: {log.read_text()}")


async def reap_until_gone(
    reaper: Reaper, s: Settings, redis: Redis, head_id: str, timeout: float = 30
) -> int:
    """Call the reaper as a router would (its snapshot, every half second) until the head is gone."""
    registry = registry_of(s, redis)
    total = 0
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        heads, _, _ = await registry.snapshot()
        if head_id not in {h.head_id for h in heads}:
            return total
        total += await reaper.reap(heads, now_ms())
        await asyncio.sleep(0.5)
    raise AssertionError(f"{head_id} was not reaped in {timeout}s")


async def test_jobs_of_a_killed_head_are_rerouted_once_to_a_live_head(
    settings: Settings,
    redis: Redis,
    reaper: Reaper,
    head_process: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    s = settings
    topics = Topics.from_settings(s)
    log = tmp_path / "dead.log"
    # capacity 16: the router's load threshold never holds one of the eight jobs back, all are in its handlers
    dead = spawn_head(s, head_process, log, "dead", partition=0, capacity=16)
    await until_registered(redis, s, "dead", dead, log)
    router = make_router(s, redis)
    served = Served()
    live = make_worker(s, redis, served, "m", head_id="live", partition=5)
    ids = [f"job-{i}" for i in range(8)]
    async with running(router):
        async with JobProducer(s) as p:
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id)
        await wait_until(lambda: router.stats.routed >= len(ids), timeout=30)
        await asyncio.sleep(0.5)  # the head takes them, each for 2 s
        dead.kill()  # kill -9: no nack, no commit, no deregistration
        dead.wait(10)
        async with running(live):
            rerouted = await reap_until_gone(reaper, s, redis, "dead")
            await wait_until(lambda: set(served.job_ids()) == set(ids), timeout=30)
            await asyncio.sleep(1.5)  # any duplicate would arrive by now
    # The router reaps too (its own loop); between the two reapers the slot lock lets exactly one re-route.
    by_router = router.reaper.stats.jobs_rerouted if router.reaper is not None else 0
    assert rerouted + by_router == len(ids), "every job the dead head held, none completed, re-routed once"
    assert Counter(served.job_ids()) == Counter(ids), "each served exactly once"
    assert {r[1] for r in served.rows} == {"live"}
    assert {r[4]["x-route-attempt"] for r in served.rows} == {b"2"}
    done = await read_topic(s, topics.results, expect=len(ids) + 1, timeout=3)
    assert sorted(msgpack.unpackb(r.value)["job_id"] for r in done) == sorted(ids)
    assert {msgpack.unpackb(r.value)["head_id"] for r in done} == {"live"}
    assert not await redis.exists(Keys(s.redis_prefix).head("dead"))
    assert await redis.get(Keys(s.redis_prefix).slot(topics.model("m"), 0)) is None, (
        "the reaper's lock released"
    )
    by_router_reaped = router.reaper.stats.heads_reaped if router.reaper is not None else 0
    assert reaper.stats.heads_reaped + by_router_reaped == 1, "reaped once, by one of the two reapers"


async def test_two_reapers_racing_republish_each_job_once(settings: Settings, redis: Redis) -> None:
    s = settings
    topics = Topics.from_settings(s)
    topic = topics.model("m")
    registry = registry_of(s, redis)
    await ensure_topics(s, [(topic, s.model_partitions), (topics.retry(1), s.requests_partitions)])
    assert await registry.claim_partition("ghost", topic, s.model_partitions, 3) == 3
    await registry.register(HeadRecord(head_id="ghost", model_id="m", partition=3), slot_topic=topic)
    ids = [f"g{i}" for i in range(20)]
    await route_directly(s, "m", 3, ids[:12])
    await route_directly(s, "m", 3, ids[12:])
    heads, _, _ = await registry.snapshot()
    (ghost,) = heads
    p1, p2 = make_producer(s), make_producer(s)
    await p1.start()
    await p2.start()
    try:
        r1 = Reaper(s, redis, registry, p1, "r1")
        r2 = Reaper(s, redis, registry, p2, "r2")
        assert await r1.reap(heads, now_ms()) == 0, "not before the grace"
        later = ghost.expires_at_ms + r1.grace_ms + 1
        assert await r1.reap(heads, later) == 0, "its slot is still held (by a live head, for all we know)"
        assert r1.stats.skipped == 1
        assert await redis.exists(Keys(s.redis_prefix).head("ghost"))
        await wait_until(lambda: now_ms() > ghost.expires_at_ms + 100, timeout=10)  # the slot lapses with it

        n1, n2 = await asyncio.gather(r1.reap(heads, later), r2.reap(heads, later))
        assert sorted((n1, n2)) == [0, len(ids)]
        assert await r2.reap(heads, later) == 0, "a stale snapshot: reaped again, nothing left"
    finally:
        await p1.stop()
        await p2.stop()
    rerouted = await read_topic(s, topics.retry(1), expect=len(ids) + 1, timeout=3)
    assert len(rerouted) == len(ids)
    offsets = []
    for rec in rerouted:
        h = dict(rec.headers)
        assert h["x-retry-reason"] == b"head_lost: ghost"
        assert h["x-route-attempt"] == b"1"
        assert h["x-original-topic"] == topic.encode()
        assert h["x-original-partition"] == b"3"
        assert int(h["x-retry-not-before"]) <= now_ms()
        offsets.append(int(h["x-original-offset"]))
        assert msgpack.unpackb(rec.value)["job_id"] == ids[offsets[-1]]
    assert sorted(offsets) == list(range(len(ids)))
    assert await committed_offset(s, "m", 3) == len(ids)
    assert not await redis.exists(Keys(s.redis_prefix).head("ghost"))
    assert await redis.get(Keys(s.redis_prefix).slot(topic, 3)) is None


async def test_a_paused_head_that_was_reaped_stops_when_it_wakes_and_rewinds_nothing(
    settings: Settings,
    redis: Redis,
    reaper: Reaper,
    head_process: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    s = settings
    topics = Topics.from_settings(s)
    log = tmp_path / "sleepy.log"
    sleepy = spawn_head(s, head_process, log, "sleepy", partition=0)
    await until_registered(redis, s, "sleepy", sleepy, log)
    ids = [f"s{i}" for i in range(6)]
    await route_directly(s, "m", 0, ids)
    await asyncio.sleep(0.5)  # it takes them: four in its handlers, two queued
    os.kill(sleepy.pid, signal.SIGSTOP)
    assert await reap_until_gone(reaper, s, redis, "sleepy") == len(ids)
    assert await committed_offset(s, "m", 0) == len(ids)
    os.kill(sleepy.pid, signal.SIGCONT)
    assert await asyncio.to_thread(sleepy.wait, 20) == 0, log.read_text()
    assert await committed_offset(s, "m", 0) == len(ids), "the woken head did not move the offset back"
    assert not await redis.exists(Keys(s.redis_prefix).head("sleepy")), "it did not come back to life"
    assert await redis.get(Keys(s.redis_prefix).slot(topics.model("m"), 0)) is None
    assert "removed" in log.read_text()
