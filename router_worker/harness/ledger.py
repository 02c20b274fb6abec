"""What came out of a deployment: every completion record of the results topic and every dead letter, read
from the beginning without a consumer group, so a run can check each job id it produced against where it
ended up (served, dead-lettered, nowhere) and how often."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition

from router_worker.harness.procs import HarnessError, poll
from router_worker.pipeline.kafka import make_consumer
from router_worker.settings import Settings
from router_worker.topics import Topics


@dataclass(frozen=True)
class DeadLetter:
    value: bytes | None
    key: bytes | None
    headers: dict[str, bytes | None]
    partition: int
    offset: int

    def h(self, name: str) -> str | None:
        raw = self.headers.get(name)
        return None if raw is None else raw.decode(errors="replace")

    @property
    def reason(self) -> str:
        return self.h("x-dlq-reason") or "<none>"

    @property
    def original(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) the dead letter came from, from its headers."""
        topic, part, off = (
            self.h("x-original-topic"),
            self.h("x-original-partition"),
            self.h("x-original-offset"),
        )
        if topic is None or part is None or off is None:
            return None
        try:
            return topic, int(part), int(off)
        except ValueError:
            return None

    def job_id(self) -> str | None:
        """The job id in the dead letter's value, when it decodes (msgpack or JSON) to a map with one."""
        if self.value is None:
            return None
        for decode in (lambda v: msgpack.unpackb(v, raw=False), json.loads):
            with contextlib.suppress(Exception):
                doc = decode(self.value)
                if isinstance(doc, dict) and isinstance(doc.get("job_id"), str):
                    return str(doc["job_id"])
        return None


@dataclass
class Report:
    """Deliveries of the expected jobs, and everything in the DLQ."""

    expected: int
    once: int
    more: dict[str, int]
    """job id -> deliveries, for jobs delivered more than once."""
    missing: list[str]
    unexpected: dict[str, int]
    """Delivered job ids that were not expected (another run's? a corrupted id?)."""
    dead_by_reason: Counter[str]
    dead_expected: int
    """Dead letters whose value carries an expected job id."""

    @property
    def lost(self) -> int:
        return len(self.missing)

    @property
    def duplicates(self) -> int:
        """Extra deliveries: a job delivered 3 times counts 2."""
        return sum(n - 1 for n in self.more.values())

    def summary(self) -> str:
        return (f"expected {self.expected}: delivered once {self.once}, more than once {len(self.more)} "
                f"({self.duplicates} extra deliveries), missing {len(self.missing)}"
                f"{' e.g. ' + ', '.join(self.missing[:5]) if self.missing else ''}; "
                f"unexpected ids delivered {len(self.unexpected)}; "
                f"dead letters {dict(self.dead_by_reason)} ({self.dead_expected} of expected jobs)")  # fmt: skip


Keep = Callable[[dict[str, Any]], dict[str, Any]]
"""What the ledger keeps of a completion record (a long run keeps a few fields, not whole records)."""


