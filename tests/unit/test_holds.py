"""HoldTimes: saturated holds back off while a partition stays stuck at one record; not-due holds are coarse."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from router_worker.pipeline.holds import NOT_DUE_MAX_SLACK_MS, NOT_DUE_SLACK, HoldTimes
from router_worker.pipeline.outcomes import Hold

TIERS = {"r.1": 500, "r.2": 2_000, "r.3": 10_000}
REQ = TopicPartition("requests", 0)
TIER1 = TopicPartition("r.1", 3)


def times(base: int = 5, cap: int = 100) -> HoldTimes:
    return HoldTimes(base, cap, TIERS)


def test_saturated_hold_doubles_at_the_same_record_up_to_the_cap() -> None:
    t = times()
    waits = [t.until(Hold(REQ, 42, 0, "saturated"), 1_000) - 1_000 for _ in range(8)]
    assert waits == [5, 10, 20, 40, 80, 100, 100, 100]
    assert t.streak(REQ) == 8


def test_progress_starts_the_streak_again() -> None:
    t = times()
    for _ in range(4):
        t.until(Hold(REQ, 42, 0, "saturated"), 0)
    assert t.until(Hold(REQ, 43, 0, "saturated"), 0) == 5  # stuck at the next record: a new streak
    assert t.streak(REQ) == 1


def test_partitions_have_their_own_streaks_and_a_revoked_one_is_forgotten() -> None:
    t = times()
    other = TopicPartition("requests", 1)
    for _ in range(3):
        t.until(Hold(REQ, 7, 0, "saturated"), 0)
    assert t.until(Hold(other, 7, 0, "saturated"), 0) == 5
    t.forget([REQ])
    assert t.streak(REQ) == 0
    assert t.until(Hold(REQ, 7, 0, "saturated"), 0) == 5


def test_not_due_hold_lasts_a_tenth_of_its_tiers_backoff_at_most_100_ms_beyond_its_time() -> None:
    t = times()
    now = 10_000
    assert t.until(Hold(TIER1, 0, now + 3, "not_due"), now) == now + 500 // NOT_DUE_SLACK
    assert t.until(Hold(TIER1, 0, now + 400, "not_due"), now) == now + 400  # already longer: its own time
    tier3 = TopicPartition("r.3", 0)  # a tenth of 10 s would be a second: at most 100 ms beyond its time
    assert t.until(Hold(tier3, 0, now + 3, "not_due"), now) == now + NOT_DUE_MAX_SLACK_MS
    # A topic that is not a tier (never happens) keeps the plan's time.
    assert t.until(Hold(REQ, 0, now + 3, "not_due"), now) == now + 3


def test_other_holds_keep_the_plans_time_and_leave_the_streak_alone() -> None:
    t = times()
    t.until(Hold(REQ, 9, 0, "saturated"), 0)
    for why in ("gap", "claimed_elsewhere", "publish_unsent", "redis_unavailable"):
        assert t.until(Hold(REQ, 9, 1_234, why), 0) == 1_234
    assert t.until(Hold(REQ, 9, 0, "saturated"), 0) == 10


def test_a_cap_below_the_first_hold_is_the_first_hold() -> None:
    assert HoldTimes(50, 10, TIERS).until(Hold(REQ, 0, 0, "saturated"), 0) == 50


@given(base=st.integers(1, 10_000), cap=st.integers(1, 60_000), n=st.integers(1, 200))
def test_a_saturated_hold_is_always_between_the_first_hold_and_the_cap(base: int, cap: int, n: int) -> None:
    t = HoldTimes(base, cap, TIERS)
    waits = [t.until(Hold(REQ, 1, 0, "saturated"), 0) for _ in range(n)]
    assert all(base <= w <= max(base, cap) for w in waits)
    assert waits == sorted(waits)  # never shorter while stuck
