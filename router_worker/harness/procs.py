"""Routers and heads in their own processes (the real CLI), a Redis server of our own that can be stopped and
started again with its data, and the probes that read them from outside (group state, ``/metrics``, RSS).

Everything here is bounded: every wait has a time limit and fails with what it saw (:class:`HarnessError`), and
every process started is killed on close (and gets SIGTERM from the kernel should this process die).

    async with Procs(settings, workdir) as procs:
        r1, r2 = await procs.start_routers(2)
        h1 = await procs.start_head("m", capacity=16, service_ms=5)
"""

from __future__ import annotations

import asyncio
import contextlib
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
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router_worker.localstack import _die_with_parent, free_port, redis_binary
from router_worker.pipeline.kafka import make_admin
from router_worker.runtime import connect_redis, make_redis
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics

LOG_TAIL = 3000


class HarnessError(AssertionError):
    """A process did not start, stop or become ready in time. An AssertionError, so in a test it reads as a
    failed check with the evidence (log tails) in its message."""


# --- small probes ----------------------------------------------------------------------------------------------


async def poll(pred: Callable[[], Awaitable[bool] | bool], within_s: float, every: float = 0.1) -> bool:
    """Evaluate ``pred`` until it is true (True) or ``within_s`` passes (False). Never raises on time."""
    deadline = time.monotonic() + within_s
    while True:
        res = pred()
        if isinstance(res, Awaitable):
            res = await res
        if res:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


def tail(path: Path, chars: int = LOG_TAIL) -> str:
    """The last ``chars`` of a log file (a note when it can not be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


def rss_mb(pid: int) -> float | None:
    """Resident set size (VmRSS) of a live process in MiB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


