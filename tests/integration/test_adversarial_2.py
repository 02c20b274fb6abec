"""Second adversarial review of the change since b07e21f (fixes of 14ef182 included), against the real
embedded broker and Redis. Each test states the promise it checks and failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from router_worker.pipeline.kafka import make_producer
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from tests.helpers import Served, make_router, make_worker, read_topic, running, wait_until
from tests.procs import wait_committed

pytestmark = pytest.mark.integration


async def test_a_record_with_huge_origin_headers_is_dead_lettered_and_does_not_stall_its_partition(
    settings: Settings, redis: Redis
) -> None:
    """Finding (stall): publish.py:223-226 dead_letter_record(squeeze=True) keeps origin_only(headers), and
    messages._origin copies every x-original-* header of the *incoming* record verbatim when it has an
    x-original-topic (messages.py:107-108).
    Any producer can set x-original-topic (on router.requests or a retry tier). A record whose
    x-original-offset header alone exceeds the limit is too_large at intake, its dead letter is squeezed,
    but the squeezed copy still carries the huge origin header: refused (fatal), squeezed again (same bytes),
    refused again, "read again" for ever. The partition never advances past it - issue 6 item 2 again, the
    exact promise of 14ef182 ("a partition never stalls on it")."""
    s = settings.model_copy(update={"kafka_max_message_bytes": 100_000})
    topics = Topics.from_settings(s)
    served = Served()
    router = make_router(s, redis)
    worker = make_worker(s, redis, served, "m")
    async with running(worker, router):
        producer = make_producer(s, max_request_size=4 << 20)
        await producer.start()
        try:
            bad = msgpack.packb({"job_id": "big-origin", "model_type": "m"})
            await producer.send_and_wait(topics.requests, bad, partition=0,
                                         headers=[("x-original-topic", b"router.requests"),
                                                  ("x-original-offset", b"9" * 200_000)])  # fmt: skip
            after = msgpack.packb({"job_id": "after", "model_type": "m"})
            await producer.send_and_wait(topics.requests, after, partition=0)
        finally:
            await producer.stop()
        await wait_until(lambda: "after" in served.job_ids(), timeout=25)  # same batch: routed
        tp = TopicPartition(topics.requests, 0)
        committed = await wait_committed(s, {tp: 2}, timeout=15)
        stats = router.stats
    dead = await read_topic(s, topics.dlq, expect=1, timeout=5)
    assert (len(dead), committed[tp]) == (1, 2), (
        f"the record with a 200 kB x-original-offset header is neither dead-lettered ({len(dead)} dead letters) "
        f"nor committed past (committed {committed[tp]}); publish_errors={stats.publish_errors} "
        f"unsent={stats.unsent}: the squeezed dead letter keeps the huge origin header, so it is read again for ever"
    )


async def test_a_paused_process_that_comes_back_does_not_deregister_its_same_id_successor(
    settings: Settings, redis: Redis
) -> None:
    """Finding (a live head killed, its partition orphaned): consumers/worker.py:276-277 with heads.py:220-226.
    Process A (head id h, instance iA) pauses past its TTL (GC, SIGSTOP, a VM migration); its slot lapses; a
    supervisor starts process B with the same --head-id (a StatefulSet pod name, a systemd unit): assert_free
    passes (A lapsed), B claims the slot and registers (instance iB). A wakes up: its heartbeat finds
    instance iB and answers SLOT_LOST, so A stops - correct - but A's `finally` then calls
    registry.remove(head_id) unconditionally, and _REMOVE_LUA deletes the hash, the in-flight count and the
    slot of *any* instance of h (`string.sub(v, 1, #id + 1) == id .. '@'`): B's registration and slot. B's next
    heartbeat finds its hash gone (REMOVED) and B stops too. The model loses both heads; jobs routed to B's
    partition meanwhile have no registered head, so the reaper (which works from registrations) never
    re-routes them. The README promises the opposite: "A head that was only paused and comes back finds
    itself removed and stops"."""
    served = Served()
    a = make_worker(settings, redis, served, "m", head_id="h", partition=0)
    gate = asyncio.Event()
    gate.set()
    real_beat = a.registry.heartbeat

    async def paused_beat(*args: Any, **kw: Any) -> Any:
        await gate.wait()  # A's event loop is "paused" here: no heartbeat reaches Redis
        return await real_beat(*args, **kw)

    a.registry.heartbeat = paused_beat  # type: ignore[method-assign]
    keys = Keys(settings.redis_prefix)
    async with running(a):
        gate.clear()  # A stops heartbeating; its deadline and its slot lapse after head_ttl_ms
        await asyncio.sleep(settings.head_ttl_ms / 1000 + 1.0)
        b = make_worker(settings, redis, served, "m", head_id="h", partition=0)
        async with running(b):
            inst_b = await redis.hget(keys.head("h"), "instance")
            assert inst_b == b.instance, "B registered under h"
            gate.set()  # A wakes up: SLOT_LOST, it stops
            await wait_until(lambda: a._stop.is_set(), timeout=10)
            await asyncio.sleep(4 * settings.head_heartbeat_ms / 1000 + 0.5)
            b_alive = not b._stop.is_set()
            registered = await redis.hget(keys.head("h"), "instance")
    assert (b_alive, registered) == (True, b.instance), (
        f"the live successor B was deregistered by the paused process A coming back (B stopped: {not b_alive}, "
        f"h's registration now: {registered!r}): A's shutdown removed every instance of head id h"
    )


