"""Admission control against a real Redis (the bucket script) and, end to end, real routers and heads in their own
processes: a tenant over its limit is delayed through the retry topics, never dropped or dead-lettered, while
another tenant's jobs go at once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.core.admission import Limit, model_key, schedule, tenant_key
from router_worker.core.policy import AdmissionPolicy, RateLimit
from router_worker.settings import Settings
from router_worker.state.admission import Buckets
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.procs import Ledger, Procs, read_audit, time_limit

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


@time_limit(150)
async def test_a_tenant_over_its_limit_is_spread_out_and_another_tenant_is_not_delayed(
    settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    s = settings.model_copy(update={"retry_backoff_ms": [100, 1000, 5000]})
    policy = PolicyStore.for_settings(redis, s)
    await policy.set(policy.default.model_copy(update={"admission": AdmissionPolicy(
        tenants={"acme": RateLimit(rate=50, burst=50)})}))  # fmt: skip
    acme = [f"acme-{i:04d}" for i in range(500)]
    other = [f"other-{i:04d}" for i in range(200)]
    async with Procs(s, tmp_path) as procs:
        await procs.start_routers(2)
        heads = [await procs.start_head("m", capacity=64, service_ms=1) for _ in range(2)]
        async with Ledger(s) as ledger:
            async with JobProducer(s) as p:
                for i in range(500):  # all at once, the other tenant's jobs among them
                    await p.submit("m", i, job_id=acme[i], tenant="acme")
                    if i % 5 == 0:
                        await p.submit("m", i, job_id=other[i // 5 * 2], tenant="other")
                        await p.submit("m", i, job_id=other[i // 5 * 2 + 1], tenant="other")
            assert await ledger.wait_for(lambda: ledger.accounted(acme + other) == 700, 90), (
                f"{ledger.delivered(acme)} of acme's, {ledger.delivered(other)} of other's delivered\n"
                f"{procs.report()}"
            )
            await ledger.settle(quiet_s=1.0)
            rep = ledger.report(acme + other)
        procs.assert_alive(*heads)
    assert rep.lost == 0, rep.summary()
    assert not rep.dead_by_reason, f"nothing dead-lettered for being over a limit: {rep.summary()}"
    routed = {j: min(d["routed_at"] for d in ledger.deliveries[j]) for j in acme + other}
    acme_at = sorted(routed[j] for j in acme)
    other_at = sorted(routed[j] for j in other)
    span_s = (acme_at[-1] - acme_at[0]) / 1000
    print(f"\n[admission] acme routed over {span_s:.1f} s; other's last routed "
          f"{(other_at[-1] - acme_at[0]) / 1000:.2f} s after acme's first")  # fmt: skip
    assert span_s >= 0.8 * 9, f"500 jobs at 50/s after a burst of 50 take 9 s; they took {span_s:.1f} s"
    assert span_s <= 60, f"the limited tenant's jobs took {span_s:.1f} s"
    assert other_at[-1] < acme_at[len(acme_at) // 2], (
        "every job of the other tenant went before half of acme's"
    )
    assert all(d["attempt"] == 1 for j in acme + other for d in ledger.deliveries[j]), (
        "a wait is not an attempt"
    )
    records, _ = read_audit(s.audit_file)
    throttled = [r for r in records if r.get("event") == "throttled"]
    assert {r["tenant"] for r in throttled} == {"acme"}
    assert 400 <= sum(r["count"] for r in throttled) <= 450, "the jobs past the burst, each audited once"
