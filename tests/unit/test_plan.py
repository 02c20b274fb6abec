"""The batch plan as data: every admitted record gets exactly one outcome or a hold, and commit offsets never
pass a record whose publish is not settled. Pure: no broker, no Redis."""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_worker.core.engine import HeadIndex
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.outcomes import DeadLettered, Duplicate, Plan, Retried, Routed, commit_offsets
from router_worker.pipeline.plan import Claim, PlanConfig, Stats, plan
from router_worker.topics import Topics
from tests.unit.core.sim import head

TOPICS = Topics(prefix="", requests="req", model_prefix="model.", retry_prefix="retry.", dlq="dlq",
                results="res")  # fmt: skip
CFG = PlanConfig(router_id="r", topics=TOPICS, max_attempts=3, retry_backoff_ms=(100, 200),
                 max_message_bytes=1000, dlq_keep_bytes=16)  # fmt: skip
NOW = 1_000_000


@dataclass
class Rec:
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


def job(job_id: str, model: str = "m", **kw: object) -> bytes:
    return msgpack.packb({"job_id": job_id, "model_type": model, **kw})  # type: ignore[no-any-return]


def run(batch: dict[TopicPartition, list[Rec]], claims: dict[str, Claim] | None = None,
        heads: int = 2, capacity: int = 100):  # type: ignore[no-untyped-def]  # fmt: skip
    gaps = GapGuard(wait_ms=1000)
    for tp, recs in batch.items():
        if recs:
            gaps.expect(tp, recs[0].offset)
    parts, holds = intake(batch, gaps, frozenset({"retry.1", "retry.2"}), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head(f"h{i}", partition=i, capacity=capacity) for i in range(heads)])
    p = plan(parts, claims or {}, index, Policy(), RouterMemory(), NOW, NOW, random.Random(1), CFG, Stats())
    p.holds.extend(holds)
    return parts, p


def test_each_kind_of_record_gets_its_outcome() -> None:
    tp = TopicPartition("req", 0)
    recs = [
        Rec(0, job("a")),
        Rec(1, b"\xc1 not msgpack"),
        Rec(2, job("b", model="nobody")),
        Rec(3, job("old", deadline_ms=1)),
        Rec(4, job("a")),  # the same job again in the batch: a duplicate
        Rec(5, None),
        Rec(6, b"x" * 2000),
    ]
    _, p = run({tp: recs})
    kinds = [type(o).__name__ for o in p.outcomes]
    assert kinds == ["Routed", "DeadLettered", "Retried", "DeadLettered", "Duplicate", "DeadLettered",
                     "DeadLettered"]  # fmt: skip
    too_large = p.outcomes[6]
    assert isinstance(too_large, DeadLettered)
    assert too_large.reason.value == "too_large"
    assert too_large.send is not None
    assert too_large.send.value == b"x" * 16, "truncated to dlq_keep_bytes"
    hdrs = dict(too_large.send.headers)
    assert hdrs["x-dlq-truncated"] == b"2000"
    assert len(hdrs["x-dlq-sha256"] or b"") == 64
    tomb = p.outcomes[5]
    assert tomb.send is not None
    assert tomb.send.key == b"", "a null key and value still makes a publishable record"
    assert p.next_offset[tp] == 7


def test_a_retry_record_without_a_valid_attempt_is_a_schema_error_not_a_drop() -> None:
    tp = TopicPartition("retry.1", 0)
    recs = [Rec(0, job("a")), Rec(1, job("b"), headers=(("x-route-attempt", b"abc"),)),
            Rec(2, job("c"), headers=(("x-route-attempt", None),))]  # fmt: skip
    _, p = run({tp: recs})
    assert all(isinstance(o, DeadLettered) and o.reason.value == "schema_error" for o in p.outcomes)
    assert "x-route-attempt" in p.outcomes[1].detail  # type: ignore[union-attr]


