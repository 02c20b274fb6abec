"""The offset-gap guard: records after a missing offset wait until it appears, or until it is clearly gone."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from router_worker.pipeline.gaps import GapGuard

TP = TopicPartition("t", 0)


@dataclass
class Rec:
    offset: int


def recs(*offsets: int) -> list[Rec]:
    return [Rec(o) for o in offsets]


def test_contiguous_records_pass_untouched_without_copying() -> None:
    g = GapGuard(wait_ms=100)
    g.expect(TP, 10)
    batch = recs(10, 11, 12)
    admitted, hold = g.admit(TP, batch, 0)
    assert admitted is batch
    assert hold is None
    assert g.expected[TP] == 13


def test_a_gap_holds_the_records_after_it_until_the_missing_offset_appears() -> None:
    g = GapGuard(wait_ms=100)
    g.expect(TP, 10)
    admitted, hold = g.admit(TP, recs(10, 11, 13, 14), now_ms=1_000)  # 12 is not visible yet
    assert [r.offset for r in admitted] == [10, 11]
    assert hold == 12
    admitted, hold = g.admit(TP, recs(13, 14), now_ms=1_010)  # read again from 12: still missing
    assert list(admitted) == []
    assert hold == 12
    admitted, hold = g.admit(TP, recs(12, 13, 14), now_ms=1_020)  # there it is
    assert [r.offset for r in admitted] == [12, 13, 14]
    assert hold is None
    assert g.waits == 2
    assert g.accepted == 0


def test_a_gap_that_persists_is_accepted_as_real() -> None:
    g = GapGuard(wait_ms=100)
    g.expect(TP, 5)
    assert g.admit(TP, recs(7, 8), now_ms=0) == ([], 5)
    admitted, hold = g.admit(TP, recs(7, 8), now_ms=150)  # compaction or a transaction marker
    assert [r.offset for r in admitted] == [7, 8]
    assert hold is None
    assert g.accepted == 1
    assert g.expected[TP] == 9


def test_unknown_start_accepts_anything_then_tracks() -> None:
    g = GapGuard()
    admitted, hold = g.admit(TP, recs(40, 41), now_ms=0)
    assert [r.offset for r in admitted] == [40, 41]
    assert hold is None
    assert g.admit(TP, recs(43), now_ms=1) == ([], 42)


def test_records_already_seen_are_never_admitted_twice() -> None:
    g = GapGuard()
    g.expect(TP, 10)
    admitted, hold = g.admit(TP, recs(8, 9, 10, 11), now_ms=0)
    assert [r.offset for r in admitted] == [10, 11]
    assert hold is None


def test_the_wait_timer_survives_re_reads_and_seeks_back_to_the_same_gap() -> None:
    g = GapGuard(wait_ms=100)
    g.expect(TP, 10)
    _, hold = g.admit(TP, recs(10, 12), now_ms=1_000)  # 11 missing
    assert hold == 11
    for t in (1_010, 1_050, 1_090):  # the router seeks back to the gap and pauses: the timer keeps running
        g.expect(TP, 11)
        admitted, hold = g.admit(TP, recs(12), now_ms=t)
        assert list(admitted) == []
        assert hold == 11
        g.admit(TP, [], now_ms=t + 1)  # an empty fetch does not close the gap either
    g.expect(TP, 11)
    admitted, hold = g.admit(TP, recs(12, 13), now_ms=1_101)
    assert [r.offset for r in admitted] == [12, 13], "accepted once the wait is over"
    assert hold is None
    assert g.accepted == 1
    # a later gap starts its own timer
    _, hold = g.admit(TP, recs(15), now_ms=5_000)
    assert hold == 14
    assert g.since[TP] == (14, 5_000)


def test_a_seek_elsewhere_drops_the_open_gap() -> None:
    g = GapGuard(wait_ms=100)
    g.expect(TP, 10)
    g.admit(TP, recs(12), now_ms=0)
    g.expect(TP, 40)
    assert TP not in g.since


async def test_start_offsets_are_read_at_once_and_a_read_that_hangs_leaves_its_partition_unguarded() -> None:
    """A router reads the start offset of every partition it is assigned inside the assignment callback, and
    fetches nothing until it returns: the reads go out together, and one the broker never answers costs at
    most ``within_s`` (that partition's first fetch is then not gap-guarded) instead of a stalled router."""
    import asyncio
    from typing import Any

    from aiokafka import TopicPartition

    from router_worker.pipeline.gaps import start_offsets

    hung = TopicPartition("req", 2)

    class _Consumer:
        """Answers ``committed`` after a moment, except for one partition it never answers."""

        def __init__(self) -> None:
            self.open = 0
            self.most_open = 0

        async def committed(self, tp: TopicPartition) -> int | None:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            try:
                await asyncio.sleep(3600 if tp == hung else 0.01)
            finally:
                self.open -= 1
            return 7 if tp.partition % 2 else None

        async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {tp: 0 for tp in tps}

    tps = [TopicPartition("req", p) for p in range(24)]
    fake = _Consumer()
    consumer: Any = fake
    starts = await asyncio.wait_for(start_offsets(consumer, tps, within_s=0.5), 60)
    assert starts[hung] is None
    assert all(starts[tp] == (7 if tp.partition % 2 else 0) for tp in tps if tp != hung)
    assert fake.most_open == len(tps), "the reads went out one after another"
