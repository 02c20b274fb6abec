"""Each router's local view of heads and policy, kept current by Redis pub/sub events plus a periodic resync.

Routing reads only this view, so no job waits on Redis. An event (head registered, status changed,
removed; policy changed) triggers a resync at once; the periodic resync picks up load and latency reports
and repairs anything a lost pub/sub message would have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router_worker.clock import now_ms
from router_worker.core.catalog import ModelSpec
from router_worker.core.engine import EMPTY_INDEX, HeadIndex
from router_worker.core.model import Head
from router_worker.core.policy import DEFAULT_POLICY, Policy
from router_worker.state.catalog import ModelCatalog
from router_worker.state.heads import HeadRegistry
from router_worker.state.health import RedisHealth
from router_worker.state.policy_store import PolicyStore
from router_worker.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class StateCache:
    def __init__(self, redis: Redis, registry: HeadRegistry, policies: PolicyStore, refresh_ms: int,
                 on_refresh: Callable[[StateCache], None] | None = None,
                 on_event: Callable[[str], None] | None = None,
                 health: RedisHealth | None = None,
                 vet: Callable[[list[Head]], Awaitable[list[Head]]] | None = None) -> None:  # fmt: skip
        self.health = health or RedisHealth()
        self.vet = vet
        """Drops heads that can not be addressed (a partition their model topic lacks) before indexing."""
        self.redis = redis
        self.registry = registry
        self.policies = policies
        self.catalog = ModelCatalog(redis, registry.keys)
        self.models: dict[str, ModelSpec] = {}
        self._models_dirty = True
        self.refresh_s = refresh_ms / 1000
        self.on_refresh = on_refresh
        self.on_event = on_event
        self.index: HeadIndex = EMPTY_INDEX
        self.policy: Policy = DEFAULT_POLICY
        self.inflight: dict[str, int] = {}
        self.refreshes = 0
        self._wake = asyncio.Event()
        self._policy_dirty = True
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._pubsub: Any = None

    async def start(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.registry.keys.events)
        self._pubsub = pubsub
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._listen(pubsub), name="state-events"),
            asyncio.create_task(self._loop(), name="state-resync"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None

    async def refresh(self) -> None:
        if self._policy_dirty:
            self._policy_dirty = False
            self.policy = await self.policies.get()
        if self._models_dirty:
            self._models_dirty = False
            self.models = await self.catalog.all()
        heads, profiles, inflight = await self.registry.snapshot()
        self.health.ok(now_ms())
        if self.vet is not None:
            heads = await self.vet(heads)
        self.index = HeadIndex.build(heads, profiles, self.models)
        self.inflight = inflight
        self.refreshes += 1
        if self.on_refresh is not None:
            self.on_refresh(self)

    async def _loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            self._wake.clear()
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                if self.health.up:
                    log.warning("head state resync failed, keeping the last snapshot: %s", exc)
                self.health.failed(now_ms())
                self._policy_dirty = self._models_dirty = True
                await asyncio.sleep(min(1.0, self.refresh_s))
            except Exception:  # a bug must not silently end the resync while the router looks healthy
                log.exception("head state resync failed unexpectedly, keeping the last snapshot")
                await asyncio.sleep(min(1.0, self.refresh_s))

    async def _listen(self, pubsub: Any) -> None:
        """Change events; polled with a timeout, so an idle channel is never mistaken for a dead Redis."""
        while not self._stopping:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:  # any failure: resubscribe; the periodic resync covers the gap
                if self.health.up:
                    log.warning("event subscription lost, resubscribing: %s", exc)
                self._policy_dirty = self._models_dirty = True
                self._wake.set()
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            try:
                event = orjson.loads(msg["data"]).get("event", "")
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                continue
            if self.on_event is not None:
                self.on_event(event)
            if event == "policy_changed":
                self._policy_dirty = True
            elif event.startswith("model_"):
                self._models_dirty = True
            self._wake.set()
