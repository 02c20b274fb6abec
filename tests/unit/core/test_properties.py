"""Property: whatever the heads, policy and job, a decision names an eligible head or says there is none."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_worker.core.engine import HeadIndex, capability_miss, decide, record
from router_worker.core.model import Head, HeadStatus, Outcome, RouterMemory
from router_worker.core.policy import STRATEGIES, ABTest, Policy
from schemas.envelope import Job

NOW = 1_000_000
MODELS = ("m1", "m2", "m3")
REGIONS = ("r1", "r2", "r3")

heads_st = st.lists(
    st.builds(
        Head,
        head_id=st.text("abcdefgh", min_size=1, max_size=4),
        model_id=st.sampled_from(MODELS),
        region=st.sampled_from(REGIONS),
        status=st.sampled_from(list(HeadStatus)),
        capacity=st.integers(1, 8),
        expires_at_ms=st.sampled_from([NOW - 1, NOW + 5_000]),
        cache_hit_rate=st.floats(0, 1),
        quota_used=st.floats(0, 1),
        latency_ms=st.floats(0, 100),
        weight=st.floats(0, 3),
        backend=st.sampled_from(["cpu", "gpu"]),
        quantizations=st.sets(st.sampled_from(["INT8", "FP16"])).map(frozenset),
        max_context=st.sampled_from([0, 4096, 32768]),
        families=st.sets(st.sampled_from(["chat"])).map(frozenset),
    ),
    max_size=12,
    unique_by=lambda h: h.head_id,
)

policy_st = st.builds(
    Policy,
    default_strategy=st.sampled_from([s for s in STRATEGIES]),
    max_load_threshold=st.floats(0.1, 1.5),
    quota_limit=st.floats(0.1, 1.0),
    min_cache_hit_rate=st.floats(0, 1),
    prefix_load_bound=st.floats(0.1, 1.0),
    fallback_models=st.sampled_from([{}, {"m1": ["m2"]}, {"m1": ["m3", "m2"]}]),
    region_fallbacks=st.sampled_from([{}, {"r1": ["r2"]}]),
    ab_tests=st.sampled_from(
        [
            [],
            [ABTest(name="t", model="*", a_model="m1", b_model="m2")],
            [ABTest(name="t", model="m1", a_strategy="random", b_strategy="adaptive")],
        ]
    ),
)

job_st = st.builds(
    Job,
    job_id=st.text(min_size=1, max_size=8),
    model_type=st.sampled_from([*MODELS, "chat", "nobody"]),
    region=st.one_of(st.none(), st.sampled_from(REGIONS)),
    strategy=st.one_of(st.none(), st.sampled_from([*STRATEGIES, "bogus"])),
    session_id=st.one_of(st.none(), st.sampled_from(["s1", "s2"])),
    prefix_hash=st.one_of(st.none(), st.sampled_from(["p1", "p2"])),
    estimated_tokens=st.one_of(st.none(), st.integers(0, 5000)),
    metadata=st.one_of(
        st.none(), st.sampled_from([{"min_context": 8192}, {"quantization": "int8"}, {"backend": "gpu"}])
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=heads_st, policy=policy_st, batch=st.lists(job_st, min_size=1, max_size=25),
       pending=st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), st.integers(0, 10)),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_every_decision_names_an_eligible_head_or_an_explicit_no_candidate(
    heads: list[Head], policy: Policy, batch: list[Job], pending: dict[str, int], seed: int
) -> None:
    index = HeadIndex.build(heads)
    mem = RouterMemory(pending=dict(pending))
    rng = random.Random(seed)
    for job in batch:
        d = decide(job, index, policy, mem, NOW, rng)
        if d.outcome is not Outcome.ROUTED:
            assert d.head is None
            assert d.reason
            continue
        h = d.head
        assert h is not None
        assert h.head_id in index.heads
        allowed_models = {job.model_type, *policy.fallback_models.get(job.model_type, ())}
        ab = policy.ab_test_for(job.model_type)
        if ab is not None:
            allowed_models |= {m for m in (ab.a_model, ab.b_model) if m}
            allowed_models |= {m2 for m in list(allowed_models) for m2 in policy.fallback_models.get(m, ())}
        assert any(h.serves(m) for m in allowed_models), (h.model_id, allowed_models)
        assert h.status is HeadStatus.HEALTHY
        assert h.expires_at_ms >= NOW
        assert mem.load(h) < policy.max_load_threshold, "never a head at or over the load threshold"
        assert h.quota_used < policy.quota_limit
        assert capability_miss(h, job.metadata or {}) is None
        assert d.strategy in STRATEGIES
        record(d, mem, job, policy, NOW)
