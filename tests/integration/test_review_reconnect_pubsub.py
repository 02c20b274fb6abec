"""A subscriber connection cut while Redis stays up (Redis dropping a subscriber past its output buffer limit, a
proxy or LB restart, CLIENT KILL, a failover behind one address): the state cache's ``_listen`` must learn of it,
so it marks policy and models dirty and its resync re-reads them; a policy change whose event was lost with the
connection is then still picked up. (A review found that a client-wide retry on ConnectionError, once tried for
stale pooled connections, made redis-py resubscribe silently and hid the cut: ``make_redis`` retries nothing.)"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from router_worker.core.policy import Policy
from router_worker.runtime import make_redis
from router_worker.state.cache import StateCache
from router_worker.state.heads import HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import wait_until
from tests.procs import RedisServer

pytestmark = pytest.mark.integration


class _SubscriberCut:
    """A TCP proxy in front of Redis. :meth:`lose`: what Redis sends the subscribed connections from then on is
    dropped; :meth:`cut`: those connections are closed. Other connections pass through untouched, and new ones
    (the resubscription) work at once: Redis itself stays up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.subs: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        state: dict[str, Any] = {"lose": False, "writer": cw}

        async def up() -> None:
            while data := await cr.read(65536):
                if b"SUBSCRIBE" in data.upper() and state not in self.subs:
                    self.subs.append(state)
                sw.write(data)
                await sw.drain()
            sw.close()

        async def down() -> None:
            while data := await sr.read(65536):
                if not state["lose"]:
                    cw.write(data)
                    await cw.drain()

        await asyncio.gather(up(), down(), return_exceptions=True)

    def lose(self) -> None:
        for s in self.subs:
            s["lose"] = True

    def cut(self) -> None:
        for s in self.subs:
            s["writer"].transport.abort()
        self.subs.clear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_policy_change_lost_with_a_cut_subscription_is_still_picked_up(tmp_path: Path) -> None:
    async with RedisServer(tmp_path / "redis") as server:
        proxy = _SubscriberCut(server.port)
        url = await proxy.start()
        redis = make_redis(url, 2.0)  # the router's client, as runtime.connect_redis makes it
        direct = make_redis(server.url, 2.0)
        keys = Keys("review-pubsub")
        cache = StateCache(redis, HeadRegistry(redis, keys, 5_000), PolicyStore(redis, keys), 100)
        try:
            await cache.start()
            await wait_until(lambda: len(proxy.subs) == 1)
            proxy.lose()
            stored = await PolicyStore(direct, keys).set(Policy(), None, "op")  # its event is lost
            await asyncio.sleep(0.2)
            proxy.cut()  # Redis is up: the subscription comes back at once
            await asyncio.sleep(1.0)  # ten periodic resyncs
            assert cache.policy.version == stored.version, "the router routes on the old policy"
        finally:
            with contextlib.suppress(Exception):
                await cache.stop()
            await redis.aclose()
            await direct.aclose()
            proxy.close()