async def scrape_metrics(port: int, timeout_s: float = 3.0) -> dict[str, float] | None:
    """Unlabelled samples of a router's ``/metrics`` (name -> value; labelled series summed); None when it does
    not answer (stopped, paused, not started yet)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


# --- the child processes -------------------------------------------------------------------------------------


def _env_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):

        def plain(v: Any) -> Any:
            return v.get_secret_value() if isinstance(v, SecretStr) else v

        if isinstance(value, dict):
            return json.dumps({k: plain(v) for k, v in value.items()})
        return json.dumps([plain(v) for v in value])
    return str(value)


def settings_env(s: Settings) -> dict[str, str]:
    """``ROUTER_*`` variables for every setting of ``s`` that differs from its default, so a child process
    runs with these settings (timeouts, partitions, back-off), not only their addresses. Secrets are passed as
    their values (in the child's environment, never on a command line)."""
    out: dict[str, str] = {}
    for name, f in Settings.model_fields.items():
        value = getattr(s, name)
        if value is None or value == f.get_default(call_default_factory=True):
            continue
        out[f"ROUTER_{name.upper()}"] = _env_text(value)
    return out


def child_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child (a CLI command, a router, a head) that joins ``s``'s deployment. This
    process's own ``ROUTER_*`` variables are left out: the settings object says everything (with
    :func:`settings_env`), and an inherited ``ROUTER_<SECRET>_FILE`` next to the secret's value would be a
    secret given twice (the child refuses to start), an inherited setting would override ``s``'s default."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ROUTER_")}
    env.update(
        ROUTER_KAFKA_BOOTSTRAP_SERVERS=s.kafka_bootstrap_servers or "",
        ROUTER_REDIS_URL=s.redis_url or "",
        ROUTER_TOPIC_PREFIX=s.topic_prefix,
        ROUTER_REDIS_PREFIX=s.redis_prefix,
        ROUTER_GROUP_ID=s.group_id,
        ROUTER_AUDIT_FILE=s.audit_file,
        ROUTER_LOG_LEVEL="WARNING",
        COLUMNS="200",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    """One child process: a router, a head or a producer, its output in ``log``."""

    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    head_id: str | None = None
    admin_port: int = 0
    cwd: Path | None = None
    started_at: float = field(default_factory=time.time)
    paused: bool = False
    signals: list[str] = field(default_factory=list)
    """Signals sent to it, in order (shown in reports)."""

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

    async def wait_exit(self, within_s: float) -> int:
        """The exit status once the process ended; HarnessError (with its log) if it is still running."""
        if not await poll(lambda: not self.alive, within_s, 0.05):
            raise HarnessError(f"{self.name} (pid {self.pid}) still running {within_s:.0f} s after "
                               f"{self.signals}\n{self.tail()}")  # fmt: skip
        rc = self.popen.returncode
        assert rc is not None
        return rc

    def tail(self, chars: int = LOG_TAIL) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{tail(self.log, chars)}"

    def describe(self) -> str:
        rc = self.returncode
        state = "alive" if rc is None else f"exited rc={rc}"
        return f"{self.name} ({self.role}, pid {self.pid}): {state}; signals sent: {self.signals or 'none'}"

    def assert_alive(self) -> None:
        if not self.alive:
            raise HarnessError(f"{self.name} is not alive: {self.describe()}\n{self.tail()}")


class Procs:
    """Starts routers and heads as ``python -m router_worker.cli`` children joined to ``settings``'s deployment
    (same broker, Redis, topic prefix, Redis prefix, group and settings), waits until they are ready, and
    kills every one of them on close."""

    def __init__(self, settings: Settings, workdir: Path, *, quiet: bool = False, **env: str) -> None:
        self.s = settings
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.quiet = quiet
        """No process summary and log tails printed on close (a benchmark prints its own report)."""
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
        return child_env(self.s, **(settings_env(self.s) | {"PYTHONUNBUFFERED": "1"} | self.env | extra))

    def spawn(self, name: str, role: str, args: Iterable[str], *, cwd: Path | None = None,
              module: str = "router_worker.cli", env: Mapping[str, str] | None = None) -> Proc:  # fmt: skip
        """Start ``python -m module args`` (in ``cwd``, default this process's), output to ``<name>.log``."""
        log = self.workdir / f"{name}.log"
        if cwd is not None:
            Path(cwd).mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=self.child_env(**(env or {})),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals from the terminal reach us only; we signal children
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        proc = Proc(name, role, popen, log, cwd=cwd)
        self.procs.append(proc)
        return proc

    def _name(self, role: str) -> str:
        self._n[role] += 1
        return f"{role}{self._n[role]}"

    def router(self, name: str | None = None, *, admin_port: int = 0, cwd: Path | None = None,
               **env: str) -> Proc:  # fmt: skip
        """Start one router (not waiting for it). Its router id is its name; it logs at INFO; with
        ``admin_port`` it serves ``/metrics`` there."""
        name = name or self._name("router")
        env = {"ROUTER_ROUTER_ID": name, "ROUTER_LOG_LEVEL": "INFO"} | env
        if admin_port:
            env["ROUTER_ADMIN_PORT"] = str(admin_port)
        proc = self.spawn(name, "router", ["run"], cwd=cwd, env=env)
        proc.admin_port = admin_port
        return proc

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
        proc = self.spawn(head_id, "head", args, env=env)
        proc.head_id = head_id
        return proc

    async def start_routers(self, n: int, within_s: float = 60.0) -> list[Proc]:
        """Start ``n`` routers and wait until the group is stable with every live router in it."""
        started = [self.router() for _ in range(n)]
        await self.wait_group(within_s)
        return started

    async def start_head(self, model: str, within_s: float = 30.0, **kw: Any) -> Proc:
        proc = self.head(model, **kw)
        await self.wait_head(proc, within_s)
        return proc

    # readiness

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            # The deployment's login and TLS, as its processes use; retried on a lost connection, since the
            # harness restarts Redis under it (the first call after a restart finds the old socket closed).
            self._redis = connect_redis(self.s, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
                                        retry_on_error=[RedisConnectionError, RedisTimeoutError])  # fmt: skip
        return self._redis

    def routers(self) -> list[Proc]:
        return [p for p in self.procs if p.role == "router"]

    def _check_started(self, procs: Iterable[Proc]) -> None:
        for p in procs:
            if not p.alive:
                raise HarnessError(f"{p.name} exited while starting (rc={p.returncode})\n{p.tail()}")

    async def group_state(self) -> tuple[str, int]:
        """(state, members) of the routers' consumer group, as the broker describes it."""
        if self._admin is None:
            admin = make_admin(self.s, request_timeout_ms=5000)  # the deployment's SASL and TLS
            try:
                await admin.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await admin.close()
                raise
            self._admin = admin
        groups = await self._admin.describe_consumer_groups([self.s.group_id])
        for resp in groups:
            for g in resp.groups:
                _err, group_id, state, _ptype, _proto, members = g[:6]
                if group_id == self.s.group_id:
                    return str(state), len(members)
        return "Unknown", 0

    async def wait_group(self, within_s: float = 60.0, members: int | None = None) -> None:
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

        if not await poll(ready, within_s, 0.2):
            tails = "\n".join(p.tail(1500) for p in live)
            raise HarnessError(f"router group {self.s.group_id} not Stable with {want} members in {within_s:.0f} s "
                               f"(last seen: {last})\n{tails}")  # fmt: skip

    async def assignments(self, routers: Iterable[Proc]) -> dict[str, tuple[int, int] | None]:
        """Router name -> (``router_assigned_partitions``, ``router_subscribed_partitions``) from its admin
        port's ``/metrics``; None for one that does not answer."""
        out: dict[str, tuple[int, int] | None] = {}
        for p in routers:
            m = await scrape_metrics(p.admin_port) if p.admin_port and p.alive and not p.paused else None
            out[p.name] = (
                None
                if m is None or "router_assigned_partitions" not in m
                else (int(m["router_assigned_partitions"]), int(m.get("router_subscribed_partitions", 0)))
            )
        return out

    async def wait_spread(self, routers: list[Proc], within_s: float = 60.0) -> dict[str, int]:
        """Wait until each of ``routers`` (run with an admin port) owns at least one partition and together they
        own every partition the group subscribes to, each exactly once as far as counts tell; returns the
        assigned counts by router name."""
        last: dict[str, tuple[int, int] | None] = {}

        async def spread() -> bool:
            nonlocal last
            self._check_started(routers)
            last = await self.assignments(routers)
            got = list(last.values())
            if any(v is None or v[0] < 1 or v[1] < 1 for v in got):
                return False
            subscribed = {v[1] for v in got if v is not None}
            return len(subscribed) == 1 and sum(v[0] for v in got if v is not None) == subscribed.pop()

        if not await poll(spread, within_s, 0.25):
            raise HarnessError(f"partitions not spread over {[p.name for p in routers]} in {within_s:.0f} s "
                               f"(assigned, subscribed) last seen: {last}\n"
                               + "\n".join(p.tail(1500) for p in routers))  # fmt: skip
        return {k: v[0] for k, v in last.items() if v is not None}

    async def wait_head(self, proc: Proc, within_s: float = 30.0, *, not_instance: str | None = None) -> None:
        """Wait until the head's hash is registered in Redis (by an instance other than ``not_instance``: a
        restarted head, not its dead predecessor)."""
        assert proc.head_id
        key = self.keys.head(proc.head_id)

        async def ready() -> bool:
            self._check_started([proc])
            try:
                head_id, instance = await self.redis.hmget(key, ["head_id", "instance"])
            except Exception:
                return False
            return bool(head_id == proc.head_id and (not_instance is None or instance != not_instance))

        if not await poll(ready, within_s, 0.1):
            raise HarnessError(
                f"head {proc.head_id} not registered in Redis in {within_s:.0f} s\n{proc.tail()}"
            )

    # reporting and teardown

    def assert_alive(self, *procs: Proc) -> None:
        dead = [p for p in (procs or tuple(self.procs)) if not p.alive]
        if dead:
            raise HarnessError("not alive: " + "; ".join(p.describe() for p in dead) + "\n"
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
        if not self.quiet:  # printed at teardown: pytest shows it with a failing test only
            print("\n=== processes at teardown ===\n" + "\n".join(p.describe() for p in self.procs))
        for p in self.procs:
            if p.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
        if not self.quiet:
            for p in self.procs:
                print(p.tail(2000))
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()


# --- a Redis server of our own -------------------------------------------------------------------------------


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
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def start(self, within_s: float = 20.0) -> None:
        assert not self.alive, "already running"
        self.popen = self._spawn()
        client = make_redis(self.url)
        try:

            async def answers() -> bool:
                if not self.alive:
                    raise HarnessError(f"redis exited at start\n{tail(self.log)}")
                try:
                    return bool(await client.ping())
                except Exception:
                    return False

            if not await poll(answers, within_s, 0.05):
                raise HarnessError(
                    f"redis on port {self.port} not answering in {within_s:.0f} s\n{tail(self.log)}"
                )
        finally:
            await client.aclose()
        self.started_at = time.time()

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
               "--appendfsync", "always", "--dir", str(self.dir), "--protected-mode", "no"]  # fmt: skip
        with open(self.log, "ab") as out:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent, close_fds=True)  # fmt: skip

    async def stop(self, within_s: float = 20.0) -> None:
        """SIGTERM (the server syncs its append-only file) and wait for it to exit."""
        assert self.popen is not None
        self.popen.terminate()
        if not await poll(lambda: not self.alive, within_s, 0.05):
            raise HarnessError(f"redis did not stop in {within_s:.0f} s")
        self.stopped_at = time.time()

    def kill(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=10)
