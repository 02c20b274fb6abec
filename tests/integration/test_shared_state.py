"""State routers share through Redis: session pins survive a rebalance; learned profiles reach every router."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.core.policy import Policy
from router_worker.pipeline.router import Router
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def _wait_for_a_settled_split(*routers: Router, quiet_s: float = 2.0) -> None:
    """Every router holds partitions, and the split has not changed for ``quiet_s`` (the embedded broker can
    run a second rebalance a few seconds after a member joins)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    last: tuple[frozenset[object], ...] = ()
    since = loop.time()
    while loop.time() < deadline:
        now = tuple(frozenset(r._consumer.assignment()) if r._consumer else frozenset() for r in routers)
        if now != last:
            last, since = now, loop.time()
        elif all(now) and loop.time() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the group never settled with every router holding partitions: {last}")


async def test_session_pins_are_shared_so_a_rebalance_keeps_every_session_on_its_head(
    settings: Settings, redis: Redis
) -> None:
    await PolicyStore(redis, Keys(settings.redis_prefix)).set(Policy(default_strategy="affinity"))
    served = Served()
    workers = [make_worker(settings, redis, served, "chat", head_id=f"h{i}", capacity=64) for i in range(4)]
    r1 = make_router(settings.model_copy(update={"router_id": "r1"}), redis)
    r2 = make_router(settings.model_copy(update={"router_id": "r2"}), redis)
    sessions = [f"user-{i}" for i in range(24)]
    async with running(*workers), running(r2):
        async with running(r1):
            await _wait_for_a_settled_split(r1, r2)
            # Rounds until both routers routed some (the embedded broker may still move partitions once more).
            rounds = 0
            async with JobProducer(settings) as p:
                while rounds < 5 or (not (r1.stats.routed and r2.stats.routed) and rounds < 15):
                    for sid in sessions:
                        await p.submit("chat", rounds, session_id=sid)
                    await p.flush()
                    rounds += 1
                    want = rounds * len(sessions)
                    await wait_until(lambda want=want: len(set(served.job_ids())) >= want)  # type: ignore[misc]
            assert r1.stats.routed > 0
            assert r2.stats.routed > 0
        # r1 left the group: its partitions, and its sessions, are r2's now; r2 never saw them before
        routed_before = r2.stats.routed
        async with JobProducer(settings) as p:
            for rnd in range(rounds, rounds + 5):
                for sid in sessions:
                    await p.submit("chat", rnd, session_id=sid)
        total = rounds + 5
        await wait_until(lambda: len(set(served.job_ids())) >= total * len(sessions), timeout=60)
        assert r2.stats.routed - routed_before == 5 * len(sessions)

    # The receipts, per session in routing order: (router, head, reason).
    receipts: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    head_of_job: dict[str, str] = {}
    for line in Path(settings.audit_file).read_bytes().splitlines():
        rec = orjson.loads(line)
        if rec["event"] == "route":
            receipts[served.session_of[rec["job_id"]] or ""].append(
                (rec["router_id"], rec["head_id"], rec["reason"])
            )
            head_of_job[rec["job_id"]] = rec["head_id"]
    assert set(receipts) == set(sessions)
    handed_over = 0
    for sid, seq in receipts.items():
        assert len(seq) == total, (sid, seq)
        assert "new session pin" in seq[0][2], seq[0]
        for (router_a, head_a, _), (router_b, head_b, reason) in itertools.pairwise(seq):
            moved_legitimately = "re-pinned" in reason
            if head_b != head_a:
                assert moved_legitimately, f"{sid} moved {head_a} -> {head_b} without a re-pin: {reason}"
            else:
                assert "pinned" in reason, reason
            if router_a == "r1" and router_b == "r2":  # the hand-over: r2 follows the pin r1 stored in Redis
                handed_over += 1
                assert "new session pin" not in reason, (sid, reason)
    assert handed_over > 0, "some sessions were r1's before the rebalance"
    # Every job was served by the head its receipt names, and the pin every router reads is the last one.
    for job_id, head_id, *_ in served.rows:
        assert head_of_job[job_id] == head_id, job_id
    for sid, seq in receipts.items():
        assert await redis.get(Keys(settings.redis_prefix).affinity(sid)) == seq[-1][1], (sid, seq)
    splits = sum(1 for seq in receipts.values() if len({h for _, h, _ in seq}) > 1)
    print(f"sessions re-pinned because their head was briefly ineligible: {splits} of {len(sessions)}")


async def test_heads_learn_profiles_that_every_router_reads(settings: Settings, redis: Redis) -> None:
    served = Served()
    workers = [make_worker(settings, redis, served, "resnet50", head_id=f"r{i}", capacity=8, delay_s=(0.002, 0.040)[i])
               for i in range(2)]  # fmt: skip
    router = make_router(settings, redis)
    async with running(*workers, router):
        async with JobProducer(settings) as p:
            for i in range(200):
                await p.submit("resnet50", i, estimated_tokens=i % 50)
        await wait_until(lambda: len(served.rows) >= 200)
        await wait_until(lambda: len(router.state.index.profiles) == 2, timeout=5)
        profiles = router.state.index.profiles
        assert all(p.samples >= 50 for p in profiles.values()), profiles
        lat = {h: router.state.index.heads[h].latency_ms for h in ("r0", "r1")}
        assert 0 < lat["r0"] < lat["r1"], f"the slower head reports the higher latency: {lat}"
