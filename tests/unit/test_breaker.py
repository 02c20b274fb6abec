"""The circuit breaker as a pure state machine: time injected, no Redis."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.core.breaker import (
    BUCKET_MS,
    Breaker,
    BreakerConfig,
    BreakerState,
    error_rate,
    evaluate,
    lease,
    probes_left,
    prune,
    record,
    routable,
    window_counts,
)
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.engine import record as record_decision
from router_worker.core.model import Outcome, RouterMemory
from router_worker.core.policy import STRATEGIES, Policy
from schemas.envelope import Job
from tests.unit.core.sim import head as sim_head

CFG = BreakerConfig(
    window_ms=10_000, min_volume=10, error_threshold=0.5, cooldown_ms=5_000, half_open_probes=2
)
T0 = 1_000_000


def opened(at: int = T0) -> Breaker:
    b = record(Breaker(), at, ok=0, err=10)
    b, t = evaluate(b, CFG, at)
    assert t is not None
    return b


def test_closed_until_min_volume_even_at_full_error_rate() -> None:
    b = record(Breaker(), T0, err=9)
    b2, t = evaluate(b, CFG, T0)
    assert t is None
    assert b2.state is BreakerState.CLOSED
    assert routable(b2)


def test_opens_at_threshold_with_volume_and_reports_the_counts() -> None:
    b = record(Breaker(), T0, ok=5, err=5)
    b, t = evaluate(b, CFG, T0 + 10)
    assert t is not None
    assert (t.from_state, t.to_state, t.ok, t.err) == (BreakerState.CLOSED, BreakerState.OPEN, 5, 5)
    assert t.event == "breaker_opened"
    assert b.state is BreakerState.OPEN
    assert b.open_until_ms == T0 + 10 + CFG.cooldown_ms
    assert b.version == 1
    assert not routable(b)


def test_below_threshold_stays_closed() -> None:
    b = record(Breaker(), T0, ok=6, err=4)
    assert evaluate(b, CFG, T0)[1] is None
    assert error_rate(b, CFG, T0) == pytest.approx(0.4)


def test_old_failures_leave_the_window() -> None:
    b = record(Breaker(), T0, err=10)
    later = T0 + CFG.window_ms + BUCKET_MS
    assert window_counts(b, CFG, later) == (0, 0)
    assert evaluate(b, CFG, later)[1] is None
    assert prune(b, CFG, later).window == ()


def test_open_stays_open_until_the_cool_down_then_half_open() -> None:
    b = opened()
    assert evaluate(b, CFG, b.open_until_ms - 1)[1] is None
    b2, t = evaluate(b, CFG, b.open_until_ms)
    assert t is not None
    assert t.event == "breaker_half_open"
    assert b2.state is BreakerState.HALF_OPEN


def test_a_failure_while_open_never_shortens_the_cool_down() -> None:
    b = opened()
    until = b.open_until_ms
    b = record(b, T0 + 100, err=50)
    b, t = evaluate(b, CFG, T0 + 100)
    assert t is None
    assert b.open_until_ms == until


def test_a_shorter_cool_down_in_a_new_policy_does_not_shorten_an_open_breaker() -> None:
    b = opened()
    short = BreakerConfig(window_ms=10_000, min_volume=10, error_threshold=0.5, cooldown_ms=10)
    b, _ = evaluate(b, short, T0 + 100)
    assert b.state is BreakerState.OPEN
    assert b.open_until_ms == T0 + CFG.cooldown_ms


def test_half_open_leases_a_bounded_number_of_probes() -> None:
    b, _ = evaluate(opened(), CFG, T0 + CFG.cooldown_ms)
    b, got = lease(b, CFG, T0 + CFG.cooldown_ms, want=5)
    assert got == 2
    assert probes_left(b, CFG, T0 + CFG.cooldown_ms) == 0
    b2, more = lease(b, CFG, T0 + CFG.cooldown_ms + 1, want=1)
    assert more == 0
    assert b2 is b
    # A lease nobody used lapses after the cool-down, so a router that died with it does not wedge the breaker.
    assert probes_left(b, CFG, b.lease_until_ms) == 2


def test_half_open_closes_on_a_success_and_forgets_old_failures() -> None:
    t_half = T0 + CFG.cooldown_ms
    b, _ = evaluate(opened(), CFG, t_half)
    b = record(b, t_half + 10, ok=1)
    b, t = evaluate(b, CFG, t_half + 20)
    assert t is not None
    assert t.to_state is BreakerState.CLOSED
    assert window_counts(b, CFG, t_half + 20) == (0, 0), "the failures that opened it no longer count"
    assert evaluate(b, CFG, t_half + 30)[1] is None


def test_half_open_reopens_on_a_probe_failure_for_a_new_cool_down() -> None:
    t_half = T0 + CFG.cooldown_ms
    b, _ = evaluate(opened(), CFG, t_half)
    b = record(b, t_half + 10, err=1)
    b, t = evaluate(b, CFG, t_half + 20)
    assert t is not None
    assert t.to_state is BreakerState.OPEN
    assert b.open_until_ms == t_half + 20 + CFG.cooldown_ms


def test_failures_counted_before_half_open_do_not_judge_the_probe() -> None:
    b = opened()
    b = record(b, T0 + 100, err=3)  # late nacks of jobs sent before it opened
    b, _ = evaluate(b, CFG, b.open_until_ms)
    assert evaluate(b, CFG, b.since_ms + 1)[1] is None


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="error_threshold"):
        BreakerConfig(error_threshold=0)
    with pytest.raises(ValueError, match="half_open_probes"):
        BreakerConfig(half_open_probes=0)
    with pytest.raises(ValueError, match="window_ms"):
        BreakerConfig(window_ms=1)
    with pytest.raises(ValueError, match="negative"):
        record(Breaker(), T0, ok=-1)


# --- properties ------------------------------------------------------------------------------------------------

op_st = st.one_of(
    st.tuples(st.just("wait"), st.integers(0, 8_000)),
    st.tuples(st.just("ok"), st.integers(1, 30)),
    st.tuples(st.just("err"), st.integers(1, 30)),
    st.tuples(st.just("eval"), st.just(0)),
    st.tuples(st.just("lease"), st.integers(1, 4)),
)
cfg_st = st.builds(
    BreakerConfig,
    window_ms=st.integers(BUCKET_MS, 20_000),
    min_volume=st.integers(1, 30),
    error_threshold=st.floats(0.01, 1.0),
    cooldown_ms=st.integers(0, 10_000),
    half_open_probes=st.integers(1, 3),
)
LEGAL = {
    (BreakerState.CLOSED, BreakerState.OPEN),
    (BreakerState.OPEN, BreakerState.HALF_OPEN),
    (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    (BreakerState.HALF_OPEN, BreakerState.OPEN),
}


@settings(max_examples=300, deadline=None)
@given(cfg=cfg_st, ops=st.lists(op_st, max_size=60))
def test_cool_down_is_monotone_and_transitions_are_legal(cfg: BreakerConfig,
                                                          ops: list[tuple[str, int]]) -> None:  # fmt: skip
    b = Breaker()
    now = T0
    leased_now = 0
    for kind, n in ops:
        before = b
        if kind == "wait":
            now += n
        elif kind == "ok":
            b = record(b, now, ok=n)
        elif kind == "err":
            b = record(b, now, err=n)
        elif kind == "eval":
            b, t = evaluate(b, cfg, now)
            if t is not None:
                assert (t.from_state, t.to_state) in LEGAL
                assert b.version == before.version + 1
                if t.from_state is BreakerState.OPEN:
                    assert now >= before.open_until_ms, "left open before its cool-down ended"
                if t.to_state is BreakerState.OPEN:
                    assert b.open_until_ms >= now + cfg.cooldown_ms
            else:
                assert b.state is before.state
        else:
            b, got = lease(b, cfg, now, n)
            assert 0 <= got <= n
            if b.state is not BreakerState.HALF_OPEN:
                assert got == 0
            leased_now = b.leased
            assert leased_now <= cfg.half_open_probes, "more probes leased than allowed"
        assert b.open_until_ms >= before.open_until_ms, "the cool-down was shortened"
        assert b.total_ok >= before.total_ok
        assert b.total_err >= before.total_err
        ok, err = window_counts(b, cfg, now)
        assert ok >= 0
        assert err >= 0
        assert 0.0 <= error_rate(b, cfg, now) <= 1.0


@settings(max_examples=200, deadline=None)
@given(cfg=cfg_st, counts=st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 5), st.integers(0, 5)),
                                   max_size=30))  # fmt: skip
def test_window_counts_equal_a_brute_force_sum(
    cfg: BreakerConfig, counts: list[tuple[int, int, int]]
) -> None:
    b = Breaker()
    events = []
    now = T0
    for dt, ok, err in counts:
        now += dt
        b = record(b, now, ok=ok, err=err)
        events.append((now, ok, err))
    lo = now - cfg.window_ms
    want_ok = sum(o for t, o, _ in events if t - t % BUCKET_MS + BUCKET_MS > lo)
    want_err = sum(e for t, _, e in events if t - t % BUCKET_MS + BUCKET_MS > lo)
    assert window_counts(b, cfg, now) == (want_ok, want_err)
    assert window_counts(prune(b, cfg, now), cfg, now) == (want_ok, want_err)


# --- the engine honours breakers and a job's excluded heads ---------------------------------------------------


def _engine() -> tuple[HeadIndex, RouterMemory, Policy]:
    return HeadIndex.build([sim_head("bad"), sim_head("good")]), RouterMemory(), Policy()


def test_an_open_breaker_takes_its_head_out_of_every_strategy_and_explain_says_so() -> None:
    index, mem, policy = _engine()
    mem.set_breakers({"bad": "circuit breaker open until 123"}, {})
    for name in STRATEGIES:
        p = policy.model_copy(update={"default_strategy": name})
        for i in range(20):
            d = decide(Job(job_id=f"j{i}", model_type="m"), index, p, mem, T0, random.Random(i))
            assert d.head is not None
            assert d.head.head_id == "good", name
    d = decide(Job(job_id="x", model_type="m"), index, policy, mem, T0, random.Random(1), explain=True)
    assert ("bad", "circuit breaker open until 123") in d.excluded


def test_a_breaker_view_change_rebuilds_cached_candidates() -> None:
    index, mem, policy = _engine()
    job = Job(job_id="x", model_type="m", strategy="random")

    def picks() -> set[str]:
        out = set()
        for i in range(30):
            d = decide(job, index, policy, mem, T0, random.Random(i))
            assert d.head is not None
            out.add(d.head.head_id)
        return out

    assert picks() == {"bad", "good"}
    mem.set_breakers({"bad": "open"}, {})
    assert picks() == {"good"}
    mem.set_breakers({}, {})
    assert picks() == {"bad", "good"}


def test_half_open_probes_let_exactly_the_leased_number_of_jobs_through() -> None:
    index = HeadIndex.build([sim_head("bad", capacity=1000)])
    mem = RouterMemory()
    mem.set_breakers({}, {"bad": 2})
    policy = Policy()
    routed = []
    for i in range(5):
        job = Job(job_id=f"j{i}", model_type="m")
        d = decide(job, index, policy, mem, T0, random.Random(i))
        if d.routed:
            assert "half-open breaker probe" in d.reason
            record_decision(d, mem, job, policy, T0)
            routed.append(job.job_id)
        else:  # the probes are spent: the job waits (held, no attempt spent), it is not a dead letter
            assert d.outcome is Outcome.SATURATED
            assert "open circuit breaker" in d.reason
    assert routed == ["j0", "j1"]
    assert "bad" in mem.blocked


def test_heads_a_job_was_refused_or_failed_by_are_passed_over_while_another_can_take_it() -> None:
    index, mem, policy = _engine()
    for i in range(20):
        d = decide(Job(job_id=f"j{i}", model_type="m"), index, policy, mem, T0, random.Random(i),
                   avoid=frozenset({"bad"}))  # fmt: skip
        assert d.head is not None
        assert d.head.head_id == "good"
    only_bad = HeadIndex.build([sim_head("bad")])
    d = decide(Job(job_id="j", model_type="m"), only_bad, policy, mem, T0, random.Random(1),
               avoid=frozenset({"bad"}))  # fmt: skip
    assert d.head is not None, "no other head: the excluded one is tried again rather than no route at all"
