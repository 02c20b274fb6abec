"""Acceptance scenarios of the robust job path (issue 6): routers and heads in their own processes, faults
injected from outside (kill -9, SIGTERM, Redis stopped, a head killed with jobs in flight), and what came out
counted from the results topic and the DLQ. Each test has a time limit; the file takes about four minutes on
two cores when everything passes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from router_worker.settings import Settings
from tests.procs import JobStream, Ledger, Proc, Procs, RedisServer, Report, poll, read_audit, time_limit

pytestmark = pytest.mark.integration

MODEL = "m"


def _deliveries_line(ledger: Ledger, job_id: str) -> str:
    return ", ".join(f"{d.get('head_id')} attempt={d.get('attempt')} routed_at={d.get('routed_at')}"
                     for d in ledger.deliveries.get(job_id, ()))  # fmt: skip


def _print_duplicates(title: str, ledger: Ledger, rep: Report, sample: int = 10) -> None:
    """The duplicate count, and for a sample whether the deliveries carried the same x-route-attempt."""
    same = sum(1 for j in rep.more if len({d.get("attempt") for d in ledger.deliveries[j]}) == 1)
    print(f"\n[{title}] {rep.summary()}")
    print(f"[{title}] duplicated jobs {len(rep.more)} ({rep.duplicates} extra deliveries); deliveries of one job "
          f"with the same x-route-attempt: {same} of {len(rep.more)}, different: {len(rep.more) - same}")  # fmt: skip
    for j in list(rep.more)[:sample]:
        print(f"[{title}]   {j}: {_deliveries_line(ledger, j)}")


async def _failover(settings: Settings, workdir: Path, stop_router: Callable[[Proc], None], title: str,
                    jobs: int = 20_000, rate: float = 2_500.0) -> tuple[Report, int]:  # fmt: skip
    """Two routers, four heads (capacity 64, 1 ms); ``jobs`` jobs at ``rate``; one router stopped by
    ``stop_router`` once a quarter of the jobs were delivered and the stream still runs. Returns the report and
    the stopped router's exit status."""
    async with Procs(settings, workdir) as procs:
        r1, r2 = await procs.start_routers(2)
        heads = [procs.head(MODEL, capacity=64, service_ms=1.0, jitter_ms=0.5) for _ in range(4)]
        for h in heads:
            await procs.wait_head(h)
        async with Ledger(settings) as ledger, JobStream(settings, MODEL, jobs, rate, prefix=title) as stream:
            ids = stream.ids
            quarter = jobs // 4
            reached = await ledger.wait_for(lambda: ledger.delivered(ids) >= quarter or not r1.alive, 60)
            r1.assert_alive()
            assert reached, (
                f"before the fault: {ledger.delivered(ids)} of {quarter} delivered, {stream.sent} sent"
            )
            sent_at_fault = stream.sent
            stop_router(r1)
            print(f"\n[{title}] fault at {ledger.delivered(ids)} delivered, {sent_at_fault} of {jobs} sent")
            await stream.wait(120)
            t0 = time.monotonic()
            await ledger.wait_for(lambda: ledger.accounted(ids) == jobs or not r2.alive, 60)
            print(f"[{title}] all sent; waited {time.monotonic() - t0:.1f} s for deliveries")
            await ledger.settle(quiet_s=3.0)
            rep = ledger.report(ids)
            _print_duplicates(title, ledger, rep)
            procs.assert_alive(r2, *heads)
            rc = await r1.wait_exit(settings.shutdown_timeout_s + 10)
            return rep, rc


@time_limit(110)
async def test_kill9_of_one_of_two_routers_mid_stream_loses_no_job(
    settings: Settings, tmp_path: Path
) -> None:
    rep, rc = await _failover(settings, tmp_path, Proc.kill9, "kill9")
    assert rc == -9
    assert rep.lost == 0, f"{rep.lost} jobs lost after kill -9 of a router: {rep.summary()}"
    assert not rep.unexpected, rep.summary()


