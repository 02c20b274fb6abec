"""Process harness for the fault tests: routers and heads in their own processes (the real CLI), a steady job
stream, a ledger of what came out (completion records and dead letters), and a Redis server of the test's own
that can be stopped and started again with its data.

Everything here is bounded: every wait has a timeout and fails with what it saw, and every process started is
killed at teardown (and gets SIGTERM from the kernel should the test process itself die).

    async with Procs(settings, tmp_path) as procs:
        r1, r2 = await procs.start_routers(2)
        h1 = await procs.start_head("m", capacity=16, service_ms=5)
        async with Ledger(settings) as ledger, JobStream(settings, "m", 1000, rate=500) as stream:
            await stream.wait()
            await ledger.wait_delivered(stream.ids, timeout=60)
            await ledger.settle()
        report = ledger.report(stream.ids)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.localstack import free_port, redis_binary
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from schemas.envelope import MSGPACK
from tests.helpers import cli_env

P = ParamSpec("P")
T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
LOG_TAIL = 3000


# --- guards -------------------------------------------------------------------------------------------------


def time_limit(seconds: float) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Fail an async test that runs longer than ``seconds`` (the harness's teardown still kills everything)."""

    def deco(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            t0 = time.monotonic()
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), seconds)  # type: ignore[arg-type]
            except TimeoutError as exc:
                if time.monotonic() - t0 >= seconds - 0.5:
                    raise AssertionError(f"{fn.__name__} ran past its time limit of {seconds:.0f} s") from exc
                raise

        return wrapper

    return deco


async def poll(pred: Callable[[], Awaitable[bool] | bool], timeout: float, every: float = 0.1) -> bool:
    """Evaluate ``pred`` until it is true (True) or ``timeout`` passes (False). Never raises on time."""
    deadline = time.monotonic() + timeout
    while True:
        res = pred()
        if isinstance(res, Awaitable):
            res = await res
        if res:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, chars: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


# --- the child processes -------------------------------------------------------------------------------------


def settings_env(s: Settings) -> dict[str, str]:
    """``ROUTER_*`` variables for every setting of ``s`` that differs from its default, so a child process
    runs with the test's settings (timeouts, partitions, back-off), not only its addresses."""
    out: dict[str, str] = {}
    for name, f in Settings.model_fields.items():
        value = getattr(s, name)
        if value is None or value == f.get_default(call_default_factory=True):
            continue
        if isinstance(value, list | dict):
            out[f"ROUTER_{name.upper()}"] = json.dumps(value)
        elif isinstance(value, bool):
            out[f"ROUTER_{name.upper()}"] = "true" if value else "false"
        else:
            out[f"ROUTER_{name.upper()}"] = str(value)
    return out


