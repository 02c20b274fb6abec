"""Regression tests from an adversarial review, against the real embedded broker and Redis. Each test states
the promise it checks; each failed on the code before its fix (lost jobs, stalled partitions, double-counted
loads, two heads on one partition, a pool shrunk by a stray CancelledError)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.pipeline.kafka import make_producer
from router_worker.pipeline.marks import Marks
from router_worker.pipeline.outcomes import Incoming, Routed
from router_worker.pipeline.publish import Send
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from router_worker.state.heads import HeadRegistry, HeadStats
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from tests.helpers import Served, make_router, make_worker, read_topic, running, wait_until
from tests.procs import RedisServer, wait_committed

pytestmark = pytest.mark.integration


def _routed(i: int, head_id: str) -> Routed:
    tp = TopicPartition("router.requests", 0)
    inc = Incoming(tp, i, None, b"x", [], "application/msgpack", 1, None, None, f"job-{i}")
    return Routed(inc, Send("model.m", b"x", None, 0, []), None, final=True, head_id=head_id)


async def test_a_mark_that_timed_out_on_a_paused_redis_is_not_applied_twice(tmp_path: Path) -> None:
    """Finding (stall): marks.py:144-163. The mark pipeline (non-transactional) is sent; Redis is paused
    (SIGSTOP, GC, a slow disk with appendfsync always) past the client's socket timeout; the client gives up
    and the router buffers the writes. Redis then wakes up and executes what was already in its socket buffer
    (HINCRBY in-flight +n included); the router replays its buffer later and adds n again. Heads only ever
    release n, and nothing reconciles the shared count (only a head's re-registration resets it), so the
    phantom load is permanent: with enough of it (one batch of a few hundred jobs), every head of the model is
    over `max_load_threshold` for good and the model's partitions sit in back-pressure forever."""
    async with RedisServer(tmp_path / "redis") as server:
        assert server.popen is not None
        redis = make_redis(server.url, 0.5)
        keys = Keys("rv")
        try:
            await redis.hset(keys.inflight, "h", 0)
            marks = Marks(redis, keys, AuditSink(None, "audit", None), claim_ttl_ms=60_000,
                          dedupe_ttl_ms=60_000, buffer_max=1000, writer="test")  # fmt: skip
            os.kill(server.popen.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                got = await marks.mark([_routed(i, "h") for i in range(3)], 60_000)
                took = time.monotonic() - t0
                assert got is None, "Redis paused: the marks are buffered"
            finally:
                os.kill(server.popen.pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
            inflight = await marks.mark([], 60_000)  # Redis answers again: the buffer is written
            assert inflight is not None
            raw = await redis.hget(keys.inflight, "h")
        finally:
            await redis.aclose()
    assert int(raw) == 3, (
        f"3 jobs routed to head h, shared in-flight count is {raw} (the mark call took {took:.1f} s while "
        f"Redis was paused)"
    )


async def test_a_job_with_large_headers_is_dead_lettered_and_does_not_stall_its_partition(
    settings: Settings, redis: Redis
) -> None:
    """Finding (stall): router.py:393-428 + plan.dead_letter. The size check at intake looks at the value only;
    aiokafka counts key + value + headers against max_request_size. A job with a small value and large headers
    (or a large key) decodes fine, its routed copy is refused (MessageSizeTooLargeError, fatal), its dead letter
    keeps every passthrough header and the key and is refused too, even "truncated" (only the value is cut), and
    then it is 'read again' for ever: the partition never advances, exactly the stall of issue 6 item 2."""
    s = settings.model_copy(update={"kafka_max_message_bytes": 100_000})
    topics = Topics.from_settings(s)
    served = Served()
    router = make_router(s, redis)
    worker = make_worker(s, redis, served, "m")
    async with running(worker, router):
        producer = make_producer(s, max_request_size=4 << 20)
        await producer.start()
        try:
            big = msgpack.packb({"job_id": "big-headers", "model_type": "m"})
            await producer.send_and_wait(topics.requests, big, partition=0,
                                         headers=[("x-trace-blob", b"z" * 200_000)])  # fmt: skip
            after = msgpack.packb({"job_id": "after", "model_type": "m"})
            await producer.send_and_wait(topics.requests, after, partition=0)
        finally:
            await producer.stop()
        await wait_until(lambda: "after" in served.job_ids(), timeout=25)  # routed (same batch) ...
        tp = TopicPartition(topics.requests, 0)
        committed = await wait_committed(
            s, {tp: 2}, timeout=15
        )  # ... but is the partition committed past it?
        stats = router.stats
    dead = await read_topic(s, topics.dlq, expect=1, timeout=5)
    assert (len(dead), committed[tp]) == (1, 2), (
        f"the large-header job is neither dead-lettered ({len(dead)} dead letters) nor committed past "
        f"(committed {committed[tp]}); publish_errors={stats.publish_errors} unsent={stats.unsent} "
        f"duplicates={stats.duplicates}: it is read again for ever, and once 500 (batch_max_records) records "
        f"sit behind it nothing new on the partition is ever reached"
    )


async def test_two_processes_with_one_head_id_can_not_both_own_its_partition(
    settings: Settings, redis: Redis
) -> None:
    """Finding (duplicate): heads.py:483-511. Slots are compare-and-set on the head *id*, not on a per-process
    token. A second process started with the same head id (a restart while the old one is paused or hung, a
    StatefulSet pod name reused, an operator typo) claims the same slot as 'already mine', and the heartbeats of
    both return OK: both consume the partition and every job routed there runs twice, with the same
    x-route-attempt. The README promises a head that lost its slot stops instead."""
    from router_worker.state.heads import HeadIdInUse, HeadRecord, HeartbeatResult

    registry = HeadRegistry(redis, Keys(settings.redis_prefix), settings.head_ttl_ms)
    topic = Topics.from_settings(settings).model("m")
    # The worker SDK's path: each process has its own instance token.
    await registry.assert_free("head-a", "proc-1")
    first = await registry.claim_partition("head-a", topic, 4, 0, instance="proc-1")
    await registry.register(HeadRecord("head-a", "m", partition=first), slot_topic=topic, instance="proc-1")
    # a second process with the same --head-id, while the first is alive: refused before it claims anything
    with pytest.raises(HeadIdInUse):
        await registry.assert_free("head-a", "proc-2")
    # once the first one's heartbeat lapsed (a paused process), a second may start, but never on its slot
    await redis.hset(Keys(settings.redis_prefix).head("head-a"), "expires_at", "1")
    second = await registry.claim_partition("head-a", topic, 4, None, instance="proc-2")
    assert second != first
    await registry.register(HeadRecord("head-a", "m", partition=second), slot_topic=topic, instance="proc-2")
    beat_1 = await registry.heartbeat("head-a", HeadStats(), (topic, first), "proc-1")
    beat_2 = await registry.heartbeat("head-a", HeadStats(), (topic, second), "proc-2")
    assert beat_2 == HeartbeatResult.OK
    assert beat_1 == HeartbeatResult.SLOT_LOST, "the replaced process learns it must stop"


async def test_a_retried_job_is_not_dropped_as_a_duplicate_of_another_job_whose_id_ends_in_hash_n(
    settings: Settings, redis: Redis
) -> None:
    """Finding (LOSS): outcomes.py:311-313 claim_key_of. The idempotency key of attempt n > 1 is
    f"{job_id}#{n}", which is also the key of attempt 1 of a job whose id is literally "<job_id>#<n>" (job_id
    is any 1-128 char string). Job "order-7#2" is routed; then job "order-7" is nacked by a head (or had no
    capacity): its attempt 2 finds the key done, is counted a duplicate, committed and never routed: lost,
    no dead letter. (Same for a job id of the form "rec|<topic>|<partition>|<offset>", the key of a bad record.)"""
    topics = Topics.from_settings(settings)
    served = Served()
    router = make_router(settings, redis)
    worker = make_worker(settings, redis, served, "m")
    async with running(worker, router):
        producer = make_producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(topics.requests, msgpack.packb({"job_id": "order-7#2", "model_type": "m"}),
                                         partition=0)  # fmt: skip
            await wait_until(lambda: "order-7#2" in served.job_ids(), timeout=20)
            # what a head's nack of job "order-7" (routed as attempt 1) looks like on the retry tier
            await producer.send_and_wait(topics.retry(1), msgpack.packb({"job_id": "order-7", "model_type": "m"}),
                                         partition=0, headers=[("x-route-attempt", b"1"),
                                                               ("x-retry-not-before", b"0")])  # fmt: skip
        finally:
            await producer.stop()
        try:
            await wait_until(lambda: "order-7" in served.job_ids(), timeout=15)
        except AssertionError:
            raise AssertionError(
                f"job 'order-7' (attempt 2) never reached a head: duplicates={router.stats.duplicates} "
                f"routed={router.stats.routed} dead={router.stats.dead_lettered}"
            ) from None


async def test_a_handler_that_raises_cancelled_error_does_not_kill_a_serving_coroutine(
    settings: Settings, redis: Redis
) -> None:
    """Finding (stall + duplicate): consumers/worker.py:360-379 and 396-402. `_serve` and `_handle` catch
    Exception only. A handler that raises asyncio.CancelledError without being cancelled (grpc.aio raises it
    when the server cancels an RPC, e.g. a Triton call; anyio cancel scopes; a re-raised inner cancellation)
    ends the serving coroutine silently: the pool shrinks by one for good, the record stays unfinished so the
    head's committed offset never passes it again, and with every coroutine gone the head stops serving while
    it keeps heartbeating as healthy (routers keep sending it jobs)."""
    from consumers.worker import ModelWorker, WorkerConfig

    served: list[str] = []

    async def handle(job, ctx):  # type: ignore[no-untyped-def]
        if job.job_id == "cancel-me":
            raise asyncio.CancelledError("RPC cancelled by the model server")
        served.append(job.job_id)
        return {"ok": True}

    topics = Topics.from_settings(settings)
    router = make_router(settings, redis)
    worker = ModelWorker(settings, redis, WorkerConfig("m", capacity=1, head_id="h-cancel"), handle)
    async with running(worker, router):
        producer = make_producer(settings)
        await producer.start()
        try:
            for jid in ("cancel-me", "next"):
                await producer.send_and_wait(topics.requests, msgpack.packb({"job_id": jid, "model_type": "m"}),
                                             partition=0)  # fmt: skip
        finally:
            await producer.stop()
        try:
            await wait_until(lambda: "next" in served, timeout=15)
        except AssertionError:
            raise AssertionError(
                f"the head stopped serving after one handler raised CancelledError (served={served}, "
                f"open={sorted(worker._open)}, still heartbeating: {not worker._stop.is_set()}, router back-pressure "
                f"holds={router.stats.saturated}: the unfinished job is never released from the shared in-flight "
                f"count either)"
            ) from None
