"""Circuit breakers against a real Redis (counting, the read script, compare-and-set) and, end to end, real
routers and heads in their own processes: a head that fails every job is cut off by every router at once."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from router_worker.core.breaker import Breaker, BreakerConfig, BreakerState, evaluate, lease, record
from router_worker.core.policy import BreakerPolicy
from router_worker.settings import Settings
from router_worker.state.breakers import BreakerStore, Write, summary_key
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore
from tests.helpers import cli
from tests.procs import JobStream, Ledger, Procs, read_audit, time_limit

pytestmark = pytest.mark.integration

CFG = BreakerConfig(window_ms=5_000, min_volume=5, error_threshold=0.5, cooldown_ms=1_000, half_open_probes=1)
T0 = 1_700_000_000_000


async def _read(store: BreakerStore, *heads: str) -> dict[str, object]:
    await store.ensure_scripts()
    async with store.redis.pipeline(transaction=False) as pipe:
        store.queue_read(pipe, heads)
        (reply,) = await pipe.execute()
    return store.parse_read(reply)  # type: ignore[return-value]


async def test_counts_read_back_as_the_pure_breaker_counts_them(settings: Settings, redis: Redis) -> None:
    store = BreakerStore(redis, Keys(settings.redis_prefix))
    await store.count({"h1": (3, 0), "h2": (1, 2)}, T0)
    await store.count({"h2": (0, 4)}, T0 + 700)
    got = await _read(store)
    assert set(got) == {"h2"}, "only a head that counted a failure is dirty; h1 is closed and clean"
    want = record(record(record(Breaker(), T0, ok=1, err=2), T0 + 700, err=4), T0, ok=0)
    assert got["h2"] == want
    assert await _read(store) == {}, "the dirty set is consumed by the read"
    assert (await _read(store, "h1"))["h1"] == record(Breaker(), T0, ok=3)


async def test_a_transition_is_applied_once_whoever_races_for_it(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.redis_prefix)
    store = BreakerStore(redis, keys)
    await store.count({"h": (0, 10)}, T0)
    seen = (await _read(store, "h"))["h"]
    new, t = evaluate(seen, CFG, T0 + 10)
    assert t is not None
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.events)
    # Three routers that read the same breaker all try to open it: one wins.
    won = await asyncio.gather(*(store.write([Write("h", seen, new, t)], keys.events) for _ in range(3)))
    assert sorted(w[0] for w in won) == [False, False, True]
    events = []
    for _ in range(20):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None:
            events.append(orjson.loads(msg["data"]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert [e["event"] for e in events] == ["breaker_opened"], "announced once, by the winner"
    now = (await _read(store))["h"]
    assert now.state is BreakerState.OPEN
    assert now.version == 1
    assert await redis.hget(summary_key(keys), "h") == f"2|{new.open_until_ms}|1"


async def test_a_probe_lease_is_granted_once_and_closing_leaves_the_summary(settings: Settings,
                                                                            redis: Redis) -> None:  # fmt: skip
    keys = Keys(settings.redis_prefix)
    store = BreakerStore(redis, keys)
    await store.count({"h": (0, 10)}, T0)
    b = (await _read(store, "h"))["h"]
    opened, t = evaluate(b, CFG, T0)
    assert await store.write([Write("h", b, opened, t)], keys.events) == [True]
    half, t = evaluate(opened, CFG, opened.open_until_ms)
    assert await store.write([Write("h", opened, half, t)], keys.events) == [True]
    leased, n = lease(half, CFG, half.since_ms, 5)
    assert n == 1
    assert await store.write([Write("h", half, leased), Write("h", half, leased)], keys.events) == [
        True,
        False,
    ]
    await store.count({"h": (1, 0)}, half.since_ms + 100)
    b = (await _read(store))["h"]
    closed, t = evaluate(b, CFG, half.since_ms + 200)
    assert t is not None
    assert t.event == "breaker_closed"
    assert await store.write([Write("h", b, closed, t)], keys.events) == [True]
    assert await redis.hget(summary_key(keys), "h") is None
    assert await _read(store) == {}


# --- end to end: routers and heads in their own processes -------------------------------------------------------


_EVENT_MS = 250
"""How soon the opening router's pub/sub event reaches the others on a loaded two-core machine."""
_NEWS_MS = 2_000
"""How soon after a breaker opens every router has heard (an event, or a read every ``breaker_poll_ms``), even on
a loaded two-core machine."""


def _walk(events: list[dict[str, Any]]) -> list[str]:
    """The states a breaker went through, from its audit records in time order; fails on an impossible step (two
    records of one transition, e.g. one per router)."""
    legal = {("closed", "open"), ("open", "half_open"), ("half_open", "closed"), ("half_open", "open")}
    state = "closed"
    walk = [state]
    for e in sorted(events, key=lambda r: (r["ts"], r["to"] != "half_open")):
        assert e["from"] == state, f"transition {e['from']} -> {e['to']} audited while {state}: {events}"
        assert (e["from"], e["to"]) in legal
        state = e["to"]
        walk.append(state)
    return walk


