"""``router-worker demo``: the whole path on the embedded stack, with a progress bar and a readable summary.

Starts a real broker and Redis, two routers in one consumer group, five heads of two models in two
regions, publishes jobs with the producer SDK, follows the completion records on ``router.results``, and
prints jobs per head and model, routing throughput and end-to-end latency percentiles. Then stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consumers.worker import ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.clock import now_ms
from router_worker.metrics import Metrics
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.kafka import make_consumer
from router_worker.pipeline.router import Router
from router_worker.runtime import Runtime
from router_worker.security import redact_url
from router_worker.services import build_router, build_worker, run_router
from router_worker.settings import Settings
from router_worker.tasks import cancel_and_wait
from router_worker.topics import Topics

DEMO_HEADS: tuple[WorkerConfig, ...] = (
    WorkerConfig("llama-3.3-70b", "us-east", capacity=8, head_id="llama-us-east-1", families=("chat",),
                 backend="gpu", quantizations=("FP16", "INT8"), max_context=131072),
    WorkerConfig("llama-3.3-70b", "us-east", capacity=8, head_id="llama-us-east-2", families=("chat",),
                 backend="gpu", quantizations=("FP16",), max_context=131072),
    WorkerConfig("llama-3.3-70b", "eu-west", capacity=8, head_id="llama-eu-west-1", families=("chat",),
                 backend="gpu", quantizations=("FP16",), max_context=32768),
    WorkerConfig("resnet50", "us-east", capacity=8, head_id="resnet-us-east-1", backend="gpu"),
    WorkerConfig("resnet50", "eu-west", capacity=8, head_id="resnet-eu-west-1", backend="cpu"),
)  # fmt: skip


@dataclass(slots=True)
class Completions:
    expected: int
    prefix: str = ""
    """Only completion records of this run's job ids count."""
    seen: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    by_head: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    errors: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, doc: dict[str, Any]) -> None:
        job_id = doc.get("job_id", "")
        if not job_id.startswith(self.prefix):
            return
        if job_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(job_id)
        self.by_head[doc.get("head_id", "?")] += 1
        self.by_model[doc.get("model_id", "?")] += 1
        if doc.get("status") != "ok":
            self.errors += 1
        if "latency_ms" in doc:
            self.latencies.append(float(doc["latency_ms"]))
        if len(self.seen) >= self.expected:
            self.done.set()


async def _follow_from_now(s: Settings, topic: str) -> tuple[AIOKafkaConsumer, GapGuard]:
    """A consumer of every partition of ``topic`` positioned at today's end offsets, fixed before any job is
    published ("latest" would be resolved lazily, at each partition's first fetch, and could skip a record)."""
    consumer = make_consumer(s, group_id=None)
    await consumer.start()
    parts: set[int] = set()
    for _ in range(100):  # a topic created a moment ago may not be in the first metadata yet
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic) or set()
        if parts:
            break
        await asyncio.sleep(0.05)
    if not parts:
        raise RuntimeError(f"topic {topic} has no partitions")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    gaps = GapGuard(s.gap_wait_ms)
    for tp, end in (await consumer.end_offsets(tps)).items():
        consumer.seek(tp, end)
        gaps.expect(tp, end)
    return consumer, gaps


async def follow_results(consumer: AIOKafkaConsumer, gaps: GapGuard, out: Completions) -> None:
    while True:
        batch = await consumer.getmany(timeout_ms=100, max_records=1000)
        for tp, fetched in batch.items():
            records, gap_at = gaps.admit(tp, fetched, now_ms())
            for rec in records:
                with contextlib.suppress(Exception):
                    out.add(msgpack.unpackb(rec.value, raw=False))
            if gap_at is not None:
                consumer.seek(tp, gap_at)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100.0 * len(s)))]


