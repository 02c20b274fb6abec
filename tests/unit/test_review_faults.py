"""Adversarial review of issue 8 (fault handling): pure checks of keys and plans."""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack
import pytest
from aiokafka import TopicPartition

from router_worker.core.engine import HeadIndex
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.fault_headers import H_ADMIT_AT, H_THROTTLE_N
from router_worker.pipeline.faults import restore_waited
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.outcomes import H_REDRIVE, Incoming, Routed, claim_key_of
from router_worker.pipeline.plan import PlanConfig, Stats, plan
from router_worker.topics import Topics
from schemas.envelope import Job
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
    out: bytes = msgpack.packb({"job_id": job_id, "model_type": model, **kw})
    return out


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


@pytest.mark.xfail(strict=True, reason="review of issue 8: a held low-priority job holds its whole partition, the "
                   "higher-priority jobs behind it included (head-of-line blocking)")  # fmt: skip
def test_a_high_priority_job_behind_a_held_low_priority_one_is_not_held_with_it() -> None:
    """``priority_headroom``: "as heads saturate, lower-priority jobs are held back (in Kafka) first". A job of
    priority 0 that meets heads at 0.8 load (its limit is 0.9 - 0.1) is held as *saturated*, and a hold cuts
    the partition there: the priority-5 job right behind it, for which the same head has room (limit 0.9), is
    held too, for as long as the heads stay between the two limits."""
    tp = TopicPartition("req", 0)
    batch = {tp: [Rec(0, job("low", priority=0)), Rec(1, job("high", priority=5))]}
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake(batch, gaps, frozenset(), NOW, CFG.max_message_bytes)
    index = HeadIndex.build([head("h0", partition=0, capacity=10, reported_inflight=8)])
    policy = Policy(max_load_threshold=0.9, priority_headroom=0.1)
    p = plan(parts, {}, index, policy, RouterMemory(), NOW, NOW, random.Random(1), CFG, Stats())
    routed = [o.src.job.job_id for o in p.outcomes if isinstance(o, Routed) and o.src.job is not None]
    assert [h.offset for h in p.holds] == [0], "the low-priority job is held"
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
