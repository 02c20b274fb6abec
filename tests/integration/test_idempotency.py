"""The bucketed idempotency marks on a real Redis: a mark is found across a bucket boundary and across clocks
that differ by less than a lifetime, a whole batch is a handful of commands, and big batches work."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from router_worker.state.idempotency import (
    CLAIM_LUA,
    LIFETIMES_KEPT,
    claim_args,
    claim_keys,
    claims_key,
    queue_done,
    read_done,
)
from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

pytestmark = pytest.mark.integration

SPAN = 10_000
"""The claim lifetime of these tests (ms); done marks live ten times longer."""
T0 = 1_000_000 * SPAN  # the start of a claims bucket (and of a done bucket)


async def claim(redis: Redis, keys: Keys, now: int, wanted: dict[str, str]) -> dict[str, int]:
    script = LoadedScript(redis, CLAIM_LUA)
    await script.ensure()
    args = claim_args(LIFETIMES_KEPT * SPAN, wanted.items())
    async with redis.pipeline(transaction=False) as pipe:
        script.queue(pipe, claim_keys(keys, now, SPAN, 10 * SPAN), args)
        (res,) = await pipe.execute()
    return {k: int(c) for k, c in zip(wanted, res, strict=True)}


async def done(redis: Redis, keys: Keys, now: int, marks: list[tuple[str, str]]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        queue_done(pipe, keys, marks, now, 10 * SPAN)
        await pipe.execute()


async def test_a_claim_holds_across_a_bucket_boundary_and_a_skewed_clock(redis: Redis) -> None:
    keys = Keys("idem1")
    late = T0 + SPAN - 1  # the last moment of a bucket
    assert await claim(redis, keys, late, {"j|1|a": "c|t|0|1"}) == {"j|1|a": 0}
    # A moment later, in the next bucket: the same record takes it over, another record waits.
    assert await claim(redis, keys, late + 2, {"j|1|a": "c|t|0|1"}) == {"j|1|a": 0}
    assert await claim(redis, keys, late + 2, {"j|1|a": "c|t|0|99"}) == {"j|1|a": 2}
    # A router whose clock is almost a lifetime behind still sees it.
    assert await claim(redis, keys, late - SPAN + 1, {"j|1|a": "c|t|0|99"}) == {"j|1|a": 2}


async def test_a_claim_lasts_at_least_a_lifetime_and_lapses_after_at_most_three(redis: Redis) -> None:
    keys = Keys("idem2")
    assert await claim(redis, keys, T0, {"k": "c|t|0|1"}) == {"k": 0}
    assert await claim(redis, keys, T0 + SPAN + SPAN - 1, {"k": "c|t|0|2"}) == {"k": 2}, (
        "one lifetime and more"
    )
    assert await claim(redis, keys, T0 + 3 * SPAN, {"k": "c|t|0|2"}) == {"k": 0}, "lapsed after three"


async def test_a_done_mark_wins_over_any_claim_and_is_read_by_tools(redis: Redis) -> None:
    keys = Keys("idem3")
    assert await claim(redis, keys, T0, {"j|1|a": "c|t|0|1", "j|1|b": "c|t|0|2"}) == {"j|1|a": 0, "j|1|b": 0}
    await done(redis, keys, T0 + 5, [("j|1|a", "d|routed|h1")])
    # Read again (a rebalance), in the next claims bucket: a is a duplicate, b still this record's.
    got = await claim(redis, keys, T0 + SPAN + 5, {"j|1|a": "c|t|0|1", "j|1|b": "c|t|0|2"})
    assert got == {"j|1|a": 1, "j|1|b": 0}
    assert await read_done(redis, keys, ["j|1|a", "j|1|b"], T0 + 10 * SPAN + 1, 10 * SPAN) == {
        "j|1|a": "d|routed|h1"
    }, "found from the next done bucket too"


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {k: v for k, v in calls.items() if not k.startswith(("config", "script", "info"))}


async def test_a_batch_costs_a_fixed_number_of_commands_whatever_its_size(redis: Redis) -> None:
    keys = Keys("idem4")
    for n in (500, 2_500):  # the default batch, and one over the script's chunk sizes
        wanted = {f"j|1|job-{n}-{i}": f"c|t|0|{i}" for i in range(n)}
        await redis.config_resetstat()
        assert set((await claim(redis, keys, T0, wanted)).values()) == {0}
        await done(redis, keys, T0, [(k, "d|routed|h") for k in wanted])
        calls = await command_calls(redis)
        if n == 500:  # one script (six reads, a write, an expiry), then one more (a write and an expiry)
            assert calls == {"evalsha": 1, "eval": 1, "hmget": 6, "hset": 2, "pexpire": 2}, calls
        assert sum(calls.values()) / n < 0.025, calls
        again = await claim(redis, keys, T0 + 1, wanted)
        assert set(again.values()) == {1}, "every one done"
    assert await redis.hlen(claims_key(keys, T0 // SPAN)) == 3_000
    assert 2 * SPAN < await redis.pttl(claims_key(keys, T0 // SPAN)) <= LIFETIMES_KEPT * SPAN
