"""The whole path of a job on the real embedded broker and Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import orjson
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.settings import Settings
from schemas.envelope import JSON, MSGPACK
from tests.helpers import Served, cli_env, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration

MODELS = {
    "llama-3.3-70b": ("us-east", "us-east", "eu-west"),
    "meta-llama/Llama-3.3-70B": ("eu-west", "us-east"),
}


async def test_jobs_arrive_exactly_once_at_the_right_head_partition_with_headers(settings: Settings, redis: Redis
                                                                                 ) -> None:  # fmt: skip
    served = Served()
    workers = [make_worker(settings, redis, served, model, region, capacity=16)
               for model, regions in MODELS.items() for region in regions]  # fmt: skip
    router = make_router(settings, redis)
    n = 2500
    async with running(*workers), running(router):
        sent: dict[str, str] = {}
        async with JobProducer(settings) as p, JobProducer(settings, JSON) as pj:
            for i in range(n):
                model = list(MODELS)[i % 2]
                producer = pj if i % 5 == 0 else p  # both encodings on the wire
                job_id = await producer.submit(model, {"i": i}, region="us-east",
                                               headers={"traceparent": f"00-{i:032x}-{i:016x}-01"})  # fmt: skip
                sent[job_id] = model
        await wait_until(lambda: len(served.rows) >= n, timeout=180)  # generous: the suite shares two cores
        await asyncio.sleep(0.5)  # a duplicate would arrive now

    counts = Counter(served.job_ids())
    assert set(counts) == set(sent), "every job arrived"
    assert max(counts.values()) == 1, f"duplicates: {[j for j, c in counts.items() if c > 1][:5]}"
    by_head = {w.head_id: w for w in workers}
    for job_id, head_id, model_type, partition, headers in served.rows:
        w = by_head[head_id]
        assert model_type == sent[job_id] == w.config.model_id, "right model"
        assert partition == w.partition, "the head's own partition"
        assert headers["x-job-id"] == job_id.encode()
        assert headers["x-route-head"] == head_id.encode()
        assert headers["x-route-strategy"] == b"least_loaded"
        assert headers["x-route-attempt"] == b"1"
        assert headers["x-route-fallback"] == b"0"
        assert int(headers["x-route-decided-at"]) > 0
        assert headers["content-type"] in (MSGPACK.encode(), JSON.encode())
        assert headers["traceparent"].startswith(b"00-")
    # least_loaded spreads the work: every head of a model got a fair share
    per_head = Counter(r[1] for r in served.rows)
    assert all(per_head[w.head_id] > 0.15 * n / len(MODELS[w.config.model_id]) for w in workers), per_head
    assert router.stats.routed == n
    assert router.stats.dead_lettered == 0


async def _group_members_routed(audit_files: list[str]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for path in audit_files:
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    if rec["event"] == "route":
                        out[rec["router_id"]] += 1
    return dict(out)


async def test_two_router_processes_share_the_partitions_and_route_every_job_once(
    settings: Settings, redis: Redis, tmp_path: object
) -> None:
    served = Served()
    workers = [make_worker(settings, redis, served, "m", region, capacity=32) for region in ("a", "b", "c")]
    env_base = cli_env(
        settings,
        ROUTER_REQUESTS_PARTITIONS=str(settings.requests_partitions),
        ROUTER_KAFKA_SESSION_TIMEOUT_MS="6000",
        ROUTER_KAFKA_HEARTBEAT_INTERVAL_MS="500",
        ROUTER_HEAD_REFRESH_MS="200",
    )
    audit_files = [str(tmp_path) + f"/audit-{i}.log" for i in range(2)]  # type: ignore[operator]
    procs = []
    n = 3000
    async with running(*workers):
        try:
            for i in range(2):
                env = env_base | {"ROUTER_AUDIT_FILE": audit_files[i], "ROUTER_ROUTER_ID": f"proc-{i}"}
                procs.append(subprocess.Popen([sys.executable, "-m", "router_worker.cli", "run"], env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
            # Jobs published while the group forms are routed too; publish in two waves to see both members.
            async with JobProducer(settings) as p:
                for i in range(n // 2):
                    await p.submit("m", i, session_id=f"s{i % 97}")
            await wait_until(lambda: len(served.rows) >= n // 2, timeout=90)
            async with JobProducer(settings) as p:
                for i in range(n // 2, n):
                    await p.submit("m", i, session_id=f"s{i % 97}")
            await wait_until(lambda: len(served.rows) >= n, timeout=90)
            await asyncio.sleep(0.5)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    _, stderr = proc.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
                assert proc.returncode in (0, -15), stderr.decode()[-2000:]
    counts = Counter(served.job_ids())
    assert len(counts) == n
    assert max(counts.values()) == 1
    routed = await _group_members_routed(audit_files)
    assert sum(routed.values()) == n, routed
    assert set(routed) == {"proc-0", "proc-1"}, f"both members routed: {routed}"


async def test_the_same_job_id_is_routed_once(settings: Settings, redis: Redis) -> None:
    served = Served()
    worker = make_worker(settings, redis, served, "m", capacity=16)
    router = make_router(settings, redis)
    async with running(worker, router):
        async with JobProducer(settings) as p:
            for _ in range(3):  # a producer retrying, in one batch or across batches
                await p.submit("m", "x", job_id="once")
                await p.flush()
                await asyncio.sleep(0.3)
            for i in range(5):
                await p.submit("m", i, job_id=f"other-{i}")
        await wait_until(lambda: len(served.rows) >= 6)
        await asyncio.sleep(0.5)
    assert Counter(served.job_ids())["once"] == 1
    assert len(served.rows) == 6
    # at least the two re-sends were skipped (a batch read again after a rebalance skips them again)
    assert router.stats.duplicates >= 2


async def test_the_default_strategy_setting_applies_until_a_policy_is_stored(settings: Settings, redis: Redis
                                                                            ) -> None:  # fmt: skip
    s = settings.model_copy(update={"default_strategy": "round_robin"})
    served = Served()
    worker = make_worker(s, redis, served, "m")
    router = make_router(s, redis)
    async with running(worker, router):
        async with JobProducer(s) as p:
            await p.submit("m", "x", job_id="rr")
        await wait_until(lambda: len(served.rows) >= 1)
    assert served.rows[0][4]["x-route-strategy"] == b"round_robin"
