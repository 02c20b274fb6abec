"""Review of ``bench e2e --repeat``: run_rounds driven with a fake stack and fake phases (no broker, no Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

import router_worker.bench_e2e as be
import router_worker.runtime as rt_mod
from router_worker.bench_e2e import E2EConfig, Latency, Phase, Report, render_spread, rounds_json, run_rounds


def _phase(kind: str, procs: int, rate: float, *, complete: bool = True, lat: bool = True) -> Phase:
    name = be.phase_name(kind, procs)
    latency = Latency(500.0, 500.0, 10, 10, 5.0, 10.0, 12.0, 13.0, [1.0]) if lat and complete else None
    return Phase(
        name=name, kind=kind, processes=procs, jobs=1000, arrived=1000 if complete else 400, complete=complete,
        dead_lettered=0, preload_s=0.1, startup_s=1.0, drain_s=1000 / rate, drain_rate=rate,
        observed_rate=rate, steady_rate=rate if complete else float("nan"), cpu_s=1.0, cpu_s_per_1000=1.0,
        cores_busy=0.5, peak_rss_mb=50.0, latency=latency, progress=[(1.0, 1), (2.0, 1000)],
    )  # fmt: skip


class Fake:
    """Records the order of the phases and the rate each was given; ``startup_s``: the stack's start-up."""

    def __init__(self, startup_s: float = 0.0, fail_in_round: int | None = None) -> None:
        self.calls: list[tuple[str, int, float | None]] = []
        self.startup_s = startup_s
        self.fail_in_round = fail_in_round
        self.rounds_done = 0
        self.profiled: list[bool] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        @contextlib.asynccontextmanager
        async def runtime(settings: Any, **_: Any) -> AsyncIterator[Any]:
            await asyncio.sleep(fake.startup_s)
            yield SimpleNamespace(settings=settings, redis=None, stack=object())

        async def run_phase(kind: str, procs: int, base: Any, redis: Any, cfg: E2EConfig, rate: float | None,
                            workdir: Path, log: Any = None) -> Phase:  # fmt: skip
            fake.calls.append((kind, procs, rate))
            fake.profiled.append(cfg.profile_dir is not None)
            if fake.fail_in_round is not None and len(fake.calls) > fake.fail_in_round * 3:
                raise be.BenchError("a child exited")
            p = _phase(kind, procs, 10000.0 if kind == "pipe" else 5000.0 * procs)
            if rate is None:
                assert p.latency is not None
                p.latency.offered_rate = p.drain_rate / 2
            return p

        monkeypatch.setattr(rt_mod, "runtime", runtime)
        monkeypatch.setattr(be, "run_phase", run_phase)


def _run(cfg: E2EConfig) -> list[Report]:
    return asyncio.run(run_rounds(SimpleNamespace(), cfg))  # type: ignore[arg-type]


def test_every_round_uses_round_one_s_one_router_rate_and_pairs_with_its_own_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(1, 2), repeat=3))
    assert [c[:2] for c in fake.calls[:3]] == [("router", 1), ("router", 2), ("pipe", 1)]
    assert [c[:2] for c in fake.calls[3:6]] == [("pipe", 1), ("router", 1), ("router", 2)]
    assert {c[2] for c in fake.calls[1:]} == {2500.0}, "half the first round's one-router drain, every phase"
    assert [len(r.phases) for r in reports] == [3, 3, 3]
    assert all(r.offered_rate == 2500.0 for r in reports)


def test_rounds_json_is_strict_with_an_incomplete_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    r1 = Report(E2EConfig(jobs=1000, heads=8, repeat=2), {"cpus": 2}, "embedded", 1.0,
                [_phase("router", 1, 5000.0), _phase("pipe", 1, 10000.0)], 1.0)  # fmt: skip
    r2 = Report(E2EConfig(jobs=1000, heads=8, repeat=2), {"cpus": 2}, "embedded", 1.0,
                [_phase("router", 1, float("nan"), complete=False), _phase("pipe", 1, 10000.0)], 1.0)  # fmt: skip
    doc = json.loads(json.dumps(rounds_json([r1, r2]), allow_nan=False))
    assert doc["spread"]["router_x1"]["drain_rate"]["values"] == [0.5]


