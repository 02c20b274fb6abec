"""Final adversarial review of the session's router changes (cd32868..cbe26ea): breaker feed across fallback
rounds, and half-open probes spent by a batch whose publish raised. On the real broker and Redis; a monkeypatched
publish only decides which sends the broker "refuses" or where a bug strikes (as ``test_fallback._refusing``
does): routing, breakers, claims, marks and heads are real."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka.errors import NotLeaderForPartitionError
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
from producers.producer import JobProducer
from router_worker.core.breaker import BreakerState
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from router_worker.topics import Topics
from tests.helpers import Served, make_half_open, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def test_a_fallback_head_that_fails_the_moved_job_too_is_charged_for_it(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both heads of model m have unwritable partitions (NotLeaderForPartition after every retry: a live broker
    says so, the head's fault). The lone job goes to one head, fails, is moved within the batch to the other,
    and fails there too. Each head failed a publish for good, after the producer's whole retry budget: each must
    be charged (a full window), so both breakers open on the next read and no head is tried again while they are
    open. The fallback head is not charged: the job read again tries it a second time (in production, another
    whole retry budget, 30 s and more, with its partition held) before its breaker opens."""
    s = settings.model_copy(update={"breaker_cooldown_s": 60.0})
    model_topic = Topics.from_settings(s).model("m")
    tried: Counter[int] = Counter()

    async def refusing(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        bad = [x for x in sends if x.topic == model_topic]
        good = [x for x in sends if x.topic != model_topic]
        report = await real_publish(producer, good, budget) if good else PublishReport()
        for x in bad:
            assert x.partition is not None
            tried[x.partition] += 1
            x.error = NotLeaderForPartitionError()
        report.unsent += bad
        return report

    monkeypatch.setattr(faults_module, "publish", refusing)
    served = Served()
    a = make_worker(s, redis, served, "m", head_id="a", partition=0, capacity=500)
    b = make_worker(s, redis, served, "m", head_id="b", partition=1, capacity=500)
    router = make_router(s, redis)

    def both_open() -> bool:
        view = router.faults.view
        return all(h in view and view[h].state is BreakerState.OPEN for h in ("a", "b"))

    async with running(a, b), running(router):
        async with JobProducer(s) as p:
            await p.submit("m", {"i": 0}, job_id="lone")
        await wait_until(both_open, timeout=30)
        await asyncio.sleep(1.0)  # the job read again meanwhile finds both heads open
    assert not served.rows
    assert sum(tried.values()) >= 2, f"the job was moved within its batch: {dict(tried)}"
    assert dict(tried) == {0: 1, 1: 1}, (
        f"each head tried once, then its breaker opened; sends per partition: {dict(tried)}"
    )


async def test_a_half_open_probe_spent_by_a_batch_whose_publish_raised_is_not_lost(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head h's breaker is half-open: the router leases its one probe and plans the lone job on it. The batch's
    publish raises before anything is sent (a bug): the batch is read again from its first record, as it must
    be. The probe was never sent, but it is gone from the router's memory while the lease stays held in Redis:
    the job read again finds h "half-open: probes in flight" and waits (with its partition) until the lease
    lapses, a whole cool-down (30 s by default)."""
    s = settings.model_copy(update={"requests_partitions": 1, "breaker_cooldown_s": 30.0})
    m_topic = Topics.from_settings(s).model("m")
    struck: list[int] = []

    async def bug_once(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        if not struck and any(x.topic == m_topic for x in sends):
            struck.append(len(sends))
            raise RuntimeError("a bug in the publish path, before anything was sent")
        return await real_publish(producer, sends, budget)

    monkeypatch.setattr(faults_module, "publish", bug_once)
    await make_half_open(redis, s, "h")
    served = Served()
    h = make_worker(s, redis, served, "m", head_id="h", partition=0, capacity=500)
    router = make_router(s, redis)
    async with running(h), running(router):
        async with JobProducer(s) as p:
            await p.submit("m", 1, job_id="jm")
        await wait_until(lambda: bool(struck), timeout=30)
        t0 = time.monotonic()
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: "jm" in served.job_ids(), timeout=10)
        waited = time.monotonic() - t0
        blocked = router.memory.blocked.get("h")
    assert struck == [1]
    assert router.stats.batch_errors == 1
    assert served.job_ids() == ["jm"], (
        f"jm, the probe of half-open head h, was not routed {waited:.0f} s after the bug; the router sees h as: "
        f"{blocked}"
    )