async def test_jobs_left_by_a_dead_head_are_rerouted_when_it_restarts_under_its_id_on_another_partition(
    settings: Settings, redis: Redis
) -> None:
    """Finding (jobs stranded): reaper.py:137-194 reaps by *registration*; heads.py:298-321 register() replaces
    the hash of a head id wholesale. Head h (partition 1) is killed with a job routed to it and not
    committed. Its supervisor restarts it with the same --head-id after its TTL (assert_free refuses it
    before that) and before the reaper's grace (3 TTLs: 15 s by default - the usual window of a restart
    loop). With no --partition, claim_partition takes the *first* free partition (0 here), and register()
    overwrites h's hash with partition 0 and a fresh deadline. The reaper now never finds h due, nothing else
    refers to partition 1, and its unfinished job sits there until some head happens to claim partition 1:
    with fewer heads than partitions, possibly never. README: "A head that dies with jobs in hand ... is
    reaped ... republishes every unfinished job"."""
    topics = Topics.from_settings(settings)
    topic = topics.model("m")
    keys = Keys(settings.redis_prefix)
    registry = HeadRegistry(redis, keys, settings.head_ttl_ms)
    served = Served()
    # the model topic (8 partitions) exists, as it did when h first started
    probe = make_worker(settings, redis, served, "m", head_id="probe", partition=3)
    async with running(probe):
        pass
    # h ran on partition 1 and died (kill -9) with job "stranded" routed to it, uncommitted
    await registry.register(HeadRecord("h", "m", partition=1), slot_topic=topic, instance="dead-process")
    await redis.hset(keys.head("h"), "expires_at", "1")  # its heartbeat lapsed; its slot expired with it
    producer = make_producer(settings)
    await producer.start()
    try:
        job = msgpack.packb({"job_id": "stranded", "model_type": "m"})
        await producer.send_and_wait(topic, job, partition=1, headers=[("x-job-id", b"stranded"),
                                                                       ("x-route-attempt", b"1")])  # fmt: skip
    finally:
        await producer.stop()
    # the supervisor restarts h (same id, no --partition) before the reaper's grace elapsed
    restarted = make_worker(settings, redis, served, "m", head_id="h")
    router = make_router(settings, redis)
    async with running(restarted, router):
        assert restarted.partition == 1, "a restarted head takes its own partition back"
        try:
            await wait_until(lambda: "stranded" in served.job_ids(), timeout=25)
        except AssertionError:
            h = await redis.hgetall(keys.head("h"))
            raise AssertionError(
                f"the job h left uncommitted on {topic}[1] was never re-routed: h restarted on partition "
                f"{restarted.partition} and its registration now says partition {h.get('partition')}, so the "
                f"reaper (reaped={router.reaper.stats.heads_reaped if router.reaper else '?'}) never looks at "
                f"partition 1"
            ) from None


async def test_in_flight_tokens_do_not_pile_up_in_redis_for_an_hour(settings: Settings, redis: Redis) -> None:
    """Finding (unbounded growth, introduced by 14ef182; fixed by numbering each writer's changes):
    state/inflight.py:20 + consumers/worker.py:570-594
    and marks.py:149-162. Every release round of every head (each `head_release_ms`, 5 ms by default, while it
    finishes jobs) and every routed batch of every router now creates a `{p}:tok:<uuid>` key that lives
    TOKEN_TTL_MS = 1 hour. One busy head alone makes up to 200 keys a second: ~720,000 keys (tens of MB) per
    head per hour, 100 busy heads several GB - where a plain HINCRBY used none. The replay the token guards
    against happens within seconds (a retried release; a buffered mark replayed within the staleness window),
    and a per-head sequence number (or one key per writer) would bound it by the number of writers.

    Here: one router, one head, 400 jobs trickled over ~4 s. Bound asserted: tokens alive stay within a few
    per writer (or expire within a minute)."""
    topics = Topics.from_settings(settings)
    keys = Keys(settings.redis_prefix)
    served = Served()
    router = make_router(settings, redis)
    worker = make_worker(settings, redis, served, "m", capacity=8)
    async with running(worker, router):
        producer = make_producer(settings)
        await producer.start()
        try:
            for i in range(400):
                await producer.send(topics.requests, msgpack.packb({"job_id": f"j{i}", "model_type": "m"}),
                                    partition=i % 6)  # fmt: skip
                if i % 10 == 9:
                    await asyncio.sleep(0.1)
            await producer.flush()
        finally:
            await producer.stop()
        await wait_until(lambda: len(set(served.job_ids())) >= 400, timeout=60)
        await asyncio.sleep(0.5)
    toks = [k async for k in redis.scan_iter(match=keys.writer_seq("*"), count=1000)]
    ttl = await redis.pttl(toks[0]) if toks else -2
    assert len(toks) <= 2, (
        f"{len(toks)} in-flight tokens alive in Redis after 400 jobs through one router and one head, each "
        f"kept {ttl / 1000:.0f} s more: ~{len(toks) / 400:.2f} keys per job, for an hour, whatever the load"
    )
