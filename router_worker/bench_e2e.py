"""``router-worker bench e2e``: the whole router against a bare Kafka pipe, end to end, in one run.

Method (every phase on fresh topics, a fresh Redis key prefix and a fresh consumer group):

1. **Setup.** ``--heads`` heads are registered in Redis (``HeadRegistry``) over ``--models`` models and
   ``--regions`` regions, one model-topic partition each, with a capacity so high that back-pressure never
   applies and a heartbeat deadline (``head_ttl_ms``) longer than the benchmark, so no heartbeat traffic
   runs during a measurement. The policy's default strategy is set to ``--strategy``.
2. **Backlog.** ``--jobs`` jobs (MessagePack, ``--payload-bytes`` of payload) are preloaded to the request
   topic by a batched producer (``create_batch``/``send_batch``, every future gathered) before anything
   consumes it.
3. **Drain.** The router processes (``python -m router_worker.cli run``, audit on: Redis channel and file)
   start together; a consumer in this process reads the model topics (and the DLQ) from the beginning and
   counts records (never ``end_offsets()``: it under-reports on the embedded broker). The drain rate is the
   job count over the time between the first and the last routed record's timestamp (set by the router's
   producer when it sent the record); the rate seen by the counting consumer (first to last arrival) and the
   10 %→90 % rate are reported too.
4. **Costs of the drain.** Redis ``INFO commandstats`` before the routers start and after the last record
   arrived: commands per routed job (every command the server ran, those run inside scripts included).
   Round trips per batch: each router runs as ``python -m router_worker.bench_e2e router``, which is
   ``router-worker run`` with a counter on redis-py's ``send_packed_command`` (one request written: a
   command, a pipeline or a script call), read at the first and the last arrival, over the batches
   (``router_batch_size_count`` of each router's ``/metrics``) in that window; requests made outside the
   batches (the head snapshot's periodic resync, the reaper) are counted apart, per second. CPU seconds
   (``/proc/<pid>/stat`` utime+stime) between the first and the last arrival, per 1,000 jobs; peak RSS
   (``VmHWM``) at the end. Where the stack is embedded, the broker's and Redis' CPU over the same window are
   reported too: on a small machine they share its cores.
5. **Latency.** As many new processes on fresh topics (the embedded broker serves a partition more slowly once
   it holds a large backlog: measured after a 50,000-job drain, the bare pipe's p99 grew from 0.25 s to 1.5 s),
   warmed up until every process routes; then ``--latency-jobs`` jobs are sent at a fixed rate (``--rate``,
   default half the one-router drain rate, the same for every phase), each stamped with its send time in a
   header (passed through by router and pipe alike); the consumer (5 ms fetch wait) takes the arrival time
   when it first reads the record: produce-to-arrival p50/p99/p99.9. Each job is split at the
   ``x-route-decided-at`` stamp its router (or pipe: it stamps the same header) put on it when it read its batch
   (sent to read, read to arrived), and each counted router and pipe times when its batches' publishes are
   acknowledged: read to acknowledged is its own part (its loop, the batch ahead, its produce round trip), the
   rest the broker making the record visible and the consumer's fetch.
6. **Baseline.** The same steps for a bare aiokafka consume → produce → commit pipe (``python -m
   router_worker.bench_e2e pipe``): one process, the same broker, topics, partitions, job sizes, producer and
   consumer settings, batch size; no decoding, no Redis. The router's figures are printed as ratios to it.
   ``--pipes 1,4`` measures four pipes in one group too: a router count with as many pipes beside it is also
   printed as a ratio to them (``router x4 / pipe x4``), which separates what the router costs from what the
   broker does with that many clients (their latency and rate).

Every wait is bounded; every child is stopped (SIGTERM, then SIGKILL) on any exit, and dies with this
process (parent-death signal) if it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, cast

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from router_worker.bench import print_table
from router_worker.clock import now_ms
from router_worker.core.policy import STRATEGIES, Policy
from router_worker.localstack import _die_with_parent, free_port
from router_worker.loop import run as run_loop
from router_worker.pipeline.kafka import ensure_topics, make_consumer, make_producer
from router_worker.pipeline.messages import H_DECIDED_AT
from router_worker.security import reveal
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from router_worker.topics import Topics

SENT_HEADER = "x-bench-sent"
"""Send time of a latency job (``time.time_ns()``, decimal): producers' headers pass through router and pipe."""
DECIDED_HEADER = H_DECIDED_AT
REGIONS = ("us-east", "eu-west", "us-west", "ap-south")
HEAD_TTL_MS = 3_600_000
"""Heads' heartbeat deadline: longer than any run, so no heartbeat traffic runs during a measurement."""
GAP_WAIT_S = 3.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run (a child died, a drain did not finish in time)."""


@dataclass(frozen=True, slots=True)
class E2EConfig:
    jobs: int = 100_000
    heads: int = 100
    models: int = 4
    regions: int = 2
    payload_bytes: int = 200
    latency_jobs: int = 3_000
    rate: float | None = None
    """Offered load of the latency phase (jobs/s); None: half the one-router drain rate."""
    routers: tuple[int, ...] = (1, 2)
    strategy: str = "least_loaded"
    baseline: bool = True
    pipes: tuple[int, ...] = (1,)
    """Bare pipe process counts measured (with ``baseline``): the router's ratios are to one pipe; a router
    count with as many pipes beside it is also compared with them, which tells the router's cost from what the
    broker does with that many clients."""
    drain_timeout_s: float | None = None
    """Longest drain; None: 30 s + 1 ms per job."""
    profile_dir: Path | None = None
    """Where py-spy writes a flame graph of each router process's drain (None: no profiling)."""
    repeat: int = 1
    """Rounds of every phase, on one stack: the ratios' spread across rounds says how far one round is to be
    trusted (on a shared machine, a few tens of per cent)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        counts = (self.jobs, self.heads, self.models, self.regions, self.latency_jobs, self.repeat)
        if min(counts) < 1 or not self.routers or min(self.routers) < 1 or min(self.pipes, default=0) < 1:
            raise ValueError(
                "jobs, heads, models, regions, latency-jobs, repeat, routers and pipes must be at least 1"
            )
        if len(set(self.routers)) != len(self.routers) or len(set(self.pipes)) != len(self.pipes):
            raise ValueError("routers and pipes: each count once")
        if self.baseline and 1 not in self.pipes:
            raise ValueError("pipes must include 1: the routers' ratios are to one pipe")
        if self.regions > len(REGIONS):
            raise ValueError(f"at most {len(REGIONS)} regions")
        if self.heads < self.models:
            raise ValueError("at least one head per model")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError("rate must be a positive number of jobs/s")
        if self.payload_bytes < 0:
            raise ValueError("payload-bytes must be at least 0")

    @property
    def timeout_s(self) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else 30.0 + self.jobs / 1000.0


# --- processes --------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def stack_pids() -> dict[str, int]:
    """This process's embedded broker and Redis (children named tansu / valkey-server / redis-server)."""
    me = os.getpid()
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        if ppid != me:
            continue
        if "tansu" in comm:
            found["broker"] = int(entry.name)
        elif "valkey" in comm or "redis" in comm:
            found["redis"] = int(entry.name)
    return found


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    admin_port: int = 0
    ready: Path | None = None
    """A pipe's: written once its first batch is committed (it consumes, in the group)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _spawn(name: str, args: Sequence[str], env: dict[str, str], logdir: Path, admin_port: int = 0) -> Child:
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )
    return Child(name, proc, log, admin_port)


def _stop_all(children: Sequence[Child], grace_s: float = 10.0) -> None:
    for c in children:
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait(timeout=5)


@contextlib.contextmanager
def _children() -> Iterator[list[Child]]:
    kids: list[Child] = []
    try:
        yield kids
    finally:
        _stop_all(kids)


def child_env(s: Settings, **overrides: object) -> dict[str, str]:
    """The environment of a child that joins this deployment: every setting that is not a default, as its
    ``ROUTER_*`` variable, then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    values: dict[str, Any] = reveal(s.model_dump(exclude_defaults=True))  # secrets as themselves, not '***'
    values.update(overrides)
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | dict | tuple):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"ROUTER_{name.upper()}"] = text
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- load -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """One phase's names: its own topics, Redis keys and consumer group."""

    settings: Settings
    topics: Topics
    keys: Keys
    models: tuple[str, ...]
    regions: tuple[str, ...]
    requests_partitions: int
    model_partitions: int

    @classmethod
    def fresh(cls, base: Settings, tag: str, cfg: E2EConfig) -> Layout:
        run = uuid.uuid4().hex[:6]
        s = base.model_copy(
            update={
                "topic_prefix": f"{base.topic_prefix}bench-{run}-{tag}.",
                "redis_prefix": f"{base.redis_prefix}-bench-{run}-{tag}",
                "group_id": f"bench-{run}-{tag}",
                "model_partitions": max(base.model_partitions, math.ceil(cfg.heads / cfg.models)),
                "head_ttl_ms": HEAD_TTL_MS,
                "head_heartbeat_ms": HEAD_TTL_MS // 4,
                "default_strategy": cfg.strategy,
                "audit_decisions": True,
            }
        )
        return cls(
            settings=s,
            topics=Topics.from_settings(s),
            keys=Keys(s.redis_prefix),
            models=tuple(f"bench-m{i}" for i in range(cfg.models)),
            regions=REGIONS[: cfg.regions],
            requests_partitions=s.requests_partitions,
            model_partitions=s.model_partitions,
        )

    def model_tps(self) -> list[TopicPartition]:
        return [
            TopicPartition(self.topics.model(m), p) for m in self.models for p in range(self.model_partitions)
        ]

    async def create_topics(self) -> None:
        s = self.settings
        await ensure_topics(
            s,
            [(self.topics.requests, self.requests_partitions), (self.topics.dlq, 1)]
            + [(self.topics.retry(i + 1), self.requests_partitions) for i in range(len(s.retry_backoff_ms))]
            + [(self.topics.model(m), self.model_partitions) for m in self.models],
        )

    async def delete_topics(self) -> None:
        from router_worker.pipeline.kafka import make_admin

        admin = make_admin(self.settings)
        try:
            await admin.start()
            mine = [t for t in await admin.list_topics() if t.startswith(self.topics.prefix)]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()

    def job(self, i: int, tag: str, payload: bytes, created_at: int) -> tuple[bytes, bytes]:
        nm = len(self.models)
        job_id = f"{tag}-{i}"
        doc = {"v": 1, "job_id": job_id, "model_type": self.models[i % nm],
               "region": self.regions[(i // nm) % len(self.regions)], "payload": payload,
               "created_at": created_at}  # fmt: skip
        return job_id.encode(), cast(bytes, msgpack.packb(doc, use_bin_type=True))


_CT = [("content-type", b"application/msgpack")]


async def register_heads(redis: Redis, lay: Layout, n: int, strategy: str) -> None:
    """``n`` heads over the layout's models and regions, one partition each, never saturated."""
    registry = HeadRegistry(redis, lay.keys, HEAD_TTL_MS)
    nm = len(lay.models)
    for i in range(n):
        model = lay.models[i % nm]
        rec = HeadRecord(head_id=f"bench-h{i:04d}", model_id=model, region=lay.regions[(i // nm) % len(lay.regions)],
                         capacity=1_000_000_000, partition=(i // nm) % lay.model_partitions)  # fmt: skip
        await registry.register(rec)
    await PolicyStore(redis, lay.keys).set(Policy(default_strategy=strategy), actor="bench")


async def preload(lay: Layout, n: int, payload_bytes: int, tag: str) -> float:
    """Publish ``n`` jobs to the request topic as fast as the broker takes them; returns the seconds it took."""
    producer = make_producer(lay.settings, linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    try:
        payload = os.urandom(payload_bytes)
        created = int(time.time() * 1000)
        parts = lay.requests_partitions
        batches = [producer.create_batch() for _ in range(parts)]
        futs: list[asyncio.Future[Any]] = []
        topic = lay.topics.requests
        for i in range(n):
            key, value = lay.job(i, tag, payload, created)
            p = i % parts
            if batches[p].append(key=key, value=value, timestamp=None, headers=_CT) is None:
                futs.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(key=key, value=value, timestamp=None, headers=_CT)
            if len(futs) >= 64:  # bound what is in flight
                await asyncio.gather(*futs)
                futs.clear()
        for p, b in enumerate(batches):
            if b.record_count():
                futs.append(await producer.send_batch(b, topic, partition=p))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


async def offered_load(
    lay: Layout, n: int, rate: float, payload_bytes: int, tag: str, stamp: bool = True
) -> float:
    """Send ``n`` jobs at ``rate`` jobs/s, each stamped with its send time (unless ``stamp`` is false);
    returns the rate achieved."""
    producer = make_producer(lay.settings, linger_ms=1)
    await producer.start()
    try:
        payload = os.urandom(payload_bytes)
        futs: list[asyncio.Future[Any]] = []
        topic = lay.topics.requests
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - t0) * rate) + 1)
            while sent < due:
                key, value = lay.job(sent, tag, payload, int(time.time() * 1000))
                hdrs = [*_CT, (SENT_HEADER, str(time.time_ns()).encode())] if stamp else _CT
                futs.append(await producer.send(topic, value, key=key, headers=hdrs))
                sent += 1
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return n / elapsed if elapsed > 0 else float("nan")


# --- measuring arrivals -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Arrivals:
    """Reads the model topics and the DLQ from their first offsets; counts records, their send timestamps and,
    for stamped jobs, their produce-to-arrival latency. Never steps past an offset not yet visible."""

    consumer: AIOKafkaConsumer | None
    dlq_topic: str
    count: int = 0
    dead: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    """(perf_counter at the read, records counted so far)."""
    min_ts: int = 2**62
    max_ts: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    splits_ms: list[tuple[float, float]] = field(default_factory=list)
    """Routed stamped jobs: (sent to read, read to arrived), split at the router's ``x-route-decided-at`` (stamped
    when it starts on the job's batch, before decoding, claiming and planning it; milliseconds, so each half is
    ±1 ms)."""
    early: dict[tuple[TopicPartition, int], int] = field(default_factory=dict)
    """Records seen past a gap (offset not yet visible before them): when they were first seen."""
    gaps_accepted: int = 0
    gap_waits: int = 0
    expected: dict[TopicPartition, int] = field(default_factory=dict)
    gap_since: dict[TopicPartition, tuple[int, float]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def reset_window(self) -> None:
        self.min_ts, self.max_ts = 2**62, 0

    async def run(self) -> None:
        c = self.consumer
        assert c is not None
        while True:
            batch = await c.getmany(timeout_ms=50, max_records=20_000)
            if not batch:
                continue
            now = time.perf_counter()
            now_ns = time.time_ns()
            got = 0
            for tp, recs in batch.items():
                ok = self._admit(tp, recs, now)
                if not ok:
                    continue
                got += len(ok)
                if tp.topic == self.dlq_topic:
                    self.dead += len(ok)
                self.min_ts = min(self.min_ts, min(r.timestamp for r in ok))
                self.max_ts = max(self.max_ts, max(r.timestamp for r in ok))
                for r in ok:
                    seen = self.early.pop((tp, r.offset), now_ns) if self.early else now_ns
                    sent = decided = None
                    for k, v in r.headers:
                        if k == SENT_HEADER:
                            sent = v
                        elif k == DECIDED_HEADER:
                            decided = v
                    if sent:
                        self.latencies_ns.append(seen - int(sent))
                        if decided:
                            at_ns = int(decided) * 1_000_000
                            self.splits_ms.append(((at_ns - int(sent)) / 1e6, (seen - at_ns) / 1e6))
            for tp, recs in batch.items():  # records read past a gap: they arrived now, are counted later
                exp = self.expected.get(tp, 0)
                for r in recs:
                    if r.offset > exp:
                        self.early.setdefault((tp, r.offset), now_ns)
            if got:
                self.count += got
                self.timeline.append((now, self.count))
                self.changed.set()

    def _admit(self, tp: TopicPartition, recs: Sequence[Any], now: float) -> list[Any]:
        exp = self.expected.get(tp, 0)
        ok = []
        for r in recs:
            if r.offset < exp:
                continue
            if r.offset > exp:
                since = self.gap_since.get(tp)
                if since is None or since[0] != exp:
                    self.gap_since[tp] = (exp, now)
                    since = self.gap_since[tp]
                if now - since[1] < GAP_WAIT_S:
                    if self.consumer is not None:
                        self.consumer.seek(tp, exp)
                    self.gap_waits += 1
                    break
                self.gaps_accepted += 1
            self.gap_since.pop(tp, None)
            ok.append(r)
            exp = r.offset + 1
        self.expected[tp] = exp
        return ok

    async def wait_for(self, total: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.count < total:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return True


DRAIN_FETCH_WAIT_MS = 100
"""The counting consumer's fetch wait while a backlog drains: the drain rate comes from the records' own
timestamps, and polling 100+ partitions every few ms would take a third of a core from the routers."""
LATENCY_FETCH_WAIT_MS = 5
"""Its fetch wait while measuring latency: a record waits at most this long for the consumer's next fetch."""


class Reader:
    """Runs an :class:`Arrivals` over a layout's model topics and DLQ; :meth:`retune` swaps its consumer for
    one with another fetch wait, at the same positions."""

    def __init__(self, lay: Layout) -> None:
        self.settings = lay.settings
        self.tps = [*lay.model_tps(), TopicPartition(lay.topics.dlq, 0)]
        self.arr = Arrivals(None, lay.topics.dlq)
        self.task: asyncio.Task[None] | None = None

    async def start(self, fetch_wait_ms: int) -> None:
        consumer = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=fetch_wait_ms,
                                 fetch_max_bytes=64 * 1024 * 1024)  # fmt: skip
        consumer.assign(self.tps)
        await consumer.start()
        for tp in self.tps:
            consumer.seek(tp, self.arr.expected.get(tp, 0))
        self.arr.consumer = consumer
        self.task = asyncio.create_task(self.arr.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
        if self.arr.consumer is not None:
            with contextlib.suppress(Exception):
                await self.arr.consumer.stop()
            self.arr.consumer = None

    async def retune(self, fetch_wait_ms: int) -> None:
        await self.stop()
        await self.start(fetch_wait_ms)


@contextlib.asynccontextmanager
async def arrivals(lay: Layout, fetch_wait_ms: int = LATENCY_FETCH_WAIT_MS) -> AsyncIterator[Reader]:
    reader = Reader(lay)
    try:
        await reader.start(fetch_wait_ms)
        yield reader
    finally:
        await reader.stop()


# --- Redis and router metrics -----------------------------------------------------------------------------


async def redis_commands(redis: Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``; commands run by scripts included)."""
    info: dict[str, Any] = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()
            if k.startswith("cmdstat_") and isinstance(v, dict)}  # fmt: skip


async def read_round_trips(child: Child, path: Path, within_s: float = 3.0) -> tuple[int, int] | None:
    """Requests a counted router (``python -m router_worker.bench_e2e router``) has sent to Redis so far, (in
    its batches, outside them): signal it to write its counters, then read the file."""
    _read_counter(path, remove=True)
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        n = _read_counter(path)
        if n is not None:
            return n
        await asyncio.sleep(0.005)
    return None


def _read_counter(path: Path, remove: bool = False) -> tuple[int, int] | None:
    try:
        if remove:
            path.unlink(missing_ok=True)
            return None
        got = json.loads(path.read_text())
        return int(got["round_trips"]), int(got["background"])
    except (OSError, ValueError, KeyError):
        return None


async def read_acks(
    kids: Sequence[Child], workdir: Path, since_ms: float, within_s: float = 3.0
) -> list[float]:
    """Each job's read-to-acknowledged time (ms), over the counted routers or pipes: see :func:`acked_ms`."""
    out: list[float] = []
    for c in kids:
        if not c.admin_port and c.ready is None:
            continue
        path = workdir / f"{c.name}.json"
        if await read_round_trips(c, path, within_s) is None:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            out += acked_ms(json.loads(path.read_text())["acks"], since_ms)
    return sorted(out)


def acked_ms(acks: Sequence[Sequence[float]], since_ms: float) -> list[float]:
    """From a counted router's (batch stamp ms, last ack ms, jobs routed): one read-to-acknowledged value per
    job, for the batches stamped at or after ``since_ms`` (the timed run's, not the warm-up's)."""
    out: list[float] = []
    for stamp, acked, n in acks:
        if stamp >= since_ms:
            out += [acked - stamp] * int(n)
    return out


async def _router_counters(kids: Sequence[Child], workdir: Path) -> tuple[int, int, int] | None:
    """(Redis round trips in batches, outside batches, batches) summed over the routers ((0, 0, 0) for the pipe);
    None while a router does not answer on its admin port yet (its counter may not be installed: a signal would
    end it)."""
    trips = background = batches = 0
    for c in kids:
        if not c.admin_port:
            continue
        m = await scrape(c.admin_port)
        if "batches" not in m:
            return None
        n = await read_round_trips(c, workdir / f"{c.name}.json")
        if n is None:
            return None
        trips += n[0]
        background += n[1]
        batches += int(m["batches"])
    return trips, background, batches


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float
    """time.time() when it was taken."""
    cpu: dict[int, float]
    counters: tuple[int, int, int] | None


async def _sample_until_first(arr: Arrivals, drained: asyncio.Future[bool], watch: asyncio.Task[None],
                              kids: Sequence[Child], pids: Sequence[int], workdir: Path) -> list[Sample]:  # fmt: skip
    """CPU every 20 ms and the routers' counters every 250 ms, from the spawn to the first arrival."""
    samples: list[Sample] = []
    counters: tuple[int, int, int] | None = None
    counted_at = 0.0
    either: list[asyncio.Future[Any]] = [drained, watch]
    while not arr.count and not drained.done():
        now = time.time()
        if now - counted_at >= 0.25:
            counters, counted_at = await _router_counters(kids, workdir), now
        samples.append(Sample(time.time(), {p: proc_cpu_s(p) for p in pids}, counters))
        await asyncio.wait(either, timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()
    samples.append(
        Sample(time.time(), {p: proc_cpu_s(p) for p in pids}, await _router_counters(kids, workdir))
    )
    return samples


def _sample_before(samples: Sequence[Sample], wall: float) -> Sample:
    """The last sample taken before ``wall`` (the first routed record's timestamp), counters included when
    there is one such; the first sample when none is that early."""
    before = [x for x in samples if x.wall < wall]
    if not before:
        return samples[0]
    last = before[-1]
    if last.counters is None:
        with_counters = [x for x in before if x.counters is not None]
        if with_counters:
            return Sample(last.wall, last.cpu, with_counters[-1].counters)
    return last


async def scrape(port: int) -> dict[str, float]:
    """The router's batch count, batch time and routed jobs from its /metrics (empty when unreachable)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "router_batch_size_count":
                out["batches"] = out.get("batches", 0.0) + s.value
            elif s.name == "router_batch_duration_seconds_sum":
                out["batch_seconds"] = out.get("batch_seconds", 0.0) + s.value
            elif s.name == "routing_decisions_total":
                out["routed"] = out.get("routed", 0.0) + s.value
    return out


# --- one phase --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Latency:
    offered_rate: float
    achieved_rate: float
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    samples_ms: list[float] = field(default_factory=list, repr=False)
    to_router_p50_ms: float = float("nan")
    """Sent to read (split at ``x-route-decided-at``, which a router stamps and the pipe too): the request topic
    and the router's (pipe's) loop."""
    to_router_p99_ms: float = float("nan")
    from_router_p50_ms: float = float("nan")
    """Read to arrived: decode, claim and plan, the batch ahead's acknowledgements, the job's own publish, the
    model topic."""
    from_router_p99_ms: float = float("nan")
    acked_p50_ms: float = float("nan")
    """Read to acknowledged (per job: its batch's stamp to the broker's last ack of the batch's publishes, as
    each router or pipe timed it): decode, claim and plan, the batch ahead's acknowledgements, the job's
    own produce round trip. From there to arrived is the broker making it visible and the counting consumer's
    fetch."""
    acked_p99_ms: float = float("nan")


@dataclass(slots=True)
class Phase:
    name: str
    kind: str
    """'router' or 'pipe'."""
    processes: int
    jobs: int
    arrived: int
    complete: bool
    dead_lettered: int
    preload_s: float
    startup_s: float
    """From spawning the processes to the first record on a model topic."""
    drain_s: float
    drain_rate: float
    """Jobs over the time from the first to the last routed record's timestamp (the sender's clock)."""
    observed_rate: float
    """Jobs over the time from the first to the last arrival at the counting consumer."""
    steady_rate: float
    """10 % to 90 % of the jobs, at the counting consumer."""
    cpu_s: float
    """CPU seconds of the router (or pipe) processes from the first to the last arrival."""
    cpu_s_per_1000: float
    cores_busy: float
    """``cpu_s`` over that time: how many cores the router (or pipe) processes kept busy."""
    peak_rss_mb: float
    """Largest peak RSS of one process."""
    redis_commands: int = 0
    commands_per_job: float = 0.0
    redis_round_trips: int = 0
    batches: int = 0
    round_trips_per_batch: float = float("nan")
    """Requests to Redis made by the batches themselves (claims, marks), per batch."""
    background_round_trips_per_s: float = float("nan")
    """Requests made outside the batches (the head snapshot's resync, the reaper), per second."""
    batch_us_per_job: float = float("nan")
    top_commands: dict[str, int] = field(default_factory=dict)
    stack_cpu_s_per_1000: dict[str, float] = field(default_factory=dict)
    gaps_accepted: int = 0
    """Offset gaps at the counting consumer still open after 3 s (accepted; 0 on a sound broker)."""
    gap_waits: int = 0
    """Times the counting consumer read a record before an earlier one was visible, and read again."""
    latency: Latency | None = None
    progress: list[tuple[float, int]] = field(default_factory=list, repr=False)
    """(seconds since spawn, records arrived)."""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress")
        if d["latency"] is not None:
            d["latency"].pop("samples_ms")
        return cast(dict[str, Any], _finite(d))


def _finite(obj: Any) -> Any:
    """NaN and infinities as null, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _pct(sorted_ms: Sequence[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


def _rate_between(timeline: Sequence[tuple[float, int]], total: int, lo: float, hi: float) -> float:
    a = next((t for t, n in timeline if n >= lo * total), None)
    b = next((t for t, n in timeline if n >= hi * total), None)
    if a is None or b is None or b <= a:
        return float("nan")
    return (hi - lo) * total / (b - a)


def _profile(child: Child, out_dir: Path, spies: list[subprocess.Popen[bytes]]) -> None:
    """Attach py-spy to a router for as long as it runs: its stacks, folded (``flamegraph.pl`` or speedscope draw
    them; :func:`profile_top` ranks them)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = out_dir / f"{child.name}.folded"
    folded.unlink(missing_ok=True)  # an earlier run's graph must not pass for this one's if py-spy fails
    args = [spy, "record", "--pid", str(child.pid), "--rate", "200", "--format", "raw",
            "--output", str(folded)]  # fmt: skip
    with open(out_dir / f"{child.name}.py-spy.log", "wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    spies.append(proc)


def profile_top(folded: str, n: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The functions most often on CPU (self) and, of the project's own, on the stack (inclusive), as shares of
    all samples, from py-spy's folded stacks (``frame;frame;... count`` lines). py-spy samples a process only
    while it is not idle, so these are shares of the router's CPU time, start-up included."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[_short(frames[-1])] += k
        for f in {_short(f) for f in frames if _ours(f)}:
            inclusive[f] += k
    if not total:
        return [], []
    return ([(f, c / total) for f, c in own.most_common(n)],
            [(f, c / total) for f, c in inclusive.most_common(n)])  # fmt: skip


_OURS = ("router_worker/", "schemas/", "consumers/", "producers/")
"""Inclusive shares are listed for the project's own functions only (the frames above them are the same
wrappers in every sample)."""


def _ours(frame: str) -> bool:
    """A frame of the project's own code: its file (``fn (path:line)``; relative when run from the checkout)
    lies in one of the project's packages, not in site-packages."""
    where = frame.partition(" (")[2]
    return "site-packages" not in where and any(where.startswith(m) or f"/{m}" in where for m in _OURS)


def _short(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: lines merged, so a function counts once."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


@contextlib.contextmanager
def _profilers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """py-spy processes: each writes its graph once its router exits (stopped first), or on SIGINT."""
    spies: list[subprocess.Popen[bytes]] = []
    try:
        yield spies
    finally:
        for proc in spies:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
            if proc.poll() is None:
                proc.kill()


def _spawn_group(kind: str, procs: int, lay: Layout, tag: str, workdir: Path, kids: list[Child],
                 profile: tuple[Path, list[subprocess.Popen[bytes]]] | None = None) -> None:  # fmt: skip
    """Start ``procs`` counted routers, or pipes (one consumer group), on the layout's topics; each is added
    to ``kids`` as soon as it runs, so it is stopped whatever happens next."""
    s = lay.settings
    if kind == "router":
        for i in range(procs):
            port = free_port()
            env = child_env(s, admin_port=port, router_id=f"bench-{tag}-{i}", log_level="WARNING",
                            audit_file=str(workdir / f"audit-{tag}-{i}.log"))  # fmt: skip
            args = ["-m", "router_worker.bench_e2e", "router", "--counters", str(workdir / f"{tag}-{i}.json")]
            kids.append(_spawn(f"{tag}-{i}", args, env, workdir, port))
            if profile is not None:
                _profile(kids[-1], *profile)
        return
    env = child_env(s, log_level="WARNING")
    for i in range(procs):
        name = tag if procs == 1 else f"{tag}-{i}"
        ready = workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)  # an earlier round's pipe of that name wrote it
        args = ["-m", "router_worker.bench_e2e", "pipe", "--source", lay.topics.requests,
                "--partitions", str(lay.model_partitions), "--ready", str(ready),
                "--counters", str(workdir / f"{name}.json")]  # fmt: skip
        for m in lay.models:
            args += ["--target", lay.topics.model(m)]
        kids.append(_spawn(name, args, env, workdir))
        kids[-1].ready = ready


async def _until(aw: Any, watch: asyncio.Task[None]) -> Any:
    """Await ``aw``, failing at once when a child exits (``watch`` raises)."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()
        return task.result()
    finally:
        task.cancel()


async def run_phase(kind: str, procs: int, base: Settings, redis: Redis, cfg: E2EConfig, rate: float | None,
                    workdir: Path, log: Console | None = None) -> Phase:  # fmt: skip
    """Drain a backlog with ``procs`` routers (or one pipe), then measure latency at ``rate`` (None: half this
    phase's drain rate) with as many new processes on fresh topics: the embedded broker serves a topic more
    slowly once it holds a large backlog, and that is not what the latency figures are about."""

    def say(text: str) -> None:
        if log is not None:
            log.print(text, soft_wrap=True)

    phase = await _drain(kind, procs, base, redis, cfg, workdir, say)
    if rate is None and phase.complete and math.isfinite(phase.drain_rate):
        rate = max(1.0, phase.drain_rate / 2)
    if rate is not None and phase.complete:
        phase.latency = await _latency(kind, procs, base, redis, cfg, rate, workdir, say)
    return phase


async def _drain(kind: str, procs: int, base: Settings, redis: Redis, cfg: E2EConfig, workdir: Path,
                 say: Any) -> Phase:  # fmt: skip
    name = phase_name(kind, procs)
    tag = f"{kind}{procs}"
    lay = Layout.fresh(base, tag, cfg)
    await lay.create_topics()
    if kind == "router":
        await register_heads(redis, lay, cfg.heads, cfg.strategy)
    preload_s = await preload(lay, cfg.jobs, cfg.payload_bytes, f"{tag}-backlog")
    say(f"[dim]{name}: {cfg.jobs:,} jobs preloaded in {preload_s:.1f}s; draining[/]")
    stack = stack_pids() | {"bench": os.getpid()}
    try:
        async with arrivals(lay, DRAIN_FETCH_WAIT_MS) as reader:
            arr = reader.arr
            with _profilers() as spies, _children() as kids:
                calls0 = await redis_commands(redis)
                t_spawn = time.perf_counter()
                profile = (
                    (cfg.profile_dir, spies) if cfg.profile_dir is not None and kind == "router" else None
                )
                _spawn_group(kind, procs, lay, tag, workdir, kids, profile)
                watch = asyncio.create_task(_watch(kids))
                try:
                    drained = asyncio.ensure_future(arr.wait_for(cfg.jobs, cfg.timeout_s))
                    pids = [c.pid for c in kids] + list(stack.values())
                    try:
                        # Samples until the first arrival; the costs are counted from the last one taken
                        # before the first record was routed (its timestamp): start-up (imports, group
                        # join) is not per-job work.
                        samples = await _sample_until_first(arr, drained, watch, kids, pids, workdir)
                        complete = await _until(drained, watch)
                    finally:
                        drained.cancel()
                    t_end, last_cpu = time.time(), {p: proc_cpu_s(p) for p in pids}
                    await asyncio.sleep(0.3)  # the last batch's marks and commit
                    calls1 = await redis_commands(redis)
                    trips1, background1, batches1 = await _router_counters(kids, workdir) or (0, 0, 0)
                    metrics = [await scrape(c.admin_port) for c in kids if c.admin_port]
                    peak = max((proc_peak_rss_mb(c.pid) for c in kids), default=0.0)
                finally:
                    watch.cancel()
                for c in kids:
                    if c.proc.poll() is not None:
                        raise BenchError(f"{c.name} exited with {c.proc.returncode}:\n{c.tail()}")
    finally:
        await _clean(lay, redis, kind)
    timeline = list(arr.timeline)
    t_first = timeline[0][0] if timeline else float("nan")
    t_last = timeline[-1][0] if timeline else float("nan")
    ts_span = (arr.max_ts - arr.min_ts) / 1000.0 if arr.max_ts else float("nan")
    arrived = arr.count
    say(f"[dim]{name}: drained {arrived:,}/{cfg.jobs:,} in {t_last - t_first:.1f}s[/]")

    start = _sample_before(samples, arr.min_ts / 1000.0)
    first_cpu = start.cpu
    trips0, background0, batches0 = start.counters or (trips1, background1, batches1)
    window = max(1, arrived)
    cpu = sum(last_cpu.get(c.pid, 0.0) - first_cpu.get(c.pid, 0.0) for c in kids)
    stack_cpu = {role: (last_cpu.get(pid, 0.0) - first_cpu.get(pid, 0.0)) * 1000 / window
                 for role, pid in stack.items()}  # fmt: skip
    delta = {k: v - calls0.get(k, 0) for k, v in calls1.items() if k != "info" and v - calls0.get(k, 0) > 0}
    commands = sum(delta.values())
    trips, window_batches = trips1 - trips0, batches1 - batches0
    batches = int(sum(m.get("batches", 0.0) for m in metrics))
    batch_s = sum(m.get("batch_seconds", 0.0) for m in metrics)
    drain_s = ts_span if ts_span > 0 else t_last - t_first
    observed_s = t_last - t_first
    return Phase(
        name=name, kind=kind, processes=procs, jobs=cfg.jobs, arrived=arrived, complete=complete,
        dead_lettered=arr.dead, preload_s=preload_s, startup_s=t_first - t_spawn, drain_s=drain_s,
        drain_rate=arrived / drain_s if drain_s > 0 else float("nan"),
        observed_rate=arrived / observed_s if observed_s > 0 else float("nan"),
        steady_rate=_rate_between(timeline, cfg.jobs, 0.1, 0.9),
        cpu_s=cpu, cpu_s_per_1000=cpu * 1000 / window, peak_rss_mb=peak,
        cores_busy=cpu / (t_end - start.wall) if t_end > start.wall else float("nan"),
        redis_commands=commands, commands_per_job=commands / arrived if arrived else float("nan"),
        redis_round_trips=trips, batches=batches,
        round_trips_per_batch=trips / window_batches if window_batches > 0 else float("nan"),
        background_round_trips_per_s=(background1 - background0) / observed_s if observed_s > 0 else float("nan"),
        batch_us_per_job=batch_s * 1e6 / arrived if batches and arrived else float("nan"),
        top_commands=dict(sorted(delta.items(), key=lambda kv: -kv[1])[:12]),
        stack_cpu_s_per_1000=stack_cpu, gaps_accepted=arr.gaps_accepted, gap_waits=arr.gap_waits,
        progress=[(t - t_spawn, n) for t, n in timeline],
    )  # fmt: skip


WARMUP_JOBS = 24
"""Jobs sent, again and again, until every process has routed some: then the latency run starts."""


async def _latency(kind: str, procs: int, base: Settings, redis: Redis, cfg: E2EConfig, rate: float,
                   workdir: Path, say: Any) -> Latency:  # fmt: skip
    name = phase_name(kind, procs)
    tag = f"{kind}{procs}lat"
    lay = Layout.fresh(base, tag, cfg)
    await lay.create_topics()
    if kind == "router":
        await register_heads(redis, lay, cfg.heads, cfg.strategy)
    try:
        async with arrivals(lay, LATENCY_FETCH_WAIT_MS) as reader:
            arr = reader.arr
            with _children() as kids:
                _spawn_group(kind, procs, lay, tag, workdir, kids)
                watch = asyncio.create_task(_watch(kids))
                try:
                    await _until(_warm_up(lay, arr, kids, cfg), watch)
                    await asyncio.sleep(1.0)  # a rebalance the last join started settles
                    arr.latencies_ns.clear()
                    arr.splits_ms.clear()
                    before = arr.count
                    since_ms = time.time() * 1000.0
                    achieved = await _until(
                        offered_load(lay, cfg.latency_jobs, rate, cfg.payload_bytes, tag), watch
                    )
                    await _until(
                        arr.wait_for(before + cfg.latency_jobs, 15.0 + cfg.latency_jobs / rate), watch
                    )
                    acked = await read_acks(kids, workdir, since_ms)
                finally:
                    watch.cancel()
    finally:
        await _clean(lay, redis, kind)
    ms = sorted(x / 1e6 for x in arr.latencies_ns)
    to_router = sorted(a for a, _ in arr.splits_ms)
    from_router = sorted(b for _, b in arr.splits_ms)
    lat = Latency(rate, achieved, cfg.latency_jobs, len(ms), _pct(ms, 0.5), _pct(ms, 0.99), _pct(ms, 0.999),
                  ms[-1] if ms else float("nan"), ms, _pct(to_router, 0.5), _pct(to_router, 0.99),
                  _pct(from_router, 0.5), _pct(from_router, 0.99), _pct(acked, 0.5), _pct(acked, 0.99))  # fmt: skip
    say(f"[dim]{name}: latency at {rate:,.0f} jobs/s (new processes, fresh topics): p50 {lat.p50_ms:.1f} ms, "
        f"p99 {lat.p99_ms:.1f} ms[/]")  # fmt: skip
    return lat


def phase_name(kind: str, procs: int) -> str:
    """``router xN``; ``pipe`` for one pipe (the baseline), ``pipe xN`` for more."""
    if kind == "router":
        return f"router x{procs}"
    return "pipe" if procs == 1 else f"pipe x{procs}"


async def _warm_up(lay: Layout, arr: Arrivals, kids: Sequence[Child], cfg: E2EConfig,
                   within_s: float = 90.0) -> None:  # fmt: skip
    """Send a few jobs until every process has routed some of them (a pipe: committed a batch) and all
    arrived (started, in the group)."""
    deadline = time.monotonic() + within_s
    sent = 0
    while time.monotonic() < deadline:
        await offered_load(lay, WARMUP_JOBS, 1000.0, cfg.payload_bytes, f"warm{sent}", stamp=False)
        sent += WARMUP_JOBS
        await arr.wait_for(sent, 0.5)
        routers = [c for c in kids if c.admin_port]
        routed = [(await scrape(c.admin_port)).get("routed", 0.0) for c in routers]
        pipes_ready = all(c.ready.exists() for c in kids if c.ready is not None)
        if arr.count >= sent and pipes_ready and all(n > 0 for n in routed):
            return
    raise BenchError(f"the processes did not start routing within {within_s:.0f}s")


async def _clean(lay: Layout, redis: Redis, kind: str) -> None:
    """Delete the phase's topics (the embedded broker keeps them in memory) and Redis keys."""
    with contextlib.suppress(Exception):
        await lay.delete_topics()
    if kind == "router":
        with contextlib.suppress(Exception):
            await _forget_keys(redis, lay.keys)


async def _watch(kids: Sequence[Child]) -> None:
    """Fail as soon as a child exits on its own."""
    while True:
        for c in kids:
            if c.proc.poll() is not None:
                raise BenchError(f"{c.name} exited with {c.proc.returncode}:\n{c.tail()}")
        await asyncio.sleep(0.1)


async def _forget_keys(redis: Redis, keys: Keys) -> None:
    batch: list[str] = []
    async for k in redis.scan_iter(match=keys.tag + "*", count=1000):
        batch.append(k)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


# --- the whole benchmark ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    config: E2EConfig
    machine: dict[str, Any]
    broker: str
    offered_rate: float | None
    phases: list[Phase]
    seconds: float

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Each router phase's figures over one pipe's (higher is better for rates, lower for costs)."""
        pipe = self.phase("pipe")
        if pipe is None:
            return {}
        return {p.name: _ratios(p, pipe) for p in self.phases if p.kind == "router"}

    def same_count_ratios(self) -> dict[str, dict[str, float | None]]:
        """``router xN`` over ``pipe xN``, for each N of more than one measured both ways: what N routers cost
        over N bare pipes in one group, the broker serving as many clients."""
        out = {}
        for p in self.phases:
            pipes = self.phase(phase_name("pipe", p.processes))
            if p.kind == "router" and p.processes > 1 and pipes is not None:
                out[f"{p.name} / {pipes.name}"] = _ratios(p, pipes)
        return out

    def scaling(self) -> float | None:
        """Drain rate of the most routers over one router's."""
        return _scaling(self.phases, "router")

    def pipe_scaling(self) -> float | None:
        """Drain rate of the most pipes over one pipe's: what the broker allows more clients."""
        return _scaling(self.phases, "pipe")

    def to_json(self) -> dict[str, Any]:
        return cast(dict[str, Any], _finite({
            "benchmark": "e2e",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "machine": self.machine,
            "broker": self.broker,
            "offered_rate": self.offered_rate,
            "seconds": self.seconds,
            "phases": {p.name.replace(" ", "_"): p.summary() for p in self.phases},
            "ratios": {k.replace(" ", "_"): v for k, v in self.ratios().items()},
            "ratios_same_count": {k.replace(" ", "_"): v for k, v in self.same_count_ratios().items()},
            "scaling": self.scaling(),
            "pipe_scaling": self.pipe_scaling(),
        }))  # fmt: skip


def _ratios(p: Phase, pipe: Phase) -> dict[str, float | None]:
    r: dict[str, float | None] = {
        "drain_rate": _div(p.drain_rate, pipe.drain_rate),
        "steady_rate": _div(p.steady_rate, pipe.steady_rate),
        "cpu_s_per_1000": _div(p.cpu_s_per_1000, pipe.cpu_s_per_1000),
        "peak_rss_mb": _div(p.peak_rss_mb, pipe.peak_rss_mb),
    }
    if p.latency is not None and pipe.latency is not None:
        r |= {"latency_p50": _div(p.latency.p50_ms, pipe.latency.p50_ms),
              "latency_p99": _div(p.latency.p99_ms, pipe.latency.p99_ms),
              "latency_p999": _div(p.latency.p999_ms, pipe.latency.p999_ms)}  # fmt: skip
    return r


def _scaling(phases: Sequence[Phase], kind: str) -> float | None:
    """Drain rate of the most processes of ``kind`` over the fewest's."""
    group = sorted((p for p in phases if p.kind == kind), key=lambda p: p.processes)
    if len(group) < 2:
        return None
    return _div(group[-1].drain_rate, group[0].drain_rate)


def _pair(a: float, b: float) -> str | None:
    return None if math.isnan(a) else f"{a:.1f} / {b:.1f}"


def _div(a: float, b: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


async def run_e2e(settings: Settings, cfg: E2EConfig, log: Console | None = None) -> Report:
    """One round of the benchmark (``cfg.repeat`` is ignored): see :func:`run_rounds`."""
    return (await run_rounds(settings, replace(cfg, repeat=1), log))[0]


async def run_rounds(settings: Settings, cfg: E2EConfig, log: Console | None = None) -> list[Report]:
    """``cfg.repeat`` rounds of the benchmark against the configured deployment, or one embedded stack started
    for them all. Rounds alternate which side goes first, routers first in the first (the latency phases'
    offered load is half the first phase's drain rate, kept for every round), so a machine that drifts over
    the run favours neither side. Only the last round is profiled. A round that fails raises
    :class:`RoundsFailed`, which carries the rounds completed before it."""
    from router_worker.runtime import runtime

    t_run = time.perf_counter()
    done: list[tuple[list[Phase], float | None, float]] = []
    """Each finished round: its phases, its offered load, when it started."""
    broker = "configured"
    workdir = Path(tempfile.mkdtemp(prefix="router-worker-bench-"))
    try:
        async with runtime(settings) as rt:
            s = rt.settings
            broker = "embedded" if rt.stack is not None else "configured"
            rate = cfg.rate
            for k in range(cfg.repeat):
                t0 = t_run if k == 0 else time.perf_counter()  # the first round counts the stack's start-up
                if log is not None and cfg.repeat > 1:
                    log.print(f"[bold]round {k + 1} of {cfg.repeat}[/]")
                routers: list[tuple[str, int]] = [("router", n) for n in cfg.routers]
                pipes: list[tuple[str, int]] = [("pipe", n) for n in cfg.pipes] if cfg.baseline else []
                order = [*routers, *pipes] if k % 2 == 0 else [*pipes, *routers]
                round_cfg = cfg if k == cfg.repeat - 1 else replace(cfg, profile_dir=None)
                measured: dict[tuple[str, int], Phase] = {}
                try:
                    for kind, n in order:
                        if log is not None:
                            log.print(f"[bold]{'bare ' if kind == 'pipe' else ''}{phase_name(kind, n)}[/]")
                        p = await run_phase(kind, n, s, rt.redis, round_cfg, rate, workdir, log)
                        if rate is None and p.latency is not None:
                            # half the first phase's drain rate, for every phase
                            rate = p.latency.offered_rate
                        measured[(kind, n)] = p
                except BenchError as exc:
                    if not done:
                        raise
                    raise RoundsFailed(f"round {k + 1} of {cfg.repeat} failed: {exc}",
                                       _reports(cfg, broker, done, time.perf_counter())) from exc  # fmt: skip
                # the routers in the order asked for, then the pipes
                phases = [measured[key] for key in (*routers, *pipes) if key in measured]
                done.append((phases, rate, t0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _reports(cfg, broker, done, time.perf_counter())


class RoundsFailed(BenchError):
    """A round after the first failed; ``reports`` are the rounds completed before it."""

    def __init__(self, message: str, reports: list[Report]) -> None:
        super().__init__(message)
        self.reports = reports


def _reports(cfg: E2EConfig, broker: str, done: Sequence[tuple[list[Phase], float | None, float]],
             t_end: float) -> list[Report]:  # fmt: skip
    """One report per finished round; a round's seconds run to the next round's start (the last's to
    ``t_end``), so they add up to the whole run."""
    machine = _machine()
    starts = [t for _, _, t in done[1:]] + [t_end]
    return [Report(cfg, machine, broker, rate, phases, t_next - t0)
            for (phases, rate, t0), t_next in zip(done, starts, strict=True)]  # fmt: skip


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(),
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure across rounds."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        vals = tuple(v for v in values if v is not None and math.isfinite(v))
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), vals)


SPREAD_FIGURES: Final = ("drain_rate", "steady_rate", "cpu_s_per_1000", "latency_p99")
"""The ratios to the pipe whose spread across rounds is reported."""


def spread(reports: Sequence[Report]) -> dict[str, dict[str, Spread]]:
    """Per router phase, each ratio to the same round's pipe (:data:`SPREAD_FIGURES`) across the rounds; the
    same for ``router xN / pipe xN`` where both were measured; under ``"scaling"`` the most routers' drain
    rate over the fewest's, under ``"pipe scaling"`` the pipes'. A round whose router or pipe drain did not
    complete is left out of that phase's figures (its rate is a partial one)."""
    out: dict[str, dict[str, Spread]] = {}
    first = reports[0] if reports else None
    pairs = [(p.name, "pipe") for p in first.phases if p.kind == "router"] if first else []
    for p in first.phases if first else []:
        if p.kind == "router" and p.processes > 1 and first and first.phase(phase_name("pipe", p.processes)):
            pairs.append((p.name, phase_name("pipe", p.processes)))
    for name, pipe in pairs:
        key = name if pipe == "pipe" else f"{name} / {pipe}"
        ratios = [(r.ratios() if pipe == "pipe" else r.same_count_ratios()).get(key, {})
                  for r in reports if _complete(r, name) and _complete(r, pipe)]  # fmt: skip
        figures = {f: Spread.of([x.get(f) for x in ratios]) for f in SPREAD_FIGURES}
        kept = {f: sp for f, sp in figures.items() if sp is not None}
        if kept:
            out[key] = kept
    for label, kind, of in (
        ("scaling", "router", Report.scaling),
        ("pipe scaling", "pipe", Report.pipe_scaling),
    ):
        sc = Spread.of([of(r) for r in reports if all(p.complete for p in r.phases if p.kind == kind)])
        if sc is not None:
            out[label] = {"drain_rate": sc}
    return out


def _complete(report: Report, name: str) -> bool:
    p = report.phase(name)
    return p is not None and p.complete


def scaling_label(cfg: E2EConfig, kind: str = "router") -> str:
    """What :meth:`Report.scaling` (or ``pipe_scaling``) divides: the most processes' drain rate by the
    fewest's."""
    counts = cfg.routers if kind == "router" else cfg.pipes
    most, fewest = max(counts), min(counts)
    return f"{most} {kind}s / {fewest} {kind}{'' if fewest == 1 else 's'}"


def rounds_json(reports: Sequence[Report]) -> dict[str, Any]:
    """``--json`` of several rounds: each round as one run prints it, and the spread of the ratios."""
    return cast(dict[str, Any], _finite({
        "benchmark": "e2e",
        "rounds": [r.to_json() for r in reports],
        "spread": {name.replace(" ", "_"): {f: asdict(sp) for f, sp in figs.items()}
                   for name, figs in spread(reports).items()},
    }))  # fmt: skip


# --- output -----------------------------------------------------------------------------------------------


def _f(v: float | str | None, fmt: str = "{:,.0f}") -> str:
    if isinstance(v, str):
        return v
    if v is None or not math.isfinite(v):
        return "-"
    return fmt.format(v)


def render(report: Report) -> Table:
    phases = report.phases
    ratios = report.ratios()
    rate = report.offered_rate
    table = Table(title=f"router vs bare aiokafka pipe: {report.config.jobs:,} jobs, {report.config.heads} heads, "
                        f"{report.config.strategy}, audit on ({report.broker} broker)")  # fmt: skip
    table.add_column("figure", no_wrap=True)
    for p in phases:
        table.add_column(p.name, justify="right", no_wrap=True)
    for name in ratios:
        table.add_column(f"{name} / pipe", justify="right", no_wrap=True)
    same = report.same_count_ratios()
    for name in same:
        table.add_column(name, justify="right", no_wrap=True)
    columns = [*ratios.values(), *same.values()]

    def row(label: str, get: Any, fmt: str = "{:,.0f}", ratio_key: str | None = None) -> None:
        cells = [_f(get(p), fmt) for p in phases]
        cells += [_f(r.get(ratio_key) if ratio_key else None, "{:.2f}x") for r in columns]
        table.add_row(label, *cells)

    row("drain rate (jobs/s)", lambda p: p.drain_rate, ratio_key="drain_rate")
    row("drain rate 10-90% at consumer (jobs/s)", lambda p: p.steady_rate, ratio_key="steady_rate")
    row("drain time (s)", lambda p: p.drain_s, "{:.2f}")
    row("start-up to first record (s)", lambda p: p.startup_s, "{:.2f}")
    row("jobs arrived", lambda p: p.arrived)
    row("dead-lettered", lambda p: p.dead_lettered)
    lat = f"at {rate:,.0f} jobs/s" if rate else ""
    row(f"produce-to-arrival p50 (ms) {lat}", lambda p: p.latency.p50_ms if p.latency else None, "{:.1f}",
        "latency_p50")  # fmt: skip
    row(f"produce-to-arrival p99 (ms) {lat}", lambda p: p.latency.p99_ms if p.latency else None, "{:.1f}",
        "latency_p99")  # fmt: skip
    row(f"produce-to-arrival p99.9 (ms) {lat}", lambda p: p.latency.p999_ms if p.latency else None, "{:.1f}",
        "latency_p999")  # fmt: skip
    row("  sent to read by the router (pipe) p50 / p99 (ms)", lambda p: _pair(p.latency.to_router_p50_ms,
        p.latency.to_router_p99_ms) if p.latency else None, "{}")  # fmt: skip
    row("  read by the router (pipe) to arrived p50 / p99 (ms)", lambda p: _pair(p.latency.from_router_p50_ms,
        p.latency.from_router_p99_ms) if p.latency else None, "{}")  # fmt: skip
    row("    of which read to acknowledged by the broker p50 / p99 (ms)", lambda p: _pair(p.latency.acked_p50_ms,
        p.latency.acked_p99_ms) if p.latency else None, "{}")  # fmt: skip
    row("Redis commands per job", lambda p: p.commands_per_job if p.kind == "router" else None, "{:.2f}")
    row("Redis round trips per batch", lambda p: p.round_trips_per_batch if p.kind == "router" else None,
        "{:.2f}")  # fmt: skip
    row("Redis round trips per second outside batches (resync, reaper)",
        lambda p: p.background_round_trips_per_s if p.kind == "router" else None, "{:.1f}")  # fmt: skip
    row("batches", lambda p: p.batches if p.kind == "router" else None)
    row("batch work per job (µs)", lambda p: p.batch_us_per_job if p.kind == "router" else None, "{:.1f}")
    row("CPU s per 1,000 jobs (routers or pipes)", lambda p: p.cpu_s_per_1000, "{:.3f}", "cpu_s_per_1000")
    row("cores busy during drain (routers or pipes)", lambda p: p.cores_busy, "{:.2f}")
    for role, label in (
        ("broker", "broker"),
        ("redis", "Redis"),
        ("bench", "this process (counting consumer)"),
    ):
        if any(role in p.stack_cpu_s_per_1000 for p in phases):
            row(f"{label} CPU s per 1,000 jobs", lambda p, r=role: p.stack_cpu_s_per_1000.get(r), "{:.3f}")
    row("peak RSS per process (MiB)", lambda p: p.peak_rss_mb, "{:.0f}", "peak_rss_mb")
    return table


_SPREAD_LABELS: Final = {"drain_rate": "drain rate", "steady_rate": "drain rate 10-90%",
                         "cpu_s_per_1000": "CPU per job", "latency_p99": "p99 latency"}  # fmt: skip


def render_spread(reports: Sequence[Report]) -> Table:
    """Each router's ratios to the pipe of the same round, across rounds: median, lowest, highest, and each
    round's value (a row with fewer values than rounds left out an incomplete drain)."""
    n = len(reports)
    has_pipe = any(r.phase("pipe") is not None for r in reports)
    what = "ratios to the bare pipe measured in the same round" if has_pipe else "scaling (no pipe measured)"
    table = Table(title=f"across {n} rounds: {what}")
    for col in ("figure", "median", "low", "high", "each round"):
        table.add_column(col, justify="left" if col in ("figure", "each round") else "right", no_wrap=True)
    for name, figs in spread(reports).items():
        for f, sp in figs.items():
            if name in ("scaling", "pipe scaling"):
                label = scaling_label(reports[0].config, "router" if name == "scaling" else "pipe")
            elif " / " in name:  # router xN / pipe xN
                label = f"{name}: {_SPREAD_LABELS[f]}"
            else:
                label = f"{name}: {_SPREAD_LABELS[f]} / pipe"
            values = " ".join(f"{v:.2f}" for v in sp.values)
            if len(sp.values) < n:
                values += f" ({len(sp.values)} of {n} rounds)"
            table.add_row(label, f"{sp.median:.2f}x", f"{sp.low:.2f}x", f"{sp.high:.2f}x", values)
    return table


def plot(report: Report, path: str | Path) -> None:
    """Drain progress and rate over time, and latency distributions, router vs pipe, side by side."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise BenchError(
            "--plot needs matplotlib: pip install 'router-worker[bench]' (or pip install matplotlib)"
        ) from exc
    fig, (ax_n, ax_r, ax_l) = plt.subplots(1, 3, figsize=(17, 5))
    longest = max((p.progress[-1][0] - p.progress[0][0] for p in report.phases if p.progress), default=1.0)
    width = max(0.1, longest / 50)  # one bin width for every phase, so their rates compare
    for p in report.phases:
        if not p.progress:
            continue
        t0 = p.progress[0][0]
        ts = [t - t0 for t, _ in p.progress]
        ns = [n for _, n in p.progress]
        ax_n.plot(ts, ns, label=p.name)
        edges = [i * width for i in range(int((ts[-1] if ts else 0) / width) + 2)]
        rates: list[float] = []
        j, prev = 0, 0
        for e in edges[1:]:
            while j < len(ts) and ts[j] <= e:
                j += 1
            cur = ns[j - 1] if j else 0
            rates.append((cur - prev) / width)
            prev = cur
        ax_r.step(edges[1:], rates, where="pre", label=p.name)
        if p.latency and p.latency.samples_ms:
            xs = p.latency.samples_ms
            ax_l.plot(
                xs,
                [(i + 1) / len(xs) for i in range(len(xs))],
                label=f"{p.name} (p99 {p.latency.p99_ms:.1f} ms)",
            )
    ax_n.set(title="drain progress", xlabel="seconds since first arrival", ylabel="jobs arrived")
    ax_r.set(title="drain rate over time", xlabel="seconds since first arrival", ylabel="jobs/s")
    rate = f" at {report.offered_rate:,.0f} jobs/s" if report.offered_rate else ""
    ax_l.set(
        title=f"produce-to-arrival latency{rate}", xlabel="ms (log)", ylabel="fraction of jobs", xscale="log"
    )
    for ax in (ax_n, ax_r, ax_l):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"router-worker bench e2e: {report.config.jobs:,} jobs, {report.config.heads} heads, "
                 f"{report.config.strategy}, {report.machine.get('cpus')} CPUs")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_plot_available() -> None:
    """Fail before a long run, not after it, when --plot can not be drawn."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            "--plot needs matplotlib: pip install 'router-worker[bench]' (or pip install matplotlib)"
        ) from exc


def command(settings: Settings, cfg: E2EConfig, *, json_out: bool, plot_to: Path | None,
            console: Console, err: Console) -> list[Report]:  # fmt: skip
    """``router-worker bench e2e``: run, then print the table (or one JSON object) and draw the plot. With
    ``--repeat``, the last round's table and plot, and the ratios' spread across rounds (``--json``: every
    round). A round that fails after the first: what the rounds before it measured is printed, then the error
    is raised."""
    if plot_to is not None:
        check_plot_available()
    most = max((*cfg.routers, *(cfg.pipes if cfg.baseline else ())))  # one count alone: max() of a tuple
    if most > settings.requests_partitions:
        raise BenchError(f"{most} processes in one group over {settings.requests_partitions} request partitions: "
                         "some would never consume (set ROUTER_REQUESTS_PARTITIONS)")  # fmt: skip
    failed: RoundsFailed | None = None
    try:
        reports = run_loop(
            run_rounds(settings, cfg, err), settings.event_loop
        )  # progress on stderr; the result on stdout
    except RoundsFailed as exc:
        failed, reports = exc, exc.reports
    report = reports[-1]
    if json_out:
        doc = report.to_json() if cfg.repeat == 1 else rounds_json(reports)
        if failed is not None:
            doc["failed"] = str(failed)
        if cfg.profile_dir is not None and failed is None:
            doc["profiles"] = profiles_json(cfg.profile_dir)
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    else:
        print_table(console, render(report))
        if cfg.repeat > 1:
            print_table(console, render_spread(reports))
        sc = report.scaling()
        loop = report.machine.get("event_loop", "asyncio")
        took = sum(r.seconds for r in reports)
        notes = [f"measured in {took:.0f}s on {report.machine['cpus']} CPUs, {loop} event loop"]
        if sc is not None and cfg.repeat == 1:
            notes.append(f"{scaling_label(cfg)}: {sc:.2f}x")
        psc = report.pipe_scaling()
        if psc is not None and cfg.repeat == 1:
            notes.append(f"{scaling_label(cfg, 'pipe')}: {psc:.2f}x")
        if cfg.repeat > 1:
            notes.append(f"the table above is round {len(reports)} of {cfg.repeat}")
        console.print("; ".join(notes))
    if plot_to is not None:
        plot(report, plot_to)
        if not json_out:
            console.print(f"plot written to {plot_to} (round {len(reports)})" if cfg.repeat > 1
                          else f"plot written to {plot_to}")  # fmt: skip
    if cfg.profile_dir is not None and not json_out and failed is None:
        print_profiles(console, cfg.profile_dir)
    if failed is not None:
        raise failed
    return reports


def profiles_json(folder: Path) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Each router's profile top, for ``--json``: its file name -> self and inclusive shares."""
    out = {}
    for path in sorted(folder.glob("*.folded")):
        own, inclusive = profile_top(path.read_text())
        out[path.name] = {"self": own, "inclusive": inclusive}
    return out


def print_profiles(console: Console, folder: Path) -> None:
    for name, top in profiles_json(folder).items():
        console.print(f"\n[bold]{name}[/]: share of samples (self | on the stack)")
        for a, b in itertools.zip_longest(top["self"], top["inclusive"]):
            left = f"{a[1]:6.1%}  {a[0]:<60.60}" if a else " " * 68
            right = f"{b[1]:6.1%}  {b[0]}" if b else ""
            console.print(f"  {left}  {right}", soft_wrap=True, highlight=False)


# --- the bare pipe (hidden entry point) -------------------------------------------------------------------


async def pipe(settings: Settings, source: str, targets: Sequence[str], partitions: int,
               ready: Path | None = None, counters: Path | None = None) -> None:  # fmt: skip
    """consume → produce → commit, nothing else: each record to one model topic and partition in turn, every
    send of a batch enqueued then gathered, one commit per batch. Settings as the router's. ``ready`` is
    written once the first batch is committed. Like a router, it stamps each record with when it read its
    batch and times the batch's acknowledgements (written to ``counters`` on SIGUSR1), so both split their
    latency the same way."""
    from router_worker.services import until_signalled

    s = settings
    acks: collections.deque[tuple[int, float, int]] = collections.deque(maxlen=ACKS_KEPT)
    if counters is not None:
        path = counters

        def dump(_signum: int, _frame: object) -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"round_trips": 0, "background": 0, "acks": list(acks)}))
            os.replace(tmp, path)

        signal.signal(signal.SIGUSR1, dump)
    producer = make_producer(s)
    consumer = make_consumer(s, source, group_id=s.group_id)
    stopped = await until_signalled()
    await producer.start()
    await consumer.start()
    nt = len(targets)
    i = 0
    try:
        while not stopped.is_set():
            batch = await consumer.getmany(timeout_ms=s.batch_timeout_ms, max_records=s.batch_max_records)
            if not batch:
                continue
            futs = []
            offsets = {}
            read_ms = now_ms()
            stamp = (DECIDED_HEADER, str(read_ms).encode())
            for tp, recs in batch.items():
                for r in recs:
                    topic, partition = targets[i % nt], (i // nt) % partitions
                    futs.append(await producer.send(topic, r.value, key=r.key, partition=partition,
                                                    headers=[*r.headers, stamp]))  # fmt: skip
                    i += 1
                offsets[tp] = OffsetAndMetadata(recs[-1].offset + 1, "")
            await asyncio.gather(*futs)
            acks.append((read_ms, time.time() * 1000.0, len(futs)))
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError):
                continue  # the group rebalanced (pipes in one group): the partition's next owner reads it again
            if ready is not None:
                await asyncio.to_thread(ready.write_text, "1")
                ready = None
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await producer.stop()


ACKS_KEPT = 100_000
"""Batches whose acknowledgement time a counted router keeps (the newest)."""


def _time_acks() -> collections.deque[tuple[int, float, int]]:
    """Wrap ``Router.start`` so that each batch's publish, once done, records (the batch's stamp in ms, when its
    last ack came in ms, jobs it routed): what the latency split reads back."""
    from router_worker.pipeline.router import Router

    acks: collections.deque[tuple[int, float, int]] = collections.deque(maxlen=ACKS_KEPT)
    start = Router.start

    def timed(self: Router, b: Any, consumer: Any, producer: Any) -> Any:
        f = start(self, b, consumer, producer)
        routed = sum(1 for o in b.plan.outcomes if o.send is not None)
        if routed:
            f.publishing.add_done_callback(lambda _t: acks.append((b.now, time.time() * 1000.0, routed)))
        return f

    Router.start = timed  # type: ignore[method-assign]
    return acks


def counted_router(counters: Path) -> None:
    """``router-worker run``, unchanged, with counters added: every request this process writes to Redis
    (``send_packed_command``: a command, a whole pipeline, a script call, a health-check PING) is one round
    trip, counted apart when a batch (``Router.step``) made it. SIGUSR1 writes the counts to ``counters``
    (JSON)."""
    from router_worker.harness.round_trips import RoundTrips

    counted = RoundTrips()
    counted.install()
    acks = _time_acks()

    def dump(_signum: int, _frame: object) -> None:
        tmp = counters.with_suffix(".tmp")
        tmp.write_text(json.dumps({"round_trips": counted.in_batches, "background": counted.outside,
                                   "acks": list(acks)}))  # fmt: skip
        os.replace(tmp, counters)

    signal.signal(signal.SIGUSR1, dump)
    from router_worker import cli

    sys.argv = ["router-worker", "run"]
    cli.main()


def main(argv: Sequence[str] | None = None) -> None:
    """Hidden entry points of the benchmark's children (settings from the ``ROUTER_*`` environment):
    ``python -m router_worker.bench_e2e pipe --source T --target T1 ... --partitions N`` and
    ``python -m router_worker.bench_e2e router --counters FILE``."""
    from router_worker.settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m router_worker.bench_e2e")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pipe", help="a bare consume → produce → commit pipe (the e2e benchmark's baseline)")
    pp.add_argument("--source", required=True)
    pp.add_argument("--target", action="append", required=True)
    pp.add_argument("--partitions", type=int, required=True)
    pp.add_argument("--ready", type=Path, help="a file written once the first batch is committed")
    pp.add_argument("--counters", type=Path, help="where SIGUSR1 writes the batches' acknowledgement times")
    rp = sub.add_parser("router", help="router-worker run, counting its Redis round trips")
    rp.add_argument("--counters", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pipe":
        s = load_settings()
        run_loop(
            pipe(s, args.source, args.target, args.partitions, args.ready, args.counters), s.event_loop
        )  # the routers' loop, to be fair
    else:
        counted_router(args.counters)


if __name__ == "__main__":
    main()
