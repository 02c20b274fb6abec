"""Regression tests from an adversarial review, (pure: no broker). Each test states the promise it
checks; each failed on the code before its fix (lost jobs, stalled partitions, double-counted loads, two heads
on one partition, a pool shrunk by a stray CancelledError)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import msgpack
from aiokafka import TopicPartition
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from router_worker.audit import AuditSink
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.marks import Marks
from router_worker.pipeline.outcomes import Incoming, Routed
from router_worker.pipeline.publish import Send
from router_worker.state.keys import Keys
from tests.procs import free_port


def _rec(offset: int, value: bytes, headers: list[tuple[str, bytes | None]]) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, key=None, value=value, headers=headers)


def test_retry_record_with_a_far_future_not_before_does_not_hold_its_partition_for_years() -> None:
    """Finding: intake.py:65-69 trusts x-retry-not-before from the record. Any client that can write a retry
    tier (every head can; so can a buggy or hostile one) pauses that retry partition until the given time, and
    every legit nack behind it waits that long: the partition stalls for good. The hold should be capped (e.g.
    at now + the tier's back-off)."""
    tp = TopicPartition("router.retry.1", 0)
    now = int(time.time() * 1000)
    ten_years = now + 10 * 365 * 86_400_000
    job = msgpack.packb({"job_id": "j", "model_type": "m"})
    poison = _rec(0, job, [("x-route-attempt", b"1"), ("x-retry-not-before", str(ten_years).encode())])
    legit = _rec(1, msgpack.packb({"job_id": "k", "model_type": "m"}),
                 [("x-route-attempt", b"1"), ("x-retry-not-before", b"0")])  # fmt: skip
    gaps = GapGuard(3000)
    gaps.expect(tp, 0)
    _parts, holds = intake({tp: [poison, legit]}, gaps, frozenset({tp.topic}), now, 1 << 20)
    longest_backoff_ms = 60_000  # intake's default bound
    assert all(h.until_ms <= now + longest_backoff_ms for h in holds), (
        f"retry partition paused for {(holds[0].until_ms - now) / 86_400_000:.0f} days by one record"
    )
    assert [inc.offset for _, items in _parts for inc in items] == [0, 1], "a bogus not-before is due now"


async def test_outage_buffer_stays_within_its_bound_and_keeps_done_marks_over_pins() -> None:
    """Finding: marks.py:84-85,165-177. The outage buffer counts pins in its size but `_bound` only ever trims
    audit lines and done marks: with sessions, pins grow without bound (one per routed job), and once they alone
    exceed `outage_buffer_max` every call deletes ALL done marks, i.e. dedupe of the outage window is lost
    while the memory keeps growing."""
    redis = Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )  # nothing listens there: every call fails at once
    try:
        keys = Keys("rv")
        marks = Marks(redis, keys, AuditSink(None, "audit", None), claim_ttl_ms=60_000, dedupe_ttl_ms=60_000,
                      buffer_max=10, writer="test")  # fmt: skip
        tp = TopicPartition("router.requests", 0)
        for i in range(40):
            inc = Incoming(tp, i, None, b"x", [], "application/msgpack", 1, None, None, f"job-{i}")
            o = Routed(inc, Send("model.m", b"x", None, 0, []), None, final=True, head_id="h", pin=(f"s{i}", "h"),
                       new_pin=True)  # fmt: skip
            assert await marks.mark([o], 300_000) is None  # Redis unreachable: buffered
        p = marks.pending
        assert marks.buffered <= 10, f"buffer bound 10, holds {len(p.pins)} pins + {len(p.done)} done marks"
    finally:
        await redis.aclose()


def test_idempotency_keys_of_distinct_jobs_and_attempts_never_collide() -> None:
    """Finding (LOSS): outcomes.py:311-313. Attempt 2 of job "a" and attempt 1 of job "a#2" share one key, so
    whichever is handled second is dropped as a duplicate (see the integration demo)."""
    from router_worker.pipeline.outcomes import claim_key_of
    from schemas.envelope import Job

    tp = TopicPartition("router.requests", 0)
    k1 = claim_key_of(Job(job_id="a", model_type="m"), 2, tp, 1)
    k2 = claim_key_of(Job(job_id="a#2", model_type="m"), 1, tp, 2)
    k3 = claim_key_of(Job(job_id="rec|router.requests|0|7", model_type="m"), 1, tp, 3)
    k4 = claim_key_of(None, 1, tp, 7)
    assert k1 != k2, f"job a attempt 2 and job a#2 attempt 1 share the key {k1!r}"
    assert k3 != k4, f"job id {k3!r} shares the key of the bad record at offset 7"
