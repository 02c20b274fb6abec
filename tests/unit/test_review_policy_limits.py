"""Review of issue 10 (bounded policies): a policy at its limits, matched against model types a producer makes
up. Any producer chooses ``model_type``: a stream of made-up ones filled the policy's rule memo (4,096 entries)
once, and from then on every model type not memoised before (a new model, or every one after a router restart
that met the made-up ones first) scanned all rules' patterns on every job, for as long as the policy stayed."""

from __future__ import annotations

from router_worker.core.policy import MAX_PATTERN_WILDCARDS, MAX_RULES, Policy

STARS = "*a" * (MAX_PATTERN_WILDCARDS - 1) + "*b"


def _policy() -> Policy:
    rules = [{"pattern": f"{STARS}{i}", "strategy": "round_robin"} for i in range(MAX_RULES - 1)]
    rules.append({"pattern": "llama-*", "strategy": "latency_based"})
    return Policy.model_validate({"rules": rules, "ab_tests": [{"name": "t", "model": "llama-*", "share_b": 0.5,
                                                               "a_model": "x", "b_model": "y"}]})  # fmt: skip


def test_a_real_model_type_is_memoised_after_a_flood_of_made_up_ones() -> None:
    policy = _policy()
    for i in range(5_000):
        policy.rule_for(f"made-up-{i}")
        policy.ab_test_for(f"made-up-{i}")
    rule = policy.rule_for("llama-3.3-70b")
    assert rule is not None
    assert rule.strategy == "latency_based"
    assert "llama-3.3-70b" in policy._rules  # the next job of it reads the memo, no scan of 1,000 patterns
    assert policy.ab_test_for("llama-3.3-70b") is not None
    assert "llama-3.3-70b" in policy._ab_by_model
    assert len(policy._rules) <= 4096


def test_the_engines_strategy_memo_keeps_caching_after_a_flood() -> None:
    """The same for the engine's resolved-strategy memo (``policy.resolved``): full, it starts afresh."""
    from router_worker.core.engine import resolve_strategy
    from schemas.envelope import Job

    policy = Policy()
    for i in range(5_000):
        resolve_strategy(Job(job_id="j", model_type=f"made-up-{i}"), policy)
    resolve_strategy(Job(job_id="j", model_type="llama-3.3-70b"), policy)
    assert "llama-3.3-70b" in policy.resolved
    assert len(policy.resolved) <= 4096
