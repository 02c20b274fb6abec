"""Review of ``bench e2e --pipes``: N bare pipes in one group, their ready files, their acknowledgement times and
the router-over-as-many-pipes ratios. Unit level: fake children, fake phases, fake Kafka clients (no broker, no
Redis). Each test of a bug the review found was xfail (strict) until its fix."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError
from rich.console import Console
from typer.testing import CliRunner

import router_worker.bench_e2e as be
import router_worker.runtime as rt_mod
import router_worker.services as services
from router_worker.bench_e2e import E2EConfig, Latency, Phase, Report
from router_worker.settings import load_settings

# --- fakes ------------------------------------------------------------------------------------------------


def _phase(kind: str, procs: int, rate: float) -> Phase:
    latency = Latency(500.0, 500.0, 10, 10, 5.0, 10.0, 12.0, 13.0, [1.0])
    return Phase(
        name=be.phase_name(kind, procs), kind=kind, processes=procs, jobs=1000, arrived=1000, complete=True,
        dead_lettered=0, preload_s=0.1, startup_s=1.0, drain_s=1000 / rate, drain_rate=rate,
        observed_rate=rate, steady_rate=rate, cpu_s=1.0, cpu_s_per_1000=1.0, cores_busy=0.5, peak_rss_mb=50.0,
        latency=latency, progress=[(1.0, 1), (2.0, 1000)],
    )  # fmt: skip


def _fake_phases(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, Path]]:
    """run_rounds on a fake stack with fake phases; returns the (kind, processes, workdir) of each phase run."""
    calls: list[tuple[str, int, Path]] = []

    @contextlib.asynccontextmanager
    async def runtime(settings: Any, **_: Any) -> AsyncIterator[Any]:
        yield SimpleNamespace(settings=settings, redis=None, stack=object())

    async def run_phase(kind: str, procs: int, base: Any, redis: Any, cfg: E2EConfig, rate: float | None,
                        workdir: Path, log: Any = None) -> Phase:  # fmt: skip
        calls.append((kind, procs, workdir))
        p = _phase(kind, procs, 10000.0 if kind == "pipe" else 5000.0 * procs)
        if rate is None:
            assert p.latency is not None
            p.latency.offered_rate = p.drain_rate / 2
        return p

    monkeypatch.setattr(rt_mod, "runtime", runtime)
    monkeypatch.setattr(be, "run_phase", run_phase)
    return calls


def _fake_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children that run (never exit) and do nothing: a pipe that has not committed a batch yet."""

    def spawn(name: str, args: Any, env: Any, logdir: Path, admin_port: int = 0) -> be.Child:
        proc = SimpleNamespace(pid=1, poll=lambda: None, returncode=None)
        return be.Child(name, proc, logdir / f"{name}.log", admin_port)  # type: ignore[arg-type]

    monkeypatch.setattr(be, "_spawn", spawn)


class _AllArrived:
    """Arrivals whose every sent job has arrived (the group's pipes that did start forwarded them)."""

    count = 10**9

    async def wait_for(self, total: int, timeout_s: float) -> bool:
        await asyncio.sleep(0.01)
        return True


# --- 1. a ready file of an earlier round passes for this round's -------------------------------------------


def test_rounds_share_one_workdir_and_the_latency_pipes_one_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    """The premise of the next test: every round's phases get the same workdir, and the latency phase's pipes
    are named by kind and count only (``pipe2lat-0`` in every round)."""
    calls = _fake_phases(monkeypatch)
    asyncio.run(
        be.run_rounds(load_settings(), E2EConfig(jobs=1000, heads=8, routers=(1,), pipes=(1, 2), repeat=2))
    )
    assert [c[:2] for c in calls].count(("pipe", 2)) == 2
    assert len({c[2] for c in calls}) == 1, "one workdir for every round"


