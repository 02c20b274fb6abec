"""Adversarial review of issue 8 (fault handling), on the real broker and Redis: throttle headers that outlive
the admission wait they belong to, and forged ones."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from consumers.worker import JobContext, JobRefused, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.clock import now_ms
from router_worker.core.policy import AdmissionPolicy, RateLimit
from router_worker.settings import Settings
from router_worker.state.policy_store import PolicyStore
from router_worker.topics import Topics
from schemas.envelope import Job
from tests.helpers import make_router, read_topic, running, wait_until

pytestmark = pytest.mark.integration


async def _dlq_by_job(s: Settings, expect: int, timeout: float) -> dict[bytes, dict[str, bytes]]:
    recs = await read_topic(s, Topics.from_settings(s).dlq, expect, timeout=timeout)
    out: dict[bytes, dict[str, bytes]] = {}
    for r in recs:
        h = {k: v for k, v in r.headers}
        out[h.get("x-job-id") or r.key or b""] = h
    return out


async def test_a_throttled_job_that_then_finds_no_head_is_retried_not_dropped_as_a_duplicate(
    settings: Settings, redis: Redis
) -> None:
    """A job over its tenant's limit waits in a retry tier (x-throttle-n=1); back, its token is there, but no
    head serves the model, so it goes to a retry tier again, as attempt 1 *with its throttle headers still on*.
    Read back, the router takes it for a return from an admission wait again: attempt 1 again, the same
    trip-keyed claim ``j|1t1|<id>`` that the previous trip marked done: a duplicate, skipped and committed. The
    job is neither routed nor dead-lettered: lost. Its twin, admitted at once, is throttled on its retry (every
    trip through the request path takes a token) and lost the same way."""
    s = settings.model_copy(update={"max_attempts": 3})
    store = PolicyStore.for_settings(redis, s)
    await store.set(store.default.model_copy(update={"admission": AdmissionPolicy(
        tenants={"acme": RateLimit(rate=2, burst=1)})}))  # fmt: skip
    router = make_router(s, redis)
    async with running(router):
        async with JobProducer(s) as p:
            await p.submit("ghost", 1, job_id="first", tenant="acme")
            await p.submit("ghost", 2, job_id="second", tenant="acme")  # throttled ~500 ms
        dlq = await _dlq_by_job(s, 2, timeout=20)
        dup = router.stats.duplicates
    assert set(dlq) == {b"first", b"second"}, (
        f"no head serves the model: both jobs end in the DLQ after {s.max_attempts} attempts; dead letters: "
        f"{sorted(dlq)}; the router skipped {dup} records as duplicates (the lost jobs)"
    )
    # (A duplicate count of its own proves nothing: a record read again after a rebalance the embedded broker
    # runs right after a join is a duplicate too. That both jobs reach the DLQ is the property.)


async def test_forged_throttle_headers_do_not_keep_a_job_in_the_retry_tiers_for_ever(
    settings: Settings, redis: Redis
) -> None:
    """No admission policy at all. A producer's record carries ``x-admit-at`` far in the future and
    ``x-throttle-n``; no head serves its model. Routed to a retry tier (unknown_model) the headers are kept, and
    read back the router honours the forged reservation: the job waits in the retry tiers, a trip per longest
    back-off, for ever (its attempt is restored on every trip), never dead-lettered."""
    s = settings.model_copy(update={"max_attempts": 2})
    topics = Topics.from_settings(s)
    router = make_router(s, redis)
    async with running(router):
        prod = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap_servers)
        await prod.start()
        try:
            value = orjson.dumps({"job_id": "forged", "model_type": "ghost", "payload": 1})
            await prod.send_and_wait(topics.requests, value, key=b"forged", headers=[
                ("content-type", b"application/json"), ("x-admit-at", b"99999999999999"),
                ("x-throttle-n", b"1")])  # fmt: skip
        finally:
            await prod.stop()
        dlq = await _dlq_by_job(s, 1, timeout=8)
        stats = router.stats
    assert b"forged" in dlq, (
        f"an unroutable job is dead-lettered after max_attempts, whatever its headers say; the router: {stats}"
    )


async def test_a_very_low_rate_in_the_policy_does_not_make_the_bucket_script_unreadable(
    settings: Settings, redis: Redis
) -> None:
    """The policy accepts any rate above 0. At one job per ~3 years the second job's reservation lies past
    1e14 ms, and Lua's ``tostring`` writes it in exponent form (``1.017e+14``): ``int()`` of that raises
    ValueError, which the router's batch loop treats as a bug and replays the batch for ever (every replay
    reserving further ahead): the router stalls."""
    from router_worker.core.admission import Limit, tenant_key
    from router_worker.state.admission import Buckets
    from router_worker.state.keys import Keys

    buckets = Buckets(redis, Keys(settings.redis_prefix))
    k = tenant_key("slow")
    now = 1_700_000_000_000
    got = await buckets.schedule({k: Limit(1e-11, 1)}, [[k], [k]], now)
    assert got[0] == now
    assert got[1] >= now + 10**14 - 1


async def test_a_job_the_only_head_refuses_as_busy_for_a_moment_is_not_dead_lettered(
    settings: Settings, redis: Redis
) -> None:
    """``JobRefused("busy")`` nacks the job with no back-off and excludes the head; with no other head the router
    sends it straight back to the same head (better than no route). Each round trip is an attempt, so a head
    that is busy for a few seconds sees the job ``max_attempts`` times in well under a second or two and the
    job is dead-lettered (``max_attempts``), although back-pressure promises nothing is dead-lettered for being
    busy."""
    loop = asyncio.get_running_loop()
    busy_until = loop.time() + 6.0
    tries: list[int] = []

    async def handle(job: Job, ctx: JobContext) -> Any:
        tries.append(ctx.attempt)
        if loop.time() < busy_until:
            raise JobRefused("busy")
        return "ok"

    head = ModelWorker(settings, redis, WorkerConfig("m", head_id="only", partition=0), handle)
    router = make_router(settings, redis)
    async with running(head), running(router):
        async with JobProducer(settings) as p:
            await p.submit("m", 1, job_id="b1")
        await wait_until(lambda: router.stats.dead_lettered > 0 or head.stats.completed > 0, timeout=20)
    assert router.stats.dead_lettered == 0, f"dead-lettered after attempts {tries} (busy, not failing)"
    assert head.stats.completed == 1


async def test_the_breaker_of_a_head_that_is_gone_is_forgotten(settings: Settings, redis: Redis) -> None:
    """A head that failed its jobs opened its breaker and then went away (killed, restarted under a new id: the
    default head id has a random part). Its breaker stays in ``{p}:breakers`` (not closed) and every router
    keeps reading it on every breaker read, takes it half-open and leases it a probe nobody can send, writing
    the key again every cool-down (so the day's TTL never runs out) and showing ``circuit_breaker_state`` 1
    for it. Each dead head that failed adds one for good."""
    from router_worker.state.breakers import BreakerStore, summary_key
    from router_worker.state.keys import Keys

    s = settings.model_copy(update={"breaker_cooldown_s": 0.3, "breaker_min_volume": 5, "max_attempts": 50})
    store = BreakerStore(redis, Keys(s.redis_prefix))
    await store.count({"gone-1": (0, 10)}, now_ms())  # its failures, counted before it died
    router = make_router(s, redis)
    async with running(router):
        async with JobProducer(s) as p:  # some traffic (jobs for a model nobody serves keep retrying)
            for i in range(5):
                await p.submit("ghost", i, job_id=f"g{i}")
        await asyncio.sleep(2.0)
        v1 = (await store.get(["gone-1"]))["gone-1"].version
        await asyncio.sleep(3.0)
        v2 = (await store.get(["gone-1"]))["gone-1"].version
        summary = await redis.hgetall(summary_key(Keys(s.redis_prefix)))
        gauge = router.metrics.registry.get_sample_value("circuit_breaker_state", {"head_id": "gone-1"})
    assert v1 > 0, "the breaker opened"
    assert v2 == v1, f"nobody writes a gone head's breaker (version {v1} -> {v2}, gauge {gauge})"
    assert not summary, f"a gone head's breaker is not read by every router for ever: {summary}"


async def test_removing_a_head_drops_its_breaker_and_a_router_forgets_an_unregistered_ones(
    settings: Settings, redis: Redis
) -> None:
    """The fix, in Redis: ``HeadRegistry.remove`` deletes the head's breaker, its summary entry and its dirty
    mark in its one script; a router's read drops the summary entry of a head that is not registered (it died and
    expired unremoved) and does not return it, while a plain read (operators, tests) still does."""
    from router_worker.core.breaker import BreakerConfig, evaluate
    from router_worker.state.breakers import BreakerStore, Write, breaker_key, dirty_key, summary_key
    from router_worker.state.heads import HeadRecord, HeadRegistry
    from router_worker.state.keys import Keys

    keys = Keys(settings.redis_prefix)
    store = BreakerStore(redis, keys)
    reg = HeadRegistry(redis, keys, settings.head_ttl_ms)
    cfg = BreakerConfig(
        window_ms=5_000, min_volume=5, error_threshold=0.5, cooldown_ms=60_000, half_open_probes=1
    )

    async def read(forget_gone: bool) -> set[str]:
        await store.ensure_scripts()
        async with redis.pipeline(transaction=False) as pipe:
            store.queue_read(pipe, forget_gone=forget_gone)
            (reply,) = await pipe.execute()
        return set(store.parse_read(reply))

    now = now_ms()
    for head_id in ("live", "removed", "lapsed"):
        await reg.register(HeadRecord(head_id, "m", partition=0))
        await store.count({head_id: (0, 10)}, now)
    seen = await store.get(["live", "removed", "lapsed"])
    for head_id, b in seen.items():
        new, t = evaluate(b, cfg, now)
        assert await store.write([Write(head_id, b, new, t)], keys.events) == [True]
    assert await read(False) == {"live", "removed", "lapsed"}, "the dirty marks, read once"
    await store.count({"removed": (0, 1)}, now)  # dirty again
    assert await reg.remove("removed", actor="test")
    assert not await redis.exists(breaker_key(keys, "removed"))
    assert await redis.hget(summary_key(keys), "removed") is None
    assert not await redis.sismember(dirty_key(keys), "removed")
    await redis.delete(keys.head("lapsed"))  # its hash expired, nobody removed it
    assert await read(False) == {"live", "lapsed"}, "a plain read keeps every entry"
    assert await read(True) == {"live"}, "a router's read forgets the unregistered head's breaker"
    assert set(await redis.hkeys(summary_key(keys))) == {"live"}
    assert await read(False) == {"live"}