def test_a_retry_not_due_holds_its_partition_and_the_commit_stops_before_it() -> None:
    tp = TopicPartition("retry.1", 0)
    due = (("x-route-attempt", b"1"), ("x-retry-not-before", str(NOW - 1).encode()))
    later = (("x-route-attempt", b"1"), ("x-retry-not-before", str(NOW + 500).encode()))
    _, p = run({tp: [Rec(10, job("a"), headers=due), Rec(11, job("b"), headers=later), Rec(12, job("c"))]})
    assert len(p.outcomes) == 1
    assert isinstance(p.outcomes[0], Routed)
    assert p.outcomes[0].src.attempt == 2
    assert [(h.offset, h.why) for h in p.holds] == [(11, "not_due")]
    p.outcomes[0].final = True
    assert commit_offsets(p) == {tp: 11}


def test_claims_done_are_duplicates_and_busy_holds_the_partition() -> None:
    tp0, tp1 = TopicPartition("req", 0), TopicPartition("req", 1)
    _, p = run({tp0: [Rec(0, job("x")), Rec(1, job("y"))], tp1: [Rec(0, job("z")), Rec(1, job("w"))]},
               claims={"j|1|x": Claim.DONE, "j|1|z": Claim.BUSY})  # fmt: skip
    assert isinstance(p.outcomes[0], Duplicate)
    assert isinstance(p.outcomes[1], Routed)
    assert [(h.tp, h.offset, h.why) for h in p.holds] == [(tp1, 0, "claimed_elsewhere")]
    assert p.next_offset[tp1] == 0


def test_the_same_job_in_two_partitions_is_routed_once() -> None:
    tp0, tp1 = TopicPartition("req", 0), TopicPartition("req", 1)
    _, p = run({tp0: [Rec(0, job("x"))], tp1: [Rec(0, job("x"))]})
    assert [type(o).__name__ for o in p.outcomes] == ["Routed", "Duplicate"]


def test_saturated_heads_hold_the_rest_of_the_partition() -> None:
    tp = TopicPartition("req", 0)
    _, p = run({tp: [Rec(i, job(f"j{i}")) for i in range(5)]}, heads=1, capacity=2)
    assert [type(o).__name__ for o in p.outcomes] == ["Routed", "Routed"]
    assert [(h.offset, h.why) for h in p.holds] == [(2, "saturated")]


def assert_commits_stop_at_the_first_unsettled(p: Plan, acks: list[bool]) -> None:
    """Settle a random subset of the plan's publishes (``acks``): no commit offset passes an unsettled record."""
    for i, o in enumerate(p.outcomes):
        o.final = o.send is None or (acks[i] if i < len(acks) else True)
    offsets = commit_offsets(p)
    for o in p.outcomes:
        if not o.final:
            assert offsets[o.src.tp] <= o.src.offset


record = st.one_of(
    st.builds(lambda i, m: job(f"j{i}", model=m), st.integers(0, 20), st.sampled_from(["m", "nobody"])),
    st.binary(max_size=40),
    st.none(),
    st.just(b"\x81\x91\x01\x01"),
)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(record, max_size=12), min_size=1, max_size=4),
    st.dictionaries(
        st.sampled_from([f"j|1|j{i}" for i in range(20)]), st.sampled_from(list(Claim)), max_size=6
    ),
    st.integers(1, 4),
    st.lists(st.booleans(), max_size=60),
)
def test_every_record_gets_one_outcome_and_commits_never_pass_an_unsettled_one(
    values: list[list[bytes | None]], claims: dict[str, Claim], capacity: int, acks: list[bool]
) -> None:
    batch = {
        TopicPartition("req", i): [Rec(100 + j, v) for j, v in enumerate(vs)] for i, vs in enumerate(values)
    }
    _parts, p = run(batch, claims, heads=2, capacity=capacity)
    planned = [(o.src.tp, o.src.offset) for o in p.outcomes]
    assert len(planned) == len(set(planned)), "one outcome per record"
    for tp, recs in batch.items():
        held = [h.offset for h in p.holds if h.tp == tp]
        mine = sorted(off for t, off in planned if t == tp)
        cut = min(held) if held else None
        expected = [r.offset for r in recs if cut is None or r.offset < cut]
        assert mine == expected, "every record before the hold has an outcome, none after it"
    assert_commits_stop_at_the_first_unsettled(p, acks)
    for o in p.outcomes:
        assert isinstance(o, Routed | Retried | DeadLettered | Duplicate)
        if isinstance(o, Duplicate):
            assert o.send is None
        else:
            assert o.send is not None