def test_a_ready_file_left_by_an_earlier_round_does_not_end_this_round_s_warm_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_spawn(monkeypatch)

    async def no_load(*_: Any, **__: Any) -> float:
        return 1000.0

    monkeypatch.setattr(be, "offered_load", no_load)
    cfg = E2EConfig(jobs=1000, heads=8, routers=(1,), pipes=(1, 2), repeat=2)
    # Round 1's latency phase: both pipes committed a batch, each wrote its ready file.
    round1: list[be.Child] = []
    be._spawn_group(
        "pipe", 2, be.Layout.fresh(load_settings(), "pipe2lat", cfg), "pipe2lat", tmp_path, round1
    )
    for c in round1:
        assert c.ready is not None
        c.ready.write_text("1")
    # Round 2's: new processes, same workdir and tag, none of them has committed anything yet.
    lay = be.Layout.fresh(load_settings(), "pipe2lat", cfg)
    round2: list[be.Child] = []
    be._spawn_group("pipe", 2, lay, "pipe2lat", tmp_path, round2)
    ended = True
    try:
        asyncio.run(be._warm_up(lay, _AllArrived(), round2, cfg, within_s=0.3))  # type: ignore[arg-type]
    except be.BenchError:
        ended = False
    assert not ended, (
        "warm-up ended though no pipe of this round has committed a batch (round 1's ready files)"
    )


# --- 2. duplicate counts ----------------------------------------------------------------------------------


def test_duplicate_pipe_counts_are_refused_or_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        cfg = E2EConfig(jobs=1000, heads=8, routers=(1,), pipes=(1, 1))
    except ValueError:
        return  # refused up front: fixed
    calls = _fake_phases(monkeypatch)
    (report,) = asyncio.run(be.run_rounds(load_settings(), cfg))
    assert [c[:2] for c in calls].count(("pipe", 1)) == 1, "the same phase measured twice"
    assert [p.name for p in report.phases].count("pipe") == 1, "the same phase listed twice"
    assert report.pipe_scaling() is None, f"one pipe over itself: {report.pipe_scaling()}"


# --- 3. more pipes than the request topic has partitions --------------------------------------------------


def test_more_pipes_than_request_partitions_are_refused_before_any_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_phases(monkeypatch)
    settings = load_settings(requests_partitions=6)
    cfg = E2EConfig(jobs=1000, heads=8, routers=(1,), pipes=(1, 8))
    quiet = Console(file=open("/dev/null", "w"), color_system=None)  # noqa: SIM115
    refused = False
    try:
        be.command(settings, cfg, json_out=True, plot_to=None, console=quiet, err=quiet)
    except (ValueError, be.BenchError):
        refused = True
    finally:
        quiet.file.close()
    assert refused, "8 pipes in one group over 6 request partitions: 2 never consume"
    assert calls == [], "refused before any phase runs"


def test_one_router_count_without_the_baseline_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--routers 1 --no-baseline`` (how a profile of one router is taken) once failed before any phase:
    ``max(*(1,))`` is ``max(1)``, a TypeError."""
    calls = _fake_phases(monkeypatch)
    cfg = E2EConfig(jobs=1000, heads=8, routers=(1,), baseline=False)
    quiet = Console(file=open("/dev/null", "w"), color_system=None)  # noqa: SIM115
    try:
        be.command(load_settings(), cfg, json_out=True, plot_to=None, console=quiet, err=quiet)
    finally:
        quiet.file.close()
    assert calls, "the router phase ran"


# --- 4. a refused commit ends the pipe (and the benchmark) ------------------------------------------------


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, *, key: bytes, partition: int,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:  # fmt: skip
        self.sent.append((topic, value, headers))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class _Consumer:
    """Two batches; the first one's commit is refused as after a rebalance; then the pipe is told to stop."""

    def __init__(self, stopped: dict[str, asyncio.Event]) -> None:
        tp = TopicPartition("req", 0)
        rec = [SimpleNamespace(value=b"v%d" % i, key=b"k", headers=[("x-bench-sent", b"1")], offset=i)
               for i in range(4)]  # fmt: skip
        self.batches = [{tp: rec[:2]}, {tp: rec[2:]}]
        self.commits: list[dict[Any, Any]] = []
        self.stopped = stopped

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        await asyncio.sleep(0)
        if self.batches:
            return self.batches.pop(0)
        self.stopped["event"].set()
        return {}

    async def commit(self, offsets: dict[Any, Any]) -> None:
        self.commits.append(offsets)
        if len(self.commits) == 1:
            raise CommitFailedError("the group has already rebalanced")


