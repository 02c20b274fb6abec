"""The one-minute soak (``router-worker bench soak --minutes 1``): 2 routers, 3 heads and 2 producers as
processes, 100 jobs/s (lighter than the command's 200: the suite shares two cores), each fault once (a router
killed and restarted, a head killed and restarted, Redis restarted, a router paused past its session timeout).
Every job produced is accounted for, and every duplicate delivery lies in the window of a fault that can cause
it. About 80 to 95 s on two cores."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from router_worker.bench_soak import FAULTS, SoakConfig, render, run_soak
from router_worker.settings import Settings
from tests.procs import time_limit

pytestmark = pytest.mark.integration


@time_limit(170)
async def test_a_one_minute_soak_with_every_fault_loses_nothing_and_explains_every_duplicate(
    settings: Settings, tmp_path: Path
) -> None:
    cfg = SoakConfig(minutes=1, rate=100, fault_every_s=12, warmup_s=6, drain_s=60)
    report = await run_soak(settings, cfg, Console(stderr=True), workdir=tmp_path)
    render(report, Console(width=160))  # shown with -s or when the test fails
    doc = report.to_json()

    assert [f.kind for f in report.faults] == list(FAULTS), "each fault ran once, in order"
    assert report.produced > 3_000, f"the producers sent too little: {report.produced}"
    assert report.lost == 0, f"{report.lost} jobs lost, e.g. {report.lost_samples}"
    assert report.completed + report.dead_lettered == report.produced
    dups = report.duplicates
    assert dups.unexplained == 0, (
        f"{dups.unexplained} of {dups.extra} duplicate deliveries lie in no fault window that can cause them: "
        f"{dups.unexplained_samples}; faults {report.faults}"
    )
    assert sum(dups.by_fault.values()) == dups.extra == sum(dups.per_fault)

    for key in ("produced", "completed", "lost", "dead_lettered", "dead_by_reason", "duplicates", "faults",
                "memory", "latency_per_minute", "config"):  # fmt: skip
        assert key in doc, key
    assert {"extra", "by_fault", "by_how", "unexplained"} <= doc["duplicates"].keys()
    assert [m["router"] for m in doc["memory"]] == ["r1", "r2"]
    for m in doc["memory"]:
        assert m["warm_mb"], f"RSS of {m['router']} after its warm-up not measured: {m}"
        assert m["end_mb"], f"RSS of {m['router']} at the end not measured: {m}"
        assert m["growth_pct"] is not None
    assert doc["latency_per_minute"]
    assert doc["latency_per_minute"][0]["minute"] == 0
    assert sum(m["jobs"] for m in doc["latency_per_minute"]) == report.completed
    assert all(m["p99_ms"] >= m["p50_ms"] > 0 for m in doc["latency_per_minute"])
    for f in doc["faults"]:
        assert f["end_ms"] >= f["start_ms"]
        assert "duplicates" in f
