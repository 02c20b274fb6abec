"""Admission tokens and records read again: a job's token is taken once, however often its record is read.

A batch whose publish leaves a job unsent rewinds that job's partition: the job and the jobs behind it on the
partition (published, now duplicates) are read again. Each read used to schedule every limited job's token
again, so a tenant under a rewind paid for its jobs several times and was throttled below its rate."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
from producers.producer import JobProducer
from router_worker.core.admission import tenant_key
from router_worker.core.policy import AdmissionPolicy, RateLimit
from router_worker.settings import Settings
from router_worker.state.admission import bucket_key
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import FirstSendUnsent, Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration

INTERVAL_MS = 1000  # one token a second: each token taken moves the bucket a whole second on


async def test_a_rewound_partition_read_again_takes_no_second_token_for_its_jobs(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = PolicyStore.for_settings(redis, settings)
    await policy.set(policy.default.model_copy(update={"admission": AdmissionPolicy(
        tenants={"acme": RateLimit(rate=1000 / INTERVAL_MS, burst=100)})}))  # fmt: skip
    gate = FirstSendUnsent()
    monkeypatch.setattr(faults_module, "publish", gate.publish)
    monkeypatch.setattr(faults_module, "broker_answers", gate.broker_away)
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1000)
    router = make_router(settings, redis)
    n = 8
    ids = [f"adm-{i}" for i in range(n)]
    async with running(worker):
        async with JobProducer(settings) as p:  # one session: one partition, read in one batch
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme")
        async with running(router):
            await wait_until(lambda: gate.struck and set(served.job_ids()) >= set(ids), timeout=60)
    assert gate.struck, "a send was left unsent: the partition was rewound and read again"
    assert router.stats.routed >= n
    raw = await redis.get(bucket_key(Keys(settings.redis_prefix), tenant_key("acme")))
    assert raw is not None
    tat = float(raw)
    # The bucket's theoretical arrival time moved one interval per token taken. The jobs came at once (within a
    # few seconds of each other, on each read): n tokens put it n intervals past the first read, give or take
    # the seconds between the reads; a second token for each of the n jobs would put it 2n intervals past.
    first_read_ms = (
        min(int(row[4].get("x-route-decided-at", b"0")) for row in served.rows) if served.rows else 0
    )
    taken = (tat - first_read_ms) / INTERVAL_MS
    assert taken < n + 3, (
        f"{taken:.1f} tokens' worth taken for {n} jobs: some were charged again on a re-read"
    )


async def test_jobs_behind_a_held_partition_take_one_token_however_often_it_is_read(
    settings: Settings, redis: Redis
) -> None:
    """The only head of the model serves one job at a time, slowly: the jobs behind the first one hold their
    partition (nothing behind them could go) and it is read again and again until the head is free."""
    policy = PolicyStore.for_settings(redis, settings)
    await policy.set(policy.default.model_copy(update={"admission": AdmissionPolicy(
        tenants={"acme": RateLimit(rate=1000 / INTERVAL_MS, burst=100)})}))  # fmt: skip
    served = Served()
    worker = make_worker(settings, redis, served, "m", head_id="h", capacity=1, delay_s=0.5)
    router = make_router(settings, redis)
    n = 4
    ids = [f"held-{i}" for i in range(n)]
    async with running(worker):
        async with JobProducer(settings) as p:
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id, session_id="one", tenant="acme")
        async with running(router):
            await wait_until(lambda: set(served.job_ids()) >= set(ids), timeout=60)
    assert router.stats.saturated > 0, "the partition was held for the busy head"
    raw = await redis.get(bucket_key(Keys(settings.redis_prefix), tenant_key("acme")))
    assert raw is not None
    first_read_ms = min(int(row[4].get("x-route-decided-at", b"0")) for row in served.rows)
    taken = (float(raw) - first_read_ms) / INTERVAL_MS
    assert taken < n + 3, f"{taken:.1f} tokens' worth taken for {n} jobs: the held ones were charged per read"
