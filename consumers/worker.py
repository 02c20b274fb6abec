"""The model-worker SDK: one head of a model, serving the jobs the router addresses to its partition.

A ``ModelWorker`` claims a partition of its model's topic in Redis, registers its head, heartbeats (load,
latency, learned profile), runs your handler on up to ``capacity`` jobs at once with a fixed pool of
coroutines (never a task per job), and publishes a completion record to ``router.results`` or the job's
``reply_to``.

What it commits. A fetched record is *finished* only when one of these was acknowledged by the broker:

- its completion record (the serving coroutine awaits its own send, never the fetch loop);
- its nack: the record handed back to the routers' retry tier for its next attempt (a handler that raised or
  refused the job, a completion that could not be sent, any exception in the SDK's own code, or shutdown);
- its dead letter (a job this head can not decode, or a record no topic would take).

The committed offset is the lowest unfinished offset (:class:`OffsetTracker`), committed every 200 ms and at
shutdown. A record whose nack could not be published stays unfinished: nothing past it is committed, so the
next head on the partition reads it again.

Shutdown (:meth:`ModelWorker.stop`): fetching stops; handlers already running get up to
``shutdown_timeout_s`` to finish; whatever is still unfinished then (cancelled handlers and records fetched
but never started) is nacked to retry tier 1 (reason ``head_shutdown: <head>``, no back-off); what is finished
is committed; the head deregisters. The heartbeat keeps running until then, so a draining head is not taken
for dead.

Losing the partition. A heartbeat that finds the head's registration gone (an operator or a reaper removed
it) stops the head as above, except that the final commit never moves the group's offset backwards (a reaper
may have committed past it). A heartbeat that finds another owner in the head's partition slot stops it at
once, with an error: two heads serving one partition deliver every job twice. Then nothing is nacked and
nothing committed: the new owner reads from the committed offset, which never passed an unfinished record.
Commits also pause whenever the last good heartbeat is older than the head TTL (a process that was paused).

Gaps: the first fetch starts at :func:`~router_worker.pipeline.gaps.start_offset`, and every fetch goes
through a :class:`~router_worker.pipeline.gaps.GapGuard` (see ``router_worker/pipeline/gaps.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from router_worker.audit import AuditSink, audit_record
from router_worker.clock import now_ms
from router_worker.core.adaptive import ProfileLearner, job_size
from router_worker.pipeline.fault_headers import BUSY, refusal_count, with_excluded, with_refusals
from router_worker.pipeline.gaps import RETRY_MS, GapGuard, seek_to_gap, start_offset
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.pipeline.messages import (
    H_ATTEMPT,
    H_DECIDED_AT,
    header_int,
    retry_headers,
)
from router_worker.pipeline.publish import RetryBudget, Send, describe, publish, publish_dead_letter
from router_worker.pipeline.topology import topic_partitions
from router_worker.settings import Settings
from router_worker.state.breakers import BreakerStore
from router_worker.state.heads import HeadRecord, HeadRegistry, HeadStats
from router_worker.state.inflight import InflightChanges
from router_worker.state.keys import Keys
from router_worker.tasks import cancel_and_wait
from router_worker.topics import Topics
from schemas.envelope import MSGPACK, EnvelopeError, Job, content_type_of, decode_job

log = logging.getLogger(__name__)

"""Bytes of an unpublishable record kept in its dead letter (the router keeps as many)."""
PUBLISH_ERROR = "publish_error"
"""The dead-letter reason of a record no topic would take (``DeadLetterReason.PUBLISH_ERROR``)."""
COMMIT_EVERY_S = 0.2

_REMOVED = "removed"
_SLOT_LOST = "slot_lost"


BREAKER_REPORT_S = 0.2
"""How often a head adds its successes and failures to its circuit breaker's counts."""


