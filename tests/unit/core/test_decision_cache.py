"""Seed 000's decision cache: candidate sets are cached per criteria and never outlive a head or policy change."""

from __future__ import annotations

import random

from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import HeadStatus, RouterMemory
from router_worker.core.policy import Policy
from schemas.envelope import Job
from tests.unit.core.sim import head


def _route(index: HeadIndex, policy: Policy, job: Job) -> str | None:
    d = decide(job, index, policy, RouterMemory(), 1_000, random.Random(0))
    return d.head.head_id if d.head else None


def test_repeated_criteria_hit_the_cache_and_new_criteria_miss() -> None:
    index = HeadIndex.build([head("a"), head("b")])
    policy = Policy()
    for i in range(10):
        _route(index, policy, Job(job_id=str(i), model_type="m", region="eu"))
    assert (index.hits, index.misses) == (9, 1)
    _route(index, policy, Job(job_id="x", model_type="m", region="us"))
    _route(index, policy, Job(job_id="y", model_type="m", region="eu", metadata={"min_context": 1}))
    _route(index, policy, Job(job_id="z", model_type="m", region="eu", strategy="random"))
    assert index.misses == 4


def test_a_head_change_or_policy_change_never_serves_a_stale_set() -> None:
    policy = Policy()
    index = HeadIndex.build([head("a")])
    assert _route(index, policy, Job(job_id="1", model_type="m")) == "a"
    # the head turns unhealthy and another joins: routers build a new index, whose cache starts empty
    index2 = HeadIndex.build([head("a", status=HeadStatus.UNHEALTHY), head("b")])
    assert _route(index2, policy, Job(job_id="2", model_type="m")) == "b"
    assert index2.misses == 1
    # a new policy (weight 0 removes b) misses the cache even on the same index
    index3 = HeadIndex.build([head("a"), head("b")])
    assert _route(index3, policy, Job(job_id="3", model_type="m")) in ("a", "b")
    p2 = Policy(version=2, head_weights={"b": 0.0}, default_strategy="round_robin")
    for i in range(5):
        assert _route(index3, p2, Job(job_id=f"4{i}", model_type="m")) == "a"
