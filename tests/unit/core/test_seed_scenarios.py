"""The integration scenarios of seed 001, as properties over many decisions of the pure engine."""

from __future__ import annotations

import random

import pytest

from router_worker.core.engine import HeadIndex, decide, record
from router_worker.core.model import HeadStatus, Outcome, RouterMemory
from router_worker.core.policy import ABTest, Policy
from schemas.envelope import Job
from tests.unit.core.sim import FAR, head, jobs, run


def test_cache_aware_sends_most_jobs_to_the_highest_hit_rate_head() -> None:
    heads = [head("A", cache_hit_rate=0.85, capacity=8), head("B", cache_hit_rate=0.62, capacity=8),
             head("C", cache_hit_rate=0.91, capacity=8)]  # fmt: skip
    picks, _ = run(heads, jobs(1000, strategy="cache_aware"), finish_p=0.9)
    assert sum(picks.values()) == 1000
    assert picks["C"] > 0.5 * 1000, picks
    assert picks["C"] > picks["A"] > picks["B"], picks


def test_quota_aware_avoids_the_near_limit_model() -> None:
    heads = [head("A", quota_used=0.95), head("B", quota_used=0.45), head("C", quota_used=0.78)]
    picks, _ = run(heads, jobs(500, strategy="quota_aware"), finish_p=0.9)
    assert sum(picks.values()) == 500
    assert picks["A"] <= 0.02 * 500, picks
    assert picks["B"] > 0.7 * 500, picks
    assert picks["B"] > picks["C"], picks


def test_unhealthy_and_degraded_heads_get_no_jobs() -> None:
    heads = [head("A"), head("B", status=HeadStatus.UNHEALTHY), head("C"), head("D", status=HeadStatus.DEGRADED),
             head("E", status=HeadStatus.DRAINING), head("F", expires_at_ms=10)]  # fmt: skip
    for strategy in ("least_loaded", "round_robin", "random", "hybrid", "weighted_random", "prefix_aware"):
        picks, _ = run(heads, jobs(200, strategy=strategy, prefix_hash="p"), finish_p=0.8)
        assert set(picks) <= {"A", "C"}, (strategy, picks)
        assert sum(picks.values()) == 200


def test_affinity_holds_for_a_session_and_moves_after_the_timeout() -> None:
    policy = Policy(affinity_timeout_s=300)
    heads = [head("A", capacity=100), head("B", capacity=100), head("C", capacity=100)]
    index = HeadIndex.build(heads)
    mem = RouterMemory()
    rng = random.Random(3)
    job = Job(job_id="x", model_type="m", session_id="user123", strategy="affinity")
    first = decide(job, index, policy, mem, 1_000, rng)
    record(first, mem, job, policy, 1_000)
    assert first.head is not None
    assert "new session pin" in first.reason
    pinned = first.head.head_id
    for t in range(2, 11):  # requests 2..10, the pinned head even becomes the busiest
        d = decide(job, index, policy, mem, 1_000 + t, rng)
        assert d.head is not None
        assert d.head.head_id == pinned
        assert "pinned" in d.reason
        record(d, mem, job, policy, 1_000 + t)
    later = 1_010 + 301_000  # after the 5-minute timeout the pin has lapsed: least loaded wins again
    d = decide(job, index, policy, mem, later, rng)
    assert d.head is not None
    assert "pin expired" in d.reason
    assert d.head.head_id != pinned, "the busiest head is not picked once the pin lapsed"


def test_affinity_re_pins_when_the_head_turns_unhealthy() -> None:
    policy = Policy()
    mem = RouterMemory(affinity={"s": ("A", FAR)})
    heads = [head("A", status=HeadStatus.UNHEALTHY), head("B")]
    d = decide(Job(job_id="j", model_type="m", session_id="s", strategy="affinity"), HeadIndex.build(heads), policy,
               mem, 1_000, random.Random(0))  # fmt: skip
    assert d.head is not None
    assert d.head.head_id == "B"
    assert d.sticky == ("s", "B")
    assert "re-pinned" in d.reason


