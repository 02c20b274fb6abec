"""Offset-gap guard: never step past a record that is not visible yet.

Within a partition Kafka offsets are contiguous, unless compaction or transaction markers remove some. A
broker that makes concurrently produced batches visible out of order can show offset N+1 before N (the
embedded Tansu broker does: a small batch from one producer commits ahead of a larger one from another).
A consumer that takes N+1 moves its position past N and never sees it: a lost job. So each consumer of
ours admits records only up to the first gap, seeks back to the missing offset and reads again a moment
later; a gap still there after ``wait_ms`` is taken to be a real one (compaction, an aborted transaction,
retention) and accepted once, with a warning and a count. On Apache Kafka without compaction or transactions
the guard never fires.

One behaviour for every consumer (router, worker SDK, demo): start the guard at the committed offset, or
at the partition's first offset when nothing was committed (:func:`start_offset`), so the first fetch is
guarded too; :meth:`GapGuard.admit` each fetch; on a gap, :func:`seek_to_gap` and read again after
:data:`RETRY_MS`. A gap's wait timer survives those re-reads (and any seek back to the same offset): it
is reset only when the gap closes or the consumer moves elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

RETRY_MS = 5
"""How soon a consumer reads a partition again from a missing offset."""
DEFAULT_WAIT_MS = 3_000
"""Above the embedded broker's known visibility delay (over a second for a partition's last record)."""


class _Record(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Record)


@dataclass(slots=True)
class GapGuard:
    wait_ms: int = DEFAULT_WAIT_MS
    expected: dict[TopicPartition, int] = field(default_factory=dict)
    """Next offset this consumer should see per partition (absent: unknown, anything goes)."""
    since: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)
    """The gap open on a partition: (missing offset, when it was first seen in ms)."""
    waits: int = 0
    accepted: int = 0

    def expect(self, tp: TopicPartition, offset: int | None) -> None:
        """The consumer will read ``tp`` from ``offset`` next (after an assignment, a seek, a rewind).

        A gap open at that same offset keeps its timer: re-reading from a gap is not a fresh start."""
        if offset is None:
            self.expected.pop(tp, None)
        else:
            self.expected[tp] = offset
        gap = self.since.get(tp)
        if gap is not None and gap[0] != offset:
            del self.since[tp]

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
                gap = self.since.get(tp)
                if gap is None or gap[0] != exp:
                    gap = self.since[tp] = (exp, now_ms)
                first_seen = gap[1]
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
        gap = self.since.get(tp)
        if gap is not None and (exp is None or exp > gap[0]):  # the missing offset came: the gap closed
            del self.since[tp]
        return (records if kept is None else kept), None


START_WITHIN_S = 10.0
"""How long reading a partition's start offset may take before its first fetch goes unguarded: the reads run
inside the consumer's assignment callback, and nothing is fetched until it returns."""


async def start_offset(
    consumer: AIOKafkaConsumer, tp: TopicPartition, within_s: float = START_WITHIN_S
) -> int | None:
    """Where reading ``tp`` resumes: the committed offset, else the partition's first offset (so the
    first fetch is guarded as well). None when neither can be read within ``within_s`` (the guard then
    trusts the fetch)."""
    try:
        return await asyncio.wait_for(_start_offset(consumer, tp), within_s)
    except (TimeoutError, KafkaError) as exc:
        log.warning("%s[%d]: start offset unknown (%s); the first fetch is not gap-guarded", tp.topic,
                    tp.partition, describe_error(exc))  # fmt: skip
        return None


async def start_offsets(consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition],
                        within_s: float = START_WITHIN_S) -> dict[TopicPartition, int | None]:  # fmt: skip
    """:func:`start_offset` of every partition at once (concurrent requests, not one round trip after
    another: a router is assigned dozens, and fetches nothing until they are read)."""
    wanted = list(tps)
    found = await asyncio.gather(*(start_offset(consumer, tp, within_s) for tp in wanted))
    return dict(zip(wanted, found, strict=True))


async def _start_offset(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    committed = await consumer.committed(tp)
    if committed is not None:
        return int(committed)
    first = await consumer.beginning_offsets([tp])
    return int(first[tp]) if tp in first else None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def seek_to_gap(consumer: AIOKafkaConsumer, guard: GapGuard, tp: TopicPartition, offset: int) -> None:
    """Read ``tp`` again from the missing ``offset`` (the gap's timer keeps running)."""
    consumer.seek(tp, offset)
    guard.expect(tp, offset)