@time_limit(150)
async def test_a_head_failing_every_job_is_cut_off_by_both_routers_and_every_job_completes_elsewhere(
    settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    policy = PolicyStore.for_settings(redis, settings)
    await policy.set(policy.default.model_copy(update={"breaker": BreakerPolicy(
        window_s=10, min_volume=10, error_threshold=0.5, cooldown_s=3, half_open_probes=1)}))  # fmt: skip
    jobs = 700
    async with Procs(settings, tmp_path) as procs:
        await procs.start_routers(2)
        good = await procs.start_head("m", head_id="good", capacity=32, service_ms=5)
        bad = await procs.start_head("m", head_id="bad", capacity=32, service_ms=5, fail_rate=1.0)
        async with (
            Ledger(settings) as ledger,
            JobStream(settings, "m", jobs, rate=100, prefix="brk") as stream,
        ):
            await stream.wait(60)
            assert await ledger.wait_for(lambda: ledger.accounted(stream.ids) == jobs, 60), (
                f"{ledger.delivered(stream.ids)} of {jobs} delivered\n{procs.report()}"
            )
            await ledger.settle(quiet_s=1.0)
            rep = ledger.report(stream.ids)
        procs.assert_alive(good, bad)
    assert rep.lost == 0, rep.summary()
    assert not rep.dead_by_reason, f"nothing dead-lettered: {rep.summary()}"
    done_at = {d.get("head_id") for ds in ledger.deliveries.values() for d in ds}
    assert done_at == {"good"}, "every job completed at the healthy head"

    records, _ = read_audit(settings.audit_file)
    transitions = [
        r for r in records if r.get("event", "").startswith("breaker_") and r.get("head_id") == "bad"
    ]
    opened = [r for r in transitions if r["event"] == "breaker_opened"]
    assert opened, "the failing head's breaker opened"
    walk = _walk(transitions)
    assert walk.count("open") == len(opened), "one breaker_opened per transition, not one per router"
    assert not [
        r for r in records if r.get("event", "").startswith("breaker_") and r.get("head_id") == "good"
    ]

    # After it first opened, each router routed to the failing head only the batches it had in hand before the news
    # reached it (the opening router's pub/sub event, or its next breaker read): the batch in flight, the one being
    # planned, and one whose claim round trip was already on its way. After that, only half-open probes. A batch's
    # decision records share its timestamp. (Seen in CI: a router two batches 13 ms apart, both just after t_open.)
    t_open = min(r["ts"] for r in opened)
    routes = [r for r in records if r.get("event") in ("route", "fallback") and r.get("head_id") == "bad"]
    assert routes, "the failing head got jobs before its breaker opened"
    late = [r for r in routes if r["ts"] > t_open and "half-open breaker probe" not in r["reason"]]
    by_router: dict[str, set[int]] = {}
    for r in late:
        by_router.setdefault(r["router_id"], set()).add(r["ts"])
    # Under a loaded suite a router can plan a few more small batches before the opening router's event reaches it:
    # more than three are accepted only while they all fall within _EVENT_MS of the opening.
    assert all(len(batches) <= 3 or max(batches) - t_open <= _EVENT_MS for batches in by_router.values()), (
        f"routers kept sending to an open breaker's head: "
        f"{ {r: sorted(ts - t_open for ts in b) for r, b in by_router.items()} } ms after it opened"
    )
    assert all(ts - t_open <= _NEWS_MS for batches in by_router.values() for ts in batches), (
        f"a router sent to an open breaker's head more than {_NEWS_MS} ms after it opened: {by_router}"
    )
    probes = [r for r in routes if "half-open breaker probe" in r["reason"]]
    print(f"\n[breakers] walk {walk}; {len(routes)} routes to the failing head, {len(late)} after it opened in "
          f"batches {by_router}, {len(probes)} probes")  # fmt: skip
    half_opens = [r for r in transitions if r["event"] == "breaker_half_open"]
    assert len(probes) <= len(half_opens) * 2, "at most the leased probes per half-open spell"


async def test_heads_ls_and_explain_show_an_open_breaker(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.redis_prefix)
    reg = HeadRegistry(redis, keys, 60_000)
    await reg.register(HeadRecord("bad", "m", partition=0))
    await reg.register(HeadRecord("good", "m", partition=1))
    store = BreakerStore(redis, keys)
    now = int(time.time() * 1000)
    await store.count({"bad": (2, 18), "good": (10, 0)}, now)
    b = (await _read(store, "bad"))["bad"]
    opened, t = evaluate(b, BreakerConfig(cooldown_ms=600_000), now)
    assert await store.write([Write("bad", b, opened, t)], keys.events) == [True]
    rows = {r["head_id"]: r for r in json.loads(cli(settings, "heads", "ls", "--json").stdout)}
    assert (rows["bad"]["breaker"], rows["bad"]["error_rate"]) == ("open", 0.9)
    assert (rows["good"]["breaker"], rows["good"]["error_rate"]) == ("closed", 0.0)
    table = cli(settings, "heads", "ls").stdout
    assert "breaker" in table
    assert "90%" in next(ln for ln in table.splitlines() if "bad" in ln)
    explained = json.loads(cli(settings, "explain", "--model", "m", "--json").stdout)
    text = json.dumps(explained)
    assert "circuit breaker open" in text, text
    assert cli(settings, "explain", "--model", "m").stdout.count("circuit breaker open") == 1
