"""Adversarial review of ef1b739 (a job takes its admission token once: verdicts kept for records read again,
``FaultGate.reserved``; keys of records acknowledged before a rewind, ``FaultGate.spent``), on the real broker and
Redis. Each test reproduced a bug the review found (``xfail(strict=True)`` until its fix).

Tokens are counted from the tenant's bucket: with a burst far above the jobs sent, each token taken moves the
bucket's theoretical arrival time (tat) exactly one interval on, so ``(tat - first decision) / interval`` is the
number of tokens taken (to within the milliseconds between the first schedule and the first decision)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
from producers.producer import JobProducer
from router_worker.clock import now_ms
from router_worker.core.admission import tenant_key
from router_worker.core.policy import AdmissionPolicy, RateLimit
from router_worker.settings import Settings
from router_worker.state.admission import bucket_key
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import FirstSendUnsent, Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def _limit_acme(settings: Settings, redis: Redis, limit: RateLimit, **others: RateLimit | None) -> None:
    policy = PolicyStore.for_settings(redis, settings)
    await policy.set(policy.default.model_copy(update={"admission": AdmissionPolicy(
        tenants={"acme": limit, **others})}))  # fmt: skip


async def _tat(settings: Settings, redis: Redis) -> float:
    raw = await redis.get(bucket_key(Keys(settings.redis_prefix), tenant_key("acme")))
    assert raw is not None, "acme's bucket was written"
    return float(raw)


def _first_decision(served: Served) -> int:
    return min(int(row[4].get("x-route-decided-at", b"0")) for row in served.rows)


async def test_a_job_sent_twice_whose_first_copy_stays_unsent_takes_one_token(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer that retried its send wrote job ``a`` twice, back to back on one partition. In the batch the
    second copy is a duplicate (final, nothing to send); ``a``'s own publish stays unsent and its partition is
    rewound. ``_close`` settles the duplicate's key, which is ``a``'s key: ``a``'s kept verdict is dropped, and
    ``a`` read again schedules a second token. Three jobs, four tokens."""
    interval_ms = 1000
    await _limit_acme(settings, redis, RateLimit(rate=1000 / interval_ms, burst=100))
    gate = FirstSendUnsent()
    monkeypatch.setattr(faults_module, "publish", gate.publish)
    monkeypatch.setattr(faults_module, "broker_answers", gate.broker_away)
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1000)
    router = make_router(settings, redis)
    order = ["a", "a", "b", "c"]  # the first send of the first publish is a's: it stays unsent
    async with running(worker):
        async with JobProducer(settings) as p:
            for job_id in order:
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme")
        async with running(router):
            await wait_until(lambda: gate.struck and set(served.job_ids()) >= {"a", "b", "c"}, timeout=60)
            await asyncio.sleep(0.5)
    assert sorted(served.job_ids()) == ["a", "b", "c"], "each job served once"
    taken = (await _tat(settings, redis) - _first_decision(served)) / interval_ms
    assert taken < 3.5, f"{taken:.2f} tokens taken for 3 jobs: a was charged again when read again"


