"""Give the heap's free pages back to the operating system now and then (glibc only; elsewhere nothing).

A router's large buffers come and go with its load: fetch responses (up to ``kafka_fetch_max_bytes``, one per
partition with records not yet taken), the record batches cut from them, a batch's encoded sends and audit
lines. Once one such buffer has been freed, glibc raises its mmap threshold and serves later ones from the
heap, and the heap keeps the pages they leave behind. RSS then shows the busiest moment since start, not what
is in use: in a 10-minute soak on two cores whose retry tiers backed up, each router went from 75 to 217-306 MiB
while Python's own live objects stayed under 80 MiB. ``malloc_trim(0)`` hands every whole free page back, so
RSS follows the live set and falls back after a backlog. It runs on the event loop's thread and holds glibc's
arena lock while it walks the free chunks: 0.3-1.8 ms per call in a router's soak, tens of milliseconds on a
deliberately fragmented heap of 300 MiB; a slow one is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable

from router_worker.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def heap_trimmer() -> Callable[[], bool] | None:
    """glibc's ``malloc_trim(0)`` (True when it released memory); None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):  # musl and other C libraries: nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


SLOW_TRIM_S = 0.05
"""A trim that blocked the event loop longer than this is logged."""


async def _trim_every(interval_s: float, trim: Callable[[], bool]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        t0 = time.perf_counter()
        try:
            trim()
        except Exception:  # never let memory housekeeping take the process down
            log.exception("returning free heap memory failed; not trying again")
            return
        took = time.perf_counter() - t0
        if took > SLOW_TRIM_S:
            log.warning("returning free heap memory blocked the event loop for %.0f ms", took * 1000)


@contextlib.asynccontextmanager
async def heap_trimming(interval_s: float) -> AsyncIterator[bool]:
    """While the block runs, trim the heap every ``interval_s`` seconds (0: never). Yields whether it does."""
    trim = heap_trimmer() if interval_s > 0 else None
    if trim is None:
        yield False
        return
    task = asyncio.create_task(_trim_every(interval_s, trim), name="heap-trim")
    try:
        yield True
    finally:
        await cancel_and_wait([task])
