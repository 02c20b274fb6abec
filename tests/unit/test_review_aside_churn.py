"""A saturated job waits aside (in a retry tier) only when a job of another model behind it can go now. When
nothing behind can go (every model saturated, the case back-pressure exists for; or the job behind is a duplicate,
or of an unknown model), the partition is held: a wait aside would stall nobody less, yet republish every such job
on every trip (a wait is not an attempt: no bound), with a done mark per trip. (A review found the first version
sent jobs aside whenever another model's job was behind.)"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from router_worker.core.engine import HeadIndex
from router_worker.core.model import Head, RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.faults import FaultGate, restore_waited
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.outcomes import Plan, Retried, Routed
from router_worker.pipeline.plan import Admission, Claim, Stats, plan
from tests.unit.core.sim import head
from tests.unit.test_plan import CFG, NOW, Rec, job

RETRY = frozenset({"retry.1", "retry.2"})
FULL_A = head("ha", model="a", capacity=1, reported_inflight=1)
FULL_B = head("hb", model="b", partition=1, capacity=1, reported_inflight=1)
FREE_B = head("hb", model="b", partition=1)


def _plan(
    batch: dict[TopicPartition, list[Rec]],
    heads: list[Head],
    claims: dict[str, Claim] | None = None,
    now: int = NOW,
) -> tuple[Plan, Stats]:
    """intake, then what the fault gate does before the plan (restore waited records, their verdicts), then plan."""
    gaps = GapGuard(wait_ms=1000)
    for tp, recs in batch.items():
        gaps.expect(tp, recs[0].offset)
    parts, _ = intake(batch, gaps, RETRY, now, CFG.max_message_bytes)
    restore_waited(parts, RETRY)
    verdicts: dict[str, Admission] = {}
    FaultGate._admission_needs(
        SimpleNamespace(retry_topics=RETRY, reserved={}, spent={}), parts, Policy(), now, verdicts
    )  # type: ignore[arg-type]
    stats = Stats()
    p = plan(parts, claims or {}, HeadIndex.build(heads), Policy(), RouterMemory(), now, now, random.Random(1),
             CFG, stats, verdicts)  # fmt: skip
    return p, stats


def test_under_global_saturation_the_partition_is_held_not_drained_into_the_retry_tiers() -> None:
    tp = TopicPartition("req", 0)
    recs = [Rec(i, job(f"{m}{i}", model=m)) for i, m in enumerate("abababab")]
    p, _ = _plan({tp: recs}, [FULL_A, FULL_B])
    retried = [o.src.offset for o in p.outcomes if isinstance(o, Retried)]
    # today: offsets 0..6 all go to retry.1 (7 republishes, 7 done marks) and the partition is held at 7 anyway
    assert retried == [], f"jobs sent aside though nothing behind them could go: {retried}"
    assert [(h.offset, h.why) for h in p.holds] == [(0, "saturated")]


@pytest.mark.parametrize("behind", ["duplicate", "unknown_model"])
def test_a_saturated_job_is_not_sent_aside_for_a_job_behind_that_routes_nowhere(behind: str) -> None:
    tp = TopicPartition("req", 0)
    other = job("b0", model="b") if behind == "duplicate" else job("z0", model="nobody-serves-this")
    p, _ = _plan({tp: [Rec(0, job("a0", model="a")), Rec(1, other)]}, [FULL_A, FREE_B],
                 claims={"j|1|b0": Claim.DONE})  # fmt: skip
    assert not any(isinstance(o, Retried) and o.src.offset == 0 for o in p.outcomes)


def test_a_job_waiting_aside_keeps_its_attempt_and_gets_a_new_claim_key_every_trip_without_bound() -> None:
    """Not a bug in itself (the claim keys are sound): the trips are unbounded, one republish and one done mark
    each, for as long as the model stays saturated and another model's job is behind it."""
    tp = TopicPartition("req", 0)
    p, stats = _plan({tp: [Rec(0, job("a0", model="a")), Rec(1, job("b0", model="b"))]}, [FULL_A, FREE_B])
    w = p.outcomes[0]
    assert isinstance(w, Retried)
    assert isinstance(p.outcomes[1], Routed)
    assert stats.waited_aside == 1
    keys = [w.src.claim_key]
    now = NOW
    for trip in range(1, 8):
        assert w.send is not None
        hdrs = dict(w.send.headers)
        assert hdrs["x-route-attempt"] == b"1"
        assert hdrs["x-throttle-n"] == str(trip).encode()
        now = int(hdrs["x-retry-not-before"] or b"0")
        rtp = TopicPartition(w.send.topic, 0)
        due = (("x-route-attempt", b"1"), ("x-retry-not-before", str(now).encode()))
        p, _ = _plan({rtp: [Rec(10, w.send.value, headers=tuple(w.send.headers)),
                            Rec(11, job(f"b{trip}", model="b"), headers=due)]}, [FULL_A, FREE_B], now=now)  # fmt: skip
        w = p.outcomes[0]
        assert isinstance(w, Retried), "still saturated: aside again, never dead-lettered"
        assert w.src.attempt == 1
        keys.append(w.src.claim_key)
    assert keys == ["j|1|a0"] + [f"j|1t{n}|a0" for n in range(1, 8)], "one fresh key (and done mark) per trip"
