"""The demo the README's first command runs, small, on the session's stack: every job completes once."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from rich.console import Console

from router_worker.demo import run_demo
from router_worker.runtime import Runtime
from router_worker.settings import Settings

pytestmark = pytest.mark.integration


async def test_demo_routes_and_completes_every_job_once(settings: Settings, redis: Redis) -> None:
    console = Console(record=True, width=120)
    out = await run_demo(Runtime(settings, redis, None), jobs=400, routers=2, console=console, rate=2000)
    assert len(out.seen) == 400
    assert out.duplicates == 0
    assert out.errors == 0
    assert set(out.by_model) == {"llama-3.3-70b", "resnet50"}
    assert len(out.by_head) == 5, "every demo head served jobs"
    text = console.export_text()
    assert "all jobs routed and completed exactly once" in text
    assert "end-to-end latency p99" in text
