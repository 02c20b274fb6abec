"""Review of harness/round_trips.py: counting must never change what redis-py writes.

``AbstractConnection.send_packed_command`` takes ``bytes | str | Iterable[bytes]``. Inside a batch the counter
parses the command's name first (``command_name``), which raises on a ``str`` (``bytes(c)`` of a character)
and on an empty command, and drains a one-shot iterable before redis-py gets to write it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection, Connection

from router_worker.harness.round_trips import RoundTrips
from router_worker.pipeline.router import Router

Written = list[bytes]


def _counted(monkeypatch: pytest.MonkeyPatch, command: Any) -> tuple[Written, Callable[[], Any]]:
    """A counter over a recording connection; returns what was written and a coroutine factory that sends
    ``command`` inside a batch (a stub ``Router.step``)."""
    written: Written = []

    async def record(conn: Any, cmd: Any, check_health: bool = True) -> None:
        if isinstance(cmd, str):
            cmd = cmd.encode()
        if isinstance(cmd, bytes):
            cmd = [cmd]
        written.extend(bytes(c) for c in cmd)

    async def step(router: Any, *args: Any, **kwargs: Any) -> None:
        await AbstractConnection.send_packed_command(Connection(), command)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", record)
    monkeypatch.setattr(Router, "step", step)
    counted = RoundTrips()
    undo = counted.install()

    async def in_batch() -> None:
        try:
            await Router.step(None, {}, None, None)  # type: ignore[arg-type]
        finally:
            undo()

    return written, in_batch


def _chunks() -> Iterator[bytes]:
    yield from Connection().pack_command("GET", "k")


async def test_a_generator_command_is_still_written(monkeypatch: pytest.MonkeyPatch) -> None:
    written, in_batch = _counted(monkeypatch, _chunks())
    await in_batch()
    assert b"".join(written) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


async def test_a_str_command_is_still_written(monkeypatch: pytest.MonkeyPatch) -> None:
    written, in_batch = _counted(monkeypatch, "*1\r\n$4\r\nPING\r\n")
    await in_batch()
    assert written == [b"*1\r\n$4\r\nPING\r\n"]


async def test_an_empty_command_does_not_fail_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    written, in_batch = _counted(monkeypatch, [])
    await in_batch()
    assert written == []


async def test_bytes_and_packed_lists_are_written_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: what redis-py 8 actually passes (lists from pack_command / pack_commands) goes through."""
    packed = Connection().pack_commands([("MULTI",), ("SET", "k", b"x" * 100_000), ("EXEC",)])
    written, in_batch = _counted(monkeypatch, packed)
    await in_batch()
    assert b"".join(written) == b"".join(bytes(c) for c in packed)


async def test_counters_undone_in_any_order_stop_counting_and_pass_every_call_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[Any] = []

    async def record(conn: Any, cmd: Any, check_health: bool = True) -> None:
        written.append(cmd)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", record)
    monkeypatch.setattr(Router, "step", Router.step)  # put back at the end whatever wrapper stays
    step = Router.step
    a, b = RoundTrips(), RoundTrips()
    undo_a, undo_b = a.install(), b.install()
    undo_b()
    undo_a()  # in order: everything as it was
    assert AbstractConnection.send_packed_command is record
    assert Router.step is step
    undo_a, undo_b = a.install(), b.install()
    undo_a()  # out of order: a's wrapper stays under b's, then alone, passing calls through uncounted
    undo_b()
    await AbstractConnection.send_packed_command(Connection(), [b"*1\r\n$4\r\nPING\r\n"])
    assert written == [[b"*1\r\n$4\r\nPING\r\n"]]
    assert (a.in_batches, a.outside, b.in_batches, b.outside) == (0, 0, 0, 0)