@dataclass
class Proc:
    """One child process: a router or a head, its output in ``log``."""

    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    head_id: str | None = None
    paused: bool = False
    signals: list[str] = field(default_factory=list)
    """Signals the test sent, in order (shown in reports)."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            self.signals.append(sig.name)
            os.kill(self.pid, sig)

    def kill9(self) -> None:
        self.send(signal.SIGKILL)

    def term(self) -> None:
        self.send(signal.SIGTERM)

    def pause(self) -> None:
        self.send(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.send(signal.SIGCONT)
        self.paused = False

    async def wait_exit(self, timeout: float) -> int:
        """The exit status once the process ended; AssertionError (with its log) if it is still running."""
        if not await poll(lambda: not self.alive, timeout, 0.05):
            raise AssertionError(f"{self.name} (pid {self.pid}) still running {timeout:.0f} s after "
                                 f"{self.signals}\n{self.tail()}")  # fmt: skip
        rc = self.popen.returncode
        assert rc is not None
        return rc

    def tail(self, chars: int = LOG_TAIL) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{_tail(self.log, chars)}"

    def describe(self) -> str:
        rc = self.returncode
        state = "alive" if rc is None else f"exited rc={rc}"
        return f"{self.name} ({self.role}, pid {self.pid}): {state}; signals sent: {self.signals or 'none'}"

    def assert_alive(self) -> None:
        if not self.alive:
            raise AssertionError(f"{self.name} is not alive: {self.describe()}\n{self.tail()}")


class Procs:
    """Starts routers and heads as ``python -m router_worker.cli`` children joined to ``settings``'s deployment
    (same broker, Redis, topic prefix, Redis prefix, group and test settings), waits until they are ready, and
    kills every one of them on close."""

    def __init__(self, settings: Settings, workdir: Path, **env: str) -> None:
        self.s = settings
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.procs: list[Proc] = []
        self.topics = Topics.from_settings(settings)
        self.keys = Keys(settings.redis_prefix)
        self._redis: Redis | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._n = Counter[str]()

    async def __aenter__(self) -> Procs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # spawning

    def child_env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.s, **settings_env(self.s), PYTHONUNBUFFERED="1", **(self.env | extra))

    def spawn(self, name: str, role: str, args: Iterable[str], **env: str) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "router_worker.cli", *args],
                env=self.child_env(**env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals from the terminal reach the test only; we signal children
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        proc = Proc(name, role, popen, log)
        self.procs.append(proc)
        return proc

    def _name(self, role: str) -> str:
        self._n[role] += 1
        return f"{role}{self._n[role]}"

    def router(self, name: str | None = None, **env: str) -> Proc:
        """Start one router (not waiting for it). Its router id is its name; it logs at INFO."""
        name = name or self._name("router")
        env = {"ROUTER_ROUTER_ID": name, "ROUTER_LOG_LEVEL": "INFO"} | env
        return self.spawn(name, "router", ["run"], **env)

    def head(self, model: str, *, region: str = "default", capacity: int = 8, service_ms: float = 10.0,
             jitter_ms: float = 2.0, head_id: str | None = None, partition: int | None = None,
             fail_rate: float = 0.0, **env: str) -> Proc:  # fmt: skip
        """Start one demo head of ``model`` (not waiting for it)."""
        head_id = head_id or self._name("head")
        args = ["worker", "--model", model, "--region", region, "--capacity", str(capacity), "--service-ms",
                str(service_ms), "--jitter-ms", str(jitter_ms), "--head-id", head_id]  # fmt: skip
        if partition is not None:
            args += ["--partition", str(partition)]
        if fail_rate:
            args += ["--fail-rate", str(fail_rate)]
        proc = self.spawn(head_id, "head", args, **env)
        proc.head_id = head_id
        return proc

    async def start_routers(self, n: int, timeout: float = 60.0) -> list[Proc]:
        """Start ``n`` routers and wait until the group is stable with every live router in it."""
        started = [self.router() for _ in range(n)]
        await self.wait_group(timeout)
        return started

    async def start_head(self, model: str, timeout: float = 30.0, **kw: Any) -> Proc:
        proc = self.head(model, **kw)
        await self.wait_head(proc, timeout)
        return proc

    # readiness

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            assert self.s.redis_url
            self._redis = make_redis(self.s.redis_url)
        return self._redis

    def routers(self) -> list[Proc]:
        return [p for p in self.procs if p.role == "router"]

    def _check_started(self, procs: Iterable[Proc]) -> None:
        for p in procs:
            if not p.alive:
                raise AssertionError(f"{p.name} exited while starting (rc={p.returncode})\n{p.tail()}")

    async def group_state(self) -> tuple[str, int]:
        """(state, members) of the routers' consumer group, as the broker describes it."""
        if self._admin is None:
            assert self.s.kafka_bootstrap_servers
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.s.kafka_bootstrap_servers,
                                              request_timeout_ms=5000)  # fmt: skip
            await self._admin.start()
        groups = await self._admin.describe_consumer_groups([self.s.group_id])
        for resp in groups:
            for g in resp.groups:
                _err, group_id, state, _ptype, _proto, members = g[:6]
                if group_id == self.s.group_id:
                    return str(state), len(members)
        return "Unknown", 0

    async def wait_group(self, timeout: float = 60.0, members: int | None = None) -> None:
        """Wait until the router group is Stable with ``members`` members (default: the live routers)."""
        live = [p for p in self.routers() if p.alive and not p.paused]
        want = len(live) if members is None else members
        last: tuple[str, int] | str = ("?", 0)

        async def ready() -> bool:
            nonlocal last
            self._check_started(live)
            try:
                last = await self.group_state()
            except Exception as exc:  # the admin client may not be up yet: keep polling
                last = f"{type(exc).__name__}: {exc}"
                return False
            return last == ("Stable", want)

        if not await poll(ready, timeout, 0.2):
            tails = "\n".join(p.tail(1500) for p in live)
            raise AssertionError(f"router group {self.s.group_id} not Stable with {want} members in {timeout:.0f} s "
                                 f"(last seen: {last})\n{tails}")  # fmt: skip

    async def wait_head(self, proc: Proc, timeout: float = 30.0) -> None:
        """Wait until the head's hash is registered in Redis."""
        assert proc.head_id
        key = self.keys.head(proc.head_id)

        async def ready() -> bool:
            self._check_started([proc])
            try:
                return bool(await self.redis.hget(key, "head_id") == proc.head_id)
            except Exception:
                return False

        if not await poll(ready, timeout, 0.1):
            raise AssertionError(
                f"head {proc.head_id} not registered in Redis in {timeout:.0f} s\n{proc.tail()}"
            )

    # reporting and teardown

    def assert_alive(self, *procs: Proc) -> None:
        dead = [p for p in (procs or tuple(self.procs)) if not p.alive]
        if dead:
            raise AssertionError("not alive: " + "; ".join(p.describe() for p in dead) + "\n"
                                 + "\n".join(p.tail() for p in dead))  # fmt: skip

    def report(self, chars: int = LOG_TAIL) -> str:
        lines = [p.describe() for p in self.procs]
        lines += [p.tail(chars) for p in self.procs]
        return "\n".join(lines)

    async def close(self) -> None:
        for p in self.procs:
            if p.paused:
                with contextlib.suppress(ProcessLookupError):
                    p.resume()
        # Printed at teardown: pytest shows it with a failing test only.
        print("\n=== processes at teardown ===\n" + "\n".join(p.describe() for p in self.procs))
        for p in self.procs:
            if p.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
        for p in self.procs:
            print(p.tail(2000))
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()