class JobRefused(Exception):
    """Raised by a handler that will not serve a job here (``busy``, ``unsupported``): the job goes back to the
    routers for its next attempt, and this head is excluded from it while another head can take it. A refusal
    does not count against the head's circuit breaker; a failure (any other exception, a timeout) does.

    ``busy`` is a wait, not a failure: the job waits its retry tier's back-off and its ``x-route-refusals``
    grows instead of its counted attempts (routers dead-letter it as ``no_capacity`` only past
    ``ROUTER_MAX_REFUSALS`` refusals). Any other reason (``unsupported``: another head may take it) goes back
    at once and counts toward ``ROUTER_MAX_ATTEMPTS``."""

    def __init__(self, reason: str = "busy", detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


@dataclass(slots=True)
class _Done:
    """A job whose handler finished, waiting for its completion record to be acknowledged."""

    rec: Any
    job: Job
    ctx: JobContext
    status: str
    result: Any
    error: str | None
    service_ms: float


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
    job_timeout_s: float | None = None
    """A handler still running after this long fails the job (completion timeout: a nack, and a failure
    counted against the head's circuit breaker). None: no limit."""

    def resolved_head_id(self) -> str:
        return self.head_id or f"{self.model_id}-{self.region}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class OffsetTracker:
    """Offsets of one partition fetched but not finished; the committable offset is the lowest of them, or
    the one after the last fetched when every fetched offset is finished (-1: nothing fetched yet).

    Offsets must be started in increasing order (as a partition is read); they may finish in any order.
    """

    pending: set[int] = field(default_factory=set)
    next_offset: int = -1
    committed: int = -1
    """The last offset committed (kept by the caller)."""

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
    """Completion records no topic would take (the job was served; an error record or a dead letter said so)."""
    released: int = 0
    """Finished jobs not yet released from the shared in-flight count."""
    fetched: int = 0
    """Records admitted from the partition (each offset once)."""
    nacked: int = 0
    """Records handed back to the retry tiers (failed handlers, SDK errors, shutdown)."""
    dead_lettered: int = 0
    unsettled: int = 0
    """Records whose nack or dead letter was not acknowledged: left uncommitted for the next head."""
    refused: int = 0
    """Jobs the handler refused (busy, unsupported): handed back at once, this head excluded."""
    timeouts: int = 0
    """Handlers that ran past ``job_timeout_s``."""


AUDIT_WAITING_MAX = 10_000
"""Heads' audit records waiting for Redis at most (each is in the audit file already)."""


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
        self._settle_q: asyncio.Queue[_Done] = asyncio.Queue(maxsize=config.capacity * 4)
        self._released_early: set[int] = set()
        """Offsets whose in-flight count was released when their handler finished (before settling)."""
        """Jobs whose handler finished, waiting for their completion record's acknowledgement."""
        self._audit_waiting: deque[bytes] = deque(maxlen=AUDIT_WAITING_MAX)
        self._audit_publishing: asyncio.Task[None] | None = None
        self._tracker = OffsetTracker()
        self._open: dict[int, Any] = {}
        """Records fetched and not finished, by offset: what shutdown nacks."""
        self._producer: AIOKafkaProducer | None = None
        self.instance = uuid.uuid4().hex[:12]
        """This process's token: its slot holds ``head_id@instance``, so a second process started with the
        same head id can neither register while this one lives nor share its partition."""
        self._changes = InflightChanges(
            redis, Keys(settings.redis_prefix), f"head:{self.head_id}@{self.instance}"
        )
        self._release_failing = False
        self._release_retry: tuple[int, int] | None = None
        self._beat_failing = False
        self._budget = RetryBudget()
        self._lost: str | None = None
        """Why the head may no longer serve its partition: removed, or its slot taken by another head."""
        self._last_beat = 0.0
        """time.monotonic() of the last heartbeat Redis accepted (or of the registration)."""
        self.breakers = BreakerStore(redis, Keys(settings.redis_prefix))
        self._outcomes = [0, 0]
        """Successes and failures not yet added to this head's circuit breaker."""

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

    # --- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        s, c = self.s, self.config
        # Every topic this head writes: results, and (as the routers create them) retry tiers and dead letters.
        wanted = [
            (self.topic, s.model_partitions),
            (self.topics.results, s.requests_partitions),
            (self.topics.dlq, 1),
        ]
        wanted += [(self.topics.retry(i + 1), s.requests_partitions) for i in range(len(s.retry_backoff_ms))]
        await ensure_topics(s, wanted)
        # A topic created earlier (by another deployment, with fewer partitions) bounds the slots: claim only
        # a partition it really has, or the routers could never address this head.
        try:
            real = await topic_partitions(s, self.topic)
        except Exception as exc:
            log.warning("head %s: partition count of %s not read (%s); assuming %d", self.head_id, self.topic,
                        exc, s.model_partitions)  # fmt: skip
            real = None
        await self.registry.assert_free(self.head_id, self.instance)
        preferred = c.partition
        if preferred is None:  # a restart takes its partition back, and with it what it left unfinished there
            preferred = await self.registry.previous_partition(self.head_id, self.topic)
            if preferred is not None and not 0 <= preferred < (real or s.model_partitions):
                preferred = None
        self.partition = await self.registry.claim_partition(self.head_id, self.topic, s.model_partitions,
                                                             preferred, valid_partitions=real,
                                                             instance=self.instance)  # fmt: skip
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
        await self.registry.register(record, slot_topic=self.topic, instance=self.instance)
        self._last_beat = time.monotonic()
        if self.audit:
            await self.audit.emit("head_registered", self.head_id, head_id=self.head_id, model_id=c.model_id,
                                  region=c.region, partition=self.partition, actor="worker")  # fmt: skip
        pool = [asyncio.create_task(self._serve(), name=f"serve-{i}") for i in range(c.capacity)]
        pool.append(asyncio.create_task(self._settle_loop(), name="settle"))
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        reporter = asyncio.create_task(self._breaker_loop(), name="breaker")
        releaser = asyncio.create_task(self._release_loop(), name="release")
        fetch = asyncio.create_task(self._fetch_loop(consumer, tp), name="fetch")
        stopped = asyncio.create_task(self._stop.wait(), name="stopped")
        self.ready.set()
        try:
            await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stop()
            self.ready.clear()
            # A fetch loop blocked on a full queue is cancelled there: its record is in _open, nacked below.
            await cancel_and_wait((fetch, stopped))
            try:
                await self._shutdown(consumer, tp, pool)
            finally:
                await cancel_and_wait((beat, releaser, reporter))
                with contextlib.suppress(Exception):
                    await self._report_outcomes()
                with contextlib.suppress(Exception):
                    await self.registry.remove(self.head_id, actor="worker", instance=self.instance,
                                               own_slot=(self.topic, self.partition))  # fmt: skip
                if self._audit_publishing is not None:  # the last nacks' records, unless Redis hangs
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._audit_publishing, 2.0)
                if self.audit:
                    with contextlib.suppress(Exception):
                        await self.audit.emit(
                            "head_removed", self.head_id, head_id=self.head_id, actor="worker"
                        )
                with contextlib.suppress(Exception):
                    await consumer.stop()
                with contextlib.suppress(Exception):
                    await producer.stop()
        failure = fetch.exception() if fetch.done() and not fetch.cancelled() else None
        if failure is not None:
            raise failure

    async def _shutdown(self, consumer: AIOKafkaConsumer, tp: TopicPartition, pool: list[asyncio.Task[None]]
                        ) -> None:  # fmt: skip
        """Let running handlers finish (bounded), nack the rest, commit what is finished."""
        while not self._queue.empty():  # fetched, never started: stays in _open, nacked below
            self._queue.get_nowait()
        serving, settling = pool[:-1], pool[-1:]
        for _ in serving:
            self._queue.put_nowait(None)
        grace = 0.0 if self._lost == _SLOT_LOST else self.s.shutdown_timeout_s
        if grace > 0:
            deadline = time.monotonic() + grace
            await asyncio.wait(serving, timeout=grace)
            with contextlib.suppress(
                TimeoutError
            ):  # completions already handed over: let them be acknowledged
                await asyncio.wait_for(self._settle_q.join(), max(0.0, deadline - time.monotonic()))
        await cancel_and_wait(pool)
        del settling
        if self._lost == _SLOT_LOST:
            # Another head owns the partition and reads it from the committed offset, which never passed an
            # unfinished record: nacking or committing now would only duplicate its work or rewind it.
            if self._open:
                log.error("head %s: %d unfinished jobs of %s[%d] left to the partition's new owner", self.head_id,
                          len(self._open), tp.topic, tp.partition)  # fmt: skip
            return
        if self._open:
            budget = RetryBudget(max_s=max(1.0, min(30.0, self.s.shutdown_timeout_s)))
            records = sorted(self._open.values(), key=lambda r: r.offset)
            await self._nack_many(records, f"head_shutdown: {self.head_id}", budget, backoff=False)
        await self._commit(consumer, tp, final=True)

    # --- fetching and committing -----------------------------------------------------------------------

    async def _fetch_loop(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        gaps = GapGuard(self.s.gap_wait_ms)
        start = await start_offset(consumer, tp)
        gaps.expect(tp, start)
        if start is not None:
            consumer.seek(tp, start)
        last_commit = time.monotonic()
        while not self._stop.is_set():
            batch = await consumer.getmany(tp, timeout_ms=100, max_records=self.config.capacity)
            records, gap_at = gaps.admit(tp, batch.get(tp, ()), now_ms())
            self.stats.fetched += len(records)
            for rec in records:  # tracked before any is queued: a stop while queueing nacks them all
                self._open[rec.offset] = rec
                self._tracker.started(rec.offset)
            for rec in records:
                await self._queue.put(rec)  # blocks when the pool is full: natural back-pressure
            if gap_at is not None:  # a routed job is not visible yet: read again from it (see gaps.py)
                seek_to_gap(consumer, gaps, tp, gap_at)
                await asyncio.sleep(RETRY_MS / 1000)
            if time.monotonic() - last_commit > COMMIT_EVERY_S:
                await self._commit(consumer, tp)
                last_commit = time.monotonic()

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, final: bool = False) -> None:
        tracker = self._tracker
        off = tracker.committable()
        if off < 0 or off <= tracker.committed or self._lost == _SLOT_LOST:
            return
        try:
            if final:
                # A reaper may have read this partition for us and committed past us: never move it back.
                current = await consumer.committed(tp)
                if current is not None and current >= off:
                    return
            elif self._lost is not None or time.monotonic() - self._last_beat > self.s.head_ttl_ms / 1000:
                return  # the head may have been taken for dead (a paused process): wait for a heartbeat
            await consumer.commit({tp: off})
            tracker.committed = off
        except KafkaError as exc:
            log.warning("head %s: commit of %s[%d] at %d failed: %s", self.head_id, tp.topic, tp.partition, off,
                        exc)  # fmt: skip

    def _finish(self, offset: int) -> None:
        """The record at ``offset`` is settled (idempotent)."""
        self._tracker.finished(offset)
        if self._open.pop(offset, None) is not None and offset not in self._released_early:
            self.stats.released += 1
        self._released_early.discard(offset)

    # --- serving ---------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            rec = await self._queue.get()
            if rec is None:
                return
            if self._stop.is_set():  # stopping: start nothing new (it stays open and shutdown nacks it)
                continue
            try:
                settled = await self._handle(rec)
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise
                settled = False  # a stray cancellation: the record stays open and is nacked at shutdown
            except Exception as exc:  # the SDK's own failure: the job goes back to the routers, never lost
                log.exception("head %s failed handling offset %d; nacking it", self.head_id, rec.offset)
                try:
                    settled = await self._nack(rec, header_int(rec.headers, H_ATTEMPT, 1),
                                               f"head_sdk_error: {describe(exc)}")  # fmt: skip
                except Exception:
                    log.exception("head %s: nack of offset %d failed", self.head_id, rec.offset)
                    settled = False
            if settled:
                self._finish(rec.offset)
            # else: left unfinished (nothing past it is committed) and nacked again at shutdown

    async def _handle(self, rec: Any) -> bool:
        """Serve one record; True once its completion, nack or dead letter was acknowledged."""
        st = self.stats
        started = now_ms()
        load = st.inflight / self.config.capacity
        ctx = JobContext(self.head_id, rec.partition, rec.offset, header_int(rec.headers, H_ATTEMPT, 1),
                         header_int(rec.headers, H_DECIDED_AT, started), tuple(rec.headers or ()))  # fmt: skip
        try:
            job = decode_job(rec.value, content_type_of(rec.headers))
        except EnvelopeError as exc:  # the router validated it, so this is a foreign writer: dead-letter it
            log.warning("head %s: undecodable job at offset %d: %s", self.head_id, rec.offset, exc)
            st.failed += 1
            return await self._dead_letter(rec, exc.reason.value, exc.detail, ctx.attempt)
        st.inflight += 1
        t0 = time.perf_counter()
        refused: JobRefused | None = None
        try:
            if self.config.job_timeout_s is None:
                result = await self.handler(job, ctx)
            else:
                async with asyncio.timeout(self.config.job_timeout_s):
                    result = await self.handler(job, ctx)
            status, error = "ok", None
        except JobRefused as exc:
            refused = exc
            result, status, error = None, "refused", str(exc)
        except TimeoutError as exc:
            if self.config.job_timeout_s is None:  # the handler's own timeout: a failure like any other
                result, status, error = None, "error", f"{type(exc).__name__}: {exc}"
            else:
                st.timeouts += 1
                result, status, error = (
                    None,
                    "error",
                    f"completion timeout after {self.config.job_timeout_s} s",
                )
        except asyncio.CancelledError as exc:
            if _being_cancelled():  # our own shutdown: let it through
                raise
            # The handler's library cancelled its own work (grpc.aio, anyio): a failure of this job, not ours.
            result, status, error = None, "error", f"cancelled by the handler: {describe(exc)}"
        except (KeyboardInterrupt, SystemExit):
            raise
        except (
            BaseException
        ) as exc:  # an Exception, or pytest's Failed, gevent's GreenletExit: the job failed
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
            self._outcomes[0] += 1
        elif refused is not None:
            st.refused += 1
            busy = refused.reason == BUSY
            return await self._nack(rec, ctx.attempt, f"head_refused: {error}", exclude=True, backoff=busy,
                                    busy=busy)  # fmt: skip
        else:
            st.failed += 1
            self._outcomes[1] += 1
            if self.config.retry_on_error:
                return await self._nack(rec, ctx.attempt, f"head_error: {error or 'error'}", exclude=True)
        # The slot is free for the next job now; the completion is acknowledged in batches by the settler, and
        # the offset is finished (committable) only then.
        # The head's capacity is free again: release the job from the shared in-flight count now, not when the
        # completion is acknowledged (routers would see the head busy for a broker round trip longer).
        self._released_early.add(rec.offset)
        self.stats.released += 1
        await self._settle_q.put(_Done(rec, job, ctx, status, result, error, service_ms))
        return False

    # --- publishing: completions, nacks, dead letters -----------------------------------------------------

    async def _settle_loop(self) -> None:
        """Publish finished jobs' completion records in batches, one wait for the acknowledgements of all;
        finish each record once its completion is acknowledged (or nacked, or dead-lettered)."""
        q = self._settle_q
        while True:
            done = [await q.get()]
            while not q.empty() and len(done) < 500:
                done.append(q.get_nowait())
            try:
                assert self._producer is not None
                sends = [self._completion(d) for d in done]
                report = await publish(self._producer, sends, self._budget)
                acked = {id(x) for x in report.acked}
                for d, send in zip(done, sends, strict=True):
                    if id(send) in acked:
                        self._finish(d.rec.offset)
                    elif await self._complete(d.rec, d.job, d.ctx, d.status, d.result, d.error, d.service_ms):
                        self._finish(
                            d.rec.offset
                        )  # sent again one by one: refused results, nacks, dead letters
            except Exception as exc:  # the SDK's own failure: the jobs go back to the routers, never lost
                log.exception(
                    "head %s: settling %d completions failed; nacking them", self.head_id, len(done)
                )
                for d in done:
                    if d.rec.offset not in self._open:
                        continue
                    try:
                        if await self._nack(d.rec, d.ctx.attempt, f"head_sdk_error: {describe(exc)}"):
                            self._finish(d.rec.offset)
                    except Exception:  # left open: nacked at shutdown, never committed past
                        log.exception("head %s: nack of offset %d failed", self.head_id, d.rec.offset)
            finally:
                for _ in done:
                    q.task_done()

    def _completion(self, d: _Done) -> Send:
        value = self._pack_completion(
            self._completion_doc(d.job, d.ctx, d.status, d.result, d.error, d.service_ms)
        )
        return Send(d.job.reply_to or self.topics.results, value, d.job.job_id.encode(), None,
                    [("content-type", MSGPACK.encode())])  # fmt: skip

    def _completion_doc(self, job: Job, ctx: JobContext, status: str, result: Any, error: str | None,
                        service_ms: float) -> dict[str, Any]:  # fmt: skip
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
        return doc

    @staticmethod
    def _pack_completion(doc: dict[str, Any]) -> bytes:
        """The record's bytes; a result MessagePack can not carry is replaced by an error saying so."""
        try:
            return msgpack.packb(doc, use_bin_type=True, default=str)  # type: ignore[no-any-return]
        except (TypeError, ValueError) as exc:
            doc.pop("result", None)
            doc["error"] = f"result not serialisable: {exc}"
            return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]

    async def _complete(self, rec: Any, job: Job, ctx: JobContext, status: str, result: Any, error: str | None,
                        service_ms: float) -> bool:  # fmt: skip
        """Publish the completion record and wait for its acknowledgement (this coroutine only)."""
        assert self._producer is not None
        doc = self._completion_doc(job, ctx, status, result, error, service_ms)
        value = self._pack_completion(doc)
        topic = job.reply_to or self.topics.results
        key = job.job_id.encode()
        headers: list[tuple[str, bytes | None]] = [("content-type", MSGPACK.encode())]
        report = await publish(self._producer, [Send(topic, value, key, None, headers)], self._budget)
        if report.acked:
            return True
        if report.unsent:  # the broker could not be reached in time: hand the job back rather than lose it
            why = describe(report.unsent[0].error or Exception())
            log.warning("head %s: completion of %s not sent (%s); nacking it", self.head_id, job.job_id, why)
            return await self._nack(rec, ctx.attempt, f"head_completion_unsent: {why}")
        # Refused for good (a result too large, a reply_to the broker refuses): say so without the result.
        why = describe(report.fatal[0].error or Exception())
        self.stats.completions_lost += 1
        log.warning(
            "head %s: completion record of %s refused by %s: %s", self.head_id, job.job_id, topic, why
        )
        if "result" in doc:
            doc.pop("result")
            doc["status"] = "error"
            doc["error"] = f"completion record not publishable: {why}"[:1000]
            slim = msgpack.packb(doc, use_bin_type=True, default=str)
            report = await publish(self._producer, [Send(topic, slim, key, None, headers)], self._budget)
            if report.acked:
                return True
            if report.unsent:
                return await self._nack(rec, ctx.attempt, f"head_completion_unsent: {why}")
            why = describe(report.fatal[0].error or Exception())
        return await self._dead_letter(rec, PUBLISH_ERROR, f"completion record to {topic} refused: {why}",
                                       ctx.attempt)  # fmt: skip

    async def _nack(self, rec: Any, attempt: int, reason: str, *, exclude: bool = False,
                    backoff: bool = True, busy: bool = False) -> bool:  # fmt: skip
        """Hand one job back to the routers through the retry tier for its next attempt (``exclude``: and tell
        them to pass over this head for it; ``busy``: a busy refusal, counted in ``x-route-refusals``)."""
        return rec.offset in await self._nack_many([rec], reason, self._budget, backoff=backoff, attempt=attempt,
                                                   exclude=exclude, busy=busy)  # fmt: skip

    async def _nack_many(self, records: Sequence[Any], reason: str, budget: RetryBudget, *, backoff: bool,
                         attempt: int | None = None, exclude: bool = False,
                         busy: bool = False) -> set[int]:  # fmt: skip
        """Nack ``records`` (each with the attempt it was routed as, unless given); finish and return the
        offsets settled (nack, or for a record the retry tier refuses for good, dead letter acknowledged).

        ``backoff``: wait the tier's back-off (a failed job) or none (a job this head merely gives back).
        ``exclude``: add this head to the job's ``x-route-exclude`` (it refused or failed the job).
        ``busy``: add one to the job's ``x-route-refusals`` (a wait the routers do not count as an attempt)."""
        assert self._producer is not None
        delays = self.s.retry_backoff_ms
        now = now_ms()
        sends: list[Send] = []
        by_send: dict[int, Any] = {}
        audit: dict[int, dict[str, Any]] = {}
        for rec in records:
            n = attempt if attempt is not None else header_int(rec.headers, H_ATTEMPT, 1)
            tier = min(max(1, n), len(delays)) if backoff else 1
            not_before = now + delays[tier - 1] if backoff else now
            headers = retry_headers(
                rec.headers, reason[:200], rec.topic, rec.partition, rec.offset, n, not_before
            )
            if exclude:
                headers = with_excluded(headers, self.head_id)
            if busy:
                headers = with_refusals(headers, refusal_count(rec.headers) + 1)
            key = rec.key if (rec.key is not None or rec.value is not None) else b""
            send = Send(self.topics.retry(tier), rec.value, key, None, headers)
            by_send[id(send)] = rec
            audit[id(send)] = {"reason": reason[:200], "attempt": n, "tier": tier}
            sends.append(send)
        report = await publish(self._producer, sends, budget)
        settled = {by_send[id(x)].offset for x in report.acked}
        self.stats.nacked += len(report.acked)
        self._audit("retry", [(by_send[id(x)], audit[id(x)]) for x in report.acked])
        if report.fatal:
            for x in report.fatal:
                rec = by_send[id(x)]
                why = describe(x.error or Exception())
                log.warning("head %s: retry tier refused offset %d (%s); dead-lettering it", self.head_id,
                            rec.offset, why)  # fmt: skip
                n = attempt if attempt is not None else header_int(rec.headers, H_ATTEMPT, 1)
                if await self._dead_letter(rec, PUBLISH_ERROR, f"nack refused: {why}", n):
                    settled.add(rec.offset)
        if report.unsent:
            self.stats.unsettled += len(report.unsent)
            first = min(by_send[id(x)].offset for x in report.unsent)
            log.error("head %s: %d nacks of %s not acknowledged (%s); nothing from offset %d on is committed, so "
                      "the partition's next reader serves them", self.head_id, len(report.unsent), self.topic,
                      describe(report.unsent[0].error or Exception()), first)  # fmt: skip
        for off in settled:
            self._finish(off)
        return settled

    def _audit(self, event: str, settled: Sequence[tuple[Any, dict[str, Any]]]) -> None:
        """One audit record per job this head gave back (``retry``) or dead-lettered, once acknowledged: the
        routers record their own decisions, not what a head does with a job. Written to the file now and
        published by one background task, so a Redis that hangs never holds a serving slot; while it hangs,
        the oldest of at most ``AUDIT_WAITING_MAX`` records waiting are dropped (the file keeps them)."""
        if self.audit is None or not settled:
            return
        out = []
        for rec, fields in settled:
            try:
                job = decode_job(rec.value, content_type_of(rec.headers))
                job_id, model_type = job.job_id, job.model_type
            except Exception:  # a record no router wrote: its place says which it is
                job_id, model_type = None, None
            out.append(audit_record(event, self.head_id, job_id=job_id, model_type=model_type, head_id=self.head_id,
                                    topic=rec.topic, partition=rec.partition, offset=rec.offset, **fields))  # fmt: skip
        try:
            self._audit_waiting.extend(self.audit.write_file(out))
        except Exception:  # the file is the audit's, not the job's: a full disk must not fail a nack
            log.exception("head %s: writing audit records failed", self.head_id)
            return
        if self._audit_publishing is None or self._audit_publishing.done():
            self._audit_publishing = asyncio.create_task(self._publish_audit())

    async def _publish_audit(self) -> None:
        assert self.audit is not None
        while self._audit_waiting:
            lines = list(self._audit_waiting)
            self._audit_waiting.clear()
            await self.audit.publish_lines(lines)

    async def _dead_letter(self, rec: Any, reason: str, detail: str, attempt: int) -> bool:
        """Dead-letter one record (original bytes, truncated past the producer's limit); True (and the record
        finished) once acknowledged."""
        assert self._producer is not None
        if await publish_dead_letter(self._producer, self.topics.dlq, rec, reason, detail, attempt,
                                     limit=self.s.kafka_max_message_bytes, keep=self.s.dlq_keep_bytes,
                                     budget=self._budget):  # fmt: skip
            self.stats.dead_lettered += 1
            self._finish(rec.offset)
            self._audit(
                "dead_letter", [(rec, {"reason": reason, "detail": detail[:200], "attempt": attempt})]
            )
            return True
        self.stats.unsettled += 1
        log.error("head %s: dead letter of offset %d (%s) not acknowledged; it stays uncommitted", self.head_id,
                  rec.offset, reason)  # fmt: skip
        return False

    # --- background loops ------------------------------------------------------------------------------

    async def _release_loop(self) -> None:
        """Give finished jobs back to the shared in-flight count often, so routers see capacity return fast."""
        interval = self.s.head_release_ms / 1000
        while True:  # until cancelled, after shutdown's nacks
            await asyncio.sleep(interval)
            st = self.stats
            if self._release_retry is None:
                if not st.released:
                    continue
                self._release_retry = (
                    self._changes.next_seq(),
                    st.released,
                )  # retried as it is until it lands
                st.released = 0
            seq, n = self._release_retry
            try:
                await self.registry.release(self.head_id, n, self._changes, seq)
                self._release_retry = None
            except Exception as exc:
                if not self._release_failing:  # once per outage, not every few milliseconds
                    log.warning("head %s: release failed (kept, retried until Redis answers): %s", self.head_id,
                                exc)  # fmt: skip
                self._release_failing = True
                await asyncio.sleep(min(1.0, 100 * interval))
                continue
            if self._release_failing:
                log.warning("head %s: releases reach Redis again", self.head_id)
                self._release_failing = False

    async def _breaker_loop(self) -> None:
        """Add this head's successes and failures to its circuit breaker's shared counts, a few times a second
        (the routers judge them); kept and sent again while Redis does not answer."""
        while True:
            await asyncio.sleep(BREAKER_REPORT_S)
            with contextlib.suppress(Exception):
                await self._report_outcomes()

    async def _report_outcomes(self) -> None:
        ok, err = self._outcomes
        if not ok and not err:
            return
        await self.breakers.count({self.head_id: (ok, err)}, now_ms())
        self._outcomes[0] -= ok
        self._outcomes[1] -= err

    async def _heartbeat_loop(self) -> None:
        """Heartbeat until cancelled (through shutdown too, so a draining head is not reaped meanwhile)."""
        interval = self.s.head_heartbeat_ms / 1000
        slot = (self.topic, self.partition)
        while True:
            await asyncio.sleep(interval)
            st = self.stats
            stats = HeadStats(inflight=st.inflight, latency_ms=st.latency_ewma_ms, completed=st.completed,
                              cache_hit_rate=st.cache_hit_rate, quota_used=st.quota_used,
                              profile=self.learner.profile() if self.learner.n else None)  # fmt: skip
            try:
                result = await self.registry.heartbeat(self.head_id, stats, slot, self.instance)
            except Exception as exc:
                if not self._beat_failing:
                    log.warning("head %s: heartbeat failed (retrying every beat): %s", self.head_id, exc)
                self._beat_failing = True
                continue
            self._beat_failing = False
            if result:
                self._last_beat = time.monotonic()
                continue
            # Falsy: removed (False, or HeartbeatResult.REMOVED) or another head owns the slot (SLOT_LOST).
            if getattr(result, "value", None) == _SLOT_LOST:
                self._lost = _SLOT_LOST
                log.error("head %s: another head (or a reaper) owns partition %d of %s now; stopping at once "
                          "(serving a partition another head owns delivers every job twice)", self.head_id,
                          self.partition, self.topic)  # fmt: skip
            else:
                self._lost = self._lost or _REMOVED
                log.warning("head %s was removed (by an operator, or reaped after its heartbeat lapsed); "
                            "stopping", self.head_id)  # fmt: skip
            self.stop()
            return


def _being_cancelled() -> bool:
    """Whether this task itself is being cancelled (not a CancelledError raised by code it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
