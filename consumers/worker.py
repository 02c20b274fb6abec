"""The model-worker SDK: one head of a model, serving the jobs the router addresses to its partition.

A ``ModelWorker`` claims a partition of its model's topic in Redis, registers its head, heartbeats (load,
latency, learned profile), runs your handler on up to ``capacity`` jobs at once with a fixed pool of
coroutines (never a task per job), publishes a completion record to ``router.results`` or the job's
``reply_to``, and commits an offset only when every job before it is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.core.adaptive import ProfileLearner, job_size
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.pipeline.messages import H_ATTEMPT, H_DECIDED_AT, header_int, retry_headers
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry, HeadStats
from router_worker.state.keys import Keys
from router_worker.tasks import cancel_and_wait
from router_worker.topics import Topics
from schemas.envelope import MSGPACK, EnvelopeError, Job, content_type_of, decode_job

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler gets besides the job: where it came from and when it was routed."""

    head_id: str
    partition: int
    offset: int
    attempt: int
    routed_at_ms: int
    headers: tuple[tuple[str, bytes], ...]


Handler = Callable[[Job, JobContext], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_id: str
    region: str = "default"
    capacity: int = 8
    head_id: str | None = None
    partition: int | None = None
    """Preferred partition; any free one when None."""
    families: tuple[str, ...] = ()
    backend: str = "cpu"
    quantizations: tuple[str, ...] = ()
    max_context: int = 0
    dynamic_shapes: bool = False
    param_count: int = 0
    tags: tuple[str, ...] = ()
    weight: float = 1.0
    power_w: float = 0.0
    retry_on_error: bool = True
    """A handler that raises sends the job back through the router's retry topics (a nack)."""

    def resolved_head_id(self) -> str:
        return self.head_id or f"{self.model_id}-{self.region}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class OffsetTracker:
    """Offsets started but not finished; the committable offset is the lowest of them (or the next one)."""

    pending: set[int] = field(default_factory=set)
    next_offset: int = -1
    committed: int = -1

    def started(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = max(self.next_offset, offset + 1)

    def finished(self, offset: int) -> None:
        self.pending.discard(offset)

    def committable(self) -> int:
        return min(self.pending) if self.pending else self.next_offset


@dataclass(slots=True)
class WorkerStats:
    cache_hit_rate: float = 0.0
    quota_used: float = 0.0
    completed: int = 0
    failed: int = 0
    inflight: int = 0
    latency_ewma_ms: float = 0.0
    completions_lost: int = 0
    """Completion records the broker did not take (the jobs themselves were served)."""
    released: int = 0
    """Finished jobs not yet released from the shared in-flight count."""


class ModelWorker:
    def __init__(self, settings: Settings, redis: Redis, config: WorkerConfig, handler: Handler,
                 audit: AuditSink | None = None) -> None:  # fmt: skip
        self.s = settings
        self.redis = redis
        self.config = config
        self.handler = handler
        self.head_id = config.resolved_head_id()
        self.topics = Topics.from_settings(settings)
        self.topic = self.topics.model(config.model_id)
        self.registry = HeadRegistry(redis, Keys(settings.redis_prefix), settings.head_ttl_ms)
        self.audit = audit
        self.stats = WorkerStats()
        self.learner = ProfileLearner()
        self.partition = -1
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=config.capacity * 2)
        self._tracker = OffsetTracker()
        self._producer: AIOKafkaProducer | None = None

    def stop(self) -> None:
        self._stop.set()

    def report(self, *, cache_hit_rate: float | None = None, quota_used: float | None = None) -> None:
        """Tell the routers about this head's cache and quota (sent with the next heartbeat).

        ``cache_hit_rate`` (0..1) feeds cache_aware and hybrid; ``quota_used`` (0..1 of the head's quota)
        feeds quota_aware, and the policy's ``quota_limit`` stops routing to the head when reached.
        """
        if cache_hit_rate is not None:
            self.stats.cache_hit_rate = min(1.0, max(0.0, cache_hit_rate))
        if quota_used is not None:
            self.stats.quota_used = min(1.0, max(0.0, quota_used))

    async def run(self) -> None:
        s, c = self.s, self.config
        await ensure_topics(
            s, [(self.topic, s.model_partitions), (self.topics.results, s.requests_partitions)]
        )
        self.partition = await self.registry.claim_partition(self.head_id, self.topic, s.model_partitions,
                                                             c.partition)  # fmt: skip
        record = HeadRecord(
            head_id=self.head_id, model_id=c.model_id, region=c.region, capacity=c.capacity,
            partition=self.partition, families=c.families, backend=c.backend, quantizations=c.quantizations,
            max_context=c.max_context, dynamic_shapes=c.dynamic_shapes, param_count=c.param_count, tags=c.tags,
            weight=c.weight, power_w=c.power_w, host=f"{os.uname().nodename}:{os.getpid()}",
        )  # fmt: skip
        consumer = make_consumer(s, group_id=f"{s.group_id}.heads", enable_auto_commit=False)
        producer = make_producer(s)
        await producer.start()
        await consumer.start()
        self._producer = producer
        tp = TopicPartition(self.topic, self.partition)
        consumer.assign([tp])
        await self.registry.register(record, slot_topic=self.topic)
        if self.audit:
            await self.audit.emit("head_registered", self.head_id, head_id=self.head_id, model_id=c.model_id,
                                  region=c.region, partition=self.partition, actor="worker")  # fmt: skip
        pool = [asyncio.create_task(self._serve(tp), name=f"serve-{i}") for i in range(c.capacity)]
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        releaser = asyncio.create_task(self._release_loop(), name="release")
        self.ready.set()
        try:
            await self._fetch_loop(consumer, tp)
        finally:
            self.ready.clear()
            await self._drain_pool(pool)
            await cancel_and_wait((beat, releaser))
            with contextlib.suppress(Exception):
                await self._commit(consumer, tp)
            await self.registry.remove(self.head_id, actor="worker")
            if self.audit:
                with contextlib.suppress(Exception):
                    await self.audit.emit("head_removed", self.head_id, head_id=self.head_id, actor="worker")
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _fetch_loop(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        last_commit = time.monotonic()
        gaps = GapGuard(self.s.gap_wait_ms)
        gaps.expect(tp, await consumer.committed(tp))
        while not self._stop.is_set():
            batch = await consumer.getmany(tp, timeout_ms=100, max_records=self.config.capacity)
            records, gap_at = gaps.admit(tp, batch.get(tp, ()), now_ms())
            for rec in records:
                self._tracker.started(rec.offset)
                await self._queue.put(rec)  # blocks when the pool is full: natural back-pressure
            if gap_at is not None:  # a routed job is not visible yet: read again from it (see gaps.py)
                consumer.seek(tp, gap_at)
                await asyncio.sleep(0.005)
            if time.monotonic() - last_commit > 0.2:
                await self._commit(consumer, tp)
                last_commit = time.monotonic()

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        off = self._tracker.committable()
        if off > self._tracker.committed and off >= 0:
            await consumer.commit({tp: off})
            self._tracker.committed = off

    async def _drain_pool(self, pool: list[asyncio.Task[None]]) -> None:
        for _ in pool:
            await self._queue.put(None)
        await asyncio.wait(pool, timeout=self.s.shutdown_timeout_s)
        await cancel_and_wait(pool)

    async def _serve(self, tp: TopicPartition) -> None:
        while True:
            rec = await self._queue.get()
            if rec is None:
                return
            try:
                await self._handle(rec)
            except Exception:  # the SDK's own failure: never lose the offset bookkeeping
                log.exception("head %s failed handling offset %d", self.head_id, rec.offset)
            finally:
                self._tracker.finished(rec.offset)
                self.stats.released += 1

    async def _handle(self, rec: Any) -> None:
        st = self.stats
        started = now_ms()
        load = st.inflight / self.config.capacity
        ctx = JobContext(self.head_id, rec.partition, rec.offset, header_int(rec.headers, H_ATTEMPT, 1),
                         header_int(rec.headers, H_DECIDED_AT, started), tuple(rec.headers or ()))  # fmt: skip
        try:
            job = decode_job(rec.value, content_type_of(rec.headers))
        except EnvelopeError as exc:  # the router validated it, so this is a foreign writer: report, move on
            log.warning("head %s: undecodable job at offset %d: %s", self.head_id, rec.offset, exc)
            st.failed += 1
            return
        st.inflight += 1
        t0 = time.perf_counter()
        try:
            result = await self.handler(job, ctx)
            status, error = "ok", None
        except Exception as exc:
            result, status, error = None, "error", f"{type(exc).__name__}: {exc}"
        finally:
            st.inflight -= 1
        service_ms = (time.perf_counter() - t0) * 1000
        if status == "ok":
            st.completed += 1
            st.latency_ewma_ms = (
                service_ms if st.latency_ewma_ms == 0 else 0.9 * st.latency_ewma_ms + 0.1 * service_ms
            )
            self.learner.observe(job_size(job), load, service_ms)
        else:
            st.failed += 1
            if self.config.retry_on_error and await self._nack(rec, ctx, error or "error"):
                return
        await self._complete(job, ctx, status, result, error, service_ms)

    async def _nack(self, rec: Any, ctx: JobContext, error: str) -> bool:
        """Hand the job back to the routers through the retry tier for its next attempt."""
        assert self._producer is not None
        backoff = self.s.retry_backoff_ms
        tier = min(ctx.attempt, len(backoff))
        headers = retry_headers(rec.headers, f"head_error: {error}"[:200], rec.topic, rec.partition, rec.offset,
                                ctx.attempt, now_ms() + backoff[tier - 1])  # fmt: skip
        try:
            await (
                await self._producer.send(self.topics.retry(tier), rec.value, key=rec.key, headers=headers)
            )
        except Exception as exc:
            log.warning("head %s: nack of offset %d failed: %s", self.head_id, rec.offset, exc)
            return False
        return True

    async def _complete(self, job: Job, ctx: JobContext, status: str, result: Any, error: str | None,
                        service_ms: float) -> None:  # fmt: skip
        assert self._producer is not None
        finished = now_ms()
        doc: dict[str, Any] = {
            "job_id": job.job_id, "model_type": job.model_type, "model_id": self.config.model_id,
            "head_id": self.head_id, "status": status, "attempt": ctx.attempt, "service_ms": round(service_ms, 3),
            "routed_at": ctx.routed_at_ms, "finished_at": finished,
        }  # fmt: skip
        if job.created_at is not None:
            doc["created_at"] = job.created_at
            doc["latency_ms"] = finished - job.created_at
        if error is not None:
            doc["error"] = error
        if result is not None:
            doc["result"] = result
        try:
            value = msgpack.packb(doc, use_bin_type=True, default=str)
        except (TypeError, ValueError) as exc:
            doc.pop("result", None)
            doc["error"] = f"result not serialisable: {exc}"
            value = msgpack.packb(doc, use_bin_type=True)
        topic = job.reply_to or self.topics.results
        try:
            fut = await self._producer.send(topic, value, key=job.job_id.encode(),
                                            headers=[("content-type", MSGPACK.encode())])  # fmt: skip
        except Exception as exc:
            self._completion_failed(job.job_id, exc)
            return
        # Not awaited (the job is done; the record rides the producer's batching), but never unobserved.
        fut.add_done_callback(lambda f, job_id=job.job_id: self._on_completion_sent(job_id, f))

    def _on_completion_sent(self, job_id: str, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._completion_failed(job_id, fut.exception())

    def _completion_failed(self, job_id: str, exc: BaseException | None) -> None:
        self.stats.completions_lost += 1
        log.warning("head %s: completion record for %s not sent: %s", self.head_id, job_id, exc)

    async def _release_loop(self) -> None:
        """Give finished jobs back to the shared in-flight count often, so routers see capacity return fast."""
        interval = self.s.head_release_ms / 1000
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            st = self.stats
            if not st.released:
                continue
            n, st.released = st.released, 0
            try:
                await self.registry.release(self.head_id, n)
            except Exception as exc:
                st.released += n
                log.warning("head %s: release failed: %s", self.head_id, exc)

    async def _heartbeat_loop(self) -> None:
        interval = self.s.head_heartbeat_ms / 1000
        slot = (self.topic, self.partition)
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            st = self.stats
            stats = HeadStats(inflight=st.inflight, latency_ms=st.latency_ewma_ms, completed=st.completed,
                              cache_hit_rate=st.cache_hit_rate, quota_used=st.quota_used,
                              profile=self.learner.profile() if self.learner.n else None)  # fmt: skip
            try:
                alive = await self.registry.heartbeat(self.head_id, stats, slot)
            except Exception as exc:
                log.warning("head %s: heartbeat failed: %s", self.head_id, exc)
                continue
            if not alive:
                log.warning("head %s was removed by an operator; stopping", self.head_id)
                self.stop()
                return
