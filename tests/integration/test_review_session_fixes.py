"""Adversarial review of 192fa08 (records settled in a rewound batch are duplicates when read again): on the real
broker and Redis. A monkeypatched publish only decides which sends the broker "refuses" or where a bug strikes (as
``test_fallback._refusing`` does); routing, claims, marks and heads are real.

The router remembers the claim keys of a rewound batch's *final* outcomes (``Router._settled``) and calls any
record read again under one of those keys a duplicate. A :class:`Duplicate` outcome is final though nothing of it
was sent: a record a producer re-sent (same job id, same attempt) right behind its first copy is planned as a
duplicate *of that first copy* (``in_batch``). When the first copy stays unsent, its key is remembered because of
the duplicate, and the first copy read again is taken for a settled record: the job is never routed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
from producers.producer import JobProducer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from tests.helpers import Served, UnsentThenRedisAway, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


def _one_batch_ids() -> tuple[list[str], list[str]]:
    """The jobs, and the order the producer writes them in: ``r01`` twice in a row (a producer's retry)."""
    ids = [f"r{i:02d}" for i in range(6)]
    return ids, [ids[0], ids[1], ids[1], *ids[2:]]


async def test_a_job_resent_by_its_producer_is_not_lost_when_its_first_copy_stays_unsent_while_redis_is_away(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer retried a send: job r01 is in the request partition twice, one right behind the other. The
    router plans the first copy as r01's route and the second as its duplicate (final, nothing to send). The
    first copy's publish stays unsent (a timeout) and the partition is read again from it; Redis is away just
    then (the claims and marks fail). r01 was never delivered, so it must be routed when read again; instead the
    router remembered r01's key as settled (the duplicate was final) and turns both copies into duplicates,
    commits past them, and r01 never reaches a head."""
    s = settings.model_copy(update={"batch_max_records": 10})
    ids, order = _one_batch_ids()

    def first_copy_of_r01(sends: Sequence[Send]) -> Send | None:  # its second copy is a duplicate: not sent
        return next((x for x in sends if x.value is not None and b"r01" in x.value), None)

    away = UnsentThenRedisAway(first_copy_of_r01)
    served, router = await away.drive(
        s, redis, monkeypatch, order, ids, away_s=4.0, within_s=20, settle_s=1.0
    )
    assert away.struck
    assert sorted(served.job_ids()) == sorted(ids), (
        f"every job once (missing: {sorted(set(ids) - set(served.job_ids()))}; "
        f"router counted {router.stats.duplicates} duplicates)"
    )


async def test_a_job_resent_by_its_producer_is_not_lost_when_a_bug_strikes_its_first_publish(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same two copies of r01; this time the batch's publishing task raises (a bug, before anything was
    sent). The batch is read again from its first records, as it must be; but the router first remembered the
    keys of the batch's final outcomes as settled for good, and r01's second copy, a duplicate of the first, was
    final. Read again, both copies of r01 are called duplicates of a job that was never sent: lost, with Redis
    up the whole time."""
    s = settings.model_copy(update={"batch_max_records": 10})
    ids, order = _one_batch_ids()
    struck: list[int] = []

    async def bug_once(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        if not struck and any(x.value is not None and b"r01" in x.value for x in sends):
            struck.append(len(sends))
            raise RuntimeError("a bug in the publish path")
        return await real_publish(producer, sends, budget)

    monkeypatch.setattr(faults_module, "publish", bug_once)
    served = Served()
    worker = make_worker(s, redis, served, "m", head_id="h", capacity=1000)
    router = make_router(s, redis)
    async with running(worker):
        async with JobProducer(s) as p:
            for job_id in order:
                await p.submit("m", job_id, job_id=job_id, session_id="one-partition")
        async with running(router):
            await wait_until(lambda: bool(struck), timeout=30)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: set(served.job_ids()) >= set(ids), timeout=20)
            await asyncio.sleep(1.0)
    assert len(struck) == 1, "one publish, holding r01's first copy, met the bug"
    assert router.stats.batch_errors == 1
    assert sorted(served.job_ids()) == sorted(ids), (
        f"every job once (missing: {sorted(set(ids) - set(served.job_ids()))}; "
        f"router counted {router.stats.duplicates} duplicates)"
    )
