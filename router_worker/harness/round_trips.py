"""Counting a router's Redis round trips, apart for its batches and for everything else (the resync, the reaper,
the health checks): what ``bench e2e`` reports as round trips per batch, and what the tests hold to two.

Every request redis-py writes (``send_packed_command``: a command, a whole pipeline, a script call) is one round
trip. One made while :meth:`Router.step` runs, or by a task it starts (the publish, the background close: they
copy its context), is the batch's. Not split: a batch's marks written by ``settle`` (a rebalance, an outage,
the stop) count as outside; a pooled connection's health-check ``PING`` (after 30 s idle) counts as the
batch's.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection

from router_worker.pipeline.router import Router

SET_UP_COMMANDS = frozenset({b"HELLO", b"CLIENT", b"AUTH", b"SELECT"})
"""What a new connection sends before its first command: the pool's work, not a batch's."""


def as_chunks(command: Any) -> list[Any]:
    """What ``send_packed_command`` takes (``bytes``, ``str`` or an iterable of chunks) as the list it would
    write: read once, so a one-shot iterable is still written whole."""
    if isinstance(command, str):
        return [command.encode()]
    if isinstance(command, bytes | bytearray | memoryview):
        return [command]
    return list(command)


def command_name(chunks: list[Any]) -> bytes:
    """The first command's name (RESP: ``*N``, then ``$len`` and the name), read from the first chunk alone;
    ``b""`` when it can not be read there. Never raises: counting must not fail a batch."""
    if not chunks:
        return b""
    parts = bytes(chunks[0][:64]).split(b"\r\n", 3)
    return parts[2].upper() if len(parts) > 2 else b""


@dataclass(slots=True)
class RoundTrips:
    in_batches: int = 0
    outside: int = 0
    set_up: int = 0
    """Connection set-up inside batches (counted in ``in_batches`` too)."""
    _in_batch: contextvars.ContextVar[bool] = field(
        default_factory=lambda: contextvars.ContextVar("in_batch", default=False)
    )

    def install(self) -> Callable[[], None]:
        """Count from now on, in this process; returns what undoes it."""
        send, step = AbstractConnection.send_packed_command, Router.step
        in_batch = self._in_batch

        active = [True]

        async def counted_send(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            if not active[0]:
                pass
            elif in_batch.get():
                self.in_batches += 1
                command = as_chunks(command)
                if command_name(command) in SET_UP_COMMANDS:
                    self.set_up += 1
            else:
                self.outside += 1
            await send(conn, command, check_health)

        async def counted_step(router: Router, *args: Any, **kwargs: Any) -> None:
            in_batch.set(True)
            try:
                await step(router, *args, **kwargs)
            finally:
                in_batch.set(False)

        setattr(AbstractConnection, "send_packed_command", counted_send)  # noqa: B010 (typed as the method)
        setattr(Router, "step", counted_step)  # noqa: B010

        def undo() -> None:
            """Stop counting; put the originals back where ours are still on top (undone out of order, a
            counter's wrappers stay under a later one's, passing every call through uncounted)."""
            active[0] = False
            if AbstractConnection.__dict__.get("send_packed_command") is counted_send:
                setattr(AbstractConnection, "send_packed_command", send)  # noqa: B010
            if Router.__dict__.get("step") is counted_step:
                setattr(Router, "step", step)  # noqa: B010

        return undo
