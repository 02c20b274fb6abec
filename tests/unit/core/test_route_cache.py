"""The route cache (``engine._decide_fast``) decides exactly as the uncached reference path (``_decide``):
same outcome, head, reason, scores and fallback flag, over random sequences of jobs (every strategy, overrides,
A/B tests, fallback models, regions, priorities, criteria, avoided heads), recorded picks, load epochs, expiring
heartbeats, breakers opening and closing, and policy changes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from router_worker.core.engine import HeadIndex, _decide, decide, record
from router_worker.core.model import Decision, Head, HeadStatus, RouterMemory
from router_worker.core.policy import STRATEGIES, ABTest, Policy, Rule
from schemas.envelope import Job

MODELS = ("m1", "m2", "m3")
REGIONS = ("eu", "us", "ap")


def _heads(rng: random.Random, n: int) -> list[Head]:
    statuses = (HeadStatus.HEALTHY,) * 6 + (HeadStatus.DEGRADED, HeadStatus.UNHEALTHY)
    return [
        Head(head_id=f"h{i}", model_id=rng.choice(MODELS), region=rng.choice(REGIONS), partition=i % 8,
             status=rng.choice(statuses), capacity=rng.randint(1, 6),
             expires_at_ms=rng.choice((5_000, 50_000, 10**12)), reported_inflight=rng.randint(0, 2),
             cache_hit_rate=rng.random(), quota_used=rng.random(), latency_ms=rng.choice((0.0, 5.0, 20.0, 80.0)),
             weight=rng.choice((0.0, 0.5, 1.0, 2.0)), backend=rng.choice(("cpu", "gpu")),
             quantizations=frozenset(rng.sample(["FP16", "INT8"], rng.randint(0, 2))),
             max_context=rng.choice((2048, 8192)), families=frozenset({"chat"}) if rng.random() < 0.2 else frozenset())
        for i in range(n)
    ]  # fmt: skip


def _policies(rng: random.Random) -> list[Policy]:
    out = [Policy()]
    for version in range(1, 4):
        out.append(Policy(
            version=version,
            default_strategy=rng.choice([s for s in STRATEGIES if s != "ab_test"]),
            max_load_threshold=rng.choice((0.5, 0.9, 1.0)),
            priority_headroom=rng.choice((0.0, 0.2)),
            allowed_overrides=rng.choice(("*", ["random", "least_loaded"])),
            fallback_models={"m1": ["m2"], "chat": ["m3"]},
            region_fallbacks={"eu": ["us"]},
            rules=[Rule(pattern="m3", strategy="ab_test"), Rule(pattern="m2", preferred_regions=["us"],
                                                               max_latency_ms=50.0)],
            ab_tests=[ABTest(name="t", model="m3", a_strategy="hybrid", b_strategy="adaptive", b_model="m1",
                             key=rng.choice(("session", "job")))],
        ))  # fmt: skip
    return out


def _job(rng: random.Random, i: int) -> Job:
    meta: dict[str, Any] | None = rng.choice((None, None, {"min_context": 4096}, {"quantization": "int8"}))
    return Job(job_id=f"j{i}", model_type=rng.choice((*MODELS, "chat", "nope")),
               region=rng.choice((None, *REGIONS)), priority=rng.choice((None, -1, 0, 2)),
               strategy=rng.choice((None, None, None, *STRATEGIES, "bogus")),
               session_id=rng.choice((None, "s1", "s2")), prefix_hash=rng.choice((None, "p1", "p2")),
               estimated_tokens=rng.choice((None, 1, 40, 900)), metadata=meta)  # fmt: skip


def _same(a: Decision, b: Decision) -> tuple[object, ...]:
    return (a.outcome, a.strategy, a.reason, a.head, a.scores, a.fallback, a.sticky, a.attempt)


@pytest.mark.parametrize("seed", range(12))
def test_cached_routes_decide_as_the_reference_path(seed: int) -> None:
    rng = random.Random(seed)
    heads = _heads(rng, rng.randint(1, 24))
    policies = _policies(rng)
    index_fast, index_ref = HeadIndex.build(heads), HeadIndex.build(heads)
    mem_fast, mem_ref = RouterMemory(), RouterMemory()
    rng_fast, rng_ref = random.Random(seed), random.Random(seed)
    policy = policies[0]
    now = 1_000
    for i in range(400):
        roll = rng.random()
        if roll < 0.03:
            policy = rng.choice(policies)
        elif roll < 0.06:  # a new load epoch from Redis
            counts = {h.head_id: rng.randint(0, 3) for h in heads}
            mem_fast.reset_pending(dict(counts))
            mem_ref.reset_pending(dict(counts))
        elif roll < 0.09:  # breakers open or close
            blocked = {h.head_id: "open" for h in heads if rng.random() < 0.2}
            probes = {
                h.head_id: rng.randint(1, 3) for h in heads if h.head_id not in blocked and rng.random() < 0.3
            }
            mem_fast.set_breakers(dict(blocked), dict(probes))
            mem_ref.set_breakers(dict(blocked), dict(probes))
        elif roll < 0.11:
            now += rng.choice((1_000, 10_000, 40_000))  # some heartbeats lapse
        job = _job(rng, i)
        avoid = frozenset(rng.sample([h.head_id for h in heads], min(len(heads), 2))) if rng.random() < 0.1 \
            else frozenset()  # fmt: skip
        fast = decide(job, index_fast, policy, mem_fast, now, rng_fast, 2, avoid=avoid)
        if avoid:
            ref = _decide(job, index_ref, policy, mem_ref, now, rng_ref, 2, False, avoid)
            if not (ref.routed or ref.outcome.value == "saturated"):
                ref = _decide(job, index_ref, policy, mem_ref, now, rng_ref, 2, False, frozenset())
        else:
            ref = _decide(job, index_ref, policy, mem_ref, now, rng_ref, 2, False, frozenset())
        assert _same(fast, ref) == _same(ref, ref), f"job {i} {job}: {fast} != {ref}"
        if fast.routed:
            record(fast, mem_fast, job, policy, now)
            record(ref, mem_ref, job, policy, now)
    hits = index_fast.hits
    job = Job(job_id="again", model_type="m1")
    decide(job, index_fast, policy, mem_fast, now, rng_fast)
    decide(job, index_fast, policy, mem_fast, now, rng_fast)
    assert index_fast.hits >= hits + 1  # a repeated key is served from the cache


def test_criteria_equal_in_python_but_not_in_meaning_get_routes_of_their_own() -> None:
    """``True == 1`` in Python, but ``dynamic_shapes: true`` asks for dynamic shapes and ``1`` does not: a job
    with the one must never take the route cached for the other (nor its candidate sets)."""
    heads = [Head(head_id="dyn", model_id="m", expires_at_ms=10**12, dynamic_shapes=True, reported_inflight=3),
             Head(head_id="static", model_id="m", expires_at_ms=10**12)]  # fmt: skip
    index, policy, mem = HeadIndex.build(heads), Policy(), RouterMemory()
    loose = decide(Job(job_id="a", model_type="m", metadata={"dynamic_shapes": 1}), index, policy, mem, 1_000,
                   random.Random(0))  # fmt: skip
    assert loose.head is not None
    assert loose.head.head_id == "static"  # the lighter head: 1 is not a criterion
    strict = decide(Job(job_id="b", model_type="m", metadata={"dynamic_shapes": True}), index, policy, mem, 1_000,
                    random.Random(0))  # fmt: skip
    assert strict.head is not None
    assert strict.head.head_id == "dyn"
    again = decide(Job(job_id="c", model_type="m", metadata={"dynamic_shapes": 1.0}), index, policy, mem, 1_000,
                   random.Random(0))  # fmt: skip
    assert again.head is not None
    assert again.head.head_id == "static"


def test_a_cached_route_keeps_no_job_alive_between_decisions() -> None:
    """A route's strategy context is reused: it must not hold on to the last job (its payload may be a MiB, and
    a snapshot keeps thousands of routes)."""
    index = HeadIndex.build([Head(head_id="h", model_id="m", expires_at_ms=10**12)])
    big = Job(job_id="big", model_type="m", payload=b"x" * 1_000_000)
    decide(big, index, Policy(), RouterMemory(), 1_000, random.Random(0))
    contexts = [step.ctx for route in index.routes.values() if route is not None
                for step in getattr(route, "steps", ())]  # fmt: skip
    assert contexts
    assert all(ctx.job is not big for ctx in contexts)
