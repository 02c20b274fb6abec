"""Stopping background tasks without hanging: cancel, then wait a bounded time.

A library that catches ``CancelledError`` during cleanup (redis-py's connection handling can) lets a task
outlive its cancellation; awaiting it unbounded would hang shutdown. Loops should also check a stop flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[object] | asyncio.Task[None]], within_s: float = 2.0
) -> None:
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if not pending:
        return
    done, still = await asyncio.wait(pending, timeout=within_s)
    for t in done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            t.result()
    for t in still:
        log.warning(
            "task %s did not stop within %.1fs of being cancelled; leaving it", t.get_name(), within_s
        )