def test_one_round_keeps_the_order_of_routers_given(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    (report,) = _run(E2EConfig(jobs=1000, heads=8, routers=(2, 1)))
    assert [p.name for p in report.phases] == ["router x2", "router x1", "pipe"]


def test_one_round_s_seconds_count_the_stack_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(startup_s=0.3)
    fake.install(monkeypatch)
    (report,) = _run(E2EConfig(jobs=1000, heads=8))
    assert report.seconds >= 0.3


def test_spread_scaling_label_names_the_fewest_routers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(2, 4), repeat=2))
    assert reports[0].scaling() == pytest.approx(2.0)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(render_spread(reports))
    assert "4 routers / 2 routers" in buf.getvalue()


def test_a_later_round_that_fails_keeps_the_rounds_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(fail_in_round=2)
    fake.install(monkeypatch)
    with pytest.raises(be.RoundsFailed, match="round 3 of 4 failed: a child exited") as caught:
        _run(E2EConfig(jobs=1000, heads=8, routers=(1, 2), repeat=4))
    assert len(caught.value.reports) == 2
    assert all(len(r.phases) == 3 for r in caught.value.reports)


def test_a_first_round_that_fails_raises_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(fail_in_round=0)
    fake.install(monkeypatch)
    with pytest.raises(be.BenchError, match="a child exited") as caught:
        _run(E2EConfig(jobs=1000, heads=8, routers=(1, 2), repeat=3))
    assert not isinstance(caught.value, be.RoundsFailed)


def test_only_the_last_round_is_profiled(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(1,), repeat=3, profile_dir=Path("/tmp/x")))
    assert fake.profiled == [False, False, False, False, True, True]
    assert all(r.config.profile_dir == Path("/tmp/x") for r in reports), (
        "the report keeps the config asked for"
    )


def test_rounds_seconds_add_up_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(startup_s=0.2)
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(1,), repeat=3))
    assert reports[0].seconds >= 0.2, "the first round counts the stack's start-up"
    assert all(r.seconds >= 0 for r in reports)


def test_an_incomplete_drain_is_left_out_of_the_spread_and_the_row_says_so() -> None:
    cfg = E2EConfig(jobs=1000, heads=8, routers=(1,), repeat=2)
    r1 = Report(
        cfg, {"cpus": 2}, "embedded", 1.0, [_phase("router", 1, 5000.0), _phase("pipe", 1, 10000.0)], 1.0
    )
    r2 = Report(cfg, {"cpus": 2}, "embedded", 1.0,
                [_phase("router", 1, 9000.0, complete=False), _phase("pipe", 1, 10000.0)], 1.0)  # fmt: skip
    sp = be.spread([r1, r2])
    assert sp["router x1"]["drain_rate"].values == pytest.approx((0.5,)), (
        "a partial drain's rate is not a figure"
    )
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(render_spread([r1, r2]))
    assert "(1 of 2 rounds)" in buf.getvalue()


def test_without_a_pipe_the_spread_says_it_is_scaling_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(1, 2), repeat=2, baseline=False))
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(render_spread(reports))
    out = buf.getvalue()
    assert "scaling (no pipe measured)" in out
    assert "2 routers / 1 router" in out


def test_pipes_alternate_with_the_routers_and_come_after_them_in_the_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    reports = _run(E2EConfig(jobs=1000, heads=8, routers=(1, 2), pipes=(1, 2), repeat=2))
    assert [c[:2] for c in fake.calls[:4]] == [("router", 1), ("router", 2), ("pipe", 1), ("pipe", 2)]
    assert [c[:2] for c in fake.calls[4:]] == [("pipe", 1), ("pipe", 2), ("router", 1), ("router", 2)]
    assert [p.name for p in reports[1].phases] == ["router x1", "router x2", "pipe", "pipe x2"]
    assert set(reports[1].same_count_ratios()) == {"router x2 / pipe x2"}


def test_no_baseline_measures_no_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake()
    fake.install(monkeypatch)
    _run(E2EConfig(jobs=1000, heads=8, routers=(1,), pipes=(1, 2), baseline=False))
    assert [c[:2] for c in fake.calls] == [("router", 1)]