async def test_a_key_kept_as_spent_does_not_exempt_a_later_new_job_with_that_id_from_admission(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1: four jobs, the first one's publish stays unsent, so the three acknowledged behind it go into
    ``spent``. Their done marks are then gone from Redis (here deleted: the dedupe TTL lapsed, or Redis lost
    them), so by the dedupe contract the same job ids sent again are new jobs, routed again. Round 2 sends them:
    they are routed, but take no token, because ``spent`` still lists their keys (and would until 20,000 keys
    of later rewinds push them out)."""
    interval_ms = 60_000  # a token is a minute: the bucket stays ahead of the clock for the whole test
    await _limit_acme(settings, redis, RateLimit(rate=1000 / interval_ms, burst=100))
    gate = FirstSendUnsent()
    monkeypatch.setattr(faults_module, "publish", gate.publish)
    monkeypatch.setattr(faults_module, "broker_answers", gate.broker_away)
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1000)
    router = make_router(settings, redis)
    ids = [f"x{i}" for i in range(4)]
    async with running(worker):
        async with JobProducer(settings) as p:
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme")
        async with running(router):
            await wait_until(lambda: gate.struck and set(served.job_ids()) >= set(ids), timeout=60)
            await wait_until(lambda: router._closing is None or router._closing.done(), timeout=10)
            await asyncio.sleep(1.0)  # every batch closed: its marks written
            first = _first_decision(served)
            round1 = (await _tat(settings, redis) - first) / interval_ms
            assert round1 < 4.5, f"round 1 took {round1:.2f} tokens for 4 jobs"
            # The done marks (and claims) lapse: the ids are forgotten, as after dedupe_ttl_s.
            tag = Keys(settings.redis_prefix).tag
            gone = []
            for pat in (f"{tag}:done:*", f"{tag}:claims:*"):
                gone += [k async for k in redis.scan_iter(match=pat)]
            assert gone, "the idempotency hashes were found"
            await redis.delete(*gone)
            n1 = len(served.rows)
            async with JobProducer(settings) as p:
                for job_id in ids[1:]:
                    await p.submit("m", job_id, job_id=job_id, session_id="two", tenant="acme")
            await wait_until(lambda: len(served.rows) >= n1 + 3, timeout=60)
    total = (await _tat(settings, redis) - first) / interval_ms
    assert total > 6.5, (
        f"{total:.2f} tokens for 4 + 3 jobs: round 2's jobs took none (their keys were 'spent')"
    )


async def test_a_held_jobs_kept_verdict_does_not_outlive_the_removal_of_its_tenants_limit(
    settings: Settings, redis: Redis
) -> None:
    """acme is limited to one job a minute (burst 2): of four jobs sent at once, a and b may go now, c in a minute
    and d in two. The only head serves one job at a time (3 s each), so b, c and d hold their partition behind a
    and keep the verdicts of that first read. The operator then lifts acme's limit (another tenant stays limited,
    so admission is still on). c and d should go as soon as the head is free (about 12 s in all); they wait
    for their old reservations instead (c a minute, d two)."""
    interval_ms = 60_000
    await _limit_acme(settings, redis, RateLimit(rate=1000 / interval_ms, burst=2))
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1, delay_s=3.0)
    router = make_router(settings, redis)
    ids = ["a", "b", "c", "d"]
    async with running(worker):
        async with JobProducer(settings) as p:
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme")
        async with running(router):
            await wait_until(lambda: router.stats.saturated > 0, timeout=30)  # held behind a: verdicts kept
            t_lift = now_ms()
            await _limit_acme(settings, redis, RateLimit(rate=1000 / interval_ms, burst=2), acme=None,
                              other=RateLimit(rate=1, burst=1))  # fmt: skip
            await wait_until(lambda: router.state.policy.admission.tenant_limit("acme") is None, timeout=10)
            assert not {"c", "d"} & set(served.job_ids()), "c and d were still held when the limit went"
            await wait_until(lambda: set(served.job_ids()) >= set(ids), timeout=20)
    assert max(int(row[4].get("x-route-decided-at", b"0")) for row in served.rows) - t_lift < 20_000


async def test_a_forged_x_redrive_header_does_not_escape_the_tenants_admission_limit(
    settings: Settings, redis: Redis
) -> None:
    """A producer adds ``x-redrive: anything`` to its jobs. The router keys them ``jr|anything|1|<id>`` when it
    schedules their tokens, then finds that no such redrive exists and keys them ``j|1|<id>`` for the claim and
    the plan. The plan looks the verdict up under the second key, finds none, and routes every job at once: a
    tenant limited to one job a minute gets all three through (and each takes a token it never waits for; its
    kept verdict, under the first key, is never settled and stays in ``FaultGate.reserved``). A fix must key
    the verdicts after the unforging, and after ``restore_waited``: a throttled job back from its wait is keyed
    ``jr|anything|1t1|<id>`` there, and would escape the same way on its second trip."""
    await _limit_acme(settings, redis, RateLimit(rate=1000 / 60_000, burst=1))
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1000)
    router = make_router(settings, redis)
    async with running(worker):
        async with JobProducer(settings) as p:
            for job_id in ("f0", "f1", "f2"):
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme",
                               headers={"x-redrive": "not-a-redrive"})  # fmt: skip
        async with running(router):
            await wait_until(lambda: len(served.rows) >= 1, timeout=60)
            await asyncio.sleep(3.0)  # the other two would be served by now if they were not throttled
            leaked = [k for k in router.faults.reserved if k.startswith("jr|not-a-redrive|")]
    assert served.job_ids() == ["f0"], f"served at once over a limit of one a minute: {served.job_ids()}"
    assert not leaked, f"verdicts never settled: {leaked}"
