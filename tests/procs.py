"""Process harness for the fault tests: routers and heads in their own processes (the real CLI), a steady job
stream, a ledger of what came out (completion records and dead letters), and a Redis server of the test's own
that can be stopped and started again with its data.

The processes, the Redis server and the ledger live in the package (``router_worker.harness``: the soak
benchmark uses them too) and are re-exported here; the test-only parts (time limits, the job stream, committed
offsets, the audit file) stay in this module.

    async with Procs(settings, tmp_path) as procs:
        r1, r2 = await procs.start_routers(2)
        h1 = await procs.start_head("m", capacity=16, service_ms=5)
        async with Ledger(settings) as ledger, JobStream(settings, "m", 1000, rate=500) as stream:
            await stream.wait()
            await ledger.wait_delivered(stream.ids, 60)
            await ledger.settle()
        report = ledger.report(stream.ids)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from aiokafka import TopicPartition

from producers.producer import JobProducer
from router_worker.harness.ledger import DeadLetter, Ledger, Report
from router_worker.harness.procs import (
    LOG_TAIL,
    HarnessError,
    Proc,
    Procs,
    RedisServer,
    poll,
    settings_env,
)
from router_worker.localstack import free_port
from router_worker.pipeline.kafka import make_consumer
from router_worker.settings import Settings
from schemas.envelope import MSGPACK

__all__ = [
    "LOG_TAIL",
    "DeadLetter",
    "HarnessError",
    "JobStream",
    "Ledger",
    "Proc",
    "Procs",
    "RedisServer",
    "Report",
    "committed_offsets",
    "free_port",
    "poll",
    "read_audit",
    "settings_env",
    "sha256_hex",
    "time_limit",
    "wait_committed",
]

P = ParamSpec("P")
T = TypeVar("T")


# --- guards -------------------------------------------------------------------------------------------------


def time_limit(seconds: float) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Fail an async test that runs longer than ``seconds`` (the harness's teardown still kills everything)."""

    def deco(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            t0 = time.monotonic()
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), seconds)  # type: ignore[arg-type]
            except TimeoutError as exc:
                if time.monotonic() - t0 >= seconds - 0.5:
                    raise AssertionError(f"{fn.__name__} ran past its time limit of {seconds:.0f} s") from exc
                raise

        return wrapper

    return deco


# --- a steady stream of valid jobs ---------------------------------------------------------------------------


class JobStream:
    """Publishes ``count`` valid jobs of ``model`` through the producer SDK at ``rate`` jobs/s (0: at once) in
    the background. Job ids are ``<prefix>-<n>``, all known up front in :attr:`ids`."""

    def __init__(self, settings: Settings, model: str, count: int, rate: float = 0.0, prefix: str = "job",
                 content_type: str = MSGPACK) -> None:  # fmt: skip
        self.s = settings
        self.model = model
        self.rate = rate
        self.ids = [f"{prefix}-{i:06d}" for i in range(count)]
        self.sent = 0
        """Jobs handed to the producer so far."""
        self.started_at = 0.0
        self.finished_at = 0.0
        self._producer = JobProducer(settings, content_type)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="job-stream")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = self.started_at = loop.time()
        n = len(self.ids)
        while self.sent < n:
            due = n if self.rate <= 0 else min(n, int((loop.time() - t0) * self.rate) + 1)
            while self.sent < due:
                await self._producer.submit(self.model, {"n": self.sent}, job_id=self.ids[self.sent])
                self.sent += 1
            if self.sent < n:
                await asyncio.sleep(0.01)
        await self._producer.flush()
        self.finished_at = loop.time()

    async def wait(self, timeout: float = 120.0) -> None:
        """Wait until every job was published and acknowledged (raises what the producer raised)."""
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            raise AssertionError(f"job stream: only {self.sent} of {len(self.ids)} sent in {timeout:.0f} s"
                                 ) from None  # fmt: skip

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.stop(), 10)


# --- offsets and audit ----------------------------------------------------------------------------------------


async def committed_offsets(s: Settings, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The router group's committed offsets (read without joining the group)."""
    consumer = make_consumer(s, group_id=s.group_id)  # never subscribes: reads the group's offsets only
    try:
        await consumer.start()
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        with contextlib.suppress(Exception):  # also after a failed start (a refused login)
            await consumer.stop()


async def wait_committed(s: Settings, expected: Mapping[TopicPartition, int], timeout: float = 20.0
                         ) -> dict[TopicPartition, int | None]:  # fmt: skip
    """Poll the group's committed offsets until they equal ``expected``; returns the last seen."""
    last: dict[TopicPartition, int | None] = {}

    async def equal() -> bool:
        nonlocal last
        last = await committed_offsets(s, expected)
        return all(last.get(tp) == off for tp, off in expected.items())

    await poll(equal, timeout, 0.5)
    return last


def read_audit(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every audit record of the file and its rotated backups, and how many lines did not parse (several
    processes append to one file, so a line may be torn)."""
    base = Path(path)
    files = [*sorted(base.parent.glob(base.name + ".*"), reverse=True), base]
    out: list[dict[str, Any]] = []
    bad = 0
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
    return out, bad


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