@pytest.mark.parametrize(("share", "key"), [(0.3, "job"), (0.5, "session"), (0.1, "job")])
def test_ab_split_lands_within_tolerance_of_its_share(share: float, key: str) -> None:
    policy = Policy(
        default_strategy="ab_test",
        ab_tests=[ABTest(name="exp1", model="m", share_b=share, a_model="m-a", b_model="m-b", key=key)],  # type: ignore[arg-type]
    )
    heads = [head("a1", "m-a"), head("a2", "m-a"), head("b1", "m-b")]
    n = 10_000
    js = [Job(job_id=f"j{i}", model_type="m", session_id=f"s{i}") for i in range(n)]
    picks, decisions = run(heads, js, policy, finish_p=1.0)
    b_share = picks["b1"] / n
    assert abs(b_share - share) < 0.02, b_share
    assert all("ab exp1 variant" in d.reason for d in decisions)


def test_ab_assignment_is_consistent_per_session() -> None:
    policy = Policy(default_strategy="ab_test",
                    ab_tests=[ABTest(name="e", model="*", a_strategy="least_loaded", b_strategy="hybrid")])  # fmt: skip
    heads = [head("h1"), head("h2")]
    js = [Job(job_id=f"j{i}", model_type="m", session_id=f"s{i % 20}") for i in range(400)]
    _, decisions = run(heads, js, policy, finish_p=1.0)
    by_session: dict[str, set[str]] = {}
    for job, d in zip(js, decisions, strict=True):
        by_session.setdefault(job.session_id or "", set()).add(d.strategy)
    assert all(len(v) == 1 for v in by_session.values())
    assert {next(iter(v)) for v in by_session.values()} == {"least_loaded", "hybrid"}


def test_least_loaded_evens_out_load() -> None:
    heads = [head(f"h{i}", capacity=1000) for i in range(6)]
    mem = RouterMemory(pending={"h0": 40, "h3": 10})
    picks, _ = run(heads, jobs(600, strategy="least_loaded"), memory=mem)
    loads = [mem.pending.get(f"h{i}", 0) for i in range(6)]
    assert max(loads) - min(loads) <= 1, loads
    assert picks["h0"] < picks["h1"], "the head that started busy got fewer"


def test_least_loaded_breaks_ties_at_random_not_toward_the_first_head() -> None:
    heads = [head(f"h{i}", capacity=10**6) for i in range(4)]
    firsts = [
        run(heads, jobs(1, strategy="least_loaded"), seed=s)[0].most_common(1)[0][0] for s in range(200)
    ]
    assert {f: firsts.count(f) for f in set(firsts)}.keys() == {"h0", "h1", "h2", "h3"}
    assert max(firsts.count(f"h{i}") for i in range(4)) < 100


def test_geo_preferred_stays_in_region_until_it_has_no_eligible_head() -> None:
    policy = Policy(region_fallbacks={"eu-west": ["eu-central", "us-east"]}, max_load_threshold=1.0)
    heads = [head("eu1", region="eu-west", capacity=5), head("eu2", region="eu-west", capacity=5),
             head("de1", region="eu-central", capacity=5), head("us1", region="us-east", capacity=100)]  # fmt: skip
    picks, decisions = run(heads, jobs(10, strategy="geo_preferred", region="eu-west"), policy)
    assert set(picks) == {"eu1", "eu2"}, "10 jobs fit in eu-west (2 x capacity 5)"
    assert not any(d.fallback for d in decisions)
    mem = RouterMemory(pending={"eu1": 5, "eu2": 5})
    picks, decisions = run(heads, jobs(5, strategy="geo_preferred", region="eu-west"), policy, memory=mem)
    assert set(picks) == {"de1"}, "eu-west full: the nearest fallback region"
    assert all(d.fallback for d in decisions)
    assert "region eu-central" in decisions[0].reason
    mem = RouterMemory(pending={"eu1": 5, "eu2": 5, "de1": 5})
    picks, _ = run(heads, jobs(3, strategy="geo_preferred", region="eu-west"), policy, memory=mem)
    assert set(picks) == {"us1"}


def test_round_robin_takes_turns() -> None:
    picks, decisions = run([head("a"), head("b"), head("c")], jobs(9, strategy="round_robin"), finish_p=1.0)
    assert [d.head.head_id for d in decisions if d.head] == ["a", "b", "c"] * 3
    assert picks == {"a": 3, "b": 3, "c": 3}


