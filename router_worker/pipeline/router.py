"""The router process: the loop that reads jobs, routes them and commits, as a list of small steps.

fetch → admit and decode (:mod:`intake`) → claim (:mod:`marks`, one Redis round trip) → plan (:mod:`plan`,
pure) → publish (:mod:`publish`, every result classified) → mark (:mod:`marks`, one Redis round trip) →
commit (each partition up to its first unsettled record).

Guarantees (README "Delivery"): every record read ends in exactly one place (a model topic, a retry tier,
the DLQ) or is read again; an offset is committed only after everything before it was acknowledged; a
publish error that sending again can not cure dead-letters that record (``publish_error``) and never stalls
its partition; a retriable one is retried, then the record is read again. While Redis is unreachable the
router routes from its last snapshot for ``redis_staleness_ms``, buffering its writes, then pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.core.model import Head, RouterMemory
from router_worker.core.validity import split_valid
from router_worker.metrics import Metrics, observe_many
from router_worker.pipeline.faults import FaultGate
from router_worker.pipeline.gaps import GapGuard, start_offsets
from router_worker.pipeline.holds import HoldTimes
from router_worker.pipeline.intake import Parts, intake
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.pipeline.marks import Marks
from router_worker.pipeline.outcomes import DeadLettered, Hold, Outcome, Plan, Retried, Routed, commit_offsets
from router_worker.pipeline.plan import Claim, PlanConfig, Stats, dead_letter, plan
from router_worker.pipeline.publish import RetryBudget, Send, describe, publish
from router_worker.pipeline.reaper import Reaper
from router_worker.pipeline.topology import ModelTopology
from router_worker.settings import Settings
from router_worker.state.cache import StateCache
from router_worker.state.heads import HeadRegistry
from router_worker.state.health import RedisHealth
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from router_worker.state.scripts import preload
from router_worker.tasks import cancel_and_wait
from router_worker.topics import Topics
from schemas.envelope import DeadLetterReason

log = logging.getLogger(__name__)

_UNSENT_BACKOFF_MS = (200, 5_000)
_PIN_WRITE_GRACE_MS = 5_000
"""A pin this router made this recently is kept though Redis does not have it yet (its marks are on the way)."""
_OUTAGE_PROBE_S = 0.5
_LOG_BAD_PER_BATCH = 10
_WARM_CONNECTIONS = 3
"""Connections opened before the first batch: a claim, the previous batch's marks, and a resync or reaper call."""


@dataclass(slots=True)
class RouterStats:
    batches: int = 0
    routed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    deferred: int = 0
    saturated: int = 0
    waited_aside: int = 0
    """Jobs with no head free that waited in a retry tier instead of holding their partition (see plan.Stats)."""
    claimed_elsewhere: int = 0
    unsent: int = 0
    publish_errors: int = 0
    gap_waits: int = 0
    commit_failures: int = 0
    batch_errors: int = 0
    outage_pauses: int = 0
    by_head: Tally[str] = field(default_factory=Tally)
    dead_by_reason: Tally[str] = field(default_factory=Tally)


_SETTLED_MAX = 200_000
"""The most claim keys :attr:`Router._settled` and :attr:`Router._unmarked` hold each (about 20 MiB at most; in
practice a few batches' worth)."""


@dataclass(slots=True)
class _Prepared:
    """A batch decoded, claimed and planned, not yet published."""

    fetched: dict[TopicPartition, list[Any]]
    parts: Parts
    plan: Plan
    t_batch: float
    now: int
    seq: int = 0
    """The batch's place in this router's order (what :attr:`Router._settled` remembers keys by)."""

    def drop(self, tps: set[TopicPartition]) -> list[Outcome]:
        """Forget these partitions' records: an earlier batch rewound them, so they are read again (their
        claims are this router's, the same on the second read). Returns the outcomes dropped."""
        p = self.plan
        dropped = [o for o in p.outcomes if o.src.tp in tps]
        p.outcomes = [o for o in p.outcomes if o.src.tp not in tps]
        p.holds = [h for h in p.holds if h.tp not in tps]
        for tp in tps:
            p.next_offset.pop(tp, None)
        self.parts = [(tp, items) for tp, items in self.parts if tp not in tps]
        return dropped


def _settled_keys(b: _Prepared, settled: list[Outcome]) -> list[str]:
    """Claim keys of the settled outcomes that no other record of the batch shares unsettled (a copy of the job
    behind a hold, or whose publish stayed unsent, is read again with that key)."""
    done = {id(o.src) for o in settled}
    still = {inc.claim_key for _, items in b.parts for inc in items if id(inc) not in done}
    return [k for o in settled if (k := o.src.claim_key) not in still]


def _acknowledged_keys(b: _Prepared, tps: Container[TopicPartition],
                       from_offset: Mapping[TopicPartition, int] | None = None) -> list[str]:  # fmt: skip
    """Claim keys of the batch's records on ``tps`` that were published and acknowledged (with ``from_offset``:
    only those at or past their partition's offset in it). Not a duplicate within the batch: it is "final" with
    nothing sent, and its key is its first copy's, maybe the very record unsent."""
    return [o.src.claim_key for o in b.plan.outcomes if o.final and o.send is not None and o.src.tp in tps
            and (from_offset is None or o.src.offset >= from_offset[o.src.tp])]  # fmt: skip