# --- a steady stream of valid jobs ---------------------------------------------------------------------------


class JobStream:
    """Publishes ``count`` valid jobs of ``model`` through the producer SDK at ``rate`` jobs/s (0: at once) in
    the background. Job ids are ``<prefix>-<n>``, all known up front in :attr:`ids`."""

    def __init__(self, settings: Settings, model: str, count: int, rate: float = 0.0, prefix: str = "job",
                 content_type: str = MSGPACK) -> None:  # fmt: skip
        self.s = settings
        self.model = model
        self.rate = rate
        self.ids = [f"{prefix}-{i:06d}" for i in range(count)]
        self.sent = 0
        """Jobs handed to the producer so far."""
        self.started_at = 0.0
        self.finished_at = 0.0
        self._producer = JobProducer(settings, content_type)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="job-stream")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = self.started_at = loop.time()
        n = len(self.ids)
        while self.sent < n:
            due = n if self.rate <= 0 else min(n, int((loop.time() - t0) * self.rate) + 1)
            while self.sent < due:
                await self._producer.submit(self.model, {"n": self.sent}, job_id=self.ids[self.sent])
                self.sent += 1
            if self.sent < n:
                await asyncio.sleep(0.01)
        await self._producer.flush()
        self.finished_at = loop.time()

    async def wait(self, timeout: float = 120.0) -> None:
        """Wait until every job was published and acknowledged (raises what the producer raised)."""
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            raise AssertionError(f"job stream: only {self.sent} of {len(self.ids)} sent in {timeout:.0f} s"
                                 ) from None  # fmt: skip

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.stop(), 10)


# --- what came out: completion records and dead letters ------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    value: bytes | None
    key: bytes | None
    headers: dict[str, bytes | None]
    partition: int
    offset: int

    def h(self, name: str) -> str | None:
        raw = self.headers.get(name)
        return None if raw is None else raw.decode(errors="replace")

    @property
    def reason(self) -> str:
        return self.h("x-dlq-reason") or "<none>"

    @property
    def original(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) the dead letter came from, from its headers."""
        topic, part, off = (
            self.h("x-original-topic"),
            self.h("x-original-partition"),
            self.h("x-original-offset"),
        )
        if topic is None or part is None or off is None:
            return None
        try:
            return topic, int(part), int(off)
        except ValueError:
            return None

    def job_id(self) -> str | None:
        """The job id in the dead letter's value, when it decodes (msgpack or JSON) to a map with one."""
        if self.value is None:
            return None
        for decode in (lambda v: msgpack.unpackb(v, raw=False), json.loads):
            with contextlib.suppress(Exception):
                doc = decode(self.value)
                if isinstance(doc, dict) and isinstance(doc.get("job_id"), str):
                    return str(doc["job_id"])
        return None