def test_weighted_random_follows_policy_weights() -> None:
    policy = Policy(head_weights={"a": 3.0, "b": 1.0})
    picks, _ = run([head("a", capacity=10**6), head("b", capacity=10**6)], jobs(8000, strategy="weighted_random"),
                   policy)  # fmt: skip
    assert abs(picks["a"] / 8000 - 0.75) < 0.03, picks


def test_latency_based_prefers_the_fast_head_until_its_queue_costs_more() -> None:
    heads = [head("fast", latency_ms=10, capacity=100), head("slow", latency_ms=40, capacity=100)]
    picks, _ = run(heads, jobs(50, strategy="latency_based"))
    assert picks["fast"] == 50
    mem = RouterMemory(pending={"fast": 85})  # 10 ms x 1.85 > 40 ms x 1.0? no: 18.5 < 40 still fast
    picks, _ = run(heads, jobs(1, strategy="latency_based"), memory=mem)
    assert picks["fast"] == 1
    heads = [head("fast", latency_ms=10, capacity=10), head("slow", latency_ms=12, capacity=10)]
    mem = RouterMemory(pending={"fast": 8})  # 10 x 1.8 = 18 > 12 x 1.0
    picks, _ = run(heads, jobs(1, strategy="latency_based"), memory=mem)
    assert picks["slow"] == 1


def test_prefix_aware_keeps_a_prefix_on_one_head_and_spills_when_it_is_loaded() -> None:
    heads = [head(f"h{i}", capacity=10) for i in range(5)]
    policy = Policy(prefix_load_bound=0.5)
    picks, decisions = run(heads, jobs(5, strategy="prefix_aware", prefix_hash="abc"), policy)
    assert len(picks) == 1, "same prefix, same head (home takes 5 = its bound)"
    home = next(iter(picks))
    assert all(d.reason == "prefix home" for d in decisions)
    picks2, decisions2 = run(heads, jobs(1, strategy="prefix_aware", prefix_hash="abc"), policy,
                             memory=RouterMemory(pending={home: 5}))  # fmt: skip
    assert home not in picks2
    assert "spilled" in decisions2[0].reason
    # a second router with its own memory and index maps the prefix to the same home: no shared state
    again, _ = run(
        list(reversed(heads)), jobs(1, strategy="prefix_aware", prefix_hash="abc"), policy, seed=99
    )
    assert next(iter(again)) == home


def test_model_specific_matches_criteria_to_capabilities() -> None:
    heads = [head("small", max_context=8192, quantizations=frozenset({"FP16"})),
             head("int8", max_context=32768, quantizations=frozenset({"INT8", "FP16"}), backend="gpu"),
             head("big", max_context=131072, quantizations=frozenset({"FP16"}), backend="gpu")]  # fmt: skip
    picks, decisions = run(
        heads, jobs(20, strategy="model_specific", metadata={"min_context": 16384}), finish_p=1
    )
    assert set(picks) == {"int8", "big"}
    picks, _ = run(heads, jobs(20, strategy="model_specific", metadata={"quantization": "int8"}), finish_p=1)
    assert set(picks) == {"int8"}
    _, decisions = run(heads, jobs(1, strategy="model_specific", metadata={"min_context": 10**6}))
    assert decisions[0].outcome is Outcome.NO_CAPACITY


def test_fallback_chain_tries_other_models_and_says_so() -> None:
    policy = Policy(fallback_models={"m": ["m-small"]})
    heads = [head("a", status=HeadStatus.UNHEALTHY), head("s", "m-small")]
    _, decisions = run(heads, jobs(3), policy)
    d = decisions[0]
    assert d.head is not None
    assert d.head.head_id == "s"
    assert d.fallback
    assert "fallback model m-small" in d.reason


def test_no_head_and_saturation_are_explicit_outcomes() -> None:
    assert run([head("a")], jobs(1, "other"))[1][0].outcome is Outcome.UNKNOWN_MODEL
    assert run([head("a", status=HeadStatus.DRAINING)], jobs(1))[1][0].outcome is Outcome.NO_CAPACITY
    full = run([head("a", capacity=2)], jobs(3))[1]
    assert [d.outcome for d in full] == [Outcome.ROUTED, Outcome.ROUTED, Outcome.SATURATED]


