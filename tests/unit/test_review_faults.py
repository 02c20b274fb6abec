"""Adversarial review of issue 8 (fault handling): pure checks of keys and plans."""

from __future__ import annotations

import random

from aiokafka import TopicPartition

from router_worker.core.engine import HeadIndex
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.fault_headers import H_ADMIT_AT, H_THROTTLE_N
from router_worker.pipeline.faults import restore_waited
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.outcomes import (
    H_REDRIVE,
    DeadLettered,
    Incoming,
    Plan,
    Retried,
    Routed,
    claim_key_of,
)
from router_worker.pipeline.plan import PlanConfig, Stats, plan
from schemas.envelope import Job
from tests.unit.core.sim import head
from tests.unit.test_plan import CFG, NOW, Rec, job


def _low_then_high() -> Plan:
    """A priority-0 job then a priority-5 one, on a head at 0.8 load (limits 0.8 and 0.9)."""
    tp = TopicPartition("req", 0)
    batch = {tp: [Rec(0, job("low", priority=0)), Rec(1, job("high", priority=5))]}
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake(batch, gaps, frozenset(), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("h0", partition=0, capacity=10, reported_inflight=8)])
    policy = Policy(max_load_threshold=0.9, priority_headroom=0.1)
    p = plan(parts, {}, index, policy, RouterMemory(), NOW, NOW, random.Random(1), CFG, Stats())
    return p


def _waited(topic: str, headers: list[tuple[str, bytes | None]]) -> Incoming:
    job = Job(job_id="j1", model_type="m", tenant="acme")
    tp = TopicPartition(topic, 0)
    return Incoming(tp, 7, b"j1", b"{}", headers, "application/json", 2, job, None,
                    claim_key_of(job, 2, tp, 7, None))  # fmt: skip


def test_a_redriven_jobs_return_from_an_admission_wait_is_keyed_within_its_redrive() -> None:
    """A job throttled once (trip key ``j|1t1|j1``, marked done for the dedupe TTL) and later dead-lettered is
    redriven; over its limit again, it waits again. Back from that wait its key must not be ``j|1t1|j1`` again:
    that key is done, so the redriven job would be skipped as a duplicate and lost."""
    throttle = [(H_ADMIT_AT, b"1"), (H_THROTTLE_N, b"1"), ("x-route-attempt", b"1")]
    plain = _waited("router.retry.1", list(throttle))
    redriven = _waited("router.retry.1", [*throttle, (H_REDRIVE, b"rd-20250101T000000Z-abcdef")])
    restore_waited([(plain.tp, [plain]), (redriven.tp, [redriven])], frozenset({"router.retry.1"}))
    assert plain.attempt == redriven.attempt == 1
    assert plain.claim_key == "j|1t1|j1"
    assert redriven.claim_key != plain.claim_key
    assert redriven.claim_key.startswith("jr|rd-20250101T000000Z-abcdef|")


def test_a_high_priority_job_behind_a_held_low_priority_one_is_not_held_with_it() -> None:
    """``priority_headroom``: "as heads saturate, lower-priority jobs are held back first". A job of priority 0
    that meets heads at 0.8 load (its limit is 0.9 - 0.1) waits in a retry tier (no attempt spent); it does not
    hold its partition, so the priority-5 job right behind it, for which the same head has room (limit 0.9),
    goes at once."""
    p = _low_then_high()
    routed = [o.src.job.job_id for o in p.outcomes if isinstance(o, Routed) and o.src.job is not None]
    assert p.holds == [], "nothing holds the partition: the low-priority job waits in a retry tier instead"
    assert [type(o).__name__ for o in p.outcomes] == ["Retried", "Routed"]
    assert routed == ["high"], "the high-priority job, for which the head has room, goes"


def test_a_forged_exclude_header_naming_every_head_does_not_strand_the_job() -> None:
    """Held up: a producer's ``x-route-exclude`` naming every head of the model is honoured only while another
    head can take the job; when none can, the job is routed anyway (not retried or dead-lettered)."""
    tp = TopicPartition("req", 0)
    everyone = b'["h0", "h1", "", 7, null]'
    batch = {tp: [Rec(0, job("x"), headers=(("x-route-exclude", everyone),))]}
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake(batch, gaps, frozenset(), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("h0", partition=0), head("h1", partition=1)])
    p = plan(parts, {}, index, Policy(), RouterMemory(), NOW, NOW, random.Random(1), CFG, Stats())
    assert [type(o).__name__ for o in p.outcomes] == ["Routed"]


# --- the fixes: busy refusals are waits, a held low-priority job waits in a retry tier -----------------------------


def _plan_one(rec: Rec, heads: list[object], cfg: PlanConfig = CFG, topic: str = "retry.1",
              policy: Policy | None = None) -> list[object]:  # fmt: skip
    tp = TopicPartition(topic, 0)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, rec.offset)
    parts, holds = intake({tp: [rec]}, gaps, frozenset({"retry.1", "retry.2"}), NOW, cfg.max_message_bytes)
    assert not holds
    index = HeadIndex.build(heads)  # type: ignore[arg-type]
    p = plan(parts, {}, index, policy or Policy(), RouterMemory(), NOW, NOW, random.Random(1), cfg, Stats())
    assert not p.holds
    return list(p.outcomes)


def _retry_rec(job_id: str, attempt: int, refusals: bytes | None, model: str = "m") -> Rec:
    headers: list[tuple[str, bytes | None]] = [("x-route-attempt", str(attempt).encode()),
                                               ("x-retry-not-before", str(NOW - 1).encode())]  # fmt: skip
    if refusals is not None:
        headers.append(("x-route-refusals", refusals))
    return Rec(0, job(job_id, model), headers=tuple(headers))


