"""A router loads its batch scripts and opens its Redis connections before its first batch, so every batch, the
first one too, costs Redis exactly two round trips (claims, then marks): the issue's "≤ 2 round trips per batch"
holds batch by batch, not only on average over a long drain."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from producers.producer import JobProducer
from router_worker.pipeline.router import Router
from router_worker.runtime import connect_redis
from router_worker.settings import Settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration

_SET_UP = {b"HELLO", b"CLIENT", b"AUTH", b"SELECT"}


def _name(command: Any) -> bytes:
    """The first command's name in what redis-py writes (RESP: ``*N``, then ``$len`` and the name)."""
    raw = (
        command
        if isinstance(command, bytes | bytearray | memoryview)
        else b"".join(bytes(c) for c in command)
    )
    return bytes(raw).split(b"\r\n", 3)[2].upper()


async def test_every_batch_costs_two_round_trips_from_the_first_one(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_batch = contextvars.ContextVar("in_batch", default=False)
    round_trips = [0]
    batches = [0]
    send = AbstractConnection.send_packed_command
    step, prepare = Router.step, Router.prepare

    async def counted_send(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        # The batch's own awaits, and the publish and close tasks it starts (context copied). A connection's own
        # set-up (HELLO, CLIENT SETINFO) is not the batch's work: the pool may open one more while the resync or
        # the reaper holds the warm ones.
        if in_batch.get() and _name(command) not in _SET_UP:
            round_trips[0] += 1
        await send(self, command, check_health)

    async def counted_step(self: Router, *args: Any, **kwargs: Any) -> None:
        in_batch.set(True)
        try:
            await step(self, *args, **kwargs)
        finally:
            in_batch.set(False)

    async def counted_prepare(self: Router, *args: Any, **kwargs: Any) -> Any:
        batches[0] += 1
        return await prepare(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted_send)
    monkeypatch.setattr(Router, "step", counted_step)
    monkeypatch.setattr(Router, "prepare", counted_prepare)

    served = Served()
    s = settings.model_copy(update={"batch_max_records": 10})
    router = make_router(s, redis)
    worker_redis = connect_redis(s)  # the head's own client: its calls never take the router's connections
    async with running(make_worker(s, worker_redis, served, "m", capacity=1000)), running(router):
        shas = [sc.sha for sc in (*router.marks.scripts(), *router.faults.scripts())]
        assert all(await redis.script_exists(*shas)), "the batch scripts are loaded before the first batch"
        assert round_trips == [0]
        assert batches == [0]
        async with JobProducer(s) as p:
            for i in range(60):
                await p.submit("m", {"i": i})
        await wait_until(lambda: len(served.rows) >= 60)
        await wait_until(
            lambda: router._inflight is None and (router._closing is None or router._closing.done()),
            timeout=10,
        )
    await worker_redis.aclose()
    assert batches[0] >= 6, batches
    assert round_trips[0] == 2 * batches[0], f"{round_trips[0]} round trips for {batches[0]} batches"