@time_limit(110)
async def test_sigterm_of_one_of_two_routers_mid_stream_loses_and_doubles_no_job(settings: Settings,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    rep, rc = await _failover(settings, tmp_path, Proc.term, "sigterm")
    assert rep.lost == 0, f"{rep.lost} jobs lost after SIGTERM of a router: {rep.summary()}"
    assert rep.duplicates == 0, (
        f"{len(rep.more)} jobs delivered twice after SIGTERM of a router: {rep.summary()}"
    )
    assert rc == 0, f"the router's exit status after SIGTERM: {rc}"


@time_limit(100)
async def test_redis_outage_of_10_s_loses_nothing_dead_letters_nothing_and_keeps_the_audit(
    settings: Settings, tmp_path: Path
) -> None:
    jobs, rate, outage_s = 7_500, 300.0, 10.0
    async with RedisServer(tmp_path / "redis") as redis_server:
        s = settings.model_copy(update={"redis_url": redis_server.url})
        async with Procs(s, tmp_path / "procs") as procs:
            routers = await procs.start_routers(2)
            heads = [procs.head(MODEL, capacity=32, service_ms=5.0) for _ in range(2)]
            for h in heads:
                await procs.wait_head(h)
            async with Ledger(s) as ledger, JobStream(s, MODEL, jobs, rate, prefix="redis") as stream:
                ids = stream.ids
                assert await ledger.wait_for(lambda: ledger.delivered(ids) >= 1_500, 30), (
                    f"before the outage: {ledger.delivered(ids)} delivered\n{procs.report()}"
                )
                await redis_server.stop()
                down_ms = int(time.time() * 1000)
                await asyncio.sleep(outage_s)  # the outage itself
                up_ms = int(time.time() * 1000)
                await redis_server.start()
                print(f"\n[redis] down {down_ms} .. up {up_ms}; {stream.sent} sent, {ledger.delivered(ids)} "
                      f"delivered when it came back")  # fmt: skip
                await stream.wait(60)
                await ledger.wait_for(
                    lambda: ledger.accounted(ids) == jobs or not any(r.alive for r in routers), 60
                )
                await ledger.settle()
                rep = ledger.report(ids)
                procs.assert_alive(*routers, *heads)
    print(f"[redis] {rep.summary()}")
    audit, torn = read_audit(s.audit_file)
    routes = [r for r in audit if r.get("event") in ("route", "fallback")]
    in_window = [r for r in routes if down_ms <= int(r.get("ts", 0)) <= up_ms]
    audited = {r.get("job_id") for r in routes}
    routed_in_window = [j for j, ds in ledger.deliveries.items() if any(down_ms <= int(d.get("routed_at") or 0)
                                                                       <= up_ms for d in ds)]  # fmt: skip
    unaudited = [j for j in routed_in_window if j not in audited]
    created_in_window = sum(1 for ds in ledger.deliveries.values() if down_ms <= int(ds[0].get("created_at") or 0)
                            <= up_ms)  # fmt: skip
    print(f"[redis] audit: {len(audit)} records ({torn} torn lines), {len(routes)} route records, {len(in_window)} "
          f"in the outage window; {len(routed_in_window)} jobs routed in the window (of {created_in_window} "
          f"published in it), {len(unaudited)} of them without a route record")  # fmt: skip
    assert rep.lost == 0, f"{rep.lost} jobs lost across a {outage_s:.0f} s Redis outage: {rep.summary()}"
    assert not ledger.dead, (f"{len(ledger.dead)} dead letters across a Redis outage: {dict(rep.dead_by_reason)}; "
                             f"first: {ledger.dead[0].h('x-dlq-error')}")  # fmt: skip
    assert in_window, f"no route audit record with ts in the outage window {down_ms}..{up_ms}"
    assert not unaudited, (
        f"{len(unaudited)} jobs routed during the outage have no route audit record: {unaudited[:5]}"
    )


@time_limit(60)
async def test_a_head_killed_with_jobs_in_flight_loses_none_of_them(
    settings: Settings, tmp_path: Path
) -> None:
    """One head (capacity 16, 200 ms a job) gets a burst; it is killed with jobs in flight and a second head
    of the model starts on another partition: the dead head's jobs are nacked or re-routed once its heartbeat
    lapses, and every job completes."""
    jobs, model = 200, "slow"
    async with Procs(settings, tmp_path) as procs:
        (router,) = await procs.start_routers(1)
        h1 = await procs.start_head(
            model, capacity=16, service_ms=200.0, jitter_ms=0.0, partition=0, head_id="h1"
        )
        async with Ledger(settings) as ledger, JobStream(settings, model, jobs, 0, prefix="burst") as stream:
            ids = stream.ids
            await stream.wait(30)

            def by_h1() -> int:
                return sum(1 for ds in ledger.deliveries.values() for d in ds if d.get("head_id") == "h1")

            # Jobs routed to h1 and not finished there: the shared in-flight count (routers add on the
            # broker's ack, the head releases as it finishes), read straight from Redis.
            inflight = 0

            async def h1_busy() -> bool:
                nonlocal inflight
                inflight = int(await procs.redis.hget(procs.keys.inflight, "h1") or 0)
                return inflight >= 8 or not h1.alive

            busy = await poll(h1_busy, 30, 0.02)
            h1.assert_alive()
            if not busy:  # what the router did with the jobs instead (held, retried, dead-lettered)
                tally = Counter(str(r.get("event")) for r in read_audit(settings.audit_file)[0])
                raise AssertionError(
                    f"h1 never held 8 jobs in flight (last {inflight}), served {by_h1()}; "
                    f"{ledger.report(ids).summary()}; audit events {dict(tally)}\n{procs.report()}"
                )
            h1.kill9()
            print(f"\n[head-kill] kill -9 of h1 with {inflight} jobs in flight")
            done_by_h1 = by_h1()
            h2 = await procs.start_head(model, capacity=16, service_ms=200.0, jitter_ms=0.0, partition=1,
                                        head_id="h2")  # fmt: skip
            await ledger.wait_for(lambda: ledger.accounted(ids) == jobs or not router.alive, 30)
            await ledger.settle()
            rep = ledger.report(ids)
            procs.assert_alive(router, h2)
    audit, _ = read_audit(settings.audit_file)
    to_h1 = {r.get("job_id") for r in audit if r.get("event") in ("route", "fallback")
             and r.get("head_id") == "h1"}  # fmt: skip
    held = [j for j in to_h1 if not any(d.get("head_id") == "h1" for d in ledger.deliveries.get(j, ()))]
    print(f"[head-kill] h1 completed {done_by_h1} (seen) when killed; {len(to_h1)} routed to h1, {len(held)} of them "
          f"never completed there; {rep.summary()}")  # fmt: skip
    assert h1.returncode == -9
    assert rep.lost == 0, (f"{rep.lost} jobs lost after a head was killed with jobs in flight "
                           f"({len(held)} were held by it): {rep.summary()}")  # fmt: skip
