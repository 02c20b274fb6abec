"""``router-worker bench soak``: the whole deployment under a steady load with faults on a schedule, then a
check of every job id produced against where it ended up.

What runs, each as its own process (``router_worker.harness``): 2 routers (with admin ports, read for their
partitions and Redis state), 3 demo heads of 2 models (2 of ``soak-a``, 1 of ``soak-b``), one producer per
model (``python -m router_worker.bench_soak produce``) at half the rate each, a Redis server of the soak's own
(append-only, fsync always: it is restarted as one of the faults, so the soak never uses a configured Redis),
and the broker: the configured one (``ROUTER_KAFKA_BOOTSTRAP_SERVERS``) or an embedded one. Every run has its
own topics, Redis key prefix and consumer group.

Faults, one every ``--fault-every`` seconds after a warm-up, in this order, repeated (each starts once the one
before it recovered):

* ``router_kill``: router ``r1`` killed with SIGKILL, restarted a second later under its id; recovered when the
  partitions are spread over both routers again.
* ``head_kill``: head ``a1`` killed with SIGKILL, restarted under its id once its heartbeat deadline passed
  (a live id is refused); recovered when it registered again.
* ``redis_restart``: Redis stopped (SIGTERM, its append-only file synced), started again after
  ``REDIS_DOWN_S``; recovered when every router says Redis answers (``router_redis_available``).
* ``router_pause``: router ``r2`` stopped with SIGSTOP for its Kafka session timeout plus ``PAUSE_MARGIN_S``,
  then SIGCONT; recovered when the partitions are spread over both routers again.

At the end the producers' acknowledged job ids are checked against the results topic (the demo heads write a
completion record per job served) and the DLQ: completed, dead-lettered (by reason), lost (neither). A job
delivered more than once is explained by the fault whose window it falls in and whose kind can cause that kind
of duplicate (see :func:`explain_duplicates`); what no fault explains is reported as unexplained. Memory: each
router's RSS at the end against its RSS after the warm-up (of its own process: a restarted router is measured
from its restart). Latency: produce (the job's ``created_at``) to completion (the record's ``finished_at``) of
each job's first completion, p50/p99/max per minute of production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from router_worker.harness.ledger import Ledger
from router_worker.harness.procs import HarnessError, Proc, Procs, RedisServer, poll, rss_mb, scrape_metrics
from router_worker.localstack import free_port
from router_worker.settings import Settings

FAULTS = ("router_kill", "head_kill", "redis_restart", "router_pause")
"""The fault kinds, in the order the schedule cycles through them."""
MODELS = ("soak-a", "soak-b")
KILLED_ROUTER, PAUSED_ROUTER, KILLED_HEAD = "r1", "r2", "a1"
REDIS_DOWN_S = 2.0
PAUSE_MARGIN_S = 3.0
"""A paused router stays stopped this much longer than its Kafka session timeout."""
RESTART_DELAY_S = 1.0
LEAD_MS = 10_000
"""A duplicate is laid to a fault only if its first routing was at most this long before the fault began (a
job in a router's batch or a head's uncommitted queue when the fault hit)."""
GRACE_MS = 5_000
"""... and at most this long after the fault recovered (the partition's new owner may still be catching up)."""

# The fault-recovery timings of the soak (the defaults of a deployment are slower: a 10 s session timeout,
# 5 s head TTL). The children get them through their environment.
SOAK_TIMINGS: dict[str, Any] = {
    "head_ttl_ms": 2_000,
    "head_heartbeat_ms": 200,
    "head_refresh_ms": 500,
    "kafka_session_timeout_ms": 6_000,
    "kafka_heartbeat_interval_ms": 500,
}


class SoakError(RuntimeError):
    """The soak could not run (a process did not start or recover, the broker is unreachable)."""


@dataclass(frozen=True, slots=True)
class SoakConfig:
    minutes: float = 10.0
    """How long the producers run."""
    rate: float = 200.0
    """Jobs per second over all producers."""
    fault_every_s: float = 30.0
    warmup_s: float = 10.0
    """Before the first fault; each router's RSS baseline is taken this long after it started."""
    faults: tuple[str, ...] = FAULTS
    service_ms: float = 5.0
    head_capacity: int = 16
    drain_s: float = 120.0
    """Longest wait, after the producers stopped, for every job to be completed or dead-lettered."""

    def __post_init__(self) -> None:
        if not 0 < self.minutes <= 24 * 60:  # a comparison with nan is false: nan is refused here too
            raise ValueError("minutes must be above 0 and at most 1440")
        if not 0 < self.rate <= 20_000:
            raise ValueError("rate must be above 0 and at most 20000 jobs/s")
        if not self.fault_every_s >= 5:
            raise ValueError("fault-every must be at least 5 s")
        if self.warmup_s < 0 or self.drain_s <= 0:
            raise ValueError("warm-up must be at least 0 s and drain above 0 s")
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(FAULTS)})")

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0


