"""Two batches overlap (the next is planned while the previous one's publishes are in flight). When the previous
one's publishes go unsent, its partition is read again from the first unsent record, and what the next batch had
planned for that partition is dropped and read again too: every job routed once, the offset committed to the end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
import router_worker.pipeline.router as router_module
from producers.producer import JobProducer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def test_a_batch_planned_behind_an_unsent_one_is_read_again_not_skipped(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(update={"batch_max_records": 5})
    calls = [0]

    async def first_publish_lost(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        calls[0] += 1
        if (
            calls[0] == 1
        ):  # slow, then unsent: meanwhile the router plans the next batch of the same partition
            await asyncio.sleep(1.0)
            for x in sends:
                x.error = KafkaTimeoutError("broker gone for a moment")
            return PublishReport(unsent=list(sends), tries=budget.attempts)
        return await real_publish(producer, sends, budget)

    dropped: list[set[Any]] = []
    real_drop = router_module._Prepared.drop

    def drop(self: Any, tps: set[Any]) -> Any:
        dropped.append(set(tps))
        return real_drop(self, tps)

    monkeypatch.setattr(faults_module, "publish", first_publish_lost)
    monkeypatch.setattr(router_module._Prepared, "drop", drop)
    served = Served()
    worker = make_worker(s, redis, served, "m", head_id="h", capacity=1000)
    ids = [f"o{i:02d}" for i in range(30)]
    async with running(worker):
        async with JobProducer(s) as p:  # one session: one partition of the request topic, in order
            for job_id in ids:
                await p.submit("m", job_id, job_id=job_id, session_id="one-partition")
        router = make_router(s, redis)
        async with running(router):
            await wait_until(lambda: set(served.job_ids()) == set(ids), timeout=60)
            await asyncio.sleep(1.0)  # a duplicate would arrive by now
    assert dropped, "the next batch was planned behind the unsent one"
    assert all(dropped), "and dropped"
    assert served.job_ids() == ids, "each once, in the partition's order: nothing routed past the unsent ones"
    assert router.stats.unsent == 5
    assert router.stats.dead_lettered == 0
