"""Token buckets (GCRA with reservations) as pure functions: time injected, no Redis."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.core.admission import Limit, model_key, retry_tier_for, schedule, tenant_key, tokens
from router_worker.core.engine import HeadIndex, decide, record
from router_worker.core.model import Outcome, RouterMemory
from router_worker.core.policy import Policy
from router_worker.state.policy_store import PolicyError, parse_policy
from schemas.envelope import Job
from tests.unit.core.sim import head

T0 = 1_000_000.0
A = tenant_key("acme")
B = tenant_key("other")
M = model_key("m")


def test_a_burst_goes_at_once_and_the_rest_at_the_rate() -> None:
    limits = {A: Limit(rate=50, burst=50)}
    _, at = schedule({}, limits, [[A]] * 500, T0)
    now = [t for t in at if t <= T0]
    assert len(now) == 50
    assert at == sorted(at)
    assert at[-1] - T0 == pytest.approx(450 * 20.0), "the 500th job goes 9 s later: 450 jobs at 50/s"


def test_tenants_do_not_share_a_bucket() -> None:
    limits = {A: Limit(rate=1, burst=1), B: Limit(rate=1, burst=1)}
    _, at = schedule({}, limits, [[A], [A], [B]], T0)
    assert at == [T0, T0 + 1000, T0]


def test_a_job_needs_both_its_tenant_and_its_model_token() -> None:
    limits = {A: Limit(rate=10, burst=1), B: Limit(rate=1000, burst=100), M: Limit(rate=1, burst=1)}
    tats, at = schedule({}, limits, [[A, M], [B, M]], T0)
    assert at == [T0, T0 + 1000], "the model's bucket holds the second tenant's job"
    assert tats[A] == T0 + 100


def test_a_job_with_no_limit_goes_now_and_touches_nothing() -> None:
    tats, at = schedule({A: T0 + 5000}, {A: Limit(1, 1)}, [[]], T0)
    assert at == [T0]
    assert tats == {A: T0 + 5000}


def test_reservations_carry_over_batches() -> None:
    limits = {A: Limit(rate=10, burst=2)}
    tats, at1 = schedule({}, limits, [[A]] * 3, T0)
    _, at2 = schedule(tats, limits, [[A]], T0 + 1)
    assert at1 == [T0, T0, T0 + 100]
    assert at2 == [T0 + 200]


def test_a_quiet_bucket_refills_to_its_burst_and_no_more() -> None:
    lim = Limit(rate=10, burst=5)
    tats, _ = schedule({}, {A: lim}, [[A]] * 5, T0)
    assert tokens(tats[A], lim, T0) == pytest.approx(0)
    assert tokens(tats[A], lim, T0 + 60_000) == pytest.approx(5)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        Limit(rate=0, burst=1)
    with pytest.raises(ValueError, match="rate"):
        Limit(rate=math.inf, burst=1)
    with pytest.raises(ValueError, match="burst"):
        Limit(rate=1, burst=0)


def test_retry_tier_covers_the_delay() -> None:
    tiers = [100, 1000, 5000]
    assert retry_tier_for(50, tiers) == 1
    assert retry_tier_for(100, tiers) == 1
    assert retry_tier_for(101, tiers) == 2
    assert retry_tier_for(60_000, tiers) == 3


# --- properties ------------------------------------------------------------------------------------------------

limit_st = st.builds(Limit, rate=st.floats(0.5, 500), burst=st.integers(1, 50))
batches_st = st.lists(
    st.tuples(st.floats(0, 3000), st.lists(st.sampled_from([(A,), (B,), (A, M), (B, M), ()]), max_size=40)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(la=limit_st, lb=limit_st, lm=limit_st, batches=batches_st)
def test_no_bucket_ever_lets_more_than_burst_plus_rate_through(la: Limit, lb: Limit, lm: Limit,
                                                               batches: list[tuple[float, list[tuple[str, ...]]]]
                                                               ) -> None:  # fmt: skip
    limits = {A: la, B: lb, M: lm}
    tats: dict[str, float] = {}
    now = T0
    went: dict[str, list[float]] = {A: [], B: [], M: []}
    for dt, jobs in batches:
        now += dt
        tats, at = schedule(tats, limits, jobs, now)
        for keys, t in zip(jobs, at, strict=True):
            assert t >= now, "a job never goes before it was admitted"
            for k in keys:
                went[k].append(t)
        for k, lim in limits.items():
            if k in tats:
                assert tokens(tats[k], lim, now) <= lim.burst + 1e-6, "a bucket holds more than its burst"
    for k, times in went.items():
        lim = limits[k]
        times.sort()
        # In any span of L ms at most burst + L * rate / 1000 jobs went (the token bucket bound).
        for i in range(len(times)):
            for j in range(i, len(times)):
                span = times[j] - times[i]
                assert j - i + 1 <= lim.burst + span / lim.interval_ms + 1e-6


@settings(max_examples=200, deadline=None)
@given(lim=limit_st, n=st.integers(1, 200))
def test_jobs_keep_their_order_and_the_first_burst_goes_now(lim: Limit, n: int) -> None:
    _, at = schedule({}, {A: lim}, [[A]] * n, T0)
    assert at == sorted(at)
    assert sum(1 for t in at if t == T0) == min(n, lim.burst)


# --- policy fields and priority ---------------------------------------------------------------------------------


def test_policy_admission_defaults_and_overrides() -> None:
    p = Policy.model_validate({"admission": {"tenant": {"rate": 10}, "tenants": {"acme": {"rate": 50, "burst": 5},
                                                                                "vip": None},
                                             "models": {"m": {"rate": 1000}}}})  # fmt: skip
    a = p.admission
    assert a.active
    assert a.tenant_limit("acme") == Limit(50, 5)
    assert a.tenant_limit("someone") == Limit(10, 10), "the default; burst defaults to one second's worth"
    assert a.tenant_limit("vip") is None, "an override of null: unlimited"
    assert a.tenant_limit(None) is None, "a job without a tenant has no tenant limit"
    assert a.model_limit("m") == Limit(1000, 1000)
    assert a.model_limit("other") is None
    assert not Policy().admission.active


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"admission": {"tenant": {"rate": 0}}}, "admission.tenant.rate"),
        ({"admission": {"tenants": {"a": {"rate": 1, "burst": 0}}}}, "admission.tenants.a.burst"),
        ({"admission": {"tenant": {"rate": 1, "brust": 3}}}, "admission.tenant.brust"),
        ({"breaker": {"error_threshold": 1.5}}, "breaker.error_threshold"),
        ({"breaker": {"half_open_probes": 0}}, "breaker.half_open_probes"),
        ({"breaker": {"window_s": 0.1}}, "breaker.window_s"),
        ({"priority_headroom": 1.0}, "priority_headroom"),
    ],
)
def test_bad_fault_fields_are_refused_naming_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError, match=field.replace(".", r"\.")):
        parse_policy(doc)


def _saturating(priority: int | None, headroom: float) -> int:
    """Jobs of ``priority`` routed to one head of capacity 10 before the router holds them back."""
    policy = Policy(max_load_threshold=1.0, priority_headroom=headroom)
    index = HeadIndex.build([head("h", capacity=10)])
    mem = RouterMemory()
    n = 0
    for i in range(20):
        job = Job(job_id=f"j{i}", model_type="m", priority=priority)
        d = decide(job, index, policy, mem, 1_000, random.Random(i))
        if not d.routed:
            assert d.outcome is Outcome.SATURATED
            break
        record(d, mem, job, policy, 1_000)
        n += 1
    return n


def test_lower_priority_jobs_are_held_first_as_heads_saturate() -> None:
    assert _saturating(1, 0.2) == 10
    assert _saturating(None, 0.2) == 8
    assert _saturating(0, 0.2) == 8
    assert _saturating(-3, 0.2) == 6
    assert _saturating(None, 0.0) == 10, "no headroom (the default): priority changes nothing"


def test_a_high_priority_job_still_goes_where_low_priority_ones_are_held() -> None:
    policy = Policy(max_load_threshold=1.0, priority_headroom=0.3)
    index = HeadIndex.build([head("h", capacity=10)])
    mem = RouterMemory(pending={"h": 8})
    low = decide(Job(job_id="low", model_type="m"), index, policy, mem, 1_000, random.Random(1))
    high = decide(Job(job_id="high", model_type="m", priority=5), index, policy, mem, 1_000, random.Random(1))
    again = decide(Job(job_id="low2", model_type="m"), index, policy, mem, 1_000, random.Random(1))
    assert low.outcome is Outcome.SATURATED
    assert high.routed
    assert again.outcome is Outcome.SATURATED
