"""State routers share through Redis: session pins survive a rebalance; learned profiles reach every router."""

from __future__ import annotations

from collections import defaultdict

import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.core.policy import Policy
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def test_session_pins_are_shared_so_a_rebalance_keeps_every_session_on_its_head(
    settings: Settings, redis: Redis
) -> None:
    await PolicyStore(redis, Keys(settings.redis_prefix)).set(Policy(default_strategy="affinity"))
    served = Served()
    workers = [make_worker(settings, redis, served, "chat", head_id=f"h{i}", capacity=64) for i in range(4)]
    r1, r2 = make_router(settings, redis), make_router(settings, redis)
    sessions = [f"user-{i}" for i in range(24)]
    async with running(*workers), running(r2):
        async with running(r1):
            await wait_until(
                lambda: len(r1._consumer.assignment()) > 0 and len(r2._consumer.assignment()) > 0
            )  # type: ignore[union-attr]
            async with JobProducer(settings) as p:
                for rnd in range(5):
                    for sid in sessions:
                        await p.submit("chat", rnd, session_id=sid)
            await wait_until(lambda: len(served.rows) >= 5 * len(sessions))
            assert r1.stats.routed > 0
            assert r2.stats.routed > 0
        # r1 left the group: its partitions, and its sessions, are r2's now; r2 never saw them before
        routed_before = r2.stats.routed
        async with JobProducer(settings) as p:
            for rnd in range(5, 10):
                for sid in sessions:
                    await p.submit("chat", rnd, session_id=sid)
        await wait_until(lambda: len(served.rows) >= 10 * len(sessions), timeout=60)
        assert r2.stats.routed - routed_before == 5 * len(sessions)
    by_session: dict[str, set[str]] = defaultdict(set)
    for job_id, head_id, *_ in served.rows:
        by_session[served.session_of[job_id] or ""].add(head_id)
    assert set(by_session) == set(sessions)
    split = {sid: heads for sid, heads in by_session.items() if len(heads) > 1}
    assert not split, f"sessions served by more than one head: {split}"
    assert len({next(iter(h)) for h in by_session.values()}) >= 3, "sessions were spread over the heads"
    for sid, heads in by_session.items():  # and the pin every router reads says the same
        assert await redis.get(Keys(settings.redis_prefix).affinity(sid)) == next(iter(heads))


async def test_heads_learn_profiles_that_every_router_reads(settings: Settings, redis: Redis) -> None:
    served = Served()
    workers = [make_worker(settings, redis, served, "resnet50", head_id=f"r{i}", capacity=8, delay_s=0.002 * (i + 1))
               for i in range(2)]  # fmt: skip
    router = make_router(settings, redis)
    async with running(*workers, router):
        async with JobProducer(settings) as p:
            for i in range(200):
                await p.submit("resnet50", i, estimated_tokens=i % 50)
        await wait_until(lambda: len(served.rows) >= 200)
        await wait_until(lambda: len(router.state.index.profiles) == 2, timeout=5)
        profiles = router.state.index.profiles
        assert all(p.samples >= 50 for p in profiles.values()), profiles
        lat = {h: router.state.index.heads[h].latency_ms for h in ("r0", "r1")}
        assert 0 < lat["r0"] < lat["r1"], f"the slower head reports the higher latency: {lat}"
