"""Adversarial review of the bucketed idempotency marks (issue 7, commit 055839b) against a real Valkey: a batch of
10,000 records claimed by one script (Lua unpack limits), job ids with odd characters, bucket boundaries and
routers whose clocks differ by less than a lifetime."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from redis.asyncio import Redis

import router_worker.pipeline.marks as marks_module
from router_worker.audit import AuditSink
from router_worker.pipeline.marks import Marks
from router_worker.pipeline.outcomes import Incoming, Routed, claim_key_of
from router_worker.pipeline.plan import Claim
from router_worker.pipeline.publish import Send
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from schemas.envelope import Job

pytestmark = pytest.mark.integration

TTL = 60_000
ODD = ["a|b", "|", "1|2|3", "j|1|x", "é漢字🙂", " spaced id ", "x" * 128, "\\n\t\"'", "{rw}:done:1", "%s%n"]


def _inc(job_id: str, partition: int, offset: int, attempt: int = 1) -> Incoming:
    tp = TopicPartition("router.requests", partition)
    job = Job(job_id=job_id, model_type="m")
    return Incoming(tp, offset, None, b"x", [], "application/msgpack", attempt, job, None,
                    claim_key_of(job, attempt, tp, offset))  # fmt: skip


def _marks(redis: Redis, settings: Settings) -> Marks:
    return Marks(redis, Keys(settings.redis_prefix), AuditSink(None, "audit", None), claim_ttl_ms=TTL,
                 dedupe_ttl_ms=TTL, buffer_max=100_000, writer="review")  # fmt: skip


def _routed(inc: Incoming) -> Routed:
    return Routed(inc, Send("model.m", b"x", None, 0, []), None, final=True, head_id="h")


async def test_ten_thousand_claims_with_odd_ids_in_one_script(settings: Settings, redis: Redis) -> None:
    marks = _marks(redis, settings)
    ids = [f"{i}#{ODD[i % len(ODD)]}"[:128] for i in range(10_000)]
    mine = [_inc(j, 0, i) for i, j in enumerate(ids)]
    other = [_inc(j, 1, i) for i, j in enumerate(ids)]
    claims, _ = await marks.claim([(mine[0].tp, mine)], [])
    assert len(claims) == 10_000
    assert set(claims.values()) == {Claim.MINE}
    claims, _ = await marks.claim([(mine[0].tp, mine)], [])
    assert set(claims.values()) == {Claim.MINE}, "the same records read again take their claims over"
    claims, _ = await marks.claim([(other[0].tp, other)], [])
    assert set(claims.values()) == {Claim.BUSY}, "another record of each job id waits"
    assert await marks.mark([_routed(i) for i in mine], 1000) is not None
    claims, _ = await marks.claim([(other[0].tp, other)], [])
    assert set(claims.values()) == {Claim.DONE}, "once marked, the other records are duplicates"
    retried = [_inc(j, 1, i, attempt=2) for i, j in enumerate(ids)]
    claims, _ = await marks.claim([(retried[0].tp, retried)], [])
    assert set(claims.values()) == {Claim.MINE}, "the next attempt of each job is a new key"


@pytest.mark.parametrize("skew", [0, TTL // 2, -(TTL // 2), TTL - 1])
@pytest.mark.parametrize("written_at", [TTL * 1000 + 1, TTL * 1001 - 1])
async def test_a_claim_and_a_done_mark_hold_for_a_lifetime_across_bucket_boundaries_and_skew(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, written_at: int, skew: int
) -> None:
    """Router A claims (then marks) at ``written_at`` by its clock; router B, whose clock is ``skew`` ahead,
    asks for another record of the same job anywhere within the next lifetime less the skew (a reader whose clock
    runs ahead sees a mark's bucket leave its window that much earlier; see state/idempotency.py)."""
    a, b = _marks(redis, settings), _marks(redis, settings)
    clock = [written_at]
    monkeypatch.setattr(marks_module, "now_ms", lambda: clock[0])
    first, second = _inc("job", 0, 7), _inc("job", 1, 9)
    claims, _ = await a.claim([(first.tp, [first])], [])
    assert claims[first.claim_key] is Claim.MINE
    laters = [x for x in (0, 1, TTL // 3, TTL - 1) if x < TTL - max(skew, 0)]
    for later in laters:
        clock[0] = written_at + skew + later
        claims, _ = await b.claim([(second.tp, [second])], [])
        assert claims[second.claim_key] is Claim.BUSY, f"B at +{later} ms (skew {skew}) found the claim gone"
    clock[0] = written_at
    assert await a.mark([_routed(first)], 1000) is not None
    for later in laters:
        clock[0] = written_at + skew + later
        claims, _ = await b.claim([(second.tp, [second])], [])
        assert claims[second.claim_key] is Claim.DONE, f"B at +{later} ms (skew {skew}) found no done mark"


async def test_a_claim_nobody_completes_lets_another_record_go_within_two_claim_ttls(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _marks(redis, settings), _marks(redis, settings)
    clock = [TTL * 1000]  # the first millisecond of a bucket
    monkeypatch.setattr(marks_module, "now_ms", lambda: clock[0])
    first, second = _inc("orphan", 0, 7), _inc("orphan", 1, 9)
    claims, _ = await a.claim([(first.tp, [first])], [])
    assert claims[first.claim_key] is Claim.MINE  # and router A dies: nobody reads that record again
    clock[0] += TTL + TTL // 2  # one and a half claim TTLs later: still held (README: one to two TTLs)
    claims, _ = await b.claim([(second.tp, [second])], [])
    assert claims[second.claim_key] is Claim.BUSY, "held at least one claim TTL"
    clock[0] += TTL // 2  # two claim TTLs after it was made: lapsed
    claims, _ = await b.claim([(second.tp, [second])], [])
    assert claims[second.claim_key] is Claim.MINE, "the orphaned claim lapses within two claim TTLs"
