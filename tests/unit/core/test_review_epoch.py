"""Review of cf75196 (a load epoch only when some head's in-flight count fell): every strategy that picks through
``CandidateSet.best`` against a fresh heap over the same heads and loads, through this router's picks, counts
from Redis that only rose and counts that fell; the one score that can rise with load (``adaptive`` with a
learned load slope below zero); the outage path's reconciliation to the last known counts; and the decision
bench, whose reconciliation every batch no longer starts an epoch."""

from __future__ import annotations

import math
import random

import pytest

from router_worker.bench import BATCH, _time
from router_worker.core.adaptive import Profile
from router_worker.core.candidates import CandidateSet
from router_worker.core.model import Head, Pick, RouterMemory
from router_worker.core.policy import Goal, Policy
from router_worker.core.strategies import STRATEGY_FUNCTIONS, Context, adaptive, least_loaded
from schemas.envelope import Job

FAR = 10**15

HEAP_STRATEGIES = ("least_loaded", "model_specific", "hybrid", "cache_aware", "quota_aware", "latency_based",
                   "adaptive")  # fmt: skip
"""The strategies whose pick is ``cs.best`` (the others sample or walk a ring with ``cs.ok``)."""


def _key(name: str, pick: Pick | None, policy: Policy) -> float | None:
    """The heap's score of a pick, as far as the pick shows it (``cache_aware`` leaves out its tier bonus)."""
    if pick is None:
        return None
    total = pick.scores.total
    if name == "cache_aware" and pick.head.cache_hit_rate >= policy.min_cache_hit_rate:
        total += 2.0
    return total


def _ctx(job: Job, policy: Policy, mem: RouterMemory, seed: int, goal: Goal, profiles: dict[str, Profile],
         limit: float) -> Context:  # fmt: skip
    return Context(job, policy, mem, 1_000, random.Random(seed), goal, profiles, None, limit)


@pytest.mark.parametrize("seed", range(20))
def test_every_heap_strategy_picks_as_a_fresh_heap_through_picks_rises_and_falls(seed: int) -> None:
    """With load slopes at or above zero (every score falls or stays as load rises), a heap kept through counts
    that only rose picks a head as good as a heap built afresh from the same loads."""
    rng = random.Random(seed)
    heads = tuple(
        Head(head_id=f"h{i}", model_id="m", capacity=rng.choice((1, 2, 4, 8)), expires_at_ms=FAR,
             cache_hit_rate=rng.random(), quota_used=rng.random() * 0.9,
             latency_ms=rng.choice((0.0, rng.uniform(5, 50))), backend=rng.choice(("cpu", "gpu")),
             reported_inflight=rng.choice((0, 0, 1, 3)))
        for i in range(rng.randint(1, 10))
    )  # fmt: skip
    profiles = {
        h.head_id: Profile(rng.randint(3, 200), (rng.uniform(5, 60), rng.uniform(0, 1), rng.uniform(0, 40)),
                           rng.random(), 0.0, rng.uniform(0, 300))
        for h in heads
        if rng.random() < 0.8
    }  # fmt: skip
    policy = Policy(
        backend_weights={"gpu": rng.choice((0.5, 1.0, 2.0))}, load_weight=rng.choice((0.0, 0.1, 1.0))
    )
    for name in HEAP_STRATEGIES:
        fn = STRATEGY_FUNCTIONS[name]
        cs = CandidateSet.of(heads)
        mem = RouterMemory()
        goal = rng.choice(list(Goal))
        for t in range(150):
            if rng.random() < 0.15:  # counts from Redis: only rises half the time, else rises and falls
                low = 0 if rng.random() < 0.5 else -2
                mem.reset_pending({h.head_id: max(0, mem.pending.get(h.head_id, 0) + rng.randint(low, 2))
                                   for h in heads})  # fmt: skip
            job = Job(job_id=f"j{t}", model_type="m", estimated_tokens=rng.choice((None, 1, 40, 900)))
            limit = rng.choice((0.5, 0.9, 1.0))
            got = fn(cs, _ctx(job, policy, mem, t, goal, profiles, limit))
            ref = fn(CandidateSet.of(heads), _ctx(job, policy, mem, t, goal, profiles, limit))
            kg, kr = _key(name, got, policy), _key(name, ref, policy)
            assert (kg is None) == (kr is None), (name, t)
            if kg is not None and kr is not None:
                assert math.isclose(kg, kr, rel_tol=1e-9, abs_tol=1e-12), (name, goal, t, got, ref)
            if got is not None and rng.random() < 0.8:  # this router's pick
                mem.pending[got.head.head_id] = mem.pending.get(got.head.head_id, 0) + 1


