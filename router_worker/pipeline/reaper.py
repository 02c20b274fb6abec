"""Reaping dead heads: the jobs a head took with it when it died are routed again, none lost.

A head killed with jobs in flight (``kill -9``, a lost machine) never nacks them, and nobody else reads its
partition of the model topic until a new head claims it, which may be never. The router calls
:meth:`Reaper.reap` every few seconds with its head snapshot. A head whose heartbeat deadline
(``expires_at_ms``) passed more than :attr:`Reaper.grace_ms` ago is reaped:

1. **Lock** its partition slot (``Keys.slot(topic, partition)``) with ``SET NX PX`` and the value
   ``reaper:<router_id>``. A slot held by anyone else (a live head that claimed the partition and will serve
   its backlog, or another router reaping it) means: skip. The lock also keeps a paused head from coming back
   to the partition meanwhile (its heartbeat finds the slot taken and it stops).
2. **Check** the head's registration again in Redis: a heartbeat newer than the grace means a stale
   snapshot, and the head is left alone.
3. **Read** the partition as the heads' consumer group (``<group_id>.heads``, manual assignment, no group
   membership) from its committed offset (:func:`~router_worker.pipeline.gaps.start_offset`), gap-guarded,
   until the fetch high watermark is reached and a fetch has returned nothing for :data:`QUIET_MS` (the
   embedded broker's ``end_offsets()`` under-reports and its last records can become visible late).
4. **Republish** every record, original bytes and key, to retry tier 1 with ``retry_headers`` (reason
   ``head_lost: <head_id>``, origin coordinates, the attempt it was routed as, no back-off) through
   :func:`~router_worker.pipeline.publish.publish`. The routers read it as the job's next attempt; their
   per-(job id, attempt) idempotency drops a second copy of the same record (a repeated reap, or the
   head's own shutdown nack when it was merely paused). A record the retry tier refuses for good is
   dead-lettered (``publish_error``).
5. **Commit** the heads group's offset up to the first record not acknowledged (never past one), chunk by
   chunk, renewing the lock before each commit (a lost lock ends the reap without committing).
6. **Remove** the registration (``HeadRegistry.remove(head_id, actor="reaper")``), only when the whole
   backlog was republished; otherwise it stays, and the next call tries again from the committed offset.
7. **Release** the lock: compare-and-delete, only while it still holds this router's value.

Grace: ``GRACE_TTLS × head_ttl_ms`` (2 × 5 s by default) after the deadline, so a head is reaped no sooner
than 3 TTLs after its last heartbeat: a slow or briefly partitioned head is not robbed of its jobs, and the
head's own slot (set with the TTL) has lapsed by then. It is derived from ``head_ttl_ms``, not a setting.

Two routers calling :meth:`Reaper.reap` at once: one takes the lock; the other skips, or, arriving after the
first released it, reads from the offset the first committed and finds nothing. Every job is republished once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from router_worker.clock import now_ms as clock_ms
from router_worker.core.model import Head
from router_worker.pipeline.gaps import RETRY_MS, GapGuard, seek_to_gap, start_offset
from router_worker.pipeline.kafka import make_consumer
from router_worker.pipeline.messages import attempt_of, retry_headers
from router_worker.pipeline.publish import RetryBudget, Send, describe, publish, publish_dead_letter
from router_worker.settings import Settings
from router_worker.state.heads import HeadRegistry
from router_worker.state.keys import Keys
from router_worker.topics import Topics

log = logging.getLogger(__name__)

GRACE_TTLS = 2
"""A head is reaped once its heartbeat deadline is this many head TTLs in the past."""
LOCK_TTL_MIN_MS = 30_000
"""The slot lock's lifetime (at least; 6 head TTLs if longer), renewed while a reap makes progress."""
QUIET_MS = 1_000
"""The end of a partition: the high watermark reached and nothing fetched for this long."""
STALL_S = 10.0
"""A reap that reads nothing new for this long (plus the gap wait) while short of the high watermark stops
(committing what it republished) and is tried again on the next call."""
CHUNK = 500
"""Records republished (and committed) per round."""
PUBLISH_ERROR = "publish_error"

# KEYS[1] the slot; ARGV[1] our lock value. Deletes it only while it is still ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the slot; ARGV[1] our lock value, ARGV[2] ttl ms. Extends it only while it is still ours.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(slots=True)
class ReaperStats:
    heads_reaped: int = 0
    jobs_rerouted: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    """Dead heads whose slot someone else held (a new owner, another router reaping)."""
    incomplete: int = 0
    """Reaps that ended short of the partition's end (kept registered, tried again)."""


@dataclass(slots=True)
class _Drained:
    rerouted: int = 0
    complete: bool = False
    first: int = -1
    end: int = -1


