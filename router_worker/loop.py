"""Which event loop runs a command: asyncio's own, or uvloop's where it is installed and asked for (``auto`` by
default). uvloop runs the same code with less overhead per callback, socket read and timer, which is most of a
router's time outside its own Python (see docs/performance.md)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopChoice = Literal["auto", "asyncio", "uvloop"]


class LoopUnavailable(RuntimeError):
    """uvloop was asked for by name and is not installed."""


def loop_factory(choice: LoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner`` (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise LoopUnavailable("ROUTER_EVENT_LOOP=uvloop, but uvloop is not installed: pip install "
                                  "'router-worker[fast]' (or set it to auto or asyncio)") from exc  # fmt: skip
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coro)


def tune_gc(young_threshold: int) -> None:
    """For a long-running process, once start-up is done: what exists now is frozen out of collection (it lives
    as long as the process), and the youngest generation is collected every ``young_threshold`` allocations
    instead of every 700. A router makes a dozen short-lived objects per job; with Python's defaults the
    collections they trigger scanned every live object so often that they cost a fifth of its CPU. 0: leave
    Python's defaults."""
    if young_threshold <= 0 or gc.get_threshold()[0] == young_threshold:
        return  # asked not to, or done already (the demo runs two routers in one process)
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
