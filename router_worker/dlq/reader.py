"""Reading the dead-letter topic to its end, and originals back from their coordinates (Kafka adapters).

The end of a partition is the high watermark of the fetch responses (``consumer.highwater``), never
``end_offsets()``: the embedded broker's ListOffsets under-reports batched partitions (BROKER-NOTES). Offsets
are admitted through the gap guard, as every consumer here does, so a dead letter made visible late is not
stepped past.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from router_worker.clock import now_ms
from router_worker.dlq.model import DeadLetter, Original, parse_dead_letter
from router_worker.pipeline.gaps import GapGuard, seek_to_gap
from router_worker.pipeline.kafka import make_consumer
from router_worker.pipeline.topology import topics_partitions
from router_worker.settings import Settings


class DlqReadError(RuntimeError):
    """The topic could not be read to its end (the broker did not answer in time)."""


async def read_dead_letters(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[DeadLetter]:
    """Every dead letter of ``topic``, in partition and offset order (none when the topic does not exist)."""
    n = (await topics_partitions(settings, [topic]))[topic]
    if not n:
        return []
    tps = [TopicPartition(topic, p) for p in range(n)]
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    out: dict[TopicPartition, list[DeadLetter]] = {tp: [] for tp in tps}
    try:
        consumer.assign(tps)
        first = await consumer.beginning_offsets(tps)
        guard = GapGuard(settings.gap_wait_ms)
        for tp in tps:
            consumer.seek(tp, first[tp])
            guard.expect(tp, first[tp])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not _at_end(consumer, guard, tps):
            if loop.time() > deadline:
                behind = {f"{tp.topic}[{tp.partition}]": (guard.expected.get(tp), consumer.highwater(tp))
                          for tp in tps if not _tp_at_end(consumer, guard, tp)}  # fmt: skip
                raise DlqReadError(
                    f"could not read {topic} to its end in {timeout_s:g} s (at, end): {behind}"
                )
            batch = await consumer.getmany(*tps, timeout_ms=200)
            now = now_ms()
            for tp, recs in batch.items():
                admitted, gap_at = guard.admit(tp, recs, now)
                out[tp].extend(
                    parse_dead_letter(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers)
                    for r in admitted
                )
                if gap_at is not None:
                    seek_to_gap(consumer, guard, tp, gap_at)
    finally:
        await consumer.stop()
    return [dl for tp in tps for dl in out[tp]]


def _tp_at_end(consumer: AIOKafkaConsumer, guard: GapGuard, tp: TopicPartition) -> bool:
    hw = consumer.highwater(tp)
    nxt = guard.expected.get(tp)
    return hw is not None and nxt is not None and nxt >= hw and tp not in guard.since


def _at_end(consumer: AIOKafkaConsumer, guard: GapGuard, tps: Sequence[TopicPartition]) -> bool:
    return all(_tp_at_end(consumer, guard, tp) for tp in tps)


class OriginalGone(LookupError):
    """The original of a squeezed dead letter can not be read back (no longer retained, or never there)."""


class Originals:
    """Reads records back by their coordinates, one consumer for all (use with ``async with``)."""

    def __init__(self, settings: Settings, timeout_s: float = 15.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[str, int | None] = {}

    async def __aenter__(self) -> Originals:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def fetch(self, topic: str, partition: int, offset: int) -> Original:
        """The record at ``topic[partition]@offset``; :class:`OriginalGone` saying why when there is none."""
        consumer = self._consumer
        if consumer is None:  # started on first use: aiokafka's stop right after start raises CancelledError
            consumer = self._consumer = make_consumer(self.settings, group_id=None, enable_auto_commit=False)
            await consumer.start()
        where = f"{topic}[{partition}]@{offset}"
        if topic not in self._partitions:
            self._partitions.update(await topics_partitions(self.settings, [topic]))
        n = self._partitions[topic]
        if n is None:
            raise OriginalGone(f"the original {where} is gone: topic {topic} does not exist")
        if partition >= n:
            raise OriginalGone(f"the original {where} is gone: {topic} has {n} partitions")
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        first = (await consumer.beginning_offsets([tp]))[tp]
        if offset < first:
            raise OriginalGone(
                f"the original {where} is no longer retained (the partition now starts at {first})"
            )
        consumer.seek(tp, offset)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while loop.time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            for rec in batch.get(tp, ()):
                if rec.offset == offset:
                    return Original(rec.key, rec.value, list(rec.headers or ()))
                if rec.offset > offset:  # compacted away, or an aborted transaction's
                    raise OriginalGone(f"the original {where} is gone (the partition skips to {rec.offset})")
            hw = consumer.highwater(tp)
            if hw is not None and hw <= offset:
                raise OriginalGone(f"the original {where} does not exist (the partition ends at {hw})")
        raise OriginalGone(f"the original {where} could not be read in {self.timeout_s:g} s")