class Reaper:
    """Re-routes the unfinished jobs of dead heads. One per router; give it the router's started producer.

    Use: ``n = await reaper.reap(heads, now_ms())`` every few seconds from a task of its own (a reap takes at
    least :data:`QUIET_MS` per dead head, so not inside the batch loop), with every registered head as
    :meth:`HeadRegistry.snapshot` returns them, lapsed ones included. Heads not yet due cost nothing."""

    def __init__(self, settings: Settings, redis: Redis, registry: HeadRegistry, producer: AIOKafkaProducer,
                 router_id: str) -> None:  # fmt: skip
        self.s = settings
        self.redis = redis
        self.registry = registry
        self.producer = producer
        self.router_id = router_id
        self.keys = Keys(settings.redis_prefix)
        self.topics = Topics.from_settings(settings)
        self.group_id = f"{settings.group_id}.heads"
        self.grace_ms = GRACE_TTLS * settings.head_ttl_ms
        self.lock_ttl_ms = max(LOCK_TTL_MIN_MS, 6 * settings.head_ttl_ms)
        self.lock_value = f"reaper:{router_id}"
        self.budget = RetryBudget()
        self.stats = ReaperStats()
        self._mutex = asyncio.Lock()
        self._release = redis.register_script(_RELEASE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)

    def due(self, head: Head, now_ms: int) -> bool:
        """Whether ``head``'s heartbeat deadline passed more than the grace ago."""
        return head.expires_at_ms > 0 and now_ms - head.expires_at_ms > self.grace_ms

    async def reap(self, heads: Iterable[Head], now_ms: int) -> int:
        """Reap every head of ``heads`` that is due; return how many jobs were re-routed (republished).

        Never raises for one head's failure (it is logged and tried again on the next call). Calls on one
        instance run one at a time; calls from several routers are safe (the slot lock decides)."""
        due = [h for h in heads if self.due(h, now_ms)]
        if not due:
            return 0
        total = 0
        async with self._mutex:
            for head in due:
                try:
                    total += await self._reap_one(head, now_ms)
                except Exception:
                    log.exception("reaper %s: reaping head %s failed; trying again next time", self.router_id,
                                  head.head_id)  # fmt: skip
        return total

    async def _reap_one(self, head: Head, now_ms: int) -> int:
        topic = self.topics.model(head.model_id)
        slot = self.keys.slot(topic, head.partition)
        if not await self.redis.set(slot, self.lock_value, nx=True, px=self.lock_ttl_ms):
            holder = await self.redis.get(slot)
            if holder not in (self.lock_value, self.lock_value.encode()):
                self.stats.skipped += 1
                log.debug("reaper %s: %s[%d] of dead head %s is held by %s; skipping", self.router_id, topic,
                          head.partition, head.head_id, holder)  # fmt: skip
                return 0
            # Our own lock, left by an earlier reap of this router that did not finish: carry on with it.
            await self._renew(keys=[slot], args=[self.lock_value, self.lock_ttl_ms])
        try:
            h: dict[Any, Any] = await self.redis.hgetall(self.keys.head(head.head_id))
            if h and _int(h.get("expires_at", h.get(b"expires_at"))) + self.grace_ms >= now_ms:
                log.info("reaper %s: head %s heartbeats again; not reaped", self.router_id, head.head_id)
                return 0
            out = await self._drain(head, topic, slot)
            self.stats.jobs_rerouted += out.rerouted
            if not out.complete:
                self.stats.incomplete += 1
                log.warning("reaper %s: head %s (%s[%d]): %d jobs re-routed, the rest not yet; kept registered, "
                            "tried again next time", self.router_id, head.head_id, topic, head.partition,
                            out.rerouted)  # fmt: skip
                return out.rerouted
            if not h and not out.rerouted:  # reaped (or removed) already; this snapshot was stale
                log.debug("reaper %s: head %s was already gone", self.router_id, head.head_id)
                return 0
            seen_at = h.get("registered_at", h.get(b"registered_at")) if h else None
            if isinstance(seen_at, bytes):
                seen_at = seen_at.decode()
            if not await self.registry.remove(head.head_id, actor="reaper", if_registered_at=seen_at):
                log.info("reaper %s: head %s registered again while its backlog was re-routed; kept", self.router_id,
                         head.head_id)  # fmt: skip
            self.stats.heads_reaped += 1
            span = f"offsets {out.first}..{out.end - 1}" if out.rerouted else "nothing unfinished"
            log.info("reaper %s: head %s of %s reaped %d ms after its heartbeat lapsed: %d jobs re-routed from "
                     "%s[%d] (%s) to %s", self.router_id, head.head_id, head.model_id, now_ms - head.expires_at_ms,
                     out.rerouted, topic, head.partition, span, self.topics.retry(1))  # fmt: skip
            return out.rerouted
        finally:
            try:
                await self._release(keys=[slot], args=[self.lock_value])
            except Exception as exc:  # it expires on its own
                log.warning("reaper %s: releasing %s failed: %s", self.router_id, slot, exc)

    async def _drain(self, head: Head, topic: str, slot: str) -> _Drained:
        """Republish everything from the committed offset to the end of the head's partition."""
        out = _Drained()
        consumer = make_consumer(self.s, group_id=self.group_id, enable_auto_commit=False)
        await consumer.start()
        try:
            # Metadata without creating the topic (assigning a missing one would, on brokers that auto-create).
            exists = topic in await consumer.topics()
            parts = consumer.partitions_for_topic(topic)
            if exists and parts is None:
                return out  # metadata not known yet: try again next time
            if not exists or head.partition not in (parts or ()):
                log.info("reaper %s: %s has no partition %d; head %s left no jobs", self.router_id, topic,
                         head.partition, head.head_id)  # fmt: skip
                out.complete = True
                return out
            tp = TopicPartition(topic, head.partition)
            consumer.assign([tp])
            start = await start_offset(consumer, tp)
            if start is None:
                return out
            consumer.seek(tp, start)
            guard = GapGuard(self.s.gap_wait_ms)
            guard.expect(tp, start)
            committed = start
            pending: list[Any] = []
            last_data = time.monotonic()
            stall_s = STALL_S + self.s.gap_wait_ms / 1000
            while True:
                batch = await consumer.getmany(tp, timeout_ms=200, max_records=CHUNK)
                records, gap_at = guard.admit(tp, batch.get(tp, ()), clock_ms())
                if records:
                    pending.extend(records)
                    last_data = time.monotonic()
                if gap_at is not None:  # an earlier record is not visible yet: read again from it (gaps.py)
                    seek_to_gap(consumer, guard, tp, gap_at)
                    await asyncio.sleep(RETRY_MS / 1000)
                nxt = guard.expected.get(tp, start)
                hw = consumer.highwater(tp)
                quiet = time.monotonic() - last_data >= QUIET_MS / 1000
                at_end = gap_at is None and hw is not None and nxt >= hw and quiet
                stalled = time.monotonic() - last_data > stall_s
                if pending and (len(pending) >= CHUNK or at_end or stalled):
                    if out.first < 0:
                        out.first = pending[0].offset
                    n, upto = await self._republish(head, pending, nxt)
                    out.rerouted += n
                    out.end = upto
                    pending = []
                    if upto > committed:
                        if not await self._renew(keys=[slot], args=[self.lock_value, self.lock_ttl_ms]):
                            log.warning("reaper %s: lost the lock on %s mid-reap; not committing", self.router_id,
                                        slot)  # fmt: skip
                            return out
                        await consumer.commit({tp: upto})
                        committed = upto
                    if upto < nxt:  # a republish not acknowledged: never commit past it; try again later
                        return out
                if at_end:
                    out.complete = True
                    return out
                if stalled:
                    log.warning("reaper %s: %s[%d] stays short of its high watermark %s at %d", self.router_id,
                                topic, head.partition, hw, nxt)  # fmt: skip
                    return out
        finally:
            await consumer.stop()

    async def _republish(self, head: Head, records: Sequence[Any], nxt: int) -> tuple[int, int]:
        """Republish ``records`` (in offset order) to retry tier 1: (how many were acknowledged there, the
        offset to commit: the first record neither republished nor dead-lettered, else ``nxt``)."""
        now = clock_ms()
        reason = f"head_lost: {head.head_id}"
        tier = self.topics.retry(1)
        sends: list[Send] = []
        for rec in records:
            headers = retry_headers(rec.headers, reason, rec.topic, rec.partition, rec.offset,
                                    attempt_of(rec.headers) or 1, now)  # fmt: skip
            key = rec.key if (rec.key is not None or rec.value is not None) else b""
            sends.append(Send(tier, rec.value, key, None, headers))
        report = await publish(self.producer, sends, self.budget)
        index = {id(x): i for i, x in enumerate(sends)}
        settled = {index[id(x)] for x in report.acked}
        for x in report.fatal:
            i = index[id(x)]
            if await self._dead_letter(records[i], f"re-route refused: {describe(x.error or Exception())}"):
                settled.add(i)
        if report.unsent:
            log.warning("reaper %s: %d of %d republishes of head %s not acknowledged (%s)", self.router_id,
                        len(report.unsent), len(sends), head.head_id,
                        describe(report.unsent[0].error or Exception()))  # fmt: skip
        for i, rec in enumerate(records):
            if i not in settled:
                return len(report.acked), int(rec.offset)
        return len(report.acked), nxt

    async def _dead_letter(self, rec: Any, detail: str) -> bool:
        if await publish_dead_letter(self.producer, self.topics.dlq, rec, PUBLISH_ERROR, detail,
                                     attempt_of(rec.headers) or 1, limit=self.s.kafka_max_message_bytes,
                                     keep=self.s.dlq_keep_bytes, budget=self.budget):  # fmt: skip
            self.stats.dead_lettered += 1
            return True
        log.error("reaper %s: dead letter of %s[%d]@%d not acknowledged", self.router_id, rec.topic,
                  rec.partition, rec.offset)  # fmt: skip
        return False


def _int(raw: Any) -> int:
    try:
        return int(float(raw))
    except (TypeError, ValueError):
        return 0
