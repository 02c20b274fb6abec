"""The worker SDK commits the lowest unfinished offset: never past a job it has not completed or nacked."""

from __future__ import annotations

from consumers.worker import OffsetTracker


def test_nothing_fetched_is_nothing_to_commit() -> None:
    assert OffsetTracker().committable() == -1


def test_nothing_finished_commits_the_first_fetched_offset() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12):
        t.started(off)
    assert t.committable() == 10


def test_everything_finished_commits_the_next_offset() -> None:
    t = OffsetTracker()
    for off in range(5):
        t.started(off)
    for off in range(5):
        t.finished(off)
    assert t.committable() == 5
    assert not t.pending


def test_out_of_order_finishes_commit_only_the_finished_prefix() -> None:
    t = OffsetTracker()
    for off in range(6):
        t.started(off)
    for off in (3, 5, 1):
        t.finished(off)
    assert t.committable() == 0, "offset 0 is still running: nothing may be committed"
    t.finished(0)
    assert t.committable() == 2
    t.finished(2)
    assert t.committable() == 4
    t.finished(4)
    assert t.committable() == 6


def test_an_offset_that_never_finishes_holds_the_commit_back() -> None:
    t = OffsetTracker()
    for off in range(100):
        t.started(off)
    for off in range(100):
        if off != 7:  # its nack was not acknowledged
            t.finished(off)
    assert t.committable() == 7


def test_offsets_skipped_by_an_accepted_gap_do_not_hold_the_commit_back() -> None:
    t = OffsetTracker()
    for off in (0, 1, 5, 6):  # 2..4 never existed (compaction, an accepted gap)
        t.started(off)
    for off in (0, 1):
        t.finished(off)
    assert t.committable() == 5
    t.finished(6)
    assert t.committable() == 5
    t.finished(5)
    assert t.committable() == 7


def test_finishing_twice_or_an_unknown_offset_is_harmless() -> None:
    t = OffsetTracker()
    t.started(0)
    t.started(1)
    t.finished(0)
    t.finished(0)
    t.finished(42)
    assert t.committable() == 1
    t.started(2)
    assert t.committable() == 1
