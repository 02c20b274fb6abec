"""Review of the not-due coarsening (:mod:`router_worker.pipeline.holds`) against admission's reservations
(fixed: a not-due hold now lasts at most ``NOT_DUE_MAX_SLACK_MS`` longer than its record needs).

A throttled job waits in the retry tier whose back-off first covers its delay (``retry_tier_for``), with its
``x-retry-not-before`` at the exact time its reserved token is there: "500 jobs at 50/s leave at 50/s".
As found, a not-due hold lasted at least a tenth of the *tier's* back-off, whatever the record's own delay, so:

* the jobs of one throttled tenant, spaced 20 ms apart in a tier of 10 s, leave in clumps of 50 once a second
  (each up to a second late): the admission limit's smoothing is lost, and the heads get the clump at once;
* a job throttled for 2.5 s lands in the tier after 2 s, and where that tier's back-off is long (600 s) it
  goes a minute late, 23 times its delay.

The loop below is what the router does for one tier partition: ``intake`` admits the due records and holds at
the first one not due, and ``_apply_holds`` pauses the partition until ``HoldTimes.until`` of that hold.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from aiokafka import TopicPartition

from router_worker.core.admission import retry_tier_for
from router_worker.pipeline.fault_headers import THROTTLE_REASON, throttle_headers
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.holds import HoldTimes
from router_worker.pipeline.intake import intake
from router_worker.pipeline.messages import Headers, retry_headers


@dataclass
class _Rec:
    offset: int
    headers: Headers
    key: bytes | None = b"k"
    value: bytes | None = b"\x80"


def _leave_times(backoff_ms: list[int], admit_at: list[int]) -> list[tuple[int, int]]:
    """Throttled jobs written at t=0 with these reservations: (when each left its tier, its reservation)."""
    topics = [f"r.{i + 1}" for i in range(len(backoff_ms))]
    tiers = {retry_tier_for(t, backoff_ms) for t in admit_at}
    assert len(tiers) == 1, "one tier partition"
    tp = TopicPartition(topics[tiers.pop() - 1], 0)
    records = [
        _Rec(i, throttle_headers(retry_headers([], THROTTLE_REASON, "requests", 0, i, 1, t), t, 1))
        for i, t in enumerate(admit_at)
    ]
    hold_times = HoldTimes(5, 100, dict(zip(topics, backoff_ms, strict=True)))
    gaps = GapGuard(3_000)
    now, pos, left = 0, 0, []
    while pos < len(records):
        parts, holds = intake({tp: records[pos:]}, gaps, frozenset(topics), now, 1 << 20, max(backoff_ms))
        n = sum(len(items) for _, items in parts)
        left += [(now, admit_at[pos + i]) for i in range(n)]
        pos += n
        if holds:
            assert [h.why for h in holds] == ["not_due"]
            now = hold_times.until(holds[0], now)  # the partition is resumed then, and read from the hold
            gaps.expect(tp, holds[0].offset)
    return left


def test_throttled_jobs_leave_their_tier_at_their_reserved_rate() -> None:
    admit_at = [2_000 + 20 * k for k in range(1, 351)]  # 50/s, past tier 2's 2 s: all in tier 3 (10 s)
    left = _leave_times([500, 2_000, 10_000], admit_at)
    clump = max(Counter(t for t, _ in left).values())
    late = max(t - due for t, due in left)
    assert clump <= 5, f"{clump} jobs left at the same moment (50/s: one every 20 ms)"
    assert late <= 100, f"a job left {late} ms after its reserved token"


def test_a_job_throttled_for_seconds_is_not_held_a_minute_by_a_long_tier() -> None:
    left = _leave_times([500, 2_000, 600_000], [2_500])
    ((t, due),) = left
    assert t - due <= 1_000, f"due at {due} ms, left at {t} ms"
