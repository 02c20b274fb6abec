"""The benchmarks' output and arithmetic: tables keep full names in any width, JSON parses, figures add up.
(The end-to-end run itself is tests/integration/test_bench_e2e.py.)"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from rich.console import Console

from router_worker.bench import Row, bench_decisions, json_lines, print_table, render
from router_worker.bench_e2e import (
    Arrivals,
    BenchError,
    E2EConfig,
    Latency,
    Phase,
    Report,
    Sample,
    _pct,
    _rate_between,
    _sample_before,
    acked_ms,
    check_plot_available,
    child_env,
    proc_cpu_s,
    proc_peak_rss_mb,
    render_spread,
    rounds_json,
    spread,
)
from router_worker.bench_e2e import render as render_e2e
from router_worker.core.policy import STRATEGIES
from router_worker.settings import load_settings


def _rows() -> list[Row]:
    return [Row(name, heads, 6.5, 12.0, 7.1, 0.22) for name in STRATEGIES for heads in (10, 1000)]


def _printed(table: Any, width: int) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None)
    print_table(console, table)
    assert console.width == width, "the console's width is restored after the print"
    return buf.getvalue()


def test_decisions_table_keeps_full_strategy_names_at_width_40() -> None:
    out = _printed(render(_rows()), 40)
    assert "…" not in out
    for name in STRATEGIES:
        assert f" {name} " in out, name


def test_decisions_table_in_a_wide_console_is_unchanged() -> None:
    out = _printed(render(_rows()), 200)
    assert "round_robin" in out
    assert max(len(line) for line in out.splitlines()) <= 200


def test_decisions_json_lines_parse_one_object_per_strategy_and_size() -> None:
    rows = _rows()
    lines = json_lines(rows).splitlines()
    assert len(lines) == len(rows)
    objs = [json.loads(line) for line in lines]
    assert {(o["strategy"], o["heads"]) for o in objs} == {(r.strategy, r.heads) for r in rows}
    first = objs[0]
    assert first["benchmark"] == "decisions"
    assert first["median_us"] == pytest.approx(6.5)
    assert first["median_over_baseline"] == pytest.approx(6.5 / 0.22)


def test_decisions_json_of_a_real_measurement() -> None:
    rows = bench_decisions([10], 30, ["round_robin", "least_loaded"])
    objs = [json.loads(line) for line in json_lines(rows).splitlines()]
    assert [o["strategy"] for o in objs] == ["round_robin", "least_loaded"]
    assert all(o["median_us"] > 0 for o in objs)


def _phase(name: str, kind: str, procs: int, rate: float, p99: float, **kw: Any) -> Phase:
    lat = Latency(1000.0, 998.0, 100, 100, p99 / 3, p99, p99 * 1.2, p99 * 1.3, [1.0, 2.0])
    base: dict[str, Any] = dict(
        name=name, kind=kind, processes=procs, jobs=1000, arrived=1000, complete=True, dead_lettered=0,
        preload_s=0.1, startup_s=2.0, drain_s=1000 / rate, drain_rate=rate, observed_rate=rate * 0.9,
        steady_rate=rate * 0.95, cpu_s=1.0, cpu_s_per_1000=1.0, cores_busy=0.8, peak_rss_mb=80.0, latency=lat,
        progress=[(2.0, 10), (2.5, 1000)],
    )  # fmt: skip
    base.update(kw)
    return Phase(**base)


def _report() -> Report:
    phases = [
        _phase("router x1", "router", 1, 5000.0, 30.0, commands_per_job=2.0, round_trips_per_batch=2.5,
               batches=10, batch_us_per_job=float("nan")),
        _phase("router x2", "router", 2, 8000.0, 40.0, commands_per_job=2.1, round_trips_per_batch=2.4,
               batches=20),
        _phase("pipe", "pipe", 1, 20000.0, 10.0, cpu_s_per_1000=0.25, peak_rss_mb=64.0),
    ]  # fmt: skip
    return Report(E2EConfig(jobs=1000, heads=8), {"cpus": 2}, "embedded", 1000.0, phases, 12.0)


def test_e2e_ratios_and_scaling() -> None:
    r = _report()
    ratios = r.ratios()
    assert set(ratios) == {"router x1", "router x2"}
    assert ratios["router x1"]["drain_rate"] == pytest.approx(0.25)
    assert ratios["router x2"]["drain_rate"] == pytest.approx(0.4)
    assert ratios["router x1"]["latency_p99"] == pytest.approx(3.0)
    assert ratios["router x1"]["cpu_s_per_1000"] == pytest.approx(4.0)
    assert r.scaling() == pytest.approx(1.6)


def test_e2e_json_is_strict_and_complete() -> None:
    doc = _report().to_json()
    text = json.dumps(doc, allow_nan=False)  # NaN became null
    back = json.loads(text)
    assert set(back["phases"]) == {"router_x1", "router_x2", "pipe"}
    x1 = back["phases"]["router_x1"]
    assert x1["batch_us_per_job"] is None
    assert "progress" not in x1
    assert "samples_ms" not in x1["latency"]
    assert back["ratios"]["router_x1"]["drain_rate"] == pytest.approx(0.25)
    assert back["scaling"] == pytest.approx(1.6)


def test_e2e_table_keeps_full_names_at_width_40() -> None:
    out = _printed(render_e2e(_report()), 40)
    assert "…" not in out
    for label in ("drain rate (jobs/s)", "Redis commands per job", "Redis round trips per batch",
                  "produce-to-arrival p99.9 (ms)", "router x1 / pipe", "router x2 / pipe",
                  "peak RSS per process (MiB)"):  # fmt: skip
        assert label in out, label


def test_percentiles_and_rates() -> None:
    xs = [float(i) for i in range(1, 1001)]
    assert _pct(xs, 0.5) == 500.0
    assert _pct(xs, 0.99) == 990.0
    assert _pct(xs, 0.999) == 999.0
    assert math.isnan(_pct([], 0.5))
    timeline = [(float(t), 100 * t) for t in range(11)]  # 100 jobs/s
    assert _rate_between(timeline, 1000, 0.1, 0.9) == pytest.approx(100.0)


def test_config_refuses_what_can_not_run() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        E2EConfig(strategy="fastest")
    with pytest.raises(ValueError, match="at least one head per model"):
        E2EConfig(heads=2, models=4)
    with pytest.raises(ValueError, match="rate"):
        E2EConfig(rate=0)


def test_child_env_carries_non_default_settings() -> None:
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://r/0", retry_backoff_ms=[1, 2],
                      audit_decisions=False)  # fmt: skip
    env = child_env(s, admin_port=1234, log_level="WARNING")
    assert env["ROUTER_KAFKA_BOOTSTRAP_SERVERS"] == "k:9092"
    assert json.loads(env["ROUTER_RETRY_BACKOFF_MS"]) == [1, 2]
    assert env["ROUTER_AUDIT_DECISIONS"] == "false"
    assert env["ROUTER_ADMIN_PORT"] == "1234"
    assert "ROUTER_GROUP_ID" not in env, "defaults are left to the child"


def test_proc_figures_of_this_process() -> None:
    assert proc_cpu_s(os.getpid()) > 0
    assert proc_peak_rss_mb(os.getpid()) > 1
    assert proc_cpu_s(2**22 + 1) == 0.0


class _FakeConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _recs(*offsets: int) -> list[Any]:
    return [SimpleNamespace(offset=o, timestamp=1, headers=[]) for o in offsets]


def test_arrivals_never_step_past_an_offset_not_yet_visible() -> None:
    consumer = _FakeConsumer()
    arr = Arrivals(consumer, "dlq")  # type: ignore[arg-type]
    tp = TopicPartition("t", 0)
    assert [r.offset for r in arr._admit(tp, _recs(0, 1, 3, 4), now=10.0)] == [0, 1]
    assert consumer.seeks == [(tp, 2)]
    assert arr.gap_waits == 1
    assert [r.offset for r in arr._admit(tp, _recs(2, 3, 4), now=10.1)] == [2, 3, 4]
    assert [r.offset for r in arr._admit(tp, _recs(3, 4, 5), now=10.2)] == [5], "re-read records count once"
    # a gap still open after the wait is accepted once
    assert arr._admit(tp, _recs(8), now=11.0) == []
    assert [r.offset for r in arr._admit(tp, _recs(8), now=20.0)] == [8]
    assert arr.gaps_accepted == 1


def _cli(*args: str, columns: str = "40") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env.update(COLUMNS=columns, TERM="dumb")
    return subprocess.run([sys.executable, "-m", "router_worker.cli", "bench", *args], env=env, text=True,
                          capture_output=True, timeout=60)  # fmt: skip


def test_cli_decisions_table_piped_at_40_columns_keeps_full_names() -> None:
    names = ["round_robin", "weighted_random", "prefix_aware"]
    proc = _cli("decisions", "--heads", "10", "--iterations", "20", *(f"--strategy={n}" for n in names))
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    for name in names:
        assert f" {name} " in proc.stdout, name


def test_cli_decisions_json_prints_one_object_per_line() -> None:
    proc = _cli("decisions", "--json", "--heads", "10,20", "--iterations", "20", "--strategy", "least_loaded")
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["strategy"], o["heads"]) for o in objs] == [("least_loaded", 10), ("least_loaded", 20)]


def test_cli_e2e_refuses_bad_options_before_starting_anything() -> None:
    proc = _cli("e2e", "--strategy", "fastest", columns="200")
    assert proc.returncode == 2
    assert "unknown strategy 'fastest'" in proc.stderr


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(BenchError, match=r"router-worker\[bench\]"):
        check_plot_available()


def test_costs_are_counted_from_the_last_sample_before_the_first_routed_record() -> None:
    samples = [
        Sample(10.0, {1: 1.0}, None),  # the router's admin port was not answering yet
        Sample(10.5, {1: 1.5}, (7, 0)),
        Sample(10.9, {1: 1.6}, None),
        Sample(11.2, {1: 2.5}, (20, 3)),  # after the first record: already routing
    ]
    start = _sample_before(samples, 11.0)
    assert start.wall == 10.9
    assert start.cpu == {1: 1.6}
    assert start.counters == (7, 0), "the latest counters before it"
    assert _sample_before(samples, 5.0) is samples[0]


def test_e2e_json_with_a_profile_folder_is_json() -> None:
    """--profile names a folder (a Path): --json with it once crashed with 'PosixPath is not JSON serializable'."""
    r = _report()
    r.config = E2EConfig(jobs=1000, heads=8, profile_dir=Path("/tmp/profiles"))
    back = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert back["config"]["profile_dir"] == "/tmp/profiles"


def _round(x1_rate: float, pipe_rate: float, x2_rate: float | None = None) -> Report:
    phases = [_phase("router x1", "router", 1, x1_rate, 30.0, cpu_s_per_1000=2.0)]
    if x2_rate is not None:
        phases.append(_phase("router x2", "router", 2, x2_rate, 30.0))
    phases.append(_phase("pipe", "pipe", 1, pipe_rate, 10.0, cpu_s_per_1000=1.0))
    return Report(E2EConfig(jobs=1000, heads=8, repeat=3), {"cpus": 2}, "embedded", 1000.0, phases, 12.0)


def test_spread_across_rounds_is_the_median_and_range_of_each_rounds_own_ratio() -> None:
    """Each round's router is judged against the pipe of the same round, never another round's."""
    rounds = [_round(5000.0, 10000.0, 8000.0), _round(9000.0, 10000.0, 9000.0), _round(6000.0, 20000.0)]
    sp = spread(rounds)
    x1 = sp["router x1"]["drain_rate"]
    assert x1.values == pytest.approx((0.5, 0.9, 0.3))
    assert (x1.median, x1.low, x1.high) == pytest.approx((0.5, 0.3, 0.9))
    assert sp["router x1"]["cpu_s_per_1000"].median == pytest.approx(2.0)
    assert sp["router x2"]["drain_rate"].values == pytest.approx((0.8, 0.9)), "a round without x2 is left out"
    assert sp["scaling"]["drain_rate"].values == pytest.approx((1.6, 1.0))


def test_rounds_json_and_table() -> None:
    rounds = [_round(5000.0, 10000.0, 8000.0), _round(9000.0, 10000.0, 9000.0)]
    back = json.loads(json.dumps(rounds_json(rounds), allow_nan=False))
    assert len(back["rounds"]) == 2
    assert back["rounds"][1]["phases"]["router_x1"]["drain_rate"] == 9000.0
    assert back["spread"]["router_x1"]["drain_rate"]["median"] == pytest.approx(0.7)
    out = _printed(render_spread(rounds), 60)
    assert "…" not in out
    for text in ("router x1: drain rate / pipe", "0.70x", "0.50 0.90", "2 routers / 1 router"):
        assert text in out, text


def test_e2e_config_refuses_no_rounds() -> None:
    with pytest.raises(ValueError, match="repeat"):
        E2EConfig(repeat=0)


def _with_pipes() -> Report:
    phases = [
        _phase("router x1", "router", 1, 5000.0, 30.0),
        _phase("router x4", "router", 4, 12000.0, 90.0, cpu_s_per_1000=1.2),
        _phase("pipe", "pipe", 1, 20000.0, 10.0, cpu_s_per_1000=0.25),
        _phase("pipe x4", "pipe", 4, 16000.0, 60.0, cpu_s_per_1000=0.4),
    ]
    return Report(E2EConfig(jobs=1000, heads=8, routers=(1, 4), pipes=(1, 4)), {"cpus": 16}, "embedded", 1000.0,
                  phases, 12.0)  # fmt: skip


def test_e2e_routers_are_compared_with_one_pipe_and_with_as_many_pipes() -> None:
    r = _with_pipes()
    assert r.ratios()["router x4"]["drain_rate"] == pytest.approx(0.6), "the target's ratio: to one pipe"
    same = r.same_count_ratios()
    assert set(same) == {"router x4 / pipe x4"}, "one router over one pipe is the ratio above"
    assert same["router x4 / pipe x4"]["drain_rate"] == pytest.approx(0.75)
    assert same["router x4 / pipe x4"]["latency_p99"] == pytest.approx(1.5)
    assert same["router x4 / pipe x4"]["cpu_s_per_1000"] == pytest.approx(3.0)
    assert r.scaling() == pytest.approx(2.4)
    assert r.pipe_scaling() == pytest.approx(0.8)
    back = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert back["ratios_same_count"]["router_x4_/_pipe_x4"]["drain_rate"] == pytest.approx(0.75)
    assert back["pipe_scaling"] == pytest.approx(0.8)
    out = _printed(render_e2e(r), 40)
    assert "…" not in out
    for label in ("pipe x4", "router x4 / pipe", "router x4 / pipe x4", "0.75x"):
        assert label in out, label


def test_spread_of_routers_over_as_many_pipes_and_of_the_pipes_scaling() -> None:
    rounds = [_with_pipes(), _with_pipes()]
    sp = spread(rounds)
    assert sp["router x4 / pipe x4"]["drain_rate"].values == pytest.approx((0.75, 0.75))
    assert sp["pipe scaling"]["drain_rate"].median == pytest.approx(0.8)
    out = _printed(render_spread(rounds), 60)
    assert "…" not in out
    for text in ("router x4 / pipe x4: drain rate", "router x4: drain rate / pipe", "4 pipes / 1 pipe",
                 "4 routers / 1 router"):  # fmt: skip
        assert text in out, text


def test_e2e_config_refuses_pipes_without_one() -> None:
    with pytest.raises(ValueError, match="pipes must include 1"):
        E2EConfig(pipes=(2, 4))
    with pytest.raises(ValueError, match="at least 1"):
        E2EConfig(pipes=(0, 1))
    assert E2EConfig(pipes=(2,), baseline=False).pipes == (2,), "no pipe is measured: nothing to refuse"


def test_read_to_acknowledged_counts_each_job_of_the_timed_batches_only() -> None:
    acks = [(1000, 1010.0, 5), (2000, 2030.5, 2), (2500, 2504.0, 0), (3000, 3100.0, 1)]
    got = acked_ms(acks, since_ms=2000)
    assert sorted(got) == [30.5, 30.5, 100.0], "one value per routed job; warm-up batches before left out"
