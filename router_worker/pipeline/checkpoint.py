"""Commit semantics in one place: which offsets a batch may commit, and when.

A batch records, per partition, the first offset it read and the next offset after the last record it
finished. It commits those next offsets only after every publish it made was acknowledged; if a publish
fails for good, it rewinds each partition to its first offset so the records are read again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata


@dataclass(slots=True)
class Checkpoint:
    first: dict[TopicPartition, int] = field(default_factory=dict)
    next: dict[TopicPartition, int] = field(default_factory=dict)

    def start(self, tp: TopicPartition, offset: int) -> None:
        self.first.setdefault(tp, offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self.next[tp] = offset + 1

    def __bool__(self) -> bool:
        return bool(self.next)

    async def commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the next offset of each finished partition that this member still owns."""
        owned = consumer.assignment()
        offsets = {tp: OffsetAndMetadata(off, "") for tp, off in self.next.items() if tp in owned}
        if offsets:
            await consumer.commit(offsets)

    def rewind(self, consumer: AIOKafkaConsumer) -> None:
        """Read the batch again from its first record (publishes failed; nothing was committed)."""
        owned = consumer.assignment()
        for tp, off in self.first.items():
            if tp in owned:
                consumer.seek(tp, off)
