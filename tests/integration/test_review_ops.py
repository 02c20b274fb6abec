"""Adversarial review of issue 9 (what ops see): ``audit tail`` at the replay/live seam, across a Redis restart
and a stream trim, and ``GET /audit``'s scan of the stream, on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from router_worker.audit import AuditSink, audit_stream_key
from router_worker.audit_recent import AuditFilter, recent_stream_records
from router_worker.audit_tail import StreamReader
from router_worker.clock import now_ms
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from tests.helpers import cli_env
from tests.procs import RedisServer

pytestmark = pytest.mark.integration


def _sink(s: Settings, redis: Redis, maxlen: int = 10_000) -> AuditSink:
    s = s.model_copy(update={"audit_channel": f"audit:{s.redis_prefix}", "audit_stream_maxlen": maxlen})
    return AuditSink.from_settings(redis, s, with_file=False)


def _rec(seq: int, **more: Any) -> dict[str, Any]:
    return {"ts": now_ms(), "event": "route", "router_id": "w", "job_id": f"j{seq}", "seq": seq, **more}


async def _next_records(gen: Any, timeout: float) -> list[dict[str, Any]]:
    _, records = await asyncio.wait_for(anext(gen), timeout)
    return list(records)


async def test_tail_since_ahead_of_the_redis_clock_still_follows_live(
    settings: Settings, redis: Redis
) -> None:
    """``--since`` is computed on the operator's clock; stream ids come from the Redis server's. With the
    operator's clock a few seconds ahead (or an ISO time typed a little in the future), the replay finds
    nothing and the follow must still show what is written from now on, not skip it until Redis' clock
    catches up."""
    sink = _sink(settings, redis)
    await sink.emit_many([_rec(0)])
    reader = StreamReader(redis, audit_stream_key(settings.redis_prefix), block_ms=200)
    ahead = now_ms() + 60_000  # as computed by `--since 0s` on a clock a minute fast
    assert [r async for r in reader.replay(ahead)] == []
    follow: Any = reader.follow()  # an async generator: closed below
    await sink.emit_many([_rec(1)])  # written after the tail started: live
    try:
        got = await _next_records(follow, 5.0)
    finally:
        await follow.aclose()
    assert [r["seq"] for r in got] == [1]


async def test_recent_audit_scan_does_not_stall_the_event_loop(settings: Settings, redis: Redis) -> None:
    """``GET /audit`` is a read (public by default) served by the router's own event loop: a filter that
    matches nothing scans up to 200,000 records. That scan must not hold the loop (Kafka heartbeats,
    publishes, acks) for long at a time."""
    key = audit_stream_key(settings.redis_prefix)
    rec = _rec(0, model_type="llama-3.3-70b", head_id="llama-eu-1", strategy="least_loaded", tenant="acme",
               reason="least loaded of 5 eligible heads", scores={"load": 0.1, "cache": 0.2, "total": 0.7})  # fmt: skip
    entry = b"\n".join(orjson.dumps(rec) for _ in range(500))  # one routed batch of 500 jobs
    pipe = redis.pipeline(transaction=False)
    for _ in range(400):
        pipe.xadd(key, {"r": entry})
    await pipe.execute()
    # Counted, not timed: the scan reads a few entries per Redis call and gives the loop a turn after each entry,
    # so no stretch of it holds the loop longer than decoding one entry (500 records).
    counts: list[int] = []
    yields = 0
    real_xrevrange, real_sleep = redis.xrevrange, asyncio.sleep

    async def xrevrange(*args: Any, **kwargs: Any) -> Any:
        counts.append(int(kwargs.get("count") or 0))
        return await real_xrevrange(*args, **kwargs)

    async def sleep(delay: float, *args: Any) -> Any:
        nonlocal yields
        yields += delay == 0
        return await real_sleep(delay, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(redis, "xrevrange", xrevrange)
        mp.setattr(asyncio, "sleep", sleep)  # the module the scan calls it through
        found = await recent_stream_records(redis, key, 100, AuditFilter(job_id="no-such-job"))
    assert found == []
    assert counts, "read a page at a time"
    assert max(counts) <= 16, f"pages of at most 16 entries, not {max(counts)}"
    assert yields >= 400, f"a turn for the loop after each of the 400 entries, not {yields}"


async def _tail_proc(s: Settings, redis_url: str, *args: str, **env: str) -> asyncio.subprocess.Process:
    e = cli_env(s, ROUTER_REDIS_URL=redis_url, **env)
    cmd = [sys.executable, "-m", "router_worker.cli", "audit", "tail", "--json", *args]
    return await asyncio.create_subprocess_exec(*cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _read_json_line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        assert proc.stderr is not None
        err = await proc.stderr.read()
        raise AssertionError(f"audit tail exited ({proc.returncode}): {err.decode()[-2000:]}")
    out: dict[str, Any] = orjson.loads(line)
    return out


async def _until_shown(proc: asyncio.subprocess.Process, sink: AuditSink, seq: int, timeout: float) -> None:
    """Write record ``seq`` every half second until the tail prints it (a CLI starts slowly on a busy box)."""
    deadline = time.monotonic() + timeout
    while True:
        await sink.emit_many([_rec(seq)])
        try:
            if (await _read_json_line(proc, 0.5))["seq"] == seq:
                return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError(f"audit tail printed no record {seq} in {timeout:.0f} s") from None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_tail_follows_on_across_a_redis_restart(settings: Settings, tmp_path: Path) -> None:
    """An operator's ``audit tail`` outlives a Redis restart (a failover, an upgrade): it goes on from the
    last entry it printed instead of dying with a traceback."""
    async with RedisServer(tmp_path / "redis") as srv:
        client = make_redis(srv.url)
        sink = _sink(settings, client)
        proc = await _tail_proc(settings, srv.url)
        try:
            await _until_shown(proc, sink, 1, 30.0)  # the tail is following
            await srv.stop()
            await asyncio.sleep(1.5)
            await srv.start()
            await client.aclose()
            client = make_redis(srv.url)
            sink = _sink(settings, client)
            await _until_shown(proc, sink, 2, 30.0)
        finally:
            await _stop(proc)
            await client.aclose()


async def test_tail_follows_when_the_redis_timeout_is_short(settings: Settings, redis: Redis) -> None:
    """``ROUTER_REDIS_TIMEOUT_S`` is a deployment's setting (the routers' quick outage detection); the tail's
    blocking read must fit in it rather than time out on the first quiet second."""
    assert settings.redis_url
    sink = _sink(settings, redis)
    proc = await _tail_proc(settings, settings.redis_url, ROUTER_REDIS_TIMEOUT_S="0.5")
    try:
        await _until_shown(proc, sink, 6, 30.0)  # the tail is following
        await asyncio.sleep(3.0)  # quiet: nothing written for several blocking reads
        await sink.emit_many([_rec(7)])
        assert (await _read_json_line(proc, 15.0))["seq"] == 7
    finally:
        await _stop(proc)


async def test_tail_says_so_when_entries_are_trimmed_past_its_cursor(
    settings: Settings, redis: Redis
) -> None:
    """A replay (or follow) slower than the writers: the capped stream trims entries the reader has not read
    yet. Records then go missing from the tail without a word; the reader should at least tell (it can:
    ``XINFO STREAM``'s ``max-deleted-entry-id`` is past its cursor)."""
    sink = _sink(settings, redis, maxlen=100)
    for i in range(100):
        await sink.emit_many([_rec(i)])
    reader = StreamReader(redis, audit_stream_key(settings.redis_prefix), page=20)
    seen: list[int] = []
    since = now_ms() - 60_000
    async for _, records in reader.replay(since):
        seen.extend(r["seq"] for r in records)
        if len(seen) == 20:  # the reader is slow: meanwhile 1,000 more batches are written
            for i in range(100, 1100):
                await sink.emit_many([_rec(i)])
    missing = sorted(set(range(seen[0], seen[-1] + 1)) - set(seen))
    trimmed_past_cursor = await reader.trimmed_from(since)
    # What a tail would need: either nothing missing, or a way to learn about it at the point of the gap.
    assert not missing or getattr(reader, "gaps", None), (
        f"{len(missing)} records skipped silently (trimmed up to {trimmed_past_cursor})"
    )
