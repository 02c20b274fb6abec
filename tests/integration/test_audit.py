"""The audit on the real stack: the channel, the rotating file and ``audit tail --since`` (the Redis stream)
hold the same records, none lost or repeated at the replay/live seam while a writer keeps writing; a
router's records replay with filters; decision sampling is deterministic; CLI operations carry the OS user."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.audit import AuditSink, keep_decision
from router_worker.metrics import Metrics
from router_worker.pipeline.router import Router
from router_worker.settings import Settings
from tests.helpers import Served, cli, cli_env, make_worker, running, wait_until
from tests.procs import read_audit

pytestmark = pytest.mark.integration


def _own_channel(s: Settings, **more: Any) -> Settings:
    """The test's own channel (the default one is shared by every test on this Redis)."""
    return s.model_copy(update={"audit_channel": f"audit:{s.redis_prefix}", **more})


async def _start_tail(s: Settings, *args: str) -> tuple[asyncio.subprocess.Process, list[dict[str, Any]]]:
    env = cli_env(s, ROUTER_AUDIT_CHANNEL=s.audit_channel)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "router_worker.cli", "audit", "tail", *args,
                                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    return proc, []


async def _collect(proc: asyncio.subprocess.Process, out: list[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        out.append(orjson.loads(line))


async def _subscribe(redis: Redis, channel: str, out: list[dict[str, Any]], ready: asyncio.Event) -> None:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    ready.set()
    try:
        async for msg in pubsub.listen():
            out.append(orjson.loads(msg["data"]))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_channel_file_and_replay_agree_across_rotation_and_the_seam(
    settings: Settings, redis: Redis
) -> None:
    s = _own_channel(settings, audit_file_max_bytes=4096, audit_file_backups=500)
    sink = AuditSink.from_settings(redis, s)
    channel: list[dict[str, Any]] = []
    subscribed = asyncio.Event()
    sub = asyncio.create_task(_subscribe(redis, s.audit_channel, channel, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    tail, tailed = await _start_tail(s, "--since", "1h", "--json")
    reader = asyncio.create_task(_collect(tail, tailed))
    per_batch, seq, after_seam = 7, 0, 0
    try:
        # The writer runs before the tail starts, while it replays, and on after it follows: the seam falls
        # in the middle of a busy stream. Each batch is one stream entry and one channel message per record.
        while after_seam < 150:
            batch = [{"ts": 1, "event": "route", "router_id": "w", "job_id": f"j{seq + k}", "seq": seq + k}
                     for k in range(per_batch)]  # fmt: skip
            await sink.emit_many(batch)
            seq += per_batch
            if tailed:
                after_seam += 1
            await asyncio.sleep(0.002)
            assert seq < 200_000, "the tail never printed anything"
        await wait_until(lambda: len(tailed) >= seq and len(channel) >= seq, timeout=30)
        await asyncio.sleep(0.3)  # anything repeated at the end would show up by now
    finally:
        tail.terminate()
        await tail.wait()
        reader.cancel()
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub
        sink.close()
    want = list(range(seq))
    assert [r["seq"] for r in tailed] == want, "replay + follow lost or repeated records at the seam"
    assert [r["seq"] for r in channel] == want
    records, bad = read_audit(s.audit_file)
    assert bad == 0
    assert sorted(r["seq"] for r in records) == want
    assert Path(s.audit_file + ".1").exists(), "the file was expected to rotate"
    assert tailed == channel  # the same objects, field for field


async def test_router_records_replay_with_filters_and_sampling(settings: Settings, redis: Redis) -> None:
    s = _own_channel(settings, audit_sample=0.5)
    served = Served()
    heads = [make_worker(s, redis, served, "llama", "us", head_id="llama-us", capacity=64),
             make_worker(s, redis, served, "resnet", "eu", head_id="resnet-eu", capacity=64)]  # fmt: skip
    router = Router(s, redis, Metrics(), AuditSink.from_settings(redis, s))
    jobs = [(f"job-{i}", "llama" if i % 2 else "resnet", "acme" if i % 3 else "globex") for i in range(60)]
    async with running(*heads, router):
        async with JobProducer(s) as producer:
            for job_id, model, tenant in jobs:
                await producer.submit(model, b"x", job_id=job_id, tenant=tenant)
        await wait_until(lambda: len(served.rows) >= len(jobs), timeout=60)
        await wait_until(lambda: router.stats.routed >= len(jobs) and not router.marks.buffered, timeout=30)

    def tail(*args: str) -> list[dict[str, Any]]:
        proc = cli(s, "audit", "tail", "--since", "10m", "--no-follow", "--json", *args)
        return [orjson.loads(x) for x in proc.stdout.splitlines()]

    everything = tail()
    file_records, _ = read_audit(s.audit_file)
    assert everything == file_records  # the stream replays exactly what the file holds, in order
    routes = [r for r in everything if r["event"] == "route"]
    sampled = {j for j, _, _ in jobs if keep_decision(j, 0.5)}
    assert {r["job_id"] for r in routes} == sampled  # the same jobs in every router and every run
    assert 10 < len(sampled) < 50
    assert {r["event"] for r in everything} >= {"router_started", "router_stopped", "route"}
    assert tail("--job", "job-1") == [r for r in routes if r["job_id"] == "job-1"]
    acme = tail("--tenant", "acme", "--event", "route")
    assert acme
    assert all(r["tenant"] == "acme" for r in acme)
    assert len(acme) == sum(1 for r in routes if r.get("tenant") == "acme")
    llama = tail("--model", "llama")
    assert llama
    assert {r["head_id"] for r in llama} == {"llama-us"}
    assert tail("--head", "resnet-eu") == [r for r in routes if r.get("head_id") == "resnet-eu"]
    assert len(tail("-n", "3")) == 3
    readable = cli(s, "audit", "tail", "--since", "10m", "--no-follow", "--event", "router_started").stdout
    assert "router_started" in readable
    assert "{" not in readable


async def test_cli_operations_carry_the_os_user_and_tail_follows_live(
    settings: Settings, redis: Redis
) -> None:
    s = _own_channel(settings)
    tail, tailed = await _start_tail(
        s, "-n", "2", "--json", "--event", "head_registered", "--event", "head_drained"
    )
    reader = asyncio.create_task(_collect(tail, tailed))
    try:
        # Following from now: wait until the tail blocks on the stream, then act.
        async def following() -> bool:
            return any(c.get("cmd") == "xread" for c in await redis.client_list())

        for _ in range(300):
            if await following():
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cli, s, "heads", "register", "hx", "--model", "m")
        await asyncio.to_thread(cli, s, "heads", "drain", "hx")
        assert await asyncio.wait_for(tail.wait(), 30) == 0
        await reader
    finally:
        if tail.returncode is None:
            tail.kill()
    assert [r["event"] for r in tailed] == ["head_registered", "head_drained"]
    assert all(r["actor"] == getpass.getuser() and r["head_id"] == "hx" for r in tailed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday-ish"), "--since 'yesterday-ish'"),
        (("--no-follow",), "--no-follow without --since"),
        (("--since", "5m", "-n", "-1"), "--count"),
    ],
)
def test_usage_errors_exit_2_with_a_message(settings: Settings, args: tuple[str, ...], message: str) -> None:
    proc = cli(settings, "audit", "tail", *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_since_is_refused_without_a_stream(settings: Settings) -> None:
    env = cli_env(settings, ROUTER_AUDIT_STREAM_MAXLEN="0")
    proc = subprocess.run([sys.executable, "-m", "router_worker.cli", "audit", "tail", "--since", "5m"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "ROUTER_AUDIT_STREAM_MAXLEN is 0" in proc.stderr
