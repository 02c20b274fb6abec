"""Counting a router's Redis round trips, apart for its batches and for everything else (the resync, the reaper,
the health checks): what ``bench e2e`` reports as round trips per batch, and what the tests hold to two.

Every request redis-py writes (``send_packed_command``: a command, a whole pipeline, a script call) is one round
trip. One made while :meth:`Router.step` runs, or by a task it starts (the publish, the background close: they
copy its context), is the batch's.
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


def command_name(command: Any) -> bytes:
    """The first command's name in what redis-py writes (RESP: ``*N``, then ``$len`` and the name)."""
    raw = (
        command
        if isinstance(command, bytes | bytearray | memoryview)
        else b"".join(bytes(c) for c in command)
    )
    return bytes(raw).split(b"\r\n", 3)[2].upper()


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

        async def counted_send(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            if in_batch.get():
                self.in_batches += 1
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
            setattr(AbstractConnection, "send_packed_command", send)  # noqa: B010
            setattr(Router, "step", step)  # noqa: B010

        return undo
