"""Admission control against a real Redis (the bucket script) and, end to end, real routers and heads in their own
processes: a tenant over its limit is delayed through the retry topics, never dropped or dead-lettered, while
another tenant's jobs go at once."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis

from router_worker.core.admission import Limit, model_key, schedule, tenant_key
from router_worker.settings import Settings
from router_worker.state.admission import Buckets
from router_worker.state.keys import Keys

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


async def test_the_bucket_script_schedules_exactly_as_the_pure_reference(
    settings: Settings, redis: Redis
) -> None:
    rng = random.Random(7)
    names = [tenant_key("a"), tenant_key("b"), model_key("m")]
    limits = {names[0]: Limit(50, 50), names[1]: Limit(3.3, 2), names[2]: Limit(120, 7)}
    buckets = Buckets(redis, Keys(settings.redis_prefix))
    tats: dict[str, float] = {}
    now = T0
    for _ in range(25):
        now += rng.randrange(0, 400)
        jobs = [rng.choice([[names[0]], [names[1]], [names[0], names[2]], [names[1], names[2]], []])
                for _ in range(rng.randrange(0, 60))]  # fmt: skip
        tats, want = schedule(tats, limits, jobs, now)
        got = await buckets.schedule(limits, jobs, now)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert abs(g - w) <= 1, (g, w)


async def test_one_round_trip_admits_a_burst_and_reserves_the_rest(settings: Settings, redis: Redis) -> None:
    buckets = Buckets(redis, Keys(settings.redis_prefix))
    a = tenant_key("acme")
    got = await buckets.schedule({a: Limit(50, 50)}, [[a]] * 500, T0)
    assert sum(1 for t in got if t <= T0) == 50
    assert max(got) - T0 == pytest.approx(9000, abs=1)
    again = await buckets.schedule({a: Limit(50, 50)}, [[a]], T0)
    assert again[0] - T0 == pytest.approx(9020, abs=1), "the reservations are shared state"
