"""Adaptive profiles: learned from completion reports, accurate after 50 executions, confident with samples."""

from __future__ import annotations

import random

from router_worker.core.adaptive import ProfileLearner
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Goal, Policy, Rule
from schemas.envelope import Job
from tests.unit.core.sim import head

# The synthetic workload: latency is a known function of batch size, backend and load (plus noise).
BACKENDS = {"gpu": (4.0, 0.35, 12.0), "cpu": (9.0, 2.4, 30.0), "neural_engine": (2.5, 0.9, 8.0)}


def true_latency(backend: str, batch: float, load: float, rng: random.Random) -> float:
    base, per_item, per_load = BACKENDS[backend]
    return base + per_item * batch + per_load * load + rng.gauss(0, 0.6)


def r_squared(pred: list[float], actual: list[float]) -> float:
    mean = sum(actual) / len(actual)
    sst = sum((a - mean) ** 2 for a in actual)
    sse = sum((a - p) ** 2 for a, p in zip(actual, pred, strict=True))
    return 1 - sse / sst


def test_prediction_r2_reaches_085_after_50_executions_per_head() -> None:
    rng = random.Random(11)
    for backend in BACKENDS:
        learner = ProfileLearner()
        for _ in range(50):
            batch, load = rng.choice([1, 2, 4, 8, 16, 32]), rng.random()
            learner.observe(batch, load, true_latency(backend, batch, load, rng))
        prof = learner.profile()
        held_out = [(rng.choice([1, 2, 4, 8, 16, 32]), rng.random()) for _ in range(500)]
        actual = [true_latency(backend, b, ld, rng) for b, ld in held_out]
        a, b, c = prof.coef
        predicted = [a + b * bb + c * ld for bb, ld in held_out]
        assert r_squared(predicted, actual) >= 0.85, backend
        assert prof.r2 >= 0.85


def test_confidence_grows_with_samples() -> None:
    rng = random.Random(5)
    learner = ProfileLearner()
    confidences = []
    for n in range(1, 101):
        batch, load = rng.choice([1, 4, 16]), rng.random()
        learner.observe(batch, load, true_latency("gpu", batch, load, rng))
        if n in (3, 10, 25, 50, 100):
            confidences.append(learner.profile().confidence)
    assert confidences == sorted(confidences), confidences
    assert confidences[0] < 0.3 < 0.8 < confidences[-1]


def test_adaptive_routes_by_goal_using_learned_profiles() -> None:
    rng = random.Random(2)
    learners = {b: ProfileLearner() for b in BACKENDS}
    power = {"gpu": 300.0, "cpu": 60.0, "neural_engine": 8.0}
    for b, learner in learners.items():
        for _ in range(60):
            batch, load = rng.choice([1, 8, 64]), rng.random()
            learner.observe(batch, load, true_latency(b, batch, load, rng), power_w=power[b])
    heads = [head(b, backend=b, capacity=1000) for b in BACKENDS]
    index = HeadIndex.build(heads, {b: learner.profile() for b, learner in learners.items()})

    def pick(goal: Goal, batch: int) -> str:
        policy = Policy(rules=[Rule(pattern="m", strategy="adaptive", goal=goal)])
        job = Job(job_id="j", model_type="m", metadata={"batch_size": batch})
        d = decide(job, index, policy, RouterMemory(), 1_000, random.Random(0))
        assert d.head is not None
        return d.head.head_id

    assert pick(Goal.MINIMIZE_LATENCY, 64) == "gpu", "big batches: the GPU's small per-item cost wins"
    assert pick(Goal.MINIMIZE_LATENCY, 1) == "neural_engine", "tiny jobs: the lowest fixed cost wins"
    assert pick(Goal.MINIMIZE_POWER, 8) == "neural_engine"


def test_unprofiled_heads_are_explored_by_load() -> None:
    heads = [head("new1"), head("new2")]
    policy = Policy(default_strategy="adaptive")
    d = decide(Job(job_id="j", model_type="m"), HeadIndex.build(heads), policy, RouterMemory(pending={"new1": 5}),
               1_000, random.Random(0))  # fmt: skip
    assert d.head is not None
    assert d.head.head_id == "new2"
    assert "confidence 0.00" in d.reason
