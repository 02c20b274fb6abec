"""``bench broker`` on the real embedded broker: every stamped record is timed once, and the CLI prints a row
per case (JSON lines with ``--json``)."""

from __future__ import annotations

import json
import math

import pytest

from router_worker.bench_broker import one_hop
from router_worker.settings import Settings
from tests.helpers import cli

pytestmark = pytest.mark.integration


async def test_one_hop_times_every_record_once(settings: Settings) -> None:
    row = await one_hop(settings, partitions=3, fetch_wait_ms=5, rate=400.0, n=120)
    assert (row.records, row.received) == (120, 120), "each record arrives and is timed once"
    assert 0 < row.p50_ms <= row.p99_ms <= row.max_ms
    assert not math.isnan(row.max_ms)


def test_the_cli_prints_one_json_object_per_case(settings: Settings) -> None:
    out = cli(settings, "bench", "broker", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 7
    assert all(r["benchmark"] == "broker_hop" and r["received"] == r["records"] for r in rows), rows
    assert {r["fetch_wait_ms"] for r in rows} == {5, 50, 100, 500}
