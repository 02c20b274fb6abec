"""The soak's pure parts: the fault schedule, laying duplicates to faults, latency per minute, memory growth."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_worker.bench_soak import (
    FAULTS,
    Delivery,
    FaultWindow,
    SoakConfig,
    delivery_of,
    explain_duplicates,
    fault_plan,
    latency_by_minute,
    memory_growth,
    percentile,
)


def test_the_one_minute_plan_has_each_fault_once_with_a_period_left_to_recover() -> None:
    plan = fault_plan(SoakConfig(minutes=1, fault_every_s=12, warmup_s=6))
    assert plan == [(6, "router_kill"), (18, "head_kill"), (30, "redis_restart"), (42, "router_pause")]


@given(st.floats(0.1, 30), st.floats(5, 120), st.floats(0, 60))
def test_a_plan_cycles_the_faults_and_ends_a_period_before_production(minutes: float, every: float,
                                                                      warmup: float) -> None:  # fmt: skip
    cfg = SoakConfig(minutes=minutes, fault_every_s=every, warmup_s=warmup)
    plan = fault_plan(cfg)
    for i, (at, kind) in enumerate(plan):
        assert kind == FAULTS[i % len(FAULTS)]
        assert at == pytest.approx(warmup + i * every)
        assert at + every <= cfg.duration_s + 1e-6
    assert not plan or plan[-1][0] + 2 * every > cfg.duration_s  # no room was left for one more


@pytest.mark.parametrize(
    "kw", [{"minutes": 0}, {"rate": 0}, {"fault_every_s": 1}, {"faults": ("router_kil",)}, {"drain_s": 0}]
)
def test_a_bad_config_is_refused_naming_the_problem(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"minutes|rate|fault|drain"):
        SoakConfig(**kw)  # type: ignore[arg-type]


def d(attempt: int, routed: int, finished: int, head: str = "a1") -> Delivery:
    return Delivery(attempt, routed, head, created_at=routed - 5, finished_at=finished)


KILL = FaultWindow("router_kill", "r1", start_ms=100_000, end_ms=108_000)
HEAD = FaultWindow("head_kill", "a1", start_ms=200_000, end_ms=205_000)


def test_a_router_kill_explains_a_reroute_of_the_same_attempt_in_its_window() -> None:
    dups = explain_duplicates({"j": [d(1, 99_500, 99_520), d(1, 107_000, 107_010, "a2")]}, [KILL, HEAD])
    assert (dups.extra, dups.jobs, dups.unexplained) == (1, 1, 0)
    assert dups.by_fault == {"router_kill": 1}
    assert dups.by_how == {"rerouted_same_attempt": 1}
    assert dups.per_fault == [1, 0]


def test_a_head_kill_explains_the_next_attempt_and_a_record_served_again() -> None:
    deliveries = {
        "next": [d(1, 199_000, 199_900), d(2, 206_000, 206_050, "a2")],
        "again": [d(1, 199_500, 199_600), d(1, 199_500, 204_000)],
    }
    dups = explain_duplicates(deliveries, [KILL, HEAD])
    assert dups.unexplained == 0
    assert dups.by_fault == {"head_kill": 2}
    assert dups.by_how == {"rerouted_next_attempt": 1, "served_again": 1}


def test_a_duplicate_no_fault_can_cause_is_unexplained() -> None:
    deliveries = {
        "far": [d(1, 10_000, 10_010), d(1, 20_000, 20_010)],  # no fault near it
        "wrong_kind": [
            d(1, 199_000, 199_010),
            d(1, 201_000, 201_010),
        ],  # a head kill does not re-route an attempt
        "before": [d(1, 99_000, 99_010), d(1, 99_500, 99_510)],  # delivered again before the fault began
        "long_before": [d(1, 80_000, 80_010), d(1, 101_000, 101_010)],  # routed long before the fault
    }
    dups = explain_duplicates(deliveries, [KILL, HEAD])
    assert dups.unexplained == 4
    assert dups.by_fault == {}
    assert len(dups.unexplained_samples) == 4
    assert any(s.startswith("wrong_kind: rerouted_same_attempt") for s in dups.unexplained_samples)


def test_three_deliveries_count_two_extra_and_single_deliveries_none() -> None:
    deliveries = {"j": [d(1, 99_000, 99_010), d(1, 101_000, 101_010), d(1, 102_000, 102_010)],
                  "k": [d(1, 5, 6)]}  # fmt: skip
    dups = explain_duplicates(deliveries, [KILL])
    assert (dups.extra, dups.jobs, dups.unexplained) == (2, 1, 0)


def test_the_latest_fault_that_fits_takes_the_duplicate() -> None:
    pause = FaultWindow("router_pause", "r2", start_ms=103_000, end_ms=110_000)
    dups = explain_duplicates({"j": [d(1, 102_000, 102_010), d(1, 109_000, 109_010)]}, [KILL, pause])
    assert dups.per_fault == [0, 1]


def test_latency_per_minute_of_production() -> None:
    t0 = 1_000_000
    first = [Delivery(1, 0, "h", t0 + i * 1000, t0 + i * 1000 + 10 + i) for i in range(120)]
    rows = latency_by_minute(first, t0)
    assert [(r.minute, r.jobs) for r in rows] == [(0, 60), (1, 60)]
    assert rows[0].max_ms == 69
    assert rows[1].max_ms == 129
    assert rows[0].p50_ms == 39
    assert rows[0].p99_ms == 69


def test_percentile_nearest_rank() -> None:
    assert math.isnan(percentile([], 0.5))
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_memory_growth_from_the_first_sample_after_warm_up_to_the_last() -> None:
    m = memory_growth("r1", 42, 10.0, [(12.0, 50.0), (21.0, 80.0), (40.0, 84.0), (60.0, 88.0)], 10.0)
    assert (m.warm_mb, m.end_mb) == (80.0, 88.0)
    assert m.growth_pct == pytest.approx(10.0)
    young = memory_growth("r1", 43, 55.0, [(56.0, 80.0)], 10.0)
    assert young.warm_mb is None
    assert young.growth_pct is None


def test_a_completion_record_becomes_a_delivery_whatever_it_lacks() -> None:
    full = {"attempt": 2, "routed_at": 5, "head_id": "a1", "created_at": 3, "finished_at": 9}
    assert delivery_of(full) == Delivery(2, 5, "a1", 3, 9)
    assert delivery_of({"head_id": None, "attempt": "x"}) == Delivery(0, 0, "", 0, 0)
