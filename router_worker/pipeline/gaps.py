"""Offset-gap guard: never step past a record that is not visible yet.

Within a partition Kafka offsets are contiguous, unless compaction or transaction markers remove some. A
broker that makes concurrently produced batches visible out of order can show offset N+1 before N (the
embedded Tansu broker does: a small batch from one producer commits ahead of a larger one from another).
A consumer that takes N+1 moves its position past N and never sees it: a lost job. So each consumer of
ours admits records only up to the first gap, seeks back to the missing offset and reads again a moment
later; a gap still there after ``wait_ms`` is taken to be a real one (compaction, an aborted transaction)
and accepted with a warning. On Apache Kafka without compaction or transactions the guard never fires.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiokafka import TopicPartition

log = logging.getLogger(__name__)


class _Record(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Record)


@dataclass(slots=True)
class GapGuard:
    wait_ms: int = 200
    expected: dict[TopicPartition, int] = field(default_factory=dict)
    """Next offset this consumer should see per partition (absent: unknown, anything goes)."""
    since: dict[TopicPartition, int] = field(default_factory=dict)
    """When the gap now open on a partition was first seen (ms)."""
    waits: int = 0
    accepted: int = 0

    def expect(self, tp: TopicPartition, offset: int | None) -> None:
        """The consumer will read ``tp`` from ``offset`` next (after an assignment, a seek, a rewind)."""
        if offset is None:
            self.expected.pop(tp, None)
        else:
            self.expected[tp] = offset
        self.since.pop(tp, None)

    def forget(self, tp: TopicPartition) -> None:
        self.expected.pop(tp, None)
        self.since.pop(tp, None)

    def admit(self, tp: TopicPartition, records: Sequence[R], now_ms: int) -> tuple[Sequence[R], int | None]:
        """The records safe to process now, and the offset to read ``tp`` again from (None: nothing held).

        In the common case (contiguous offsets) the input sequence itself is returned: no allocation.
        """
        exp = self.expected.get(tp)
        kept: list[R] | None = None  # built only once a record has to be dropped
        for i, rec in enumerate(records):
            off = rec.offset
            if exp is not None and off < exp:  # already seen (a fetch that raced a seek): never twice
                if kept is None:
                    kept = list(records[:i])
                continue
            if exp is not None and off > exp:
                first_seen = self.since.setdefault(tp, now_ms)
                if now_ms - first_seen < self.wait_ms:
                    self.waits += 1
                    self.expected[tp] = exp
                    return (records[:i] if kept is None else kept), exp
                self.accepted += 1
                log.warning("%s[%d]: offsets %d..%d never appeared in %d ms; accepting the gap", tp.topic,
                            tp.partition, exp, off - 1, self.wait_ms)  # fmt: skip
                self.since.pop(tp, None)
            if kept is not None:
                kept.append(rec)
            exp = off + 1
        if exp is not None:
            self.expected[tp] = exp
        self.since.pop(tp, None)
        return (records if kept is None else kept), None
