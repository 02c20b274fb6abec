"""Long-running services built from a Runtime: a router (with its admin server) and a demo head."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from router_worker.admin import router_app, serve
from router_worker.heap import heap_trimming
from router_worker.loop import tune_gc
from router_worker.metrics import Metrics
from router_worker.pipeline.router import Router
from router_worker.runtime import Runtime
from schemas.envelope import Job


def build_router(rt: Runtime, metrics: Metrics | None = None, with_file: bool = True) -> Router:
    return Router(rt.settings, rt.redis, metrics or Metrics(), rt.audit(with_file))


async def run_router(rt: Runtime, router: Router) -> None:
    """Run a router and, when ROUTER_ADMIN_PORT is set, its admin HTTP server, until stopped."""
    s = rt.settings
    tune_gc(s.gc_young_threshold)
    runner = None
    if s.admin_port:
        app = router_app(router, s)
        runner = await serve(app, s.admin_host, s.admin_port)
    try:
        async with heap_trimming(s.heap_trim_s):
            await router.run()
    finally:
        if runner is not None:
            await runner.cleanup()
        router.audit.close()


def simulated_handler(service_ms: float, jitter_ms: float, fail_rate: float,
                      rng: random.Random) -> Callable[[Job, JobContext], Awaitable[Any]]:  # fmt: skip
    """A demo model: sleeps for the service time (scaled by the job's size hint) and echoes a summary."""

    async def handle(job: Job, ctx: JobContext) -> Any:
        size = 1.0 + (job.estimated_tokens or 0) / 1000.0
        await asyncio.sleep(max(0.0, (service_ms + rng.uniform(-jitter_ms, jitter_ms)) * size) / 1000.0)
        if fail_rate and rng.random() < fail_rate:
            raise RuntimeError("simulated failure")
        return {"head": ctx.head_id, "bytes": len(job.payload) if isinstance(job.payload, bytes | str) else 0}

    return handle


def build_worker(rt: Runtime, config: WorkerConfig, service_ms: float = 10.0, jitter_ms: float = 2.0,
                 fail_rate: float = 0.0, seed: int | None = None) -> ModelWorker:  # fmt: skip
    handler = simulated_handler(service_ms, jitter_ms, fail_rate, random.Random(seed))
    return ModelWorker(rt.settings, rt.redis, config, handler, audit=rt.audit(with_file=False))


async def until_signalled(*stoppers: Callable[[], None]) -> asyncio.Event:
    """Install SIGINT/SIGTERM handlers that call the stoppers; returns the event they set."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stopped.set()
        for stop in stoppers:
            stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    return stopped