def _warming_heads() -> tuple[tuple[Head, ...], dict[str, Profile]]:
    """Head ``a`` answers in 20 ms whatever its load; ``b`` in 40 ms idle but faster when busy (a learned load
    slope of -30 ms: warm caches, clocks that ramp up under load, or a least-squares fit of noise)."""
    heads = (Head(head_id="a", model_id="m", capacity=10, expires_at_ms=FAR),
             Head(head_id="b", model_id="m", capacity=10, expires_at_ms=FAR))  # fmt: skip
    return heads, {"a": Profile(100, (20.0, 0.0, 0.0), 1.0), "b": Profile(100, (40.0, 0.0, -30.0), 1.0)}


def _adaptive_pick(cs: CandidateSet, mem: RouterMemory, profiles: dict[str, Profile]) -> str:
    ctx = _ctx(Job(job_id="j", model_type="m"), Policy(), mem, 0, Goal.MINIMIZE_LATENCY, profiles, 0.9)
    pick = adaptive(cs, ctx)
    assert pick is not None
    return pick.head.head_id


def test_adaptive_with_a_falling_load_slope_is_rebuilt_when_a_count_fell() -> None:
    heads, profiles = _warming_heads()
    mem = RouterMemory(pending={"c": 1})
    cs = CandidateSet.of(heads)
    assert _adaptive_pick(cs, mem, profiles) == "a"  # idle: 20 ms against 40 ms
    mem.reset_pending({"b": 8})  # c finished (a new epoch); b took 8 jobs from other routers
    # The negative slope is clamped (adaptive.predict): b is never predicted faster for being busier, so a
    # fresh heap and the kept one agree on a.
    assert _adaptive_pick(CandidateSet.of(heads), mem, profiles) == "a"
    assert _adaptive_pick(cs, mem, profiles) == "a"


def test_adaptive_with_a_falling_load_slope_after_counts_only_rose() -> None:
    heads, profiles = _warming_heads()
    mem = RouterMemory()
    cs = CandidateSet.of(heads)
    assert _adaptive_pick(cs, mem, profiles) == "a"
    mem.reset_pending({"b": 8})  # only a rise: no new epoch
    # A heap built afresh picks b (predicted 16 ms at load 0.8); the kept heap returns a. (Clamping the slope at
    # zero makes both pick a; a new epoch on every reconciliation makes both pick b.)
    assert _adaptive_pick(cs, mem, profiles) == _adaptive_pick(CandidateSet.of(heads), mem, profiles)


def test_outage_reconciliation_starts_an_epoch_after_every_batch_with_picks() -> None:
    """``Router._plan`` resets ``pending`` to the last counts Redis gave before every batch while Redis is down:
    the batch's own picks fall away, so there is a new epoch exactly when the batch before routed something, and
    a head over the limit in one batch is back in the next."""
    rng = random.Random(3)
    heads = tuple(Head(head_id=f"h{i}", model_id="m", capacity=4, expires_at_ms=FAR) for i in range(5))
    last = {"h0": 3, "h1": 1}
    mem = RouterMemory()
    mem.reset_pending(dict(last))
    cs = CandidateSet.of(heads)
    policy = Policy()
    made = False
    for batch in range(30):
        before = mem.epoch
        mem.reset_pending(dict(last))  # the outage path of Router._plan
        assert mem.epoch == before + (1 if made else 0)
        made = False
        for t in range(rng.randint(0, 12)):
            job = Job(job_id=f"j{batch}-{t}", model_type="m")
            got = least_loaded(cs, _ctx(job, policy, mem, t, Goal.BALANCED, {}, 0.9))
            ref = least_loaded(CandidateSet.of(heads), _ctx(job, policy, mem, t, Goal.BALANCED, {}, 0.9))
            assert (got is None) == (ref is None)
            if got is None or ref is None:
                break
            assert mem.load(got.head) == mem.load(ref.head)
            mem.pending[got.head.head_id] = mem.pending.get(got.head.head_id, 0) + 1
            made = True


def test_the_decision_bench_starts_a_load_epoch_every_batch() -> None:
    mem = RouterMemory(pending={"a": 3, "b": 1})
    _time(lambda job: None, [Job(job_id=f"j{i}", model_type="m") for i in range(2 * BATCH + 1)], memory=mem)
    assert mem.epoch == 3