class Ledger:
    """Reads the results topic and the DLQ from the beginning, in the background, without a consumer group.

    Never steps past an offset that is not visible yet (the embedded broker can show N+1 before N): it reads a
    partition again from the missing offset, and accepts a gap only after ``gap_accept_s`` (counted).
    """

    def __init__(self, settings: Settings, gap_accept_s: float = 10.0, keep: Keep | None = None) -> None:
        self.s = settings
        self.topics = Topics.from_settings(settings)
        self.gap_accept_s = gap_accept_s
        self.keep = keep
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.dead: list[DeadLetter] = []
        self.dead_ids: set[str] = set()
        """Job ids found in dead letters' values."""
        self.undecodable_results = 0
        self.gaps_accepted = 0
        self.records = 0
        self.last_record_at = time.monotonic()
        self._next: dict[TopicPartition, int] = {}
        self._gap_since: dict[TopicPartition, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, within_s: float = 30.0) -> None:
        """Start reading; waits until both topics exist (the routers create the DLQ, heads the results)."""
        consumer = make_consumer(  # the deployment's SASL and TLS, as every client of it
            self.s, group_id=None, fetch_max_wait_ms=100, fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=max(8 << 20, self.s.kafka_max_message_bytes + 64 * 1024),
        )  # fmt: skip
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._consumer = consumer
        wanted = (self.topics.results, self.topics.dlq)
        tps: list[TopicPartition] = []

        async def exist() -> bool:
            nonlocal tps
            await consumer._client.force_metadata_update()
            parts = {t: consumer.partitions_for_topic(t) for t in wanted}
            if any(not p for p in parts.values()):
                return False
            tps = [TopicPartition(t, p) for t, ps in parts.items() for p in sorted(ps or ())]
            return True

        if not await poll(exist, within_s, 0.2):
            await consumer.stop()
            raise HarnessError(f"topics {wanted} do not exist after {within_s:.0f} s")
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begin[tp])
            self._next[tp] = begin[tp]
        self._task = asyncio.create_task(self._read(consumer), name="ledger")

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.monotonic()
            for tp, recs in batch.items():
                exp = self._next[tp]
                for rec in recs:
                    if rec.offset < exp:  # a fetch that raced our seek: never count twice
                        continue
                    if rec.offset > exp:
                        since = self._gap_since.setdefault(tp, now)
                        if now - since < self.gap_accept_s:
                            consumer.seek(tp, exp)  # read again from the missing offset shortly
                            break
                        self.gaps_accepted += 1
                    self._gap_since.pop(tp, None)
                    self._take(tp, rec)
                    exp = rec.offset + 1
                self._next[tp] = exp

    def _take(self, tp: TopicPartition, rec: Any) -> None:
        self.records += 1
        self.last_record_at = time.monotonic()
        if tp.topic == self.topics.dlq:
            dead = DeadLetter(rec.value, rec.key, dict(rec.headers or ()), tp.partition, rec.offset)
            self.dead.append(dead)
            job_id = dead.job_id()
            if job_id is not None:
                self.dead_ids.add(job_id)
            return
        try:
            doc = msgpack.unpackb(rec.value, raw=False)
            job_id = doc["job_id"]
        except Exception:
            self.undecodable_results += 1
            return
        self.deliveries.setdefault(str(job_id), []).append(doc if self.keep is None else self.keep(doc))

    def _check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # the reader died: surface why
            raise HarnessError("ledger reader ended")

    def delivered(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` were delivered at least once."""
        d = self.deliveries
        return sum(1 for i in ids if i in d)

    def accounted(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` were delivered or dead-lettered: nothing more is coming for them."""
        d, dead = self.deliveries, self.dead_ids
        return sum(1 for i in ids if i in d or i in dead)

    async def wait_for(self, pred: Callable[[], bool], within_s: float) -> bool:
        def check() -> bool:
            self._check()
            return pred()

        return await poll(check, within_s, 0.1)

    async def wait_delivered(self, ids: list[str], within_s: float) -> bool:
        """Wait until every one of ``ids`` was delivered at least once; False when the time ran out."""
        todo = set(ids)

        def done() -> bool:
            todo.difference_update([i for i in todo if i in self.deliveries] if len(todo) < 5000 else
                                   self.deliveries.keys() & todo)  # fmt: skip
            return not todo

        return await self.wait_for(done, within_s)

    async def wait_accounted(self, ids: Iterable[str], within_s: float) -> bool:
        """Wait until every one of ``ids`` was delivered or dead-lettered; False when the time ran out."""
        todo = set(ids)

        def done() -> bool:
            todo.difference_update(self.deliveries.keys() & todo)
            todo.difference_update(self.dead_ids & todo)
            return not todo

        return await self.wait_for(done, within_s)

    async def settle(self, quiet_s: float = 2.0, within_s: float = 20.0) -> None:
        """Read until nothing new arrived for ``quiet_s`` (late duplicates, dead letters), at most ``within_s``."""
        await self.wait_for(lambda: time.monotonic() - self.last_record_at >= quiet_s, within_s)

    def report(self, ids: Iterable[str]) -> Report:
        expected = list(ids)
        exp_set = set(expected)
        once = 0
        more: dict[str, int] = {}
        missing = []
        for i in expected:
            n = len(self.deliveries.get(i, ()))
            if n == 0:
                missing.append(i)
            elif n == 1:
                once += 1
            else:
                more[i] = n
        unexpected = {i: len(v) for i, v in self.deliveries.items() if i not in exp_set}
        dead_expected = sum(1 for d in self.dead if d.job_id() in exp_set)  # counts every dead letter of one
        return Report(len(expected), once, more, missing, unexpected, Counter(d.reason for d in self.dead),
                      dead_expected)  # fmt: skip

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 10)