def test_strategy_overrides_obey_the_policy() -> None:
    policy = Policy(default_strategy="round_robin", allowed_overrides=["random"])
    _, d = run([head("a")], [Job(job_id="1", model_type="m", strategy="hybrid")], policy)
    assert d[0].strategy == "round_robin"
    assert "override hybrid not allowed" in d[0].reason
    _, d = run([head("a")], [Job(job_id="1", model_type="m", strategy="random")], policy)
    assert d[0].strategy == "random"
    _, d = run([head("a")], [Job(job_id="1", model_type="m", strategy="fastest")], policy)
    assert d[0].outcome is Outcome.REFUSED
    assert "unknown strategy" in d[0].reason


def test_rules_by_model_pattern() -> None:
    from router_worker.core.policy import Goal, Rule

    policy = Policy(rules=[Rule(pattern="resnet*", strategy="adaptive", goal=Goal.MAXIMIZE_THROUGHPUT),
                           Rule(pattern="bert_*", strategy="latency_based")])  # fmt: skip
    assert policy.strategy_for("resnet50") == "adaptive"
    assert policy.goal_for("resnet50") is Goal.MAXIMIZE_THROUGHPUT
    assert policy.strategy_for("bert_base") == "latency_based"
    assert policy.strategy_for("llama") == "least_loaded"
    _, d = run([head("r", "resnet50")], jobs(1, "resnet50"), policy)
    assert d[0].strategy == "adaptive"
    assert "maximize_throughput" in d[0].reason


def test_registered_model_characteristics_narrow_and_tilt_the_candidates() -> None:
    from router_worker.core.catalog import ModelSpec

    spec = ModelSpec(model_id="resnet50", backends=["gpu", "neural_engine"], preferred_backends=["neural_engine"],
                     quantization="int8")  # fmt: skip
    int8, fp16 = frozenset({"INT8"}), frozenset({"FP16"})
    heads = [head("cpu1", "resnet50", backend="cpu", quantizations=int8, capacity=100),
             head("gpu1", "resnet50", backend="gpu", quantizations=int8, capacity=100),
             head("gpu2", "resnet50", backend="gpu", quantizations=fp16, capacity=100),
             head("ne1", "resnet50", backend="neural_engine", quantizations=int8, capacity=100)]  # fmt: skip
    index = HeadIndex.build(heads, models={"resnet50": spec})
    policy = Policy()
    mem = RouterMemory()
    picks: dict[str, int] = {}
    rng = random.Random(0)
    for i in range(40):
        job = Job(job_id=str(i), model_type="resnet50", strategy="model_specific")
        d = decide(job, index, policy, mem, 1_000, rng)
        assert d.head is not None
        picks[d.head.head_id] = picks.get(d.head.head_id, 0) + 1
        record(d, mem, job, policy, 1_000)
    assert set(picks) <= {"gpu1", "ne1"}, "cpu can not run it; gpu2 lacks INT8"
    d = decide(Job(job_id="x", model_type="resnet50", strategy="model_specific"), index, policy, RouterMemory(),
               1_000, rng)  # fmt: skip
    assert d.head is not None
    assert d.head.head_id == "ne1", "the preferred backend wins when loads are equal"
    explained = decide(
        Job(job_id="y", model_type="resnet50"), index, policy, RouterMemory(), 1_000, rng, explain=True
    )
    why = dict(explained.excluded)
    assert why["cpu1"] == "backend cpu can not run resnet50"
    assert why["gpu2"] == "no INT8 support for resnet50"


def test_rule_max_latency_excludes_slow_heads() -> None:
    from router_worker.core.policy import Rule

    policy = Policy(rules=[Rule(pattern="bert_*", strategy="round_robin", max_latency_ms=50)])
    heads = [head("fast", "bert_base", latency_ms=20), head("slow", "bert_base", latency_ms=80)]
    picks, _ = run(heads, jobs(10, "bert_base"), policy, finish_p=1.0)
    assert set(picks) == {"fast"}