# --- the pure part: schedule, duplicates, latency, memory ------------------------------------------------------


def fault_plan(cfg: SoakConfig) -> list[tuple[float, str]]:
    """(seconds after production starts, kind): one fault every ``fault_every_s`` from the warm-up on, cycling
    through ``cfg.faults``, each with a whole period left before production ends (to recover in)."""
    plan: list[tuple[float, str]] = []
    if not cfg.faults:
        return plan
    at = cfg.warmup_s
    while at + cfg.fault_every_s <= cfg.duration_s + 1e-9:
        plan.append((at, cfg.faults[len(plan) % len(cfg.faults)]))
        at += cfg.fault_every_s
    return plan


@dataclass(frozen=True, slots=True)
class FaultWindow:
    kind: str
    target: str
    start_ms: int
    end_ms: int
    """When it recovered (epoch ms)."""
    note: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the soak keeps of one completion record."""

    attempt: int
    routed_at: int
    head_id: str
    created_at: int
    finished_at: int


def delivery_of(doc: Mapping[str, Any]) -> Delivery:
    def i(key: str) -> int:
        v = doc.get(key)
        return int(v) if isinstance(v, int | float) else 0

    return Delivery(
        i("attempt"), i("routed_at"), str(doc.get("head_id") or ""), i("created_at"), i("finished_at")
    )


HOW = {
    "served_again": ("head_kill",),
    "rerouted_same_attempt": ("router_kill", "router_pause", "redis_restart"),
    "rerouted_next_attempt": ("head_kill",),
}
"""Which faults can cause each kind of duplicate. ``served_again``: the same routed record served twice (a
restarted head read its partition again from its committed offset); ``rerouted_same_attempt``: a router routed
the record again under the same attempt (a killed or paused router's partitions moved before its marks were
written; claims not checkable while Redis was down); ``rerouted_next_attempt``: the job came back as its next
attempt (a lost head's unfinished jobs republished by the reaper)."""


def how_duplicated(prev: Delivery, cur: Delivery) -> str:
    if cur.attempt > prev.attempt:
        return "rerouted_next_attempt"
    if cur.routed_at == prev.routed_at and cur.attempt == prev.attempt:
        return "served_again"
    return "rerouted_same_attempt"


@dataclass(slots=True)
class Duplicates:
    extra: int = 0
    """Deliveries beyond each job's first."""
    jobs: int = 0
    by_fault: dict[str, int] = field(default_factory=dict)
    """Fault kind -> extra deliveries it explains."""
    by_how: dict[str, int] = field(default_factory=dict)
    per_fault: list[int] = field(default_factory=list)
    """Extra deliveries explained by each fault of the run, in order."""
    unexplained: int = 0
    unexplained_samples: list[str] = field(default_factory=list)


def explain_duplicates(deliveries: Mapping[str, Sequence[Delivery]], faults: Sequence[FaultWindow],
                       lead_ms: int = LEAD_MS, grace_ms: int = GRACE_MS, samples: int = 10) -> Duplicates:  # fmt: skip
    """Lay every extra delivery to a fault: one of a kind that can cause it (:data:`HOW`), whose window holds
    it: the job was first routed within ``lead_ms`` before the fault began and no later than ``grace_ms`` after
    it recovered, and delivered again after it began. The latest such fault wins; none: unexplained."""
    out = Duplicates(per_fault=[0] * len(faults))
    for job_id, ds in deliveries.items():
        if len(ds) < 2:
            continue
        out.jobs += 1
        ordered = sorted(ds, key=lambda d: (d.routed_at, d.finished_at))
        for prev, cur in pairwise(ordered):
            out.extra += 1
            how = how_duplicated(prev, cur)
            out.by_how[how] = out.by_how.get(how, 0) + 1
            again = cur.finished_at if how == "served_again" else cur.routed_at
            best: int | None = None
            for i, f in enumerate(faults):
                if (f.kind in HOW[how] and f.start_ms - lead_ms <= prev.routed_at <= f.end_ms + grace_ms
                        and again >= f.start_ms and (best is None or f.start_ms > faults[best].start_ms)):  # fmt: skip
                    best = i
            if best is None:
                out.unexplained += 1
                if len(out.unexplained_samples) < samples:
                    out.unexplained_samples.append(
                        f"{job_id}: {how}: {prev.head_id} attempt {prev.attempt} routed {prev.routed_at}, then "
                        f"{cur.head_id} attempt {cur.attempt} routed {cur.routed_at} finished {cur.finished_at}"
                    )
                continue
            out.per_fault[best] += 1
            kind = faults[best].kind
            out.by_fault[kind] = out.by_fault.get(kind, 0) + 1
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class MinuteLatency:
    minute: int
    """Minute of production the jobs were produced in (0 first)."""
    jobs: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def latency_by_minute(first: Sequence[Delivery], t0_ms: int) -> list[MinuteLatency]:
    """Produce-to-completion latency of each job's first completion, per minute of its production."""
    buckets: dict[int, list[float]] = {}
    for d in first:
        if d.created_at <= 0 or d.finished_at <= 0:
            continue
        buckets.setdefault(max(0, (d.created_at - t0_ms) // 60_000), []).append(
            float(d.finished_at - d.created_at)
        )
    out = []
    for minute in sorted(buckets):
        v = sorted(buckets[minute])
        out.append(MinuteLatency(minute, len(v), percentile(v, 0.5), percentile(v, 0.99), v[-1]))
    return out


@dataclass(frozen=True, slots=True)
class Memory:
    router: str
    pid: int
    started_s: float
    """When this process started, seconds after production began (negative: before)."""
    warm_mb: float | None
    """RSS after its warm-up (None: it had not run that long by the end)."""
    end_mb: float | None

    @property
    def growth_pct(self) -> float | None:
        if self.warm_mb is None or self.end_mb is None or self.warm_mb <= 0:
            return None
        return (self.end_mb - self.warm_mb) / self.warm_mb * 100.0


def memory_growth(router: str, pid: int, started_s: float, samples: Sequence[tuple[float, float]],
                  warmup_s: float) -> Memory:  # fmt: skip
    """RSS of one router process: the first sample at least ``warmup_s`` after it started, against the last."""
    warm = next((mb for t, mb in samples if t >= started_s + warmup_s), None)
    end = samples[-1][1] if samples else None
    return Memory(router, pid, round(started_s, 1), warm, end)


# --- the report ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SoakReport:
    config: dict[str, Any]
    broker: str
    produced: int
    completed: int
    lost: int
    lost_samples: list[str]
    dead_lettered: int
    """Produced jobs that ended in the DLQ (and were never completed)."""
    dead_by_reason: dict[str, int]
    duplicates: Duplicates
    faults: list[FaultWindow]
    memory: list[Memory]
    latency: list[MinuteLatency]
    produce_failed: int
    """Jobs a producer sent that the broker did not acknowledge (not counted as produced)."""
    seconds: float

    def to_json(self) -> dict[str, Any]:
        def finite(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            if isinstance(v, list):
                return [finite(x) for x in v]
            return v

        out: dict[str, Any] = finite({
            "config": self.config, "broker": self.broker, "produced": self.produced, "completed": self.completed,
            "lost": self.lost, "lost_samples": self.lost_samples, "dead_lettered": self.dead_lettered,
            "dead_by_reason": self.dead_by_reason, "produce_failed": self.produce_failed,
            "duplicates": asdict(self.duplicates),
            "faults": [asdict(f) | {"duplicates": self.duplicates.per_fault[i]} for i, f in enumerate(self.faults)],
            "memory": [asdict(m) | {"growth_pct": m.growth_pct} for m in self.memory],
            "latency_per_minute": [asdict(m) for m in self.latency],
            "seconds": round(self.seconds, 1),
        })  # fmt: skip
        return out


def render(report: SoakReport, console: Console) -> None:
    r, d = report, report.duplicates
    console.print(f"[bold]soak[/] {r.config['minutes']} min at {r.config['rate']:.0f} jobs/s, broker {r.broker}, "
                  f"{len(r.faults)} faults, {r.seconds:.0f} s in all")  # fmt: skip
    console.print(f"produced {r.produced:,}  completed {r.completed:,}  dead-lettered {r.dead_lettered:,} "
                  f"{r.dead_by_reason or ''}  [bold]lost {r.lost:,}[/]"
                  + (f" (e.g. {', '.join(r.lost_samples[:5])})" if r.lost else ""))  # fmt: skip
    if r.produce_failed:
        console.print(f"not acknowledged to the producers (not counted): {r.produce_failed:,}")
    console.print(f"duplicated deliveries {d.extra:,} of {d.jobs:,} jobs: by fault {d.by_fault or '{}'}, "
                  f"by kind {d.by_how or '{}'}, unexplained {d.unexplained}")  # fmt: skip
    for s in d.unexplained_samples:
        console.print(f"  unexplained: {s}")
    faults = Table(title="faults")
    for col in ("kind", "target", "at s", "recovered in s", "duplicates", "note"):
        faults.add_column(col)
    t0 = r.config["t0_ms"]
    for i, f in enumerate(r.faults):
        faults.add_row(f.kind, f.target, f"{(f.start_ms - t0) / 1000:.1f}", f"{(f.end_ms - f.start_ms) / 1000:.1f}",
                       str(d.per_fault[i]), f.note)  # fmt: skip
    console.print(faults)
    mem = Table(title="router memory (RSS)")
    for col in ("router", "pid", "started at s", "after warm-up MiB", "end MiB", "growth"):
        mem.add_column(col)
    for m in r.memory:
        g = m.growth_pct
        mem.add_row(m.router, str(m.pid), f"{m.started_s:.0f}", "-" if m.warm_mb is None else f"{m.warm_mb:.1f}",
                    "-" if m.end_mb is None else f"{m.end_mb:.1f}", "-" if g is None else f"{g:+.1f} %")  # fmt: skip
    console.print(mem)
    lat = Table(title="produce to completion, per minute of production")
    for col in ("minute", "jobs", "p50 ms", "p99 ms", "max ms"):
        lat.add_column(col)
    for ml in r.latency:
        lat.add_row(
            str(ml.minute), f"{ml.jobs:,}", f"{ml.p50_ms:.0f}", f"{ml.p99_ms:.0f}", f"{ml.max_ms:.0f}"
        )
    console.print(lat)


# --- the imperative shell -----------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _keep(doc: dict[str, Any]) -> dict[str, Any]:
    """The ledger keeps only what the soak reads of a completion record."""
    return {k: doc.get(k) for k in ("attempt", "routed_at", "head_id", "created_at", "finished_at")}


@dataclass(slots=True)
class _Run:
    """The processes of one soak and what happened to them."""

    cfg: SoakConfig
    s: Settings
    procs: Procs
    redis: RedisServer
    workdir: Path
    log: Console | None
    t0: float = 0.0
    """Production start (time.time())."""
    routers: dict[str, Proc] = field(default_factory=dict)
    heads: dict[str, Proc] = field(default_factory=dict)
    rss: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    """pid -> (seconds after t0, MiB)."""
    faults: list[FaultWindow] = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log.print(f"[dim]{time.time() - self.t0 if self.t0 else 0.0:6.1f}s[/] {text}")

    def start_router(self, name: str) -> Proc:
        p = self.procs.router(name, admin_port=free_port(), cwd=self.workdir / name,
                              ROUTER_AUDIT_FILE=str(self.workdir / name / "audit.log"))  # fmt: skip
        self.routers[name] = p
        return p

    def start_head(self, head_id: str, model: str) -> Proc:
        p = self.procs.head(model, head_id=head_id, capacity=self.cfg.head_capacity,
                            service_ms=self.cfg.service_ms, jitter_ms=1.0)  # fmt: skip
        self.heads[head_id] = p
        return p

    async def spread(self, within_s: float = 60.0) -> None:
        await self.procs.wait_spread(list(self.routers.values()), within_s)

    # faults

    async def router_kill(self) -> tuple[str, str]:
        old = self.routers[KILLED_ROUTER]
        old.kill9()
        await old.wait_exit(10)
        await asyncio.sleep(RESTART_DELAY_S)
        self.start_router(KILLED_ROUTER)
        await self.spread(90)
        return KILLED_ROUTER, f"pid {old.pid} killed, restarted as pid {self.routers[KILLED_ROUTER].pid}"

    async def router_pause(self) -> tuple[str, str]:
        p = self.routers[PAUSED_ROUTER]
        pause_s = self.s.kafka_session_timeout_ms / 1000.0 + PAUSE_MARGIN_S
        p.pause()
        try:
            await asyncio.sleep(pause_s)
        finally:
            p.resume()
        await self.spread(90)
        return (
            PAUSED_ROUTER,
            f"stopped {pause_s:.1f} s (session timeout {self.s.kafka_session_timeout_ms} ms)",
        )

    async def head_kill(self) -> tuple[str, str]:
        old = self.heads[KILLED_HEAD]
        key = self.procs.keys.head(KILLED_HEAD)
        raw_instance = await self.procs.redis.hget(key, "instance")
        instance = None if raw_instance is None else str(raw_instance)
        old.kill9()
        await old.wait_exit(10)

        async def lapsed() -> bool:  # a live head's id is refused: restart once its deadline passed
            with contextlib.suppress(Exception):
                raw = await self.procs.redis.hget(key, "expires_at")
                return raw is None or int(float(raw)) < _now_ms()
            return False

        await poll(lapsed, self.s.head_ttl_ms / 1000.0 * 3 + 5, 0.1)
        for _ in range(3):  # a restart that raced the deadline is refused (exit 2): try again
            new = self.start_head(KILLED_HEAD, MODELS[0])
            try:
                await self.procs.wait_head(new, 30, not_instance=instance)
                break
            except HarnessError:
                if new.alive:
                    raise
                await asyncio.sleep(1.0)
        else:
            raise SoakError(
                f"head {KILLED_HEAD} did not come back after its kill\n{self.heads[KILLED_HEAD].tail()}"
            )
        return KILLED_HEAD, f"pid {old.pid} killed, restarted as pid {self.heads[KILLED_HEAD].pid}"

    async def redis_restart(self) -> tuple[str, str]:
        await self.redis.stop()
        await asyncio.sleep(REDIS_DOWN_S)
        await self.redis.start()
        routers = list(self.routers.values())

        async def answered() -> bool:
            for p in routers:
                m = await scrape_metrics(p.admin_port)
                if m is None or m.get("router_redis_available") != 1.0:
                    return False
            return True

        if not await poll(answered, 60, 0.25):
            raise SoakError("the routers did not see Redis again within 60 s of its restart")
        return "redis", f"down {REDIS_DOWN_S:.0f} s (SIGTERM, append-only file kept)"

    async def fault(self, kind: str) -> None:
        start = _now_ms()
        self.say(f"fault: {kind}")
        target, note = await getattr(self, kind)()
        self.faults.append(FaultWindow(kind, target, start, _now_ms(), note))
        self.say(f"recovered from {kind} in {(_now_ms() - start) / 1000:.1f} s ({note})")

    async def run_faults(self, plan: Sequence[tuple[float, str]]) -> None:
        for at, kind in plan:
            delay = self.t0 + at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.check_alive()
            await self.fault(kind)

    def check_alive(self) -> None:
        dead = [p for p in [*self.routers.values(), *self.heads.values()] if not p.alive]
        if dead:
            raise SoakError("not alive: " + "; ".join(p.describe() for p in dead) + "\n"
                            + "\n".join(p.tail(2000) for p in dead))  # fmt: skip

    async def sample_rss(self) -> None:
        while True:
            t = time.time() - self.t0
            for p in self.routers.values():
                if p.alive and not p.paused:
                    mb = rss_mb(p.pid)
                    if mb is not None:
                        self.rss.setdefault(p.pid, []).append((t, mb))
            await asyncio.sleep(1.0)

    def memory(self) -> list[Memory]:
        return [memory_growth(name, p.pid, p.started_at - self.t0, self.rss.get(p.pid, []), self.cfg.warmup_s)
                for name, p in sorted(self.routers.items())]  # fmt: skip


REDIS_SECURITY = ("redis_username", "redis_password", "redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile",
                  "redis_ssl_key_password")  # fmt: skip
"""Login and TLS of a configured Redis: not for the soak's own (plaintext, no password)."""


def soak_settings(base: Settings, bootstrap: str, redis_url: str, workdir: Path) -> Settings:
    """The run's settings: its own topics, keys and group, the soak's fault-recovery timings, and its own
    Redis (without the configured Redis's login and TLS; the broker's are kept)."""
    run = uuid.uuid4().hex[:6]
    return base.model_copy(update={
        **dict.fromkeys(REDIS_SECURITY), "redis_ssl_check_hostname": True,
        "kafka_bootstrap_servers": bootstrap, "redis_url": redis_url,
        "topic_prefix": f"{base.topic_prefix}soak-{run}.", "redis_prefix": f"{base.redis_prefix}-soak-{run}",
        "group_id": f"soak-{run}", "audit_file": str(workdir / "audit.log"), **SOAK_TIMINGS,
    })  # fmt: skip


@contextlib.contextmanager
def _broker(settings: Settings, workdir: Path) -> Iterator[tuple[str, str]]:
    """(bootstrap servers, what it is): the configured broker, or an embedded one started for the soak."""
    if settings.kafka_bootstrap_servers:
        yield settings.kafka_bootstrap_servers, "configured"
        return
    from router_worker.localstack import local_stack

    with local_stack(workdir / "stack") as st:  # its Redis stays idle: the soak restarts a Redis of its own
        yield st.bootstrap_servers, "embedded"


async def run_soak(settings: Settings, cfg: SoakConfig, log: Console | None = None,
                   workdir: Path | None = None) -> SoakReport:  # fmt: skip
    """The whole soak (see the module's docstring). ``workdir`` keeps the processes' logs (default: a temporary
    folder, removed at the end)."""
    from router_worker.localstack import wait_kafka_ready

    began = time.time()
    owned = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="router-worker-soak-")) if workdir is None else Path(workdir)
    try:
        with _broker(settings, wd) as (bootstrap, broker):
            await wait_kafka_ready(bootstrap)
            async with RedisServer(wd / "redis") as redis:
                s = soak_settings(settings, bootstrap, redis.url, wd)
                async with Procs(s, wd / "logs", quiet=True) as procs:
                    run = _Run(cfg, s, procs, redis, wd, log)
                    try:
                        report = await _soak(run)
                    except HarnessError as exc:
                        raise SoakError(str(exc)) from exc
        report.broker = broker
        report.seconds = time.time() - began
        return report
    finally:
        if owned:
            shutil.rmtree(wd, ignore_errors=True)


async def _soak(run: _Run) -> SoakReport:
    cfg, s, procs = run.cfg, run.s, run.procs
    for name in (KILLED_ROUTER, PAUSED_ROUTER):
        run.start_router(name)
    for head_id, model in (("a1", MODELS[0]), ("a2", MODELS[0]), ("b1", MODELS[1])):
        run.start_head(head_id, model)
    await run.spread(90)
    for p in run.heads.values():
        await procs.wait_head(p, 60)
    run.say("2 routers, 3 heads ready")
    async with Ledger(s, keep=_keep) as ledger:
        prefix = f"soak-{uuid.uuid4().hex[:6]}"
        outs = {m: run.workdir / f"produced-{m}.json" for m in MODELS}
        run.t0 = time.time()
        t0_ms = int(run.t0 * 1000)
        producers = [
            procs.spawn(f"producer-{m}", "producer", ["produce", "--model", m, "--rate", str(cfg.rate / len(MODELS)),
                        "--seconds", str(cfg.duration_s), "--prefix", f"{prefix}-{m}", "--out", str(outs[m])],
                        module="router_worker.bench_soak")
            for m in MODELS
        ]  # fmt: skip
        sampler = asyncio.create_task(run.sample_rss(), name="rss")
        try:
            await run.run_faults(fault_plan(cfg))
            if not await poll(lambda: not any(p.alive for p in producers), cfg.duration_s + 60, 0.2):
                raise SoakError("the producers did not finish\n" + "\n".join(p.tail() for p in producers))
            produced: list[str] = []
            failed = 0
            for m, p in zip(MODELS, producers, strict=True):
                got = _read_produced(outs[m], p)
                produced += got[0]
                failed += got[1]
            run.say(f"production over: {len(produced):,} jobs acknowledged; draining")
            drained = await ledger.wait_accounted(produced, cfg.drain_s)
            await ledger.settle(quiet_s=3.0, within_s=30.0)
            run.say("drained" if drained else f"not drained within {cfg.drain_s:.0f} s")
            run.check_alive()
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        return _report(run, ledger, produced, failed, t0_ms)


def _read_produced(path: Path, proc: Proc) -> tuple[list[str], int]:
    """The acknowledged job ids a producer wrote, and how many it sent that were not acknowledged."""
    try:
        doc = json.loads(path.read_text())
        failed = set(doc["failed"])
        ids = [f"{doc['prefix']}-{i:07d}" for i in range(int(doc["sent"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SoakError(
            f"producer {proc.name} left no result ({exc}); rc={proc.returncode}\n{proc.tail()}"
        ) from exc
    return [i for i in ids if i not in failed], len(failed)


def _report(run: _Run, ledger: Ledger, produced: list[str], failed: int, t0_ms: int) -> SoakReport:
    by_job: dict[str, list[Delivery]] = {}
    for job_id in produced:
        docs = ledger.deliveries.get(job_id)
        if docs:
            by_job[job_id] = [delivery_of(d) for d in docs]
    dead_ids = ledger.dead_ids
    lost = [i for i in produced if i not in by_job and i not in dead_ids]
    dead_lettered = sum(1 for i in produced if i not in by_job and i in dead_ids)
    first = [min(ds, key=lambda d: d.finished_at) for ds in by_job.values()]
    cfg = run.cfg
    return SoakReport(
        config={"minutes": cfg.minutes, "rate": cfg.rate, "fault_every_s": cfg.fault_every_s,
                "warmup_s": cfg.warmup_s, "faults": list(cfg.faults), "t0_ms": t0_ms,
                "timings": SOAK_TIMINGS, "routers": 2, "heads": {"soak-a": 2, "soak-b": 1}},
        broker="", produced=len(produced), completed=len(by_job), lost=len(lost), lost_samples=lost[:20],
        dead_lettered=dead_lettered, dead_by_reason=dict(Counter(d.reason for d in ledger.dead)),
        duplicates=explain_duplicates(by_job, run.faults), faults=list(run.faults), memory=run.memory(),
        latency=latency_by_minute(first, t0_ms), produce_failed=failed, seconds=0.0,
    )  # fmt: skip


def command(
    settings: Settings, cfg: SoakConfig, *, json_out: bool, console: Console, err: Console
) -> SoakReport:
    """``router-worker bench soak``: run, then print the report (or one JSON object). Progress on stderr.
    SIGTERM stops it as Ctrl-C does: every process it started is resumed (one may be paused) and stopped."""
    report = asyncio.run(_stoppable(run_soak(settings, cfg, err)))
    if json_out:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
        sys.stdout.flush()
    else:
        render(report, console)
    return report


async def _stoppable(soak: Awaitable[SoakReport]) -> SoakReport:
    """``soak`` cancelled on SIGTERM, so its clean-up runs (Python's default for SIGTERM ends the process at once:
    the children get SIGTERM from the kernel, but a router paused by SIGSTOP for a fault would stay stopped)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await soak
    except asyncio.CancelledError:
        if terminated:
            raise SoakError("stopped by SIGTERM (every process the soak started was stopped)") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# --- the producer process -----------------------------------------------------------------------------------


async def produce(
    settings: Settings, model: str, rate: float, seconds: float, prefix: str, out: Path
) -> None:
    """Send jobs of ``model`` at ``rate`` per second for ``seconds`` (ids ``<prefix>-<n>``), then wait for every
    acknowledgement and write {prefix, sent, failed: [ids]} to ``out``. SIGTERM ends the sending early."""
    from producers.producer import build_job
    from router_worker.pipeline.kafka import make_producer
    from router_worker.topics import Topics
    from schemas.envelope import MSGPACK, encode_job

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    topic = Topics.from_settings(settings).requests
    producer = make_producer(settings)
    await producer.start()
    futures: dict[str, asyncio.Future[Any]] = {}
    failed: list[str] = []
    headers = [("content-type", MSGPACK.encode())]
    sent = 0
    t0 = loop.time()
    try:
        while not stop.is_set():
            elapsed = loop.time() - t0
            if elapsed >= seconds:
                break
            due = min(int(elapsed * rate) + 1, int(seconds * rate))
            while sent < due:
                job_id = f"{prefix}-{sent:07d}"
                doc = build_job(model, b"x" * 64, job_id=job_id)
                try:
                    futures[job_id] = await producer.send(topic, encode_job(doc, MSGPACK), key=job_id.encode(),
                                                          headers=headers)  # fmt: skip
                except Exception:
                    failed.append(job_id)
                sent += 1
            if len(futures) > 5_000:  # bound what we hold: settle what is acknowledged
                await _settle(futures, failed)
            await asyncio.sleep(0.01)
        await _settle(futures, failed)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 30)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"prefix": prefix, "sent": sent, "failed": failed}))
    os.replace(tmp, out)


async def _settle(futures: dict[str, asyncio.Future[Any]], failed: list[str]) -> None:
    ids = list(futures)
    results = await asyncio.gather(*(futures.pop(i) for i in ids), return_exceptions=True)
    failed.extend(i for i, r in zip(ids, results, strict=True) if isinstance(r, BaseException))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m router_worker.bench_soak produce ...``: one producer process of the soak."""
    from router_worker.settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m router_worker.bench_soak")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce", help="send jobs at a steady rate; write the acknowledged ids' range")
    p.add_argument("--model", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.rate <= 0 or a.seconds <= 0:
        ap.error("--rate and --seconds must be above 0")
    asyncio.run(produce(load_settings(), a.model, a.rate, a.seconds, a.prefix, a.out))


if __name__ == "__main__":
    main()
