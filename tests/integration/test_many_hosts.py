"""Routers as separate processes that share nothing but the broker and Redis (each its own working directory,
audit file and admin port, as on separate hosts): the consumer group spreads the partitions over them, survives
the loss of a member (SIGKILL: its partitions move to the others, no job is lost) and spreads them again when it
returns. Each router's share is read from its own ``/metrics`` (``router_assigned_partitions``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_worker.localstack import free_port
from router_worker.settings import Settings
from tests.procs import JobStream, Ledger, Proc, Procs, time_limit

pytestmark = pytest.mark.integration

MODEL = "m"


@time_limit(150)
async def test_routers_on_separate_hosts_spread_partitions_survive_a_lost_member_and_spread_back(
    settings: Settings, tmp_path: Path
) -> None:
    jobs, rate = 4_000, 100.0
    hosts = {name: tmp_path / f"host-{name}" for name in ("r1", "r2", "r3")}
    async with Procs(settings, tmp_path / "logs") as procs:
        routers: dict[str, Proc] = {}

        def start(name: str) -> Proc:
            # A relative audit file: each router writes under its own working directory, as on its own host.
            routers[name] = procs.router(name, admin_port=free_port(), cwd=hosts[name],
                                         ROUTER_AUDIT_FILE="var/log/routing_audit.log")  # fmt: skip
            return routers[name]

        for name in hosts:
            start(name)
        spread = await procs.wait_spread(list(routers.values()), 90)
        total = sum(spread.values())
        print(f"\n[hosts] 3 routers: {spread} of {total} partitions")
        assert all(n >= 1 for n in spread.values()), spread
        assert max(spread.values()) - min(spread.values()) <= 1 + total // 6, f"uneven spread: {spread}"

        heads = [procs.head(MODEL, capacity=32, service_ms=2.0) for _ in range(2)]
        for h in heads:
            await procs.wait_head(h)
        async with (
            Ledger(settings) as ledger,
            JobStream(settings, MODEL, jobs, rate, prefix="hosts") as stream,
        ):
            ids = stream.ids
            assert await ledger.wait_for(lambda: ledger.delivered(ids) >= 500, 60), (
                f"before the kill: {ledger.delivered(ids)} delivered\n{procs.report()}"
            )
            lost = routers["r3"]
            lost.kill9()
            assert await lost.wait_exit(10) == -9
            survivors = [routers["r1"], routers["r2"]]
            after = await procs.wait_spread(survivors, 90)
            print(f"[hosts] r3 killed at {ledger.delivered(ids)} delivered: {after}")
            assert sum(after.values()) == total, f"the survivors own {after}, not all {total} partitions"
            assert after["r1"] + after["r2"] > spread["r1"] + spread["r2"], "r3's partitions did not move"

            start("r3")  # the same id and working directory, a new process: it rejoins the group
            back = await procs.wait_spread(list(routers.values()), 90)
            print(f"[hosts] r3 back at {ledger.delivered(ids)} delivered: {back}")
            assert back["r3"] >= 1, back
            assert sum(back.values()) == total, back

            await stream.wait(120)
            await ledger.wait_for(lambda: ledger.accounted(ids) == jobs, 60)
            await ledger.settle()
            rep = ledger.report(ids)
            procs.assert_alive(*routers.values(), *heads)
    print(f"[hosts] {rep.summary()}")
    assert rep.lost == 0, f"{rep.lost} jobs lost across the loss and return of a router: {rep.summary()}"
    assert not ledger.dead, f"dead letters: {dict(rep.dead_by_reason)}"
    for name, home in hosts.items():  # each router wrote under its own working directory only
        assert (home / "var/log/routing_audit.log").is_file(), f"{name} wrote no audit file in {home}"