def _h(o: object, name: str) -> bytes | None:
    send = o.send  # type: ignore[attr-defined]
    return dict(send.headers).get(name)


def test_busy_refusals_do_not_count_toward_max_attempts_and_the_head_sees_the_count() -> None:
    """Attempt 5 of which 3 trips were busy refusals is the job's 2nd counted attempt (max 3): routed, and its
    head reads the count the router took (so its own refusal adds one to it)."""
    (o,) = _plan_one(_retry_rec("a", 4, b"3"), [head("h0", partition=0)])
    assert isinstance(o, Routed)
    assert _h(o, "x-route-attempt") == b"5", "the attempt number still grows: one idempotency key per trip"
    assert _h(o, "x-route-refusals") == b"3"
    assert o.src.claim_key == "j|5|a"


def test_a_job_with_no_head_is_retried_while_its_counted_attempts_last() -> None:
    (o,) = _plan_one(_retry_rec("a", 4, b"3", model="ghost"), [head("h0", partition=0)])
    assert isinstance(o, Retried), "attempt 5, 3 of them refusals: 2 counted, under max_attempts 3"
    assert _h(o, "x-route-refusals") == b"3"
    (o,) = _plan_one(_retry_rec("a", 5, b"3", model="ghost"), [head("h0", partition=0)])
    assert isinstance(o, DeadLettered)
    assert o.reason.value == "unknown_model"
    assert "after 3 attempts and 3 busy refusals" in o.detail


def test_a_forged_refusal_count_hides_no_attempt() -> None:
    """A refusal is a trip: a job counts at most ``attempt - 1`` of them, whatever its header says, and the
    router writes the count it took onto the routed record."""
    (o,) = _plan_one(_retry_rec("a", 1, b"99"), [head("h0", partition=0)])
    assert isinstance(o, Routed)
    assert _h(o, "x-route-refusals") == b"1"
    (o,) = _plan_one(_retry_rec("a", 3, b"99"), [head("h0", partition=0)])
    assert isinstance(o, Routed), "attempt 4 of which 3 refusals: counted 1"
    for bad in (b"-1", b"x", b"9" * 20):
        (o,) = _plan_one(_retry_rec("a", 1, bad), [head("h0", partition=0)])
        assert isinstance(o, Routed)
        assert _h(o, "x-route-refusals") is None
    tp = TopicPartition("req", 0)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: [Rec(0, job("n"), headers=(("x-route-refusals", b"40"),))]}, gaps, frozenset(), NOW,
                      CFG.max_message_bytes)  # fmt: skip
    p = plan(parts, {}, HeadIndex.build([head("h0", partition=0)]), Policy(), RouterMemory(), NOW, NOW,
             random.Random(1), CFG, Stats())  # fmt: skip
    (o,) = p.outcomes
    assert isinstance(o, Routed)
    assert _h(o, "x-route-refusals") is None, "a new job has made no trip: the producer's count is dropped"


def test_refusals_past_max_refusals_dead_letter_the_job_as_no_capacity() -> None:
    from dataclasses import replace

    cfg = replace(CFG, max_refusals=2)
    (o,) = _plan_one(_retry_rec("a", 2, b"2"), [head("h0", partition=0)], cfg)
    assert isinstance(o, Routed), "2 refusals: at the bound, not past it"
    (o,) = _plan_one(_retry_rec("a", 3, b"3"), [head("h0", partition=0)], cfg)
    assert isinstance(o, DeadLettered)
    assert o.reason.value == "no_capacity"
    assert "refused as busy 3 times" in o.detail
    assert _h(o, "x-dlq-reason") == b"no_capacity"


def test_a_low_priority_job_held_for_headroom_waits_in_a_retry_tier_and_the_one_behind_it_goes() -> None:
    """The fix of the head-of-line blocking above: the low-priority job waits in a retry tier (a return from a
    wait: no attempt spent, its claim keyed by the trip), the high-priority one behind it is routed, nothing is
    held, and the partition is planned to its end."""
    p = _low_then_high()
    assert not p.holds
    assert p.next_offset[TopicPartition("req", 0)] == 2
    low, high = p.outcomes
    assert isinstance(high, Routed)
    assert isinstance(low, Retried)
    assert low.tier == 1
    assert _h(low, "x-retry-reason") == b"priority_headroom"
    assert _h(low, "x-route-attempt") == b"1"
    assert _h(low, H_THROTTLE_N) == b"1"
    # Read back from its tier: a return from a wait, its attempt kept, its claim its own.
    back = _waited("retry.1", list(low.send.headers))  # type: ignore[union-attr]
    restore_waited([(back.tp, [back])], frozenset({"retry.1"}))
    assert back.attempt == 1
    assert back.claim_key == "j|1t1|j1"


def test_a_low_priority_job_is_still_held_in_kafka_when_no_priority_would_go() -> None:
    """Heads at ``max_load_threshold``: back-pressure as before (the partition held), no retry-tier churn."""
    tp = TopicPartition("req", 0)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: [Rec(0, job("low", priority=0))]}, gaps, frozenset(), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("h0", partition=0, capacity=10, reported_inflight=10)])
    policy = Policy(max_load_threshold=0.9, priority_headroom=0.1)
    p = plan(parts, {}, index, policy, RouterMemory(), NOW, NOW, random.Random(1), CFG, Stats())
    assert [h.offset for h in p.holds] == [0]
    assert not p.outcomes
