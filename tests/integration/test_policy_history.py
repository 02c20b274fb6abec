"""A policy history entry that no longer validates (stored by an older version, or by hand) is skipped, not a 500."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from router_worker.core.policy import Policy
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore

pytestmark = pytest.mark.integration


async def test_a_bad_history_entry_is_skipped(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.redis_prefix)
    store = PolicyStore(redis, keys)
    await store.set(Policy(default_strategy="random"))
    await store.set(Policy(default_strategy="least_loaded"))
    await redis.lpush(keys.policy_history, b'{"default_strategy": "no_such_strategy"}', b"not json")
    history = await store.history(10)
    assert [p.default_strategy for p in history][:1] == ["random"]