@dataclass
class Report:
    """Deliveries of the expected jobs, and everything in the DLQ."""

    expected: int
    once: int
    more: dict[str, int]
    """job id -> deliveries, for jobs delivered more than once."""
    missing: list[str]
    unexpected: dict[str, int]
    """Delivered job ids that were not expected (another test's? a corrupted id?)."""
    dead_by_reason: Counter[str]
    dead_expected: int
    """Dead letters whose value carries an expected job id."""

    @property
    def lost(self) -> int:
        return len(self.missing)

    @property
    def duplicates(self) -> int:
        """Extra deliveries: a job delivered 3 times counts 2."""
        return sum(n - 1 for n in self.more.values())

    def summary(self) -> str:
        return (f"expected {self.expected}: delivered once {self.once}, more than once {len(self.more)} "
                f"({self.duplicates} extra deliveries), missing {len(self.missing)}"
                f"{' e.g. ' + ', '.join(self.missing[:5]) if self.missing else ''}; "
                f"unexpected ids delivered {len(self.unexpected)}; "
                f"dead letters {dict(self.dead_by_reason)} ({self.dead_expected} of expected jobs)")  # fmt: skip


class Ledger:
    """Reads the results topic and the DLQ from the beginning, in the background, without a consumer group.

    Never steps past an offset that is not visible yet (the embedded broker can show N+1 before N): it reads a
    partition again from the missing offset, and accepts a gap only after ``gap_accept_s`` (counted).
    """

    def __init__(self, settings: Settings, gap_accept_s: float = 10.0) -> None:
        self.s = settings
        self.topics = Topics.from_settings(settings)
        self.gap_accept_s = gap_accept_s
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.dead: list[DeadLetter] = []
        self.dead_ids: set[str] = set()
        """Job ids found in dead letters' values."""
        self.undecodable_results = 0
        self.gaps_accepted = 0
        self.records = 0
        self.last_record_at = time.monotonic()
        self._next: dict[TopicPartition, int] = {}
        self._gap_since: dict[TopicPartition, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, timeout: float = 30.0) -> None:
        """Start reading; waits until both topics exist (the routers create the DLQ, heads the results)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=100, max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )  # fmt: skip
        await consumer.start()
        self._consumer = consumer
        wanted = (self.topics.results, self.topics.dlq)
        tps: list[TopicPartition] = []

        async def exist() -> bool:
            nonlocal tps
            await consumer._client.force_metadata_update()
            parts = {t: consumer.partitions_for_topic(t) for t in wanted}
            if any(not p for p in parts.values()):
                return False
            tps = [TopicPartition(t, p) for t, ps in parts.items() for p in sorted(ps or ())]
            return True

        if not await poll(exist, timeout, 0.2):
            await consumer.stop()
            raise AssertionError(f"topics {wanted} do not exist after {timeout:.0f} s")
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begin[tp])
            self._next[tp] = begin[tp]
        self._task = asyncio.create_task(self._read(consumer), name="ledger")

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.monotonic()
            for tp, recs in batch.items():
                exp = self._next[tp]
                for rec in recs:
                    if rec.offset < exp:  # a fetch that raced our seek: never count twice
                        continue
                    if rec.offset > exp:
                        since = self._gap_since.setdefault(tp, now)
                        if now - since < self.gap_accept_s:
                            consumer.seek(tp, exp)  # read again from the missing offset shortly
                            break
                        self.gaps_accepted += 1
                    self._gap_since.pop(tp, None)
                    self._take(tp, rec)
                    exp = rec.offset + 1
                self._next[tp] = exp

    def _take(self, tp: TopicPartition, rec: Any) -> None:
        self.records += 1
        self.last_record_at = time.monotonic()
        if tp.topic == self.topics.dlq:
            dead = DeadLetter(rec.value, rec.key, dict(rec.headers or ()), tp.partition, rec.offset)
            self.dead.append(dead)
            job_id = dead.job_id()
            if job_id is not None:
                self.dead_ids.add(job_id)
            return
        try:
            doc = msgpack.unpackb(rec.value, raw=False)
            job_id = doc["job_id"]
        except Exception:
            self.undecodable_results += 1
            return
        self.deliveries.setdefault(str(job_id), []).append(doc)

    def _check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # the reader died: surface why
            raise AssertionError("ledger reader ended")

    def delivered(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` were delivered at least once."""
        d = self.deliveries
        return sum(1 for i in ids if i in d)

    def accounted(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` were delivered or dead-lettered: nothing more is coming for them."""
        d, dead = self.deliveries, self.dead_ids
        return sum(1 for i in ids if i in d or i in dead)

    async def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        def check() -> bool:
            self._check()
            return pred()

        return await poll(check, timeout, 0.1)

    async def wait_delivered(self, ids: list[str], timeout: float) -> bool:
        """Wait until every one of ``ids`` was delivered at least once; False when the time ran out."""
        todo = set(ids)

        def done() -> bool:
            todo.difference_update([i for i in todo if i in self.deliveries] if len(todo) < 5000 else
                                   self.deliveries.keys() & todo)  # fmt: skip
            return not todo

        return await self.wait_for(done, timeout)

    async def settle(self, quiet_s: float = 2.0, timeout: float = 20.0) -> None:
        """Read until nothing new arrived for ``quiet_s`` (late duplicates, dead letters), at most ``timeout``."""
        await self.wait_for(lambda: time.monotonic() - self.last_record_at >= quiet_s, timeout)

    def report(self, ids: Iterable[str]) -> Report:
        expected = list(ids)
        exp_set = set(expected)
        once = 0
        more: dict[str, int] = {}
        missing = []
        for i in expected:
            n = len(self.deliveries.get(i, ()))
            if n == 0:
                missing.append(i)
            elif n == 1:
                once += 1
            else:
                more[i] = n
        unexpected = {i: len(v) for i, v in self.deliveries.items() if i not in exp_set}
        dead_expected = sum(1 for d in self.dead if d.job_id() in exp_set)  # counts every dead letter of one
        return Report(len(expected), once, more, missing, unexpected, Counter(d.reason for d in self.dead),
                      dead_expected)  # fmt: skip

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 10)


# --- offsets and audit ----------------------------------------------------------------------------------------


async def committed_offsets(s: Settings, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The router group's committed offsets (read without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, group_id=s.group_id,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def wait_committed(s: Settings, expected: Mapping[TopicPartition, int], timeout: float = 20.0
                         ) -> dict[TopicPartition, int | None]:  # fmt: skip
    """Poll the group's committed offsets until they equal ``expected``; returns the last seen."""
    last: dict[TopicPartition, int | None] = {}

    async def equal() -> bool:
        nonlocal last
        last = await committed_offsets(s, expected)
        return all(last.get(tp) == off for tp, off in expected.items())

    await poll(equal, timeout, 0.5)
    return last


def read_audit(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every audit record of the file and its rotated backups, and how many lines did not parse (several
    processes append to one file, so a line may be torn)."""
    base = Path(path)
    files = [*sorted(base.parent.glob(base.name + ".*"), reverse=True), base]
    out: list[dict[str, Any]] = []
    bad = 0
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
    return out, bad


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a Redis server of the test's own ------------------------------------------------------------------------


class RedisServer:
    """A ``valkey-server`` (or redis-server) on a fixed port with an always-fsynced append-only file, so its data
    survives :meth:`stop` and :meth:`start` on the same port and directory."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = self.dir / "redis.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped_at: float | None = None
        self.started_at: float | None = None

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.kill()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def start(self, timeout: float = 20.0) -> None:
        assert not self.alive, "already running"
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
               "--appendfsync", "always", "--dir", str(self.dir), "--protected-mode", "no"]  # fmt: skip
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_parent, close_fds=True)  # fmt: skip
        client = make_redis(self.url)
        try:

            async def answers() -> bool:
                if not self.alive:
                    raise AssertionError(f"redis exited at start\n{_tail(self.log)}")
                try:
                    return bool(await client.ping())
                except Exception:
                    return False

            if not await poll(answers, timeout, 0.05):
                raise AssertionError(
                    f"redis on port {self.port} not answering in {timeout:.0f} s\n{_tail(self.log)}"
                )
        finally:
            await client.aclose()
        self.started_at = time.time()

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the server syncs its append-only file) and wait for it to exit."""
        assert self.popen is not None
        self.popen.terminate()
        if not await poll(lambda: not self.alive, timeout, 0.05):
            raise AssertionError(f"redis did not stop in {timeout:.0f} s")
        self.stopped_at = time.time()

    def kill(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=10)
