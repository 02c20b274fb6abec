"""Review of the fixes in ef04196 (dead-letter path, SDKs) and d855677 (ops truth), on the real broker and Redis.
Each test is one attack; those that reproduce a bug still open are ``xfail(strict=True)``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer, build_job
from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.dlq.model import new_redrive_id, parse_filter
from router_worker.dlq.reader import read_dead_letters
from router_worker.dlq.redrive import execute, prepare
from router_worker.dlq.state import RedriveState
from router_worker.pipeline.kafka import ensure_topics, make_producer
from router_worker.pipeline.publish import dead_letter_record
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from schemas.envelope import EnvelopeError, Job, encode_job
from tests.helpers import make_router, read_topic, running, wait_until
from tests.procs import RedisServer

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- the producer SDK's size check


async def test_a_job_the_router_refuses_as_too_large_is_refused_by_submit(
    settings: Settings, redis: Redis
) -> None:
    """The value alone fits the limit; with its key (the job id) and the content-type header it does not."""
    limit = 4096
    s = settings.model_copy(update={"kafka_max_message_bytes": limit})
    job_id = "near-the-limit"
    n = 3000
    while len(encode_job(build_job("m", "x" * n, job_id=job_id))) < limit - 4:
        n += 1
    value_size = len(encode_job(build_job("m", "x" * n, job_id=job_id)))
    assert value_size <= limit < value_size + len(job_id) + len("content-type") + len("application/msgpack")
    try:
        async with JobProducer(s) as p:
            await p.submit("m", "x" * n, job_id=job_id)
    except (EnvelopeError, ValueError):
        return  # refused client-side: what the SDK promises
    async with running(make_router(s, redis)):
        dead = await read_topic(s, Topics.from_settings(s).dlq, expect=1, timeout=20)
    reasons = [dict(r.headers).get("x-dlq-reason") for r in dead]
    pytest.fail(f"submit acknowledged a {value_size}-byte job; the router dead-lettered it: {reasons}")


# ---------------------------------------------------------------- redrive: squeezed dead letters of one job


async def _squeezed_dead_letters(s: Settings, job_id: str, reasons: list[str]) -> None:
    """One original job on the request topic and a cut dead letter of it per reason (as a router writes one
    whose dead letter could not hold the whole record: value truncated, x-dlq-truncated and x-dlq-sha256)."""
    topics = Topics.from_settings(s)
    await ensure_topics(s, [(topics.dlq, 1), (topics.requests, 2)])
    producer = make_producer(s)
    await producer.start()
    try:
        value = msgpack.packb({"job_id": job_id, "model_type": "m", "payload": "p" * 400})
        headers: list[tuple[str, bytes | None]] = [("content-type", b"application/msgpack")]
        meta = await producer.send_and_wait(topics.requests, value, key=job_id.encode(), headers=headers)
        for reason in reasons:
            v, k, h = dead_letter_record(value, job_id.encode(), headers, reason, "no head", topics.requests,
                                         meta.partition, meta.offset, 3, limit=256, keep=32)  # fmt: skip
            await producer.send_and_wait(topics.dlq, v, key=k, headers=h)
    finally:
        await producer.stop()


async def test_a_cut_dead_letter_of_a_job_an_interrupted_redrive_began_goes_under_that_redrives_id(
    settings: Settings, redis: Redis
) -> None:
    s = settings
    job_id = "cut-twice"
    await _squeezed_dead_letters(s, job_id, ["no_capacity", "max_attempts"])
    dls = await read_dead_letters(s, Topics.from_settings(s).dlq)
    assert len(dls) == 2
    assert all(dl.squeezed for dl in dls)
    first = next(dl for dl in dls if dl.reason == "no_capacity")
    # The plan for the max_attempts one is made, then an earlier redrive of the no_capacity one (interrupted
    # after its p| mark: its copy may be on the request topic) is found once the lock is held.
    prepared = await prepare(s, redis, parse_filter(["max_attempts"], now_ms=now_ms()))
    assert [it.dl.job_id for it in prepared.to_send] == [job_id]
    interrupted = new_redrive_id(now_ms(), os.urandom(3))
    await RedriveState(redis, Keys(s.redis_prefix)).mark("p", [(first.coord, interrupted)])
    res = await execute(s, redis, prepared, rate=100, actor="test", source="test",
                        audit=AuditSink(redis, s.audit_channel, s.audit_file))  # fmt: skip
    assert res.sent == 1, res
    sent = [r.redrive for r in await read_dead_letters(s, Topics.from_settings(s).requests) if r.redrive]
    assert sent == [interrupted], (
        f"the job went out under {sent}, not under the interrupted redrive {interrupted} that began sending it"
    )


# ---------------------------------------------------------------- a head's audit records and a hung Redis


async def test_a_hung_audit_redis_does_not_hold_a_heads_slot_per_failed_job(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    async def handler(job: Job, ctx: JobContext) -> Any:
        raise RuntimeError("model crashed")

    from tests.integration.test_worker_sdk import route_directly, start

    async with RedisServer(tmp_path / "audit-redis") as server:
        audit_redis = make_redis(server.url, 2.0)
        try:
            assert await audit_redis.ping()
            audit = AuditSink(audit_redis, settings.audit_channel, None)
            worker = ModelWorker(settings, redis, WorkerConfig("m", head_id="h", capacity=1, partition=0), handler,
                                 audit=audit)  # fmt: skip
            task = await start(worker)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                await route_directly(settings, "m", 0, [f"f{i}" for i in range(4)])
                try:
                    await wait_until(lambda: worker.stats.nacked >= 4, timeout=4)
                except AssertionError:
                    pytest.fail(f"{worker.stats.nacked} of 4 failed jobs handed back in "
                                f"{time.monotonic() - t0:.1f} s: each nack waited on the audit publish")  # fmt: skip
            finally:
                os.kill(server.pid, signal.SIGCONT)
                worker.stop()
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        finally:
            await audit_redis.aclose()