@dataclass(slots=True)
class _InFlight:
    """A batch whose publishes are in flight."""

    batch: _Prepared
    publishing: asyncio.Task[None]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Let the batch in hand finish (publish + commit) before partitions move to another router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.router.batch_lock:
            consumer = self.router._consumer
            if consumer is not None:
                try:
                    await self.router.settle(
                        consumer
                    )  # its acks, marks and commit, while the partitions are ours
                except Exception as exc:  # acknowledged records are marked: the next owner dedupes them
                    log.warning("settling the batch in flight before a rebalance failed: %s", exc)
            self.router.hold_times.forget(revoked)
            for tp in revoked:
                self.router.paused_until.pop(tp, None)
                self.router.gaps.forget(tp)
                self.router._uncommitted.pop(tp, None)  # its next owner commits it (or reads it again)
            self.router.metrics.partitions_revoked(self.router.s.group_id, revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("router %s assigned %d partitions", self.router.router_id, len(assigned))
        consumer = self.router._consumer
        if consumer is None:
            return
        t0 = time.monotonic()
        # Reading resumes at the committed offset: the first record must be that one.
        starts = await start_offsets(consumer, assigned)
        for tp, offset in starts.items():
            self.router.gaps.expect(tp, offset)
        self.router.metrics.partitions_assigned(consumer, starts)
        if self.router._outage_paused:  # a fresh assignment starts unpaused: it waits for Redis too
            consumer.pause(*assigned)
        log.info("router %s reads %d partitions from their committed offsets (found in %.0f ms)",
                 self.router.router_id, len(starts), (time.monotonic() - t0) * 1000)  # fmt: skip


class Router:
    def __init__(self, settings: Settings, redis: Redis, metrics: Metrics, audit: AuditSink,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        s = settings
        self.s = s
        self.redis = redis
        self.metrics = metrics
        self.audit = audit
        self.rng = rng or random.Random()
        self.topics = Topics.from_settings(s)
        self.keys = Keys(s.redis_prefix)
        self.health = RedisHealth(last_ok_ms=now_ms())
        self.registry = HeadRegistry(redis, self.keys, s.head_ttl_ms)
        self.policies = PolicyStore.for_settings(redis, s)
        self.state = StateCache(redis, self.registry, self.policies, s.head_refresh_ms, self._on_refresh,
                                self._on_event, health=self.health, vet=self._vet)  # fmt: skip
        self.topology: ModelTopology | None = None
        self.reaper: Reaper | None = None
        self.invalid_heads: dict[str, str] = {}
        """Heads left out of routing: head id -> why (a partition their model topic lacks)."""
        self.marks = Marks(redis, self.keys, audit, claim_ttl_ms=s.claim_ttl_ms, dedupe_ttl_ms=s.dedupe_ttl_s * 1000,
                           buffer_max=s.outage_buffer_max,
                           writer=f"router:{s.effective_router_id}@{uuid.uuid4().hex[:12]}",
                           on_drop=lambda kind, n: metrics.outage_dropped.labels(kind).inc(n))  # fmt: skip
        self.memory = RouterMemory()
        self.router_id = s.effective_router_id
        self.stats = RouterStats()
        self.batch_lock = asyncio.Lock()
        self._inflight: _InFlight | None = None
        """The batch whose publishes are in flight while the next one is planned (see :meth:`step`)."""
        self._closing: asyncio.Task[None] | None = None
        """The acknowledged batch whose marks and commit are being written while the next ones go on."""
        self._mark_lock = asyncio.Lock()
        self._uncommitted: dict[TopicPartition, int] = {}
        """Offsets settled but not committed (their commit failed), for the next commit of partitions still owned."""
        self.paused_until: dict[TopicPartition, int] = {}
        self.gaps = GapGuard(s.gap_wait_ms)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._retry_topics = [self.topics.retry(i + 1) for i in range(len(s.retry_backoff_ms))]
        self._retry_set = frozenset(self._retry_topics)
        self.hold_times = HoldTimes(s.backpressure_ms, s.backpressure_max_ms,
                                    dict(zip(self._retry_topics, s.retry_backoff_ms, strict=True)))  # fmt: skip
        self._cfg = PlanConfig(
            router_id=self.router_id, topics=self.topics, max_attempts=s.max_attempts,
            retry_backoff_ms=tuple(s.retry_backoff_ms), max_message_bytes=s.kafka_max_message_bytes,
            dlq_keep_bytes=s.dlq_keep_bytes, audit_decisions=s.audit_decisions, backpressure_ms=s.backpressure_ms,
            claim_wait_ms=s.claim_wait_ms, max_refusals=s.max_refusals,
        )  # fmt: skip
        self._budget = RetryBudget(attempts=s.publish_retry_attempts, max_s=s.publish_retry_max_s)
        self.faults = FaultGate(s, redis, self.keys, audit, metrics.registry, self.router_id, self.state, self.memory,
                                self._retry_set, self._cfg, self.rng)  # breakers, admission, fallback  # fmt: skip
        self._unsent_streak = 0
        self._seq = 0
        self._marked_seq = 0
        self._settled: dict[str, int] = {}
        """Claim keys of records settled (acknowledged) in a batch whose partitions were rewound (claim key ->
        the batch's seq), until their done marks are in Redis: read again meanwhile, they are duplicates, though
        Redis (slow, or away) would still call them this router's to handle."""
        self._unmarked: OrderedDict[str, None] = OrderedDict()
        """Claim keys of records settled in a batch whose publishing raised (a bug): that batch is never closed,
        so their done marks are never written; remembered until the size bound pushes them out."""
        self._last_inflight: dict[str, int] = {}
        self._outage_paused = False
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def is_ready(self) -> bool:
        """Consuming, and not paused for a Redis outage (``/readyz``)."""
        return self.ready.is_set() and not self._outage_paused

    async def run(self) -> None:
        s = self.s
        await ensure_topics(
            s,
            [(self.topics.requests, s.requests_partitions), (self.topics.dlq, 1)]
            + [(t, s.requests_partitions) for t in self._retry_topics],
        )
        producer = make_producer(s)
        consumer = make_consumer(s, group_id=s.group_id)
        self._producer, self._consumer = producer, consumer
        self.topology = ModelTopology(s, producer)
        self.reaper = Reaper(s, self.redis, self.registry, producer, self.router_id)
        reaping: asyncio.Task[None] | None = None
        try:
            await producer.start()
            await self.state.start()
            await self._warm_redis()
            if self._stop.is_set():  # stopped while starting: leave before joining the group
                return
            reaping = asyncio.create_task(self._reap_loop(), name="reaper")
            consumer.subscribe([self.topics.requests, *self._retry_topics], listener=_Rebalance(self))
            await consumer.start()
            await self.audit.emit("router_started", self.router_id, group_id=s.group_id)
            self.ready.set()
            await self._loop(consumer, producer)
        finally:
            # Each batch committed at its end; leave the group at once so partitions move without waiting.
            self.ready.clear()
            if reaping is not None:
                await cancel_and_wait([reaping])
            if self._closing is not None:  # the loop was cancelled: the batch being closed finishes first
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self._closed(), s.shutdown_timeout_s)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), s.shutdown_timeout_s)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), s.shutdown_timeout_s)
            with contextlib.suppress(Exception):  # what Redis did not take during an outage, if it is back
                async with self._mark_lock:
                    await asyncio.wait_for(self.marks.mark([], self._pin_ms()), 2.0)
            if self.marks.buffered:  # the audit file has the records; Redis never will
                log.error("stopping with %d writes Redis never took (audit records, marks, pins): dropped",
                          self.marks.buffered)  # fmt: skip
            await self.state.stop()
            with contextlib.suppress(Exception):
                await self.audit.emit("router_stopped", self.router_id, routed=self.stats.routed)

    async def _reap_loop(self) -> None:
        """Re-route the jobs of heads that died with work in hand (see :mod:`reaper`)."""
        interval = max(0.5, self.s.head_ttl_ms / 1000)
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            if self.reaper is None or not self.health.up:  # judged on a stale snapshot: never reap
                continue
            if now_ms() - self.health.recovered_ms < 3 * self.s.head_ttl_ms:
                continue  # heads have not had time to heartbeat since Redis came back
            try:
                await self.reaper.reap(list(self.state.index.heads.values()), now_ms())
            except Exception:
                log.exception("reaping dead heads failed; trying again")

    async def _loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        s = self.s
        while not self._stop.is_set():
            try:
                if await self._outage_hold(consumer):
                    continue
                # Holds whose time came are lifted every time round, batch in flight or not (a steady stream keeps
                # one in flight). While its publishes are in flight, take only what is fetched already.
                timeout_ms = self._resume_due(consumer, s.batch_timeout_ms)
                if self._inflight is not None:
                    timeout_ms = 0
                batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=s.batch_max_records)
                if not batch and self._inflight is None:
                    if self.marks.buffered and self.health.up:
                        await self._mark([])
                    continue
                async with self.batch_lock:
                    await self.step(batch, consumer, producer)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us: what was acknowledged is marked done, so the partition's
                # next owner skips it as a duplicate; what was not is read again by it. Nothing is lost.
                self.stats.commit_failures += 1
                log.warning("commit refused after a rebalance (the next owner dedupes): %s", exc)
            except KafkaError as exc:
                self.stats.batch_errors += 1
                log.warning("Kafka error in the router loop, continuing: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:  # a bug: the batch was rewound (nothing committed), so it is read again
                self.stats.batch_errors += 1
                log.exception("batch failed unexpectedly; it will be read again")
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(self.stats.batch_errors, 6)))
        async with self.batch_lock:  # stopping: the batch in flight is settled before the consumer leaves
            try:
                await self.settle(consumer)
            except Exception as exc:  # what was acknowledged is marked: whoever reads it next dedupes it
                log.warning("settling the last batch failed: %s", exc)

    async def _warm_redis(self) -> None:
        """Before the first batch: load the batch's scripts and open the connections batches use at once (a
        claim overlaps the previous batch's marks), so no batch pays a script load or a connection's set-up.
        Best effort: what fails here is done by the first batch that needs it."""
        try:
            await preload(self.redis, (*self.marks.scripts(), *self.faults.scripts()))
            await asyncio.gather(*(self.redis.ping() for _ in range(_WARM_CONNECTIONS)))
        except (RedisError, OSError) as exc:
            log.warning("could not warm the Redis connections at start-up (the first batch will): %s", exc)

    async def _outage_hold(self, consumer: AIOKafkaConsumer) -> bool:
        """Past the staleness window of a Redis outage: pause every partition until Redis answers."""
        now = now_ms()
        self.metrics.redis_up.set(1 if self.health.up else 0)
        if self.health.up or self.health.down_for_ms(now) <= self.s.redis_staleness_ms:
            if self._outage_paused:
                self._outage_paused = False
                consumer.resume(*(tp for tp in consumer.assignment() if tp not in self.paused_until))
                log.warning("Redis answers again: routing resumed")
            return False
        if not self._outage_paused:
            async with self.batch_lock:  # the batch in flight first: its acks came, its marks are buffered
                await self.settle(consumer)
            self._outage_paused = True
            self.stats.outage_pauses += 1
            log.error("Redis unreachable for %d ms (window %d ms): consumption paused until it answers",
                      self.health.down_for_ms(now), self.s.redis_staleness_ms)  # fmt: skip
        assigned = consumer.assignment()
        if assigned:
            consumer.pause(*assigned)
        fetched = await consumer.getmany(timeout_ms=int(_OUTAGE_PROBE_S * 1000))  # keeps the poll alive
        if fetched:
            self._unread(consumer, fetched)
        try:
            await self.redis.ping()
        except (RedisError, OSError):
            return True
        self.health.ok(now_ms())
        await self._mark([])
        with contextlib.suppress(RedisError, OSError):
            await self.state.refresh()
        return True

    def _resume_due(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> int:
        """Resume partitions whose hold elapsed; return how long the next fetch may wait."""
        if not self.paused_until:
            return timeout_ms
        now = now_ms()
        due = [tp for tp, t in self.paused_until.items() if t <= now]
        if due:
            owned = consumer.assignment()
            consumer.resume(*(tp for tp in due if tp in owned))
            for tp in due:
                del self.paused_until[tp]
        if self.paused_until:
            timeout_ms = max(0, min(timeout_ms, min(self.paused_until.values()) - now))
        return timeout_ms

    def _on_event(self, event: str) -> None:
        if event == "head_registered":
            self.metrics.head_registrations.inc()
        elif event in ("head_status", "head_removed"):
            self.metrics.head_status_updates.inc()

    def _on_refresh(self, state: StateCache) -> None:
        self._last_inflight = state.inflight
        self.memory.reset_pending(dict(state.inflight))
        now = now_ms()
        pins = self.memory.affinity
        if len(pins) > 1000:  # sessions that went quiet: their pins expired (Redis has its own TTL)
            for sid in [sid for sid, (_, until) in pins.items() if until < now]:
                del pins[sid]
        self.metrics.active_heads.set(
            sum(1 for h in state.index.heads.values() if h.status == "healthy" and h.expires_at_ms >= now)
        )
        self.metrics.policy_version.set(state.policy.version)

    async def _vet(self, heads: list[Head]) -> list[Head]:
        """Only heads whose partition exists in their model topic can be picked (never a blind send)."""
        topology = self.topology
        if topology is None:
            return []
        await topology.ensure({self.topics.model(h.model_id) for h in heads})
        valid, invalid = split_valid(heads, topology.partitions, self.topics.model)
        now_invalid = {h.head_id: why for h, why in invalid}
        for head_id, why in now_invalid.items():
            if self.invalid_heads.get(head_id) != why:  # logged once per head and reason
                log.warning("head %s is not routable: %s", head_id, why)
        self.invalid_heads = now_invalid
        self.metrics.invalid_heads.set(len(invalid))
        return valid

    def _pin_ms(self) -> int:
        return int(self.state.policy.affinity_timeout_s * 1000)

    # --- one batch -------------------------------------------------------------------------------------------

    async def step(self, batch: dict[TopicPartition, list[Any]], consumer: AIOKafkaConsumer,
                   producer: AIOKafkaProducer) -> None:  # fmt: skip
        """Batches overlap: this one is decoded, claimed and planned while the previous one's publishes are in
        flight; once the previous one's acks are in, this one is published, and the previous one's marks and
        commit are written in the background (after the marks and commit of the one before it, in order),
        while the next batch is fetched and planned. A partition the previous one rewound (an unsent publish, a
        bug) is dropped from this one: read again."""
        prepared = await self.prepare(batch, consumer) if batch else None
        previous, self._inflight = self._inflight, None
        if previous is not None:
            try:
                rewound = await self._acked(previous, consumer)
                await self._closed(raising=False)
            except BaseException:
                # Never past what the previous batch left unsettled: it rewound its partitions to that.
                if prepared is not None:
                    self._give_back_probes(prepared.plan.outcomes)
                    self._rewind(consumer, prepared.parts, prepared.plan.holds,
                                 not_after=commit_offsets(previous.batch.plan))  # fmt: skip
                raise
            self._closing = asyncio.create_task(self._close(previous, consumer), name="close")
            if prepared is not None and rewound:
                try:
                    self._give_back_probes(prepared.drop(rewound))
                except BaseException:  # a bug: nothing of this batch went, so all of it is read again
                    self._give_back_probes(prepared.plan.outcomes)
                    self._rewind(consumer, prepared.parts, prepared.plan.holds)
                    raise
        if prepared is not None:
            try:
                self._inflight = self.start(prepared, consumer, producer)
            except BaseException:
                self._give_back_probes(prepared.plan.outcomes)
                self._rewind(consumer, prepared.parts, prepared.plan.holds)
                raise

    async def process(self, batch: dict[TopicPartition, list[Any]], consumer: AIOKafkaConsumer,
                      producer: AIOKafkaProducer) -> None:  # fmt: skip
        """One batch from fetch to commit, nothing in flight before or after (tests and the last batch)."""
        await self.step(batch, consumer, producer)
        await self.settle(consumer)

    async def settle(self, consumer: AIOKafkaConsumer) -> None:
        """Finish the batch being closed and the batch in flight, if any: before partitions move, and before the
        router stops."""
        previous, self._inflight = self._inflight, None
        try:
            await self._closed()
        finally:
            if previous is not None:
                await self.finish(previous, consumer)

    async def _closed(self, raising: bool = True) -> None:
        """Wait until the batch being closed in the background has its marks and commit written. Its error is
        raised, or (``raising=False``, in the loop, where the next batches are already in hand) logged and
        counted as the loop does: a commit refused after a rebalance loses nothing (what was acknowledged is
        marked done, and the next owner skips it)."""
        closing, self._closing = self._closing, None
        if closing is None:
            return
        if raising:
            await closing
            return
        try:
            await closing
        except (CommitFailedError, IllegalStateError) as exc:
            self.stats.commit_failures += 1
            log.warning("commit refused after a rebalance (the next owner dedupes): %s", exc)
        except Exception:
            self.stats.batch_errors += 1
            # Its acknowledged records are marked done or buffered for Redis; the next commit covers their offsets.
            log.exception("closing a batch (marks, counts, commit) failed; the next batch's commit covers it")

    async def prepare(self, batch: dict[TopicPartition, list[Any]], consumer: AIOKafkaConsumer) -> _Prepared:
        """Decode, claim and plan a batch: no publish yet."""
        t_batch = time.perf_counter()
        now = now_ms()
        accepted = self.gaps.accepted
        parts, holds = intake(batch, self.gaps, self._retry_set, now, self.s.kafka_max_message_bytes,
                              max(self.s.retry_backoff_ms))  # fmt: skip
        if self.gaps.accepted > accepted:
            self.metrics.gaps_accepted.inc(self.gaps.accepted - accepted)
        try:
            settled = self._settled  # as before the round trip (a close that lands meanwhile replaces it)
            claims = await self._claim(parts, now)
            if settled or self._unmarked:
                self._known_settled(parts, claims, settled, self._unmarked)
            p = self._plan(parts, claims, now)
        except BaseException:
            self._rewind(consumer, parts, holds)  # nothing of it is committed: read it all again
            raise
        p.holds.extend(holds)
        self._seq += 1
        return _Prepared(batch, parts, p, t_batch, now, self._seq)

    def start(self, b: _Prepared, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> _InFlight:
        """Hold what the plan holds (before the next fetch), then enqueue the publishes; their acks are awaited
        by :meth:`finish`."""
        self._apply_holds(consumer, b.plan.holds)
        publishing = asyncio.create_task(self._publish(producer, b.plan), name="publish")
        return _InFlight(b, publishing)

    async def finish(self, f: _InFlight, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """Await the acks, hold what was not sent, mark, count and commit. Returns the partitions it rewound."""
        rewound = await self._acked(f, consumer)
        await self._close(f, consumer)
        return rewound

    async def _acked(self, f: _InFlight, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """Await the acks and hold what was not sent. Returns the partitions it rewound."""
        b, p = f.batch, f.batch.plan
        try:
            await f.publishing
        except BaseException:
            # Nothing of this batch is committed: read it all again from its first records. What went is settled
            # and never marked (this batch is not closed); what did not go gives its probes back.
            self._remember_unmarked(b)
            self._give_back_probes(o for o in p.outcomes if not o.final)
            self._rewind(consumer, b.parts, p.holds)
            raise
        rewound: set[TopicPartition] = set()
        unsent = [o for o in p.outcomes if not o.final]
        if unsent:
            before = len(p.holds)
            self._hold_unsent(p, unsent, now_ms())
            self._apply_holds(consumer, p.holds[before:])
            rewound = {h.tp for h in p.holds[before:]}
            self._remember_settled(b, rewound)
            from_offset: dict[TopicPartition, int] = {}
            for h in p.holds[before:]:
                from_offset[h.tp] = min(h.offset, from_offset.get(h.tp, h.offset))
            # Read again from there, the ones acknowledged are duplicates: they take no admission token.
            self.faults.spend(_acknowledged_keys(b, from_offset, from_offset))
        else:
            self._unsent_streak = 0
        return rewound

    async def _close(self, f: _InFlight, consumer: AIOKafkaConsumer) -> None:
        """Mark, count and commit an acknowledged batch."""
        b, p = f.batch, f.batch.plan
        self._log_bad(p)
        self._marked_seq = b.seq
        settled = [o for o in p.outcomes if o.final]
        if self.faults.reserved:  # their admission tokens are spent, unless a copy of the job is still to go
            self.faults.settled(_settled_keys(b, settled))
        await self._mark(settled)
        self._count(
            p, b.t_batch
        )  # what the broker acknowledged happened, whether or not the commit goes through
        offsets = commit_offsets(p)
        self.metrics.observe_batch(self.s.group_id, consumer, b.fetched, offsets, p.outcomes)
        await self._commit(consumer, offsets)

    @staticmethod
    def _known_settled(parts: Parts, claims: dict[str, Claim], settled: dict[str, int],
                       unmarked: OrderedDict[str, None]) -> None:  # fmt: skip
        """Records this router settled in a batch whose partitions were rewound, read again before Redis has
        their done marks: duplicates, whatever Redis (slow, or away) said. ``settled`` as it was before the
        claims were asked for: a done mark written meanwhile may have come after the claim was judged."""
        for _, items in parts:
            for inc in items:
                key = inc.claim_key
                if key in settled or key in unmarked:
                    claims[key] = Claim.DONE

    def _remember_settled(self, b: _Prepared, tps: set[TopicPartition]) -> None:
        settled = self._settled
        for key in _acknowledged_keys(b, tps):
            settled[key] = b.seq
        if len(settled) > _SETTLED_MAX:  # the newest kept (a long Redis outage with many rewinds)
            self._settled = dict(list(settled.items())[-_SETTLED_MAX:])

    def _remember_unmarked(self, b: _Prepared) -> None:
        unmarked = self._unmarked
        keys = _acknowledged_keys(b, {tp for tp, _ in b.parts})
        self.faults.spend(keys)
        for key in keys:
            unmarked[key] = None
        while len(unmarked) > _SETTLED_MAX:
            unmarked.popitem(last=False)

    def _forget_settled(self) -> None:
        """Done marks up to the last closed batch are in Redis: its claims say "done" from now on."""
        if self._settled and not self.marks.buffered:
            upto = self._marked_seq
            self._settled = {k: seq for k, seq in self._settled.items() if seq > upto}

    async def _claim(self, parts: Parts, now: int) -> dict[str, Claim]:
        """Claims for the batch's keys and the pins of its sessions; nothing while Redis is unreachable."""
        # Claim keys settle before admission keys on them: a record back from a wait gets its trip's key, then a
        # forged x-redrive is keyed as the job it is (a round trip, only for a batch holding redriven jobs).
        self.faults.restore(parts)
        unforged = False
        if self.marks.dedupe:
            try:
                await self.marks.unforge(parts)
                unforged = True
            except (RedisError, OSError):
                pass  # Redis away: the claims below fail the same way, and say so
        ride = self.faults.ride(parts, now, restored=True)  # breakers and admission, on this trip
        sessions = sorted({inc.job.session_id for _, items in parts for inc in items
                           if inc.job is not None and inc.job.session_id})  # fmt: skip
        if not self.marks.dedupe and not sessions and not ride.active:
            ride.done()
            return {}
        try:
            claims, pins = await self.marks.claim(parts, sessions, ride, unforged=unforged)
        except (RedisError, OSError) as exc:
            if self.health.up:
                log.warning("Redis unreachable: routing without claims from the last snapshot: %s", exc)
            self.health.failed(now)
            self.metrics.external_calls.labels("redis", "error").inc()
            ride.failed(exc)
            return {}
        self.health.ok(now)
        if ride.active:
            try:
                await ride.apply()
            except (
                RedisError,
                OSError,
            ) as exc:  # a transition's compare-and-set write failed: judged again next read
                ride.failed(exc)
        else:
            ride.done()
        affinity = self.memory.affinity
        pin_ms = self._pin_ms()
        expires = now + pin_ms
        fresh_after = expires - _PIN_WRITE_GRACE_MS
        for sid, head_id in zip(sessions, pins, strict=True):
            if head_id is None:
                local = affinity.get(sid)
                # Expired in Redis: expired everywhere; unless this router pinned it a moment ago, and the
                # batch that did is still on its way to Redis (marks are written after the next batch starts).
                if local is not None and local[1] < fresh_after:
                    del affinity[sid]
            else:
                affinity[sid] = (head_id, expires)
        return claims

    def _plan(self, parts: Parts, claims: dict[str, Claim], now: int) -> Plan:
        if not self.health.up:
            # Heads can not release finished jobs while Redis is away: keep loads as last known instead of
            # piling up this router's own picks, which would soon look like every head is saturated.
            self.memory.reset_pending(dict(self._last_inflight))
        index = self.state.index
        hits0, misses0 = index.hits, index.misses
        stats = Stats()
        p = plan(parts, claims, index, self.state.policy, self.memory, now, self.health.heads_clock(now),
                 self.rng, self._cfg, stats, self.faults.verdicts)  # fmt: skip
        observe_many(self.metrics.decision_duration, stats.decision_seconds)
        self.metrics.cache_hits.inc(index.hits - hits0)
        self.metrics.cache_misses.inc(index.misses - misses0)
        self.stats.saturated += stats.saturated
        self.stats.waited_aside += stats.waited_aside
        self.stats.claimed_elsewhere += stats.busy
        return p

    async def _publish(self, producer: AIOKafkaProducer, p: Plan) -> None:
        """Publish the plan; dead-letter what can never be sent; leave the rest unsettled (read again)."""
        by_send = {id(o.send): i for i, o in enumerate(p.outcomes) if o.send is not None}
        for o in p.outcomes:
            if o.send is None:
                o.final = True
        self.metrics.inflight_sends.set(len(by_send))
        report = await self.faults.publish(
            producer, p, self._budget, now_ms()
        )  # with fallback to other heads
        for s in report.acked:
            p.outcomes[by_send[id(s)]].final = True
        self._count_sends(report.acked, report.fatal, report.unsent, p, by_send)
        # A fatal error is the record's own (too large, a partition its topic lacks): dead-letter it.
        fatal = [by_send[id(s)] for s in report.fatal]
        now = now_ms()
        for force in (False, True):
            if not fatal:
                break
            letters: dict[int, DeadLettered] = {}
            for i in fatal:
                o = p.outcomes[i]
                err = o.send.error if o.send is not None else None
                if isinstance(o, DeadLettered) and o.reason is not DeadLetterReason.PUBLISH_ERROR:
                    letters[i] = dead_letter(o.src, o.reason, o.detail, self._cfg, now, force_truncate=True)
                else:
                    detail = (
                        f"publish to {o.send.topic if o.send else '?'} failed: {describe(err or Exception())}"
                    )
                    letters[i] = dead_letter(o.src, DeadLetterReason.PUBLISH_ERROR, detail, self._cfg, now,
                                             force_truncate=force)  # fmt: skip
                self.stats.publish_errors += 1
            log.warning("%d publishes failed for good; dead-lettering them (first: %s)", len(letters),
                        letters[fatal[0]].detail)  # fmt: skip
            second = await publish(
                producer, [d.send for d in letters.values() if d.send is not None], self._budget
            )
            done = {id(s) for s in second.acked}
            fatal_again = {id(s) for s in second.fatal}
            next_fatal = []
            for i, letter in letters.items():
                assert letter.send is not None
                if id(letter.send) in done:
                    letter.final = True
                    p.outcomes[i] = letter
                elif id(letter.send) in fatal_again:
                    p.outcomes[i] = letter
                    next_fatal.append(i)
            fatal = next_fatal
        if fatal:
            log.error("%d dead letters could not be published even truncated; they will be read again",
                      len(fatal))  # fmt: skip
        self.metrics.inflight_sends.set(0)

    def _hold_unsent(self, p: Plan, unsent: list[Outcome], now: int) -> None:
        """Read unsent records again after a back-off: from the first one of each partition."""
        self._unsent_streak += 1
        backoff = min(_UNSENT_BACKOFF_MS[0] * 2 ** (self._unsent_streak - 1), _UNSENT_BACKOFF_MS[1])
        first: dict[TopicPartition, int] = {}
        for o in unsent:
            tp = o.src.tp
            if tp not in first or o.src.offset < first[tp]:
                first[tp] = o.src.offset
        for tp, off in first.items():
            p.holds.append(Hold(tp, off, now + backoff, "publish_unsent"))
        self.stats.unsent += len(unsent)
        self._give_back_probes(unsent)
        log.warning("%d publishes not acknowledged after retries; reading them again in %d ms", len(unsent),
                    backoff)  # fmt: skip

    def _give_back_probes(self, outcomes: Iterable[Outcome]) -> None:
        """Half-open probes spent on jobs that were never sent (dropped behind a rewind, or unsent) go back to
        this router's lease: the job read again may take one, instead of finding the head's probes "in flight"
        until the lease lapses (a whole cool-down) though none went."""
        memory = self.memory
        back = Tally(o.head_id for o in outcomes if isinstance(o, Routed) and o.probe)
        for head_id, n in back.items():
            memory.probes[head_id] = memory.probes.get(head_id, 0) + n
            memory.blocked.pop(head_id, None)
            memory.breaker_epoch += 1

    def _apply_holds(self, consumer: AIOKafkaConsumer, holds: list[Hold]) -> None:
        """Pause each held partition at its earliest held record until the hold's time."""
        earliest: dict[TopicPartition, Hold] = {}
        for h in holds:
            cur = earliest.get(h.tp)
            if cur is None or h.offset < cur.offset:
                earliest[h.tp] = h
            if h.why == "not_due":
                self.stats.deferred += 1
            elif h.why == "gap":
                self.stats.gap_waits += 1
        owned = consumer.assignment()
        now = now_ms()
        for tp, h in earliest.items():
            if tp not in owned:  # revoked meanwhile: the next owner reads from the committed offset
                continue
            consumer.seek(tp, h.offset)
            consumer.pause(tp)
            self.paused_until[tp] = self.hold_times.until(h, now)
            self.gaps.expect(tp, h.offset)

    def _unread(self, consumer: AIOKafkaConsumer, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Give back records fetched while consumption is paused for an outage, and pause their partitions: a
        rebalance during the keep-alive poll assigned them unpaused, and the poll's records are not routed."""
        owned = consumer.assignment()
        back = [tp for tp, records in fetched.items() if records and tp in owned]
        for tp in back:  # from where the poll began: its first record may be past one not visible yet
            first = fetched[tp][0].offset
            start = min(first, self.gaps.expected.get(tp, first))
            consumer.seek(tp, start)
            self.gaps.expect(tp, start)
        if back:
            consumer.pause(*back)

    def _rewind(self, consumer: AIOKafkaConsumer, parts: Parts, holds: list[Hold],
                not_after: dict[TopicPartition, int] | None = None) -> None:  # fmt: skip
        """Read these records again from each partition's first one (or from ``not_after``'s offset where that
        is earlier: an earlier batch's first unsettled record, which a later batch must not seek past)."""
        owned = consumer.assignment()
        first = {tp: items[0].offset for tp, items in parts if items}
        for h in holds:
            first[h.tp] = min(first.get(h.tp, h.offset), h.offset)
        for tp, off in (not_after or {}).items():
            if tp in first:
                first[tp] = min(first[tp], off)
        for tp, off in first.items():
            if tp in owned:
                consumer.seek(tp, off)
                self.gaps.expect(tp, off)

    def _log_bad(self, p: Plan) -> None:
        """A few lines per batch about records that were not jobs (never one line per record)."""
        bad = [o for o in p.outcomes if o.final and isinstance(o, DeadLettered) and o.src.error is not None]
        for o in bad[:_LOG_BAD_PER_BATCH]:
            src = o.src
            log.warning("bad job at %s[%d]@%d, dead-lettered: %s: %s", src.tp.topic, src.tp.partition, src.offset,
                        o.reason.value, o.detail)  # fmt: skip
        if len(bad) > _LOG_BAD_PER_BATCH:
            log.warning("... and %d more bad jobs in this batch", len(bad) - _LOG_BAD_PER_BATCH)

    async def _mark(self, settled: list[Outcome]) -> None:
        async with self._mark_lock:  # one at a time: a batch closed in the background and an idle flush
            inflight = await self.marks.mark(settled, self._pin_ms())
        now = now_ms()
        self.metrics.outage_buffered.set(self.marks.buffered)
        if inflight is None:
            self.health.failed(now)
            self.metrics.external_calls.labels("redis", "error").inc()
            return
        self.health.ok(now)
        self._forget_settled()
        self._last_inflight = inflight
        pending = dict(inflight)
        # Redis counts a job once its batch is marked: the picks of the batch still in flight are this
        # router's own, and count against their heads until then.
        f = self._inflight
        if f is not None:
            for o in f.batch.plan.outcomes:
                if isinstance(o, Routed):
                    pending[o.head_id] = pending.get(o.head_id, 0) + 1
        self.memory.reset_pending(pending)
        self.metrics.external_calls.labels("redis", "ok").inc()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit the next offset of each partition this member still owns: everything before it is settled.
        Offsets a failed commit left are carried into the next one (a quiet partition has no next batch of its
        own to cover them)."""
        owned = consumer.assignment()
        carried = self._uncommitted
        if carried:
            offsets = {**{tp: off for tp, off in carried.items() if tp in owned}, **offsets}
            for tp, off in carried.items():
                if tp in offsets and offsets[tp] < off:
                    offsets[tp] = off
        commit = {tp: OffsetAndMetadata(off, "") for tp, off in offsets.items() if tp in owned}
        if not commit:
            return
        try:
            await consumer.commit(commit)
        except BaseException:
            self._uncommitted = {tp: m.offset for tp, m in commit.items()}
            raise
        self._uncommitted = {}

    def _count(self, p: Plan, t_batch: float) -> None:
        st = self.stats
        m = self.metrics
        routed: list[Routed] = []
        others: list[Outcome] = []
        for o in p.outcomes:
            if not o.final:
                continue
            if isinstance(o, Routed):
                routed.append(o)
            else:
                others.append(o)
        if routed:  # counted a batch at a time (C loops), not a job at a time
            st.routed += len(routed)
            st.by_head.update([o.head_id for o in routed])
        decisions = Tally([(o.strategy, o.src.job.model_type if o.src.job else "", o.region) for o in routed])
        for o in others:
            if isinstance(o, Retried):
                st.retried += 1
            elif isinstance(o, DeadLettered):
                st.dead_lettered += 1
                st.dead_by_reason[o.reason.value] += 1
            else:
                st.duplicates += 1
                m.duplicates.inc()
        for (strategy, model_type, region), n in decisions.items():
            m.routing_decisions.labels(strategy, model_type, region).inc(n)
        st.batches += 1
        m.batch_size.observe(len(p.outcomes))
        m.batch_duration.observe(time.perf_counter() - t_batch)

    def _count_sends(self, acked: list[Send], fatal: list[Send], unsent: list[Send], p: Plan,
                     by_send: dict[int, int]) -> None:  # fmt: skip
        def kind(s: Send) -> str:
            o = p.outcomes[by_send[id(s)]]
            return "routed" if isinstance(o, Routed) else "retry" if isinstance(o, Retried) else "dlq"

        q = self.metrics.queue_messages
        for status, sends in (("ok", acked), ("error", fatal + unsent)):
            for k, n in Tally(kind(s) for s in sends).items():
                q.labels(k, status).inc(n)
        self.metrics.external_calls.labels("kafka", "ok").inc(len(acked))
        if fatal or unsent:
            self.metrics.external_calls.labels("kafka", "error").inc(len(fatal) + len(unsent))
