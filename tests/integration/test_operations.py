"""Operators' commands against running routers: policy changes and head removals take effect everywhere."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.settings import Settings
from tests.helpers import Served, cli, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def _cli(s: Settings, *args: str, check: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
    proc = await asyncio.to_thread(cli, s, *args, check=check)
    return proc, time.monotonic()


async def test_policy_change_and_head_removal_reach_every_router_within_a_second(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    served = Served()
    workers = [
        make_worker(settings, redis, served, "m", "r1", capacity=64, head_id=f"h{i}") for i in range(3)
    ]
    routers = [make_router(settings, redis) for _ in range(2)]
    async with running(*workers), running(*routers):
        assert all(r.state.policy.version == 0 for r in routers)

        # 1. a policy change through the CLI
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text("default_strategy: round_robin\nmax_load_threshold: 0.95\n")
        _, done_at = await _cli(settings, "policy", "set", str(policy_file))
        await wait_until(lambda: all(r.state.policy.version == 1 for r in routers), timeout=1.0, every=0.005)
        lag = time.monotonic() - done_at
        assert lag < 1.0, lag
        print(f"policy change reached both routers {lag * 1000:.1f} ms after the CLI exited")
        assert all(r.state.policy.default_strategy == "round_robin" for r in routers)

        # 2. an invalid policy is refused with the field named, and the current one stays
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"default_strategy": "fastest", "max_load_threshold": -1}))
        proc, _ = await _cli(settings, "policy", "set", str(bad), check=False)
        assert proc.returncode == 1
        assert "default_strategy" in proc.stderr
        assert "max_load_threshold" in proc.stderr
        shown = json.loads((await _cli(settings, "policy", "show"))[0].stdout)
        assert shown["version"] == 1
        assert shown["default_strategy"] == "round_robin"

        # 3. route some jobs, then remove a head through the CLI
        async with JobProducer(settings) as p:
            for i in range(300):
                await p.submit("m", i, job_id=f"before-{i}")
        await wait_until(lambda: len(served.rows) >= 300)
        assert {r[1] for r in served.rows} == {"h0", "h1", "h2"}
        assert all(r[4]["x-route-strategy"] == b"round_robin" for r in served.rows)

        _, done_at = await _cli(settings, "heads", "remove", "h1")
        await wait_until(
            lambda: all("h1" not in r.state.index.heads for r in routers), timeout=1.0, every=0.005
        )
        lag = time.monotonic() - done_at
        assert lag < 1.0, lag
        print(f"head removal reached both routers {lag * 1000:.1f} ms after the CLI exited")
        served.rows.clear()
        async with JobProducer(settings) as p:
            for i in range(600):
                await p.submit("m", i, job_id=f"after-{i}")
        await wait_until(lambda: len(served.rows) >= 600)
        assert {r[1] for r in served.rows} == {"h0", "h2"}, "no router routes to the removed head"

    audit_events = [
        orjson.loads(line)["event"] for line in Path(settings.audit_file).read_bytes().splitlines()
    ]
    assert "policy_changed" in audit_events
    assert "head_removed" in audit_events


async def test_explain_prints_candidates_exclusions_scores_and_the_pick(
    settings: Settings, redis: Redis
) -> None:
    served = Served()
    workers = [make_worker(settings, redis, served, "llama", region, head_id=f"llama-{region}", capacity=8)
               for region in ("eu", "us")]  # fmt: skip
    async with running(*workers):
        await _cli(settings, "heads", "drain", "llama-us")
        proc, _ = await _cli(
            settings, "explain", "--model", "llama", "--region", "eu", "--strategy", "geo_preferred"
        )
        out = proc.stdout
        assert "llama-eu" in out
        assert "PICK" in out
        assert "excluded: status draining" in out
        assert "outcome: routed" in out
        assert "strategy: geo_preferred" in out
        assert "scores: {'load'" in out
        proc, _ = await _cli(settings, "explain", "--model", "nobody")
        assert "outcome: unknown_model" in proc.stdout
        ls = json.loads((await _cli(settings, "heads", "ls", "--json"))[0].stdout)
        assert {h["head_id"]: h["status"] for h in ls} == {"llama-eu": "healthy", "llama-us": "draining"}
