"""A router loads its batch scripts and opens its Redis connections before its first batch, so every batch, the
first one too, costs Redis exactly two round trips (claims, then marks): the issue's "≤ 2 round trips per batch"
holds batch by batch, not only on average over a long drain."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.harness.round_trips import RoundTrips
from router_worker.pipeline.router import Router
from router_worker.runtime import connect_redis
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def test_every_batch_costs_two_round_trips_from_the_first_one(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [0]
    prepare = Router.prepare

    async def counted_prepare(self: Router, *args: Any, **kwargs: Any) -> Any:
        batches[0] += 1
        return await prepare(self, *args, **kwargs)

    monkeypatch.setattr(Router, "prepare", counted_prepare)
    counted = RoundTrips()
    undo = counted.install()
    try:
        served = Served()
        s = settings.model_copy(update={"batch_max_records": 10})
        router = make_router(s, redis)
        worker_redis = connect_redis(
            s
        )  # the head's own client: its calls never take the router's connections
        try:
            async with running(make_worker(s, worker_redis, served, "m", capacity=1000)), running(router):
                shas = [sc.sha for sc in (*router.marks.scripts(), *router.faults.scripts())]
                assert all(await redis.script_exists(*shas)), (
                    "the batch scripts are loaded before the first batch"
                )
                assert counted.in_batches == 0
                assert batches == [0]
                async with JobProducer(s) as p:
                    for i in range(60):
                        await p.submit("m", {"i": i})
                await wait_until(lambda: len(served.rows) >= 60)
                await wait_until(lambda: router._inflight is None
                                 and (router._closing is None or router._closing.done()), timeout=10)  # fmt: skip
        finally:
            await worker_redis.aclose()
    finally:
        undo()
    assert batches[0] >= 6, batches
    # A connection's own set-up (HELLO, CLIENT SETINFO) is the pool's work, not the batch's: the pool may open
    # one more while the resync or the reaper holds the warm ones.
    work = counted.in_batches - counted.set_up
    assert work == 2 * batches[0], f"{work} round trips for {batches[0]} batches"