def test_a_saturated_model_waits_aside_when_another_models_job_is_behind_it() -> None:
    """Holding the partition for a model with no head free would stall every other model's job behind it: the
    job waits in a retry tier instead (a wait, not an attempt); with only its own model behind it, it holds."""
    tp = TopicPartition("req", 0)
    recs = [Rec(0, job("a0", model="a")), Rec(1, job("a1", model="a")), Rec(2, job("b0", model="b")),
            Rec(3, job("a2", model="a")), Rec(4, job("a3", model="a"))]  # fmt: skip
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: recs}, gaps, frozenset({"retry.1", "retry.2"}), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("ha", model="a", capacity=1), head("hb", model="b", partition=1)])
    stats = Stats()
    p = plan(parts, {}, index, Policy(), RouterMemory(), NOW, NOW, random.Random(1), CFG, stats)
    kinds = [(type(o).__name__, o.src.offset) for o in p.outcomes]
    assert kinds == [("Routed", 0), ("Retried", 1), ("Routed", 2)], "a1 waits aside; b0 behind it goes"
    assert [(h.offset, h.why) for h in p.holds] == [(3, "saturated")], "nothing of another model behind a2"
    waited = p.outcomes[1]
    assert isinstance(waited, Retried)
    assert waited.send is not None
    hdrs = dict(waited.send.headers)
    assert hdrs["x-retry-reason"] == b"saturated"
    assert hdrs["x-route-attempt"] == b"1", "a wait, not an attempt"
    assert hdrs["x-throttle-n"] == b"1"
    assert waited.audit is not None
    assert "a job behind it can go" in str(waited.audit["reason"])
    assert stats.waited_aside == 1
    assert stats.saturated == 1


def _headroom_plan(recs: list[Rec]):  # type: ignore[no-untyped-def]
    """Plan with ``priority_headroom`` on one head of capacity 10 with 8 in flight: a job of priority none waits,
    a job of priority 5 goes."""
    tp = TopicPartition("req", 0)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, recs[0].offset)
    parts, _ = intake({tp: recs}, gaps, frozenset({"retry.1", "retry.2"}), NOW, CFG.max_message_bytes)
    policy = Policy(max_load_threshold=1.0, priority_headroom=0.3)
    index = HeadIndex.build([head("h", capacity=10)])
    return plan(
        parts, {}, index, policy, RouterMemory(pending={"h": 8}), NOW, NOW, random.Random(1), CFG, Stats()
    )


def test_a_low_priority_job_held_by_the_headroom_always_waits_aside() -> None:
    """Whatever the fetch shows behind it: a higher-priority job further back than one fetch must never wait behind
    a run of lower-priority ones (a review found that holding them when nothing fetched behind could go did that)."""
    p = _headroom_plan([Rec(0, job("low")), Rec(1, job("low2")), Rec(2, job("high", priority=5))])
    kinds = [(type(o).__name__, o.src.offset) for o in p.outcomes]
    assert kinds == [("Retried", 0), ("Retried", 1), ("Routed", 2)], "the high-priority job behind them goes"
    waited = p.outcomes[0]
    assert waited.send is not None
    assert dict(waited.send.headers)["x-retry-reason"] == b"priority_headroom"
    p = _headroom_plan([Rec(0, job("low")), Rec(1, job("low2"))])
    assert [type(o).__name__ for o in p.outcomes] == ["Retried", "Retried"]
    assert p.holds == []


def test_a_saturated_job_holds_when_the_plan_would_stop_at_a_claim_held_behind_it() -> None:
    """A job behind a record whose key another holds is not reached by the plan now: it can not justify a wait
    aside (the saturated job would circle the retry tiers while nothing behind it went)."""
    tp = TopicPartition("req", 0)
    recs = [Rec(0, job("a0", model="a")), Rec(1, job("x", model="b")), Rec(2, job("b2", model="b"))]
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: recs}, gaps, frozenset({"retry.1", "retry.2"}), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("ha", model="a", capacity=1, reported_inflight=1),
                             head("hb", model="b", partition=1)])  # fmt: skip
    p = plan(parts, {"j|1|x": Claim.BUSY}, index, Policy(), RouterMemory(), NOW, NOW, random.Random(1), CFG,
             Stats())  # fmt: skip
    assert p.outcomes == []
    assert [(h.offset, h.why) for h in p.holds] == [(0, "saturated")]