async def run_demo(rt: Runtime, jobs: int, routers: int, console: Console, rate: float = 1000.0, seed: int = 7
                   ) -> Completions:  # fmt: skip
    s = rt.settings
    topics = Topics.from_settings(s)
    rng = random.Random(seed)
    metrics = [Metrics() for _ in range(routers)]
    router_objs: list[Router] = [build_router(rt, m) for m in metrics]
    workers: list[ModelWorker] = [build_worker(rt, cfg, service_ms=4.0, jitter_ms=2.0, seed=i)
                                  for i, cfg in enumerate(DEMO_HEADS)]  # fmt: skip
    tasks = [asyncio.create_task(w.run(), name=f"head-{w.head_id}") for w in workers]
    await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 30)
    tasks += [asyncio.create_task(run_router(rt, r), name=f"router-{i}") for i, r in enumerate(router_objs)]
    await asyncio.wait_for(asyncio.gather(*(r.ready.wait() for r in router_objs)), 30)

    run_id = uuid.uuid4().hex[:8]  # job ids unique per run: a rerun against the same Redis is not a duplicate
    results, gaps = await _follow_from_now(s, topics.results)
    out = Completions(expected=jobs, prefix=f"demo-{run_id}-")
    follower = asyncio.create_task(follow_results(results, gaps, out))
    pace = f"at {rate:,.0f} jobs/s" if rate > 0 else "in one burst"
    console.print(f"[bold]router-worker demo[/]: {routers} routers, {len(workers)} heads, {jobs} jobs {pace} "
                  f"(kafka {s.kafka_bootstrap_servers}, redis {redact_url(s.redis_url or '')})")  # fmt: skip
    t0 = time.perf_counter()
    try:
        async with JobProducer(s) as producer:
            for i in range(jobs):
                model = "llama-3.3-70b" if rng.random() < 0.6 else "resnet50"
                await producer.submit(
                    model, payload=b"x" * rng.randint(16, 512), region=rng.choice(("us-east", "eu-west")),
                    session_id=f"user-{rng.randint(1, 50)}", estimated_tokens=rng.randint(0, 400),
                    tenant=rng.choice(("acme", "globex")), job_id=f"demo-{run_id}-{i}",
                )  # fmt: skip
                if rate > 0 and i % 50 == 49:  # pace in small bursts: the latencies then measure routing
                    ahead = t0 + (i + 1) / rate - time.perf_counter()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        published = time.perf_counter() - t0
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:  # fmt: skip
            task = progress.add_task("jobs completed", total=jobs)
            deadline = time.monotonic() + max(60.0, jobs / 50)
            while not out.done.is_set() and time.monotonic() < deadline:
                progress.update(task, completed=len(out.seen))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(out.done.wait(), 0.1)
            progress.update(task, completed=len(out.seen))
        elapsed = time.perf_counter() - t0
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await results.stop()
        for r in router_objs:
            r.stop()
        for w in workers:
            w.stop()
        await asyncio.wait(tasks, timeout=2 * s.shutdown_timeout_s)
        await cancel_and_wait(tasks)
    print_summary(console, out, router_objs, jobs, published, elapsed)
    print_where_to_look(console, s)
    return out


def print_summary(console: Console, out: Completions, routers: list[Router], jobs: int, published_s: float,
                  elapsed_s: float) -> None:  # fmt: skip
    heads = Table(title="Jobs per head", show_lines=False)
    heads.add_column("head")
    heads.add_column("model")
    heads.add_column("region")
    heads.add_column("jobs", justify="right")
    for cfg in DEMO_HEADS:
        assert cfg.head_id is not None
        heads.add_row(cfg.head_id, cfg.model_id, cfg.region, str(out.by_head.get(cfg.head_id, 0)))
    console.print(heads)
    routed = sum(r.stats.routed for r in routers)
    summary = Table(title="Summary", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for model, n in sorted(out.by_model.items()):
        summary.add_row(f"jobs for {model}", str(n))
    summary.add_row("jobs published", f"{jobs} in {published_s:.2f}s")
    summary.add_row("jobs completed", f"{len(out.seen)} ({out.errors} errors, {out.duplicates} duplicates)")
    for i, r in enumerate(routers):
        summary.add_row(f"router {i + 1} routed", f"{r.stats.routed} in {r.stats.batches} batches")
    summary.add_row("routed/s (whole run)", f"{routed / elapsed_s:,.0f}")
    summary.add_row("dead letters", str(sum(r.stats.dead_lettered for r in routers)))
    held = {k: sum(getattr(r.stats, k) for r in routers) for k in ("saturated", "gap_waits", "claimed_elsewhere",
                                                                    "unsent")}  # fmt: skip
    summary.add_row("partition holds", ", ".join(f"{k} {v}" for k, v in held.items()))
    for q in (50, 95, 99):
        summary.add_row(f"end-to-end latency p{q}", f"{percentile(out.latencies, q):.1f} ms")
    console.print(summary)
    ok = len(out.seen) == jobs and out.duplicates == 0
    if ok:
        console.print("[bold green]all jobs routed and completed exactly once[/]")
    else:
        console.print(f"[bold red]{jobs - len(out.seen)} jobs not completed[/] (routers routed {routed}, "
                      f"dead-lettered {sum(r.stats.dead_lettered for r in routers)})")  # fmt: skip
        missing = sorted({f"{out.prefix}{i}" for i in range(jobs)} - out.seen)
        console.print(f"missing: {missing[:10]}")
        for i, r in enumerate(routers):
            console.print(f"router {i + 1}: {r.stats}")


def where_to_look(s: Settings) -> list[tuple[str, str]]:
    """Where an operator looks next: the metrics URL, the audit file, the audit replay command."""
    if s.admin_port:
        metrics = f"http://{s.admin_host}:{s.admin_port}/metrics"
    else:
        metrics = (
            "http://127.0.0.1:8080/metrics of a router run with ROUTER_ADMIN_PORT=8080 (off in this demo)"
        )
    audit_file = str(Path(s.audit_file).resolve()) if s.audit_file else "(off: ROUTER_AUDIT_FILE is empty)"
    return [
        ("metrics", metrics),
        ("audit file", f"{audit_file} (rotated: .1, .2, ...)"),
        ("audit replay", "router-worker audit tail --since 10m [--json] [--event E] [--model M] [--head H] "
                         "[--job J] [--tenant T]  (ROUTER_REDIS_URL of a running deployment)"),
    ]  # fmt: skip


def print_where_to_look(console: Console, s: Settings) -> None:
    table = Table(title="Where to look", show_header=False)
    table.add_column("what")
    table.add_column("where", overflow="fold")
    for what, where in where_to_look(s):
        table.add_row(what, where)
    console.print(table)
