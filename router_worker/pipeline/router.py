"""The router process: consume jobs in batches, decide with the pure engine, publish, then commit.

Per batch: at most one Redis round trip before routing (duplicate check) and one after the broker
acknowledged every publish (idempotency markers, shared in-flight counts, audit records). Offsets are
committed only after those acknowledgements (see :mod:`router_worker.pipeline.checkpoint`). Retry topics are
read by the same consumer; a record whose back-off has not elapsed pauses its partition until it has, so the
main topic never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter as Tally
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router_worker.audit import AuditSink, decision_record
from router_worker.clock import now_ms
from router_worker.core.engine import decide, record
from router_worker.core.model import Decision, Outcome, RouterMemory
from router_worker.metrics import Metrics
from router_worker.pipeline.checkpoint import Checkpoint
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.pipeline.messages import (
    H_ATTEMPT,
    H_NOT_BEFORE,
    dead_letter_headers,
    header_int,
    retry_headers,
    routed_headers,
)
from router_worker.settings import Settings
from router_worker.state.cache import StateCache
from router_worker.state.heads import HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from router_worker.topics import Topics
from schemas.envelope import DeadLetterReason, EnvelopeError, Job, content_type_of, decode_job

log = logging.getLogger(__name__)

_LOG_BAD_PER_BATCH = 10
_GAP_RETRY_MS = 5


def dedupe_key(job_id: str, attempt: int) -> str:
    """What "routed once" means: once per job id and attempt. A job a head hands back, or the router
    retries, is routed again as its next attempt; a replay of any one attempt is skipped."""
    return job_id if attempt <= 1 else f"{job_id}#{attempt}"


class PublishFailed(RuntimeError):
    pass


@dataclass(slots=True)
class RouterStats:
    batches: int = 0
    routed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    deferred: int = 0
    saturated: int = 0
    rewinds: int = 0
    gap_waits: int = 0
    commit_failures: int = 0
    by_head: Tally[str] = field(default_factory=Tally)
    dead_by_reason: Tally[str] = field(default_factory=Tally)


@dataclass(slots=True)
class _Out:
    """One publish of the batch, kept until acknowledged."""

    topic: str
    value: bytes | None
    key: bytes | None
    partition: int | None
    headers: list[tuple[str, bytes]]
    kind: str  # routed | retry | dlq
    job_id: str | None = None
    head_id: str | None = None
    pin: tuple[str, str] | None = None
    """(session, head) when the decision pinned a session."""
    new_pin: bool = False
    """The session had no pin: written only if still absent, so of two routers racing the first wins."""
    attempt: int = 1


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Let the batch in hand finish (publish + commit) before partitions move to another router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.router.batch_lock:
            for tp in revoked:
                self.router.paused_until.pop(tp, None)
                self.router.gaps.forget(tp)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("router %s assigned %d partitions", self.router.router_id, len(assigned))
        consumer = self.router._consumer
        for tp in assigned:  # reading resumes at the committed offset: the first record must be that one
            committed = None
            if consumer is not None:
                with contextlib.suppress(KafkaError):
                    committed = await consumer.committed(tp)
            self.router.gaps.expect(tp, committed)


class Router:
    def __init__(self, settings: Settings, redis: Redis, metrics: Metrics, audit: AuditSink,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        self.s = settings
        self.redis = redis
        self.metrics = metrics
        self.audit = audit
        self.rng = rng or random.Random()
        self.topics = Topics.from_settings(settings)
        self.keys = Keys(settings.redis_prefix)
        self.registry = HeadRegistry(redis, self.keys, settings.head_ttl_ms)
        self.policies = PolicyStore(redis, self.keys)
        self.state = StateCache(
            redis, self.registry, self.policies, settings.head_refresh_ms, self._on_refresh, self._on_event
        )
        self.memory = RouterMemory()
        self.router_id = settings.effective_router_id
        self.stats = RouterStats()
        self.batch_lock = asyncio.Lock()
        self.paused_until: dict[TopicPartition, int] = {}
        self.gaps = GapGuard(settings.gap_wait_ms)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._retry_topics = [self.topics.retry(i + 1) for i in range(len(settings.retry_backoff_ms))]
        self._retry_set = frozenset(self._retry_topics)
        self._refresh_inflight = False
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.s
        await ensure_topics(
            s,
            [(self.topics.requests, s.requests_partitions), (self.topics.dlq, 1)]
            + [(t, s.requests_partitions) for t in self._retry_topics],
        )
        await self.state.start()
        producer = make_producer(s)
        consumer = make_consumer(s, group_id=s.group_id)
        consumer.subscribe([self.topics.requests, *self._retry_topics], listener=_Rebalance(self))
        self._consumer, self._producer = consumer, producer
        await producer.start()
        await consumer.start()
        await self.audit.emit("router_started", self.router_id, group_id=s.group_id)
        self.ready.set()
        try:
            await self._loop(consumer, producer)
        finally:
            # The batch in hand was committed at its end; stop() would not call the revoke listener, so
            # there is nothing else to commit. Leave the group at once so partitions move without waiting.
            self.ready.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), s.shutdown_timeout_s)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), s.shutdown_timeout_s)
            await self.state.stop()
            with contextlib.suppress(Exception):
                await self.audit.emit("router_stopped", self.router_id, routed=self.stats.routed)

    async def _loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        s = self.s
        backoff = 0.1
        while not self._stop.is_set():
            timeout_ms = self._resume_due(consumer, s.batch_timeout_ms)
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=s.batch_max_records)
            if not batch:
                continue
            if self._refresh_inflight:  # we held jobs back for load: read how much the heads released
                self._refresh_inflight = False
                await self._read_inflight()
            async with self.batch_lock:
                try:
                    await self.process(batch, consumer, producer)
                    backoff = 0.1
                except PublishFailed as exc:
                    self.stats.rewinds += 1
                    log.error("publish failed, batch will be read again in %.1fs: %s", backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except (CommitFailedError, IllegalStateError) as exc:
                    # The group rebalanced under us: every publish of the batch was acknowledged and marked
                    # seen, so the partition's next owner skips them as duplicates. Nothing is lost.
                    self.stats.commit_failures += 1
                    log.warning("commit refused after a rebalance (the next owner dedupes): %s", exc)

    def _resume_due(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> int:
        """Resume retry partitions whose back-off elapsed; return how long the next fetch may wait."""
        if not self.paused_until:
            return timeout_ms
        now = now_ms()
        due = [tp for tp, t in self.paused_until.items() if t <= now]
        if due:
            consumer.resume(*due)
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
        self.memory.reset_pending(dict(state.inflight))
        now = now_ms()
        self.metrics.active_heads.set(
            sum(1 for h in state.index.heads.values() if h.status == "healthy" and h.expires_at_ms >= now)
        )
        self.metrics.policy_version.set(state.policy.version)

    # --- one batch -------------------------------------------------------------------------------------------

    async def process(self, batch: dict[TopicPartition, list[Any]], consumer: AIOKafkaConsumer,
                      producer: AIOKafkaProducer) -> None:  # fmt: skip
        t_batch = time.perf_counter()
        s = self.s
        now = now_ms()
        cp = Checkpoint()
        outs: list[_Out] = []
        audits: list[dict[str, Any]] = []
        bad_logged = 0

        # 1. decode and validate everything (no I/O); defer retry records that are not due yet
        work: list[tuple[TopicPartition, list[tuple[Any, Job | EnvelopeError, str, int]]]] = []
        job_ids: list[str] = []
        sessions: set[str] = set()
        for tp, fetched in batch.items():
            retry_tier = tp.topic in self._retry_set
            items: list[tuple[Any, Job | EnvelopeError, str, int]] = []
            records, gap_at = self.gaps.admit(tp, fetched, now)
            for rec in records:
                if retry_tier:
                    not_before = header_int(rec.headers, H_NOT_BEFORE)
                    if not_before > now:
                        self._hold(consumer, tp, rec.offset, not_before)
                        self.stats.deferred += 1
                        gap_at = None  # held earlier than the gap: the gap is re-read anyway
                        break
                attempt = header_int(rec.headers, H_ATTEMPT, 0) + 1 if retry_tier else 1
                ctype = content_type_of(rec.headers)
                try:
                    job: Job | EnvelopeError = decode_job(rec.value, ctype, s.kafka_max_message_bytes)
                    job_ids.append(dedupe_key(job.job_id, attempt))  # type: ignore[union-attr]
                    if job.session_id:  # type: ignore[union-attr]
                        sessions.add(job.session_id)  # type: ignore[union-attr]
                except EnvelopeError as exc:
                    if bad_logged < _LOG_BAD_PER_BATCH:
                        log.warning("bad job at %s[%d]@%d, dead-lettered: %s", tp.topic, tp.partition, rec.offset,
                                    exc)  # fmt: skip
                    bad_logged += 1
                    job = exc
                items.append((rec, job, ctype, attempt))
            if gap_at is not None:  # an offset is missing: read again from it shortly (see gaps.py)
                self._hold(consumer, tp, gap_at, now + _GAP_RETRY_MS)
                self.stats.gap_waits += 1
            work.append((tp, items))
        if bad_logged > _LOG_BAD_PER_BATCH:
            log.warning("... and %d more bad jobs in this batch", bad_logged - _LOG_BAD_PER_BATCH)

        # 2. one round trip for the whole batch: duplicates, and the sessions' pins set by any router
        seen = await self._prefetch(job_ids, sessions, now)

        # 3. decide and queue publishes, partition by partition in offset order
        policy = self.state.policy
        index = self.state.index
        memory = self.memory
        hits0, misses0 = index.hits, index.misses
        decisions_tally: Tally[tuple[str, str, str]] = Tally()
        observe = self.metrics.decision_duration.observe
        in_batch: set[str] = set()
        for tp, items in work:
            for rec, job, ctype, attempt in items:
                cp.start(tp, rec.offset)
                if isinstance(job, EnvelopeError):
                    outs.append(self._dead(rec, tp, job.reason, job.detail, attempt, audits, None))
                    cp.done(tp, rec.offset)
                    continue
                key = dedupe_key(job.job_id, attempt)
                if key in seen or key in in_batch:
                    self.stats.duplicates += 1
                    audits.append({"ts": now, "event": "duplicate", "router_id": self.router_id,
                                   "job_id": job.job_id, "model_type": job.model_type})  # fmt: skip
                    cp.done(tp, rec.offset)
                    continue
                if attempt > s.max_attempts:
                    detail = f"attempt {attempt} exceeds max_attempts {s.max_attempts}"
                    outs.append(
                        self._dead(rec, tp, DeadLetterReason.MAX_ATTEMPTS, detail, attempt, audits, job)
                    )
                    cp.done(tp, rec.offset)
                    continue
                if job.deadline_ms is not None and job.deadline_ms < now:
                    detail = f"deadline {job.deadline_ms} passed {now - job.deadline_ms} ms before routing"
                    outs.append(self._dead(rec, tp, DeadLetterReason.EXPIRED, detail, attempt, audits, job))
                    cp.done(tp, rec.offset)
                    continue
                t0 = time.perf_counter_ns()
                d = decide(job, index, policy, memory, now, self.rng, attempt)
                observe((time.perf_counter_ns() - t0) / 1e9)
                if d.outcome is Outcome.SATURATED:
                    # Back-pressure: leave this job and the rest of its partition in Kafka for a moment.
                    self._hold(consumer, tp, rec.offset, now + s.backpressure_ms)
                    self.stats.saturated += 1
                    self._refresh_inflight = True
                    break
                in_batch.add(key)
                cp.done(tp, rec.offset)
                if d.outcome is Outcome.ROUTED:
                    new_pin = d.sticky is not None and d.sticky[0] not in memory.affinity
                    record(d, memory, job, policy, now)
                    head = d.head
                    assert head is not None
                    outs.append(_Out(self.topics.model(head.model_id), rec.value, rec.key, head.partition,
                                     routed_headers(rec.headers, job.job_id, d, ctype, now), "routed",
                                     job.job_id, head.head_id, pin=d.sticky, attempt=attempt,
                                     new_pin=new_pin))  # fmt: skip
                    decisions_tally[(d.strategy, job.model_type, head.region)] += 1
                    if s.audit_decisions:
                        audits.append(decision_record(d, self.router_id, job.job_id, job.model_type, job.region,
                                                      now))  # fmt: skip
                elif d.outcome is Outcome.REFUSED:
                    outs.append(
                        self._dead(rec, tp, DeadLetterReason.SCHEMA_ERROR, d.reason, attempt, audits, job)
                    )
                else:
                    outs.append(self._retry_or_dead(rec, tp, job, d, attempt, now, audits))
        for (strategy, model_type, region), n in decisions_tally.items():
            self.metrics.routing_decisions.labels(strategy, model_type, region).inc(n)
        self.metrics.cache_hits.inc(index.hits - hits0)
        self.metrics.cache_misses.inc(index.misses - misses0)

        # 4. publish everything, wait for every acknowledgement
        acked = await self._publish(producer, outs)

        # 5. one Redis round trip: idempotency markers, shared in-flight counts, audit
        await self._after_ack(acked, audits)

        if len(acked) < len(outs):
            cp.rewind(consumer)
            for tp, off in cp.first.items():
                self.gaps.expect(tp, off)
            raise PublishFailed(f"{len(outs) - len(acked)} of {len(outs)} publishes were not acknowledged")

        # 6. commit the next offsets: everything before them is on the broker
        await cp.commit(consumer)
        self.stats.batches += 1
        self.metrics.batch_size.observe(len(outs))
        self.metrics.batch_duration.observe(time.perf_counter() - t_batch)

    def _hold(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, until_ms: int) -> None:
        """Stop reading ``tp`` at ``offset`` until ``until_ms``; the record is read again then."""
        consumer.seek(tp, offset)
        consumer.pause(tp)
        self.paused_until[tp] = until_ms
        self.gaps.expect(tp, offset)

    # --- helpers ---------------------------------------------------------------------------------------------

    def _dead(self, rec: Any, tp: TopicPartition, reason: DeadLetterReason, detail: str, attempt: int,
              audits: list[dict[str, Any]], job: Job | None) -> _Out:  # fmt: skip
        audits.append({
            "ts": now_ms(), "event": "dead_letter", "router_id": self.router_id, "reason": reason.value,
            "detail": detail, "attempt": attempt, "topic": tp.topic, "partition": tp.partition,
            "offset": rec.offset, **({"job_id": job.job_id, "model_type": job.model_type} if job else {}),
        })  # fmt: skip
        headers = dead_letter_headers(rec.headers, reason.value, detail, tp.topic, tp.partition, rec.offset,
                                      attempt)  # fmt: skip
        return _Out(self.topics.dlq, rec.value, rec.key, None, headers, "dlq", job.job_id if job else None,
                    reason.value, attempt=attempt)  # fmt: skip

    def _retry_or_dead(self, rec: Any, tp: TopicPartition, job: Job, d: Decision, attempt: int, now: int,
                       audits: list[dict[str, Any]]) -> _Out:  # fmt: skip
        reason = DeadLetterReason(d.outcome.value)
        if attempt >= self.s.max_attempts:
            detail = f"{d.reason} (after {attempt} attempts)"
            return self._dead(rec, tp, reason, detail, attempt, audits, job)
        backoff = self.s.retry_backoff_ms
        tier = min(attempt, len(backoff))
        not_before = now + backoff[tier - 1]
        audits.append({"ts": now, "event": "retry", "router_id": self.router_id, "job_id": job.job_id,
                       "model_type": job.model_type, "strategy": d.strategy, "reason": d.reason,
                       "attempt": attempt, "tier": tier, "not_before": not_before})  # fmt: skip
        headers = retry_headers(
            rec.headers, reason.value, tp.topic, tp.partition, rec.offset, attempt, not_before
        )
        return _Out(self.topics.retry(tier), rec.value, rec.key, None, headers, "retry", job.job_id)

    async def _read_inflight(self) -> None:
        try:
            raw = cast(dict[str, str], await self.redis.hgetall(self.keys.inflight))
        except (RedisError, OSError) as exc:
            log.warning("in-flight refresh failed: %s", exc)
            return
        self.memory.reset_pending({k: int(v) for k, v in raw.items()})

    async def _prefetch(self, job_ids: list[str], sessions: set[str], now: int) -> set[str]:
        """Which job ids were routed before, and load the pins of this batch's sessions into memory."""
        dedupe = bool(job_ids) and self.s.dedupe_ttl_s > 0  # job_ids: dedupe keys (see dedupe_key)
        if not dedupe and not sessions:
            return set()
        order = list(sessions)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if dedupe:
                    pipe.mget([self.keys.seen(j) for j in job_ids])
                if order:
                    pipe.mget([self.keys.affinity(sid) for sid in order])
                res = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.metrics.external_calls.labels("redis", "error").inc()
            log.warning("duplicate check and pin lookup skipped, Redis unavailable: %s", exc)
            return set()
        seen: set[str] = set()
        if dedupe:
            seen = {j for j, v in zip(job_ids, res[0], strict=True) if v is not None}
        if order:
            pins = self.memory.affinity
            expires = now + int(self.state.policy.affinity_timeout_s * 1000)
            for sid, head_id in zip(order, res[-1], strict=True):
                if head_id is None:
                    pins.pop(sid, None)  # expired in Redis: expired everywhere
                else:
                    pins[sid] = (head_id, expires)
        return seen

    async def _publish(self, producer: AIOKafkaProducer, outs: list[_Out]) -> list[_Out]:
        """Send all, gather the acks; re-send the failures a few times. Returns what was acknowledged."""
        pending = outs
        acked: list[_Out] = []
        delay = 0.05
        for attempt in range(self.s.publish_retry_attempts):
            futures = []
            self.metrics.inflight_sends.set(len(pending))
            try:
                for o in pending:
                    futures.append(await producer.send(o.topic, o.value, key=o.key, partition=o.partition,
                                                       headers=o.headers))  # fmt: skip
            except KafkaError as exc:  # could not even enqueue (e.g. metadata for a new topic): retry all
                log.warning("publish enqueue failed (try %d): %s", attempt + 1, exc)
                futures.extend(_failed(exc) for _ in range(len(pending) - len(futures)))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = []
            for o, r in zip(pending, results, strict=True):
                if isinstance(r, BaseException):
                    failed.append(o)
                else:
                    acked.append(o)
            self._count(pending, results)
            if not failed:
                break
            log.warning("%d publishes failed (try %d), retrying", len(failed), attempt + 1)
            pending = failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        self.metrics.inflight_sends.set(0)
        return acked

    def _count(self, outs: list[_Out], results: list[Any]) -> None:
        ok = Tally(o.kind for o, r in zip(outs, results, strict=True) if not isinstance(r, BaseException))
        bad = Tally(o.kind for o, r in zip(outs, results, strict=True) if isinstance(r, BaseException))
        for kind, n in ok.items():
            self.metrics.queue_messages.labels(kind, "ok").inc(n)
        for kind, n in bad.items():
            self.metrics.queue_messages.labels(kind, "error").inc(n)
        self.metrics.external_calls.labels("kafka", "ok").inc(sum(ok.values()))
        if bad:
            self.metrics.external_calls.labels("kafka", "error").inc(sum(bad.values()))

    async def _after_ack(self, acked: list[_Out], audits: list[dict[str, Any]]) -> None:
        per_head: Tally[str] = Tally()
        ttl_ms = self.s.dedupe_ttl_s * 1000
        st = self.stats
        for o in acked:
            if o.kind == "routed":
                st.routed += 1
                assert o.head_id is not None
                per_head[o.head_id] += 1
            elif o.kind == "retry":
                st.retried += 1
            else:
                st.dead_lettered += 1
                st.dead_by_reason[o.head_id or "?"] += 1
        st.by_head.update(per_head)
        lines = self.audit.write_file(audits)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if ttl_ms:
                    for o in acked:
                        if o.job_id and o.kind != "retry":
                            pipe.set(self.keys.seen(dedupe_key(o.job_id, o.attempt)), 1, px=ttl_ms)
                pin_ms = int(self.state.policy.affinity_timeout_s * 1000)
                for o in acked:
                    if o.pin is not None:  # sliding timeout: every routed job of a session renews its pin
                        pipe.set(self.keys.affinity(o.pin[0]), o.pin[1], px=pin_ms, nx=o.new_pin)
                for head_id, n in per_head.items():
                    pipe.hincrby(self.keys.inflight, head_id, n)
                inflight_at = len(pipe)
                pipe.hgetall(self.keys.inflight)
                self.audit.publish_into(pipe, lines)
                res = await pipe.execute()
            inflight = res[inflight_at]
            self.memory.reset_pending({k: int(v) for k, v in inflight.items()})
            self.metrics.external_calls.labels("redis", "ok").inc()
        except (RedisError, OSError) as exc:
            self.metrics.external_calls.labels("redis", "error").inc()
            self.audit.publish_failed(exc)


def _failed(exc: BaseException) -> Awaitable[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut
