"""Idempotency marks kept in time-bucketed hashes, so a whole batch costs a handful of Redis commands.

One string key per job attempt (``SET``/``GET`` each) made idempotency the router's largest Redis cost: about
three commands per job. Here every mark of one time bucket is a field of one hash:

| key | type | holds |
|---|---|---|
| ``{p}:claims:<bucket>`` | hash | idempotency key -> ``c|topic|partition|offset`` while a router holds its claim |
| ``{p}:done:<bucket>`` | hash | idempotency key -> where it ended: ``d|routed|<head>``, ``d|retry|<n>``, ``d|dlq|…`` |

A bucket spans one lifetime (``claim_ttl_ms`` for claims, ``dedupe_ttl_s`` for done marks) of the writer's clock.
Writes go to the current bucket; reads look at the previous, current and next one, so a mark is found for at least
one full lifetime (at most three) whatever bucket boundary lies between writer and reader, and routers whose
clocks differ by less than a lifetime agree. Each hash expires three lifetimes after its last write. A batch's
claims are one script call (reads of the six hashes, one ``HSET``, one ``PEXPIRE``); its done marks are one
more (one ``HSET``, one ``PEXPIRE``). Both take the batch's keys as one MessagePack argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
from redis.asyncio import Redis

from router_worker.state.keys import Keys

# KEYS: claims of the previous, current and next bucket, then done marks of the same three buckets.
# ARGV[1]: how long the current claims hash lives (ms); ARGV[2]: field, wanted value, field, ... as one
# MessagePack array (see claim_args).
# Returns per field 0 (mine: free, or claimed before by this same record), 1 (done), 2 (busy: another record's).
CLAIM_LUA = """
local pairs_ = cmsgpack.unpack(ARGV[2])
local n = #pairs_ / 2
local fields = {}
for i = 1, n do fields[i] = pairs_[2 * i - 1] end
local function found(keys_from, keys_to)
  local seen = {}
  for k = keys_from, keys_to do
    for lo = 1, n, 1000 do
      local hi = math.min(n, lo + 999)
      local got = redis.call('HMGET', KEYS[k], unpack(fields, lo, hi))
      for i = lo, hi do
        local v = got[i - lo + 1]
        if v and not seen[i] then seen[i] = v end
      end
    end
  end
  return seen
end
local done = found(4, 6)
local claimed = found(1, 3)
local out = {}
local write = {}
for i = 1, n do
  local want = pairs_[2 * i]
  if done[i] then
    out[i] = 1
  elseif claimed[i] and claimed[i] ~= want then
    out[i] = 2
  else
    out[i] = 0
    write[#write + 1] = fields[i]
    write[#write + 1] = want
  end
end
for lo = 1, #write, 2000 do
  redis.call('HSET', KEYS[2], unpack(write, lo, math.min(#write, lo + 1999)))
end
if #write > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return out
"""

LIFETIMES_KEPT = 3
"""A hash expires this many lifetimes after its last write (it is read for up to two lifetimes after its own)."""


def bucket_of(now_ms: int, span_ms: int) -> int:
    return now_ms // span_ms


def claims_key(keys: Keys, bucket: int) -> str:
    return f"{keys.tag}:claims:{bucket}"


def done_key(keys: Keys, bucket: int) -> str:
    return f"{keys.tag}:done:{bucket}"


def redrive_key(keys: Keys, redrive_id: str) -> str:
    """A redrive's progress record (written by ``dlq/state.py`` before it sends anything): its existence is what
    makes an ``x-redrive`` header genuine."""
    return f"{keys.tag}:dlq:redrive:{redrive_id}"


def around(bucket: int) -> tuple[int, int, int]:
    """The buckets a reader looks at: previous, current, next."""
    return bucket - 1, bucket, bucket + 1


def claim_keys(keys: Keys, now_ms: int, claim_span_ms: int, done_span_ms: int) -> list[str]:
    """KEYS of :data:`CLAIM_LUA` (the current claims hash is the second)."""
    return [claims_key(keys, b) for b in around(bucket_of(now_ms, claim_span_ms))] + [
        done_key(keys, b) for b in around(bucket_of(now_ms, done_span_ms))
    ]


def claim_args(ttl_ms: int, pairs: Iterable[tuple[str, str]]) -> list[Any]:
    """ARGV of :data:`CLAIM_LUA`: the lifetime, then every (field, wanted value) in one MessagePack argument.
    One string for the client to encode and send, not two per job (a tenth of a router's CPU went to
    encoding a batch's arguments one by one)."""
    flat: list[str] = []
    for field, value in pairs:
        flat += (field, value)
    return [ttl_ms, msgpack.packb(flat)]


DONE_LUA = """
local a = cmsgpack.unpack(ARGV[2])
for lo = 1, #a, 2000 do redis.call('HSET', KEYS[1], unpack(a, lo, math.min(#a, lo + 1999))) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #a / 2
"""
"""HSET the field, value pairs of ARGV[2] (one MessagePack array) into KEYS[1]; PEXPIRE it by ARGV[1]. Sent as
EVAL, source and all: Redis caches it, and a Redis that restarted has no NOSCRIPT to answer."""


def queue_done(
    pipe: Any, keys: Keys, marks: Sequence[tuple[str, str]], now_ms: int, done_span_ms: int
) -> None:
    """Queue one batch's done marks on a pipeline: one script call, whatever the batch's size."""
    if not marks:
        return
    key = done_key(keys, bucket_of(now_ms, done_span_ms))
    flat: list[str] = []
    for field, value in marks:
        flat += (field, value)
    pipe.eval(DONE_LUA, 1, key, LIFETIMES_KEPT * done_span_ms, msgpack.packb(flat))


async def read_done(redis: Redis, keys: Keys, fields: Sequence[str], now_ms: int, done_span_ms: int
                    ) -> dict[str, str]:  # fmt: skip
    """Where each of these idempotency keys ended, for the ones that ended (read-only; for tools)."""
    if not fields:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for b in around(bucket_of(now_ms, done_span_ms)):
            pipe.hmget(done_key(keys, b), list(fields))
        answers: list[list[bytes | str | None]] = await pipe.execute()
    out: dict[str, str] = {}
    for got in answers:
        for f, v in zip(fields, got, strict=True):
            if v is not None and f not in out:
                out[f] = v.decode() if isinstance(v, bytes) else v
    return out