def test_a_pipe_in_a_group_survives_a_commit_refused_after_a_rebalance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stopped: dict[str, asyncio.Event] = {}

    async def until_signalled(*_: Any) -> asyncio.Event:
        stopped["event"] = asyncio.Event()
        return stopped["event"]

    producer, consumer = _Producer(), _Consumer(stopped)
    monkeypatch.setattr(services, "until_signalled", until_signalled)
    monkeypatch.setattr(be, "make_producer", lambda *_, **__: producer)
    monkeypatch.setattr(be, "make_consumer", lambda *_, **__: consumer)
    crashed: BaseException | None = None
    try:
        asyncio.run(be.pipe(load_settings(), "req", ["m0"], 1))
    except CommitFailedError as exc:
        crashed = exc
    assert crashed is None, f"the pipe exited on a refused commit: {crashed!r}"
    assert len(producer.sent) == 4, "both batches forwarded"
    assert len(consumer.commits) == 2, "the next batch committed"


# --- 5. --pipes with --no-baseline ------------------------------------------------------------------------


def test_cli_pipes_without_baseline_is_refused_or_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from router_worker import cli_admin
    from router_worker.cli import app

    cli_admin.register(app)
    ran: list[E2EConfig] = []

    def command(settings: Any, cfg: E2EConfig, **_: Any) -> list[Report]:
        ran.append(cfg)
        return []

    monkeypatch.setattr(be, "command", command)
    for key in ("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "ROUTER_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["bench", "e2e", "--no-baseline", "--pipes", "1,4"])
    if result.exit_code not in (0, 2) or (result.exit_code == 0 and not ran):
        pytest.fail(f"bench e2e did not run as expected: {result.exit_code} {result.output}")  # not the bug
    said = "pipe" in result.output.lower()
    assert result.exit_code == 2 or said, f"--pipes 1,4 dropped silently: ran with pipes={ran[0].pipes}"


# --- sound: what was checked and holds --------------------------------------------------------------------


def test_same_count_ratios_use_the_pipe_group_of_that_count_and_json_is_strict() -> None:
    phases = [_phase("router", 1, 5000.0), _phase("router", 4, 12000.0), _phase("router", 2, 8000.0),
              _phase("pipe", 4, 16000.0), _phase("pipe", 1, 20000.0), _phase("pipe", 2, 18000.0)]  # fmt: skip
    phases[-1].latency = None  # pipe x2's latency phase did not run
    r = Report(E2EConfig(jobs=1000, heads=8, routers=(1, 4, 2), pipes=(4, 1, 2)), {"cpus": 2}, "embedded",
               1.0, phases, 1.0)  # fmt: skip
    same = r.same_count_ratios()
    assert set(same) == {"router x4 / pipe x4", "router x2 / pipe x2"}
    assert same["router x4 / pipe x4"]["drain_rate"] == pytest.approx(12000 / 16000)
    assert same["router x2 / pipe x2"]["drain_rate"] == pytest.approx(8000 / 18000)
    assert "latency_p99" not in same["router x2 / pipe x2"]
    assert r.ratios()["router x4"]["drain_rate"] == pytest.approx(12000 / 20000), "to one pipe"
    assert r.pipe_scaling() == pytest.approx(16000 / 20000), "most pipes over fewest, whatever the order"
    doc = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert "latency_p50" not in doc["ratios_same_count"]["router_x2_/_pipe_x2"], (
        "no latency ratio to a missing one"
    )
    assert doc["phases"]["pipe_x2"]["latency"] is None


def test_acked_times_leave_out_batches_stamped_before_the_timed_run_and_weigh_each_job() -> None:
    since = 1_700_000_000_500.25  # time.time() * 1000, as _latency takes it
    acks = [(1_700_000_000_400, 1_700_000_000_420.5, 24), (1_700_000_000_501, 1_700_000_000_511.0, 3)]
    assert be.acked_ms(acks, since) == [10.0, 10.0, 10.0]
