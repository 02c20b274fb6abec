"""Test helpers that drive real routers, heads and consumers on the embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaTimeoutError
from redis.asyncio import Redis

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.core.breaker import Breaker, BreakerState
from router_worker.metrics import Metrics
from router_worker.pipeline.kafka import make_consumer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.pipeline.router import Router
from router_worker.settings import Settings
from router_worker.state.breakers import BreakerStore, Write
from router_worker.state.keys import Keys
from schemas.envelope import Job


@dataclass
class Served:
    """What heads saw: one entry per delivery."""

    rows: list[tuple[str, str, str, int, dict[str, bytes]]] = field(default_factory=list)
    """(job_id, head_id, model_type, partition, headers)."""
    session_of: dict[str, str | None] = field(default_factory=dict)

    def handler_for(self, delay_s: float = 0.0) -> Callable[[Job, JobContext], Any]:
        async def handle(job: Job, ctx: JobContext) -> Any:
            if delay_s:
                await asyncio.sleep(delay_s)
            self.rows.append((job.job_id, ctx.head_id, job.model_type, ctx.partition, dict(ctx.headers)))
            self.session_of[job.job_id] = job.session_id
            return {"ok": True}

        return handle

    def job_ids(self) -> list[str]:
        return [r[0] for r in self.rows]


def cli_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment for a child process (a CLI command, a router) that joins this test's deployment."""
    env = dict(os.environ)
    env.update(
        ROUTER_KAFKA_BOOTSTRAP_SERVERS=s.kafka_bootstrap_servers or "",
        ROUTER_REDIS_URL=s.redis_url or "",
        ROUTER_TOPIC_PREFIX=s.topic_prefix,
        ROUTER_REDIS_PREFIX=s.redis_prefix,
        ROUTER_GROUP_ID=s.group_id,
        ROUTER_AUDIT_FILE=s.audit_file,
        ROUTER_LOG_LEVEL="WARNING",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def cli(s: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "router_worker.cli", *args], env=cli_env(s), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def make_router(s: Settings, redis: Redis, **kw: Any) -> Router:
    return Router(s, redis, Metrics(), AuditSink(redis, s.audit_channel, s.audit_file), **kw)


def make_worker(s: Settings, redis: Redis, served: Served, model: str, region: str = "default", **kw: Any
                ) -> ModelWorker:  # fmt: skip
    delay = kw.pop("delay_s", 0.0)
    return ModelWorker(s, redis, WorkerConfig(model, region, **kw), served.handler_for(delay))


@contextlib.asynccontextmanager
async def running(*services: Router | ModelWorker) -> AsyncIterator[None]:
    """Run routers and heads as tasks; wait until each is ready; stop them all on exit."""
    tasks = [asyncio.create_task(svc.run()) for svc in services]
    try:
        all_ready = asyncio.create_task(
            asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in services)), 30)
        )
        await asyncio.wait([all_ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t.done():  # a service ended before it was ready: surface why
                all_ready.cancel()
                t.result()
                raise AssertionError(f"{t} ended before it was ready")
        await all_ready
        yield
    finally:
        for svc in services:
            svc.stop()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r


async def wait_until(pred: Callable[[], bool], timeout: float = 75.0, every: float = 0.05) -> None:
    """Poll ``pred`` until it holds. The default outlasts one publish the broker keeps refusing for the producer's
    whole request timeout (30 s; the embedded broker has done so for a topic just created) plus the router's
    reading it again: only a failing test waits this long."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def read_topic(s: Settings, topic: str, expect: int, timeout: float = 20.0) -> list[Any]:
    """Every record of a topic from the beginning, until ``expect`` were read or the time is up."""
    consumer: AIOKafkaConsumer = make_consumer(s, topic, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


async def make_half_open(redis: Redis, s: Settings, head_id: str) -> None:
    """Write ``head_id``'s breaker as half-open with its probes free, as a cool-down that just ended leaves it."""
    keys = Keys(s.redis_prefix)
    now = now_ms()
    half_open = Breaker(state=BreakerState.HALF_OPEN, version=1, since_ms=now, open_until_ms=now)
    won = await BreakerStore(redis, keys).write([Write(head_id, Breaker(), half_open)], keys.events)
    assert won == [True], f"{head_id}'s breaker was not closed"


class FirstSendUnsent:
    """The first publish leaves its first send unsent (a timeout while the broker was away: no head blamed) and
    publishes the rest; every later publish goes to the broker as it is. Install ``publish`` and ``broker_away``
    over ``faults.publish`` and ``faults.broker_answers``."""

    def __init__(self) -> None:
        self.struck = False

    async def publish(self, producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        if self.struck or not sends:
            return await real_publish(producer, sends, budget)
        self.struck = True
        first, rest = sends[0], list(sends[1:])
        first.error = KafkaTimeoutError("this one timed out")
        report = await real_publish(producer, rest, budget) if rest else PublishReport()
        report.unsent.append(first)
        return report

    @staticmethod
    async def broker_away(producer: Any, request_timeout_ms: int) -> bool:
        return False


@dataclass
class UnsentThenRedisAway:
    """Stands in for ``faults.publish`` (with :meth:`broker_away` for ``faults.broker_answers``): the first
    publish holding a send ``pick`` chooses leaves that one unsent (a timeout, no head blamed) and publishes the
    rest on the real broker; then the router's claims and marks go to a Redis that does not answer, until
    :meth:`back`. Set ``router`` before it runs; :meth:`aclose` at the end."""

    pick: Callable[[Sequence[Send]], Send | None]
    router: Any = None
    struck: bool = False
    dead: Redis = field(default_factory=lambda: Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))

    async def publish(self, producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        unsent = None if self.struck else self.pick(sends)
        if unsent is None:
            return await real_publish(producer, sends, budget)
        self.struck = True
        unsent.error = KafkaTimeoutError("this one timed out")
        report = await real_publish(producer, [x for x in sends if x is not unsent], budget)
        report.unsent.append(unsent)
        self.router.marks.redis = self.dead  # Redis goes away for the router's claims and marks
        return report

    @staticmethod
    async def broker_away(producer: Any, request_timeout_ms: int) -> bool:
        return False  # the broker was away a moment too: the timeout blames no head

    def back(self, redis: Redis) -> None:
        self.router.marks.redis = redis

    async def drive(self, s: Settings, redis: Redis, monkeypatch: Any, order: Sequence[str], expect: Sequence[str],
                    *, away_s: float, within_s: float, settle_s: float) -> tuple[Served, Router]:  # fmt: skip
        """Stand in for the broker's publish, send ``order`` on one request partition (one session), run a head
        and a router on the real stack; once a send was left unsent, keep Redis away for ``away_s`` (the
        partition is read again meanwhile), then wait up to ``within_s`` for every job of ``expect`` and
        ``settle_s`` more (a duplicate would arrive by then). Returns what the head served, and the router."""
        import router_worker.pipeline.faults as faults_module

        monkeypatch.setattr(faults_module, "publish", self.publish)
        monkeypatch.setattr(faults_module, "broker_answers", self.broker_away)
        served = Served()
        worker = make_worker(s, redis, served, "m", head_id="h", capacity=1000)
        router = self.router = make_router(s, redis)
        try:
            async with running(worker):
                async with JobProducer(s) as p:
                    for job_id in order:
                        await p.submit("m", job_id, job_id=job_id, session_id="one-partition")
                async with running(router):
                    await wait_until(lambda: self.struck, timeout=30)
                    await asyncio.sleep(away_s)
                    self.back(redis)
                    with contextlib.suppress(AssertionError):  # the caller's assertions say what is missing
                        await wait_until(lambda: set(served.job_ids()) >= set(expect), timeout=within_s)
                    await asyncio.sleep(settle_s)
        finally:
            await self.aclose()
        return served, router

    async def aclose(self) -> None:
        await self.dead.aclose()
