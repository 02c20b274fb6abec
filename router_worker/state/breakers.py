"""Circuit breakers in Redis, shared by every router and fed by every head.

| key | type | holds |
|---|---|---|
| ``{p}:breaker:<head>`` | hash | one head's breaker (``core/breaker.py``): state fields, monotone totals, buckets
  ``o:<start>`` / ``e:<start>`` (expires a day after its last write) |
| ``{p}:breakers`` | hash | head -> ``state|open_until|version`` for every breaker that is not closed |
| ``{p}:breakers:dirty`` | set | heads that counted a failure since a router last looked |

A head's removal (``HeadRegistry.remove``) deletes its breaker in the same script; a router's read deletes the
summary entry of a head that is not registered (one that died and expired without being removed), so a gone
head's breaker is neither read nor leased probes again and its key expires.

Counting is plain ``HINCRBY`` (heads and routers add outcomes; no state changes). A router reads, in one script
call, the breakers that are not closed plus the dirty ones, evaluates them with the pure core, and writes each
transition (or half-open probe lease) by compare-and-set on the breaker's ``version``: of several routers
evaluating the same breaker, exactly one applies a transition, announces it on the events channel (in the same
script) and audits it; the others find the version moved and take the new state on their next read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from router_worker.core.breaker import Breaker, BreakerState, Transition, bucket_of
from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

KEY_TTL_MS = 86_400_000
"""A breaker nobody wrote for a day is forgotten (its head is long gone or healthy)."""

# KEYS[1]: summary hash, KEYS[2]: dirty set. ARGV[1]: breaker key prefix (same hash tag), ARGV[2]: head hash key
# prefix ('' keeps every entry), ARGV[3..]: heads the caller wants too. Returns head, HGETALL pairs, head, pairs ...
# for the not-closed, dirty and asked-for heads. With ARGV[2], a summary entry of a head that is not registered
# (no head hash: removed, or expired long ago) is deleted and not returned, unless the head is dirty or asked for.
_READ = """
local ids, seen = {}, {}
local function add(id) if not seen[id] then seen[id] = true; ids[#ids + 1] = id end end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do add(id) end
redis.call('DEL', KEYS[2])
for i = 3, #ARGV do add(ARGV[i]) end
local summary = redis.call('HGETALL', KEYS[1])
for i = 1, #summary, 2 do
  local id = summary[i]
  if ARGV[2] ~= '' and not seen[id] and redis.call('EXISTS', ARGV[2] .. id) == 0 then
    redis.call('HDEL', KEYS[1], id)
  else
    add(id)
  end
end
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""

# KEYS[1]: the breaker, KEYS[2]: the summary. ARGV: expected version, head id, summary value ('' removes the
# head from the summary), events channel, event ('' none), TTL ms, number of field/value pairs, the pairs, then
# bucket fields to delete. 1 when applied, 0 when the version moved (another router applied something first).
_CAS = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
local n = tonumber(ARGV[7])
local i = 8
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + 2 * n))
  i = 8 + 2 * n
end
if i <= #ARGV then redis.call('HDEL', KEYS[1], unpack(ARGV, i, #ARGV)) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if ARGV[3] == '' then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

_STATE_FIELDS = {
    "state": "s",
    "version": "v",
    "open_until_ms": "u",
    "since_ms": "t",
    "floor_ms": "f",
    "leased": "l",
    "lease_until_ms": "lu",
    "base_ok": "bo",
    "base_err": "be",
}
"""Breaker attribute -> hash field, for what a compare-and-set writes (counts are only ever incremented)."""


def breaker_key(keys: Keys, head_id: str) -> str:
    return f"{keys.tag}:breaker:{head_id}"


def summary_key(keys: Keys) -> str:
    return f"{keys.tag}:breakers"


def dirty_key(keys: Keys) -> str:
    return f"{keys.tag}:breakers:dirty"


def _int(raw: Any) -> int:
    try:
        return int(float(raw))
    except (TypeError, ValueError):
        return 0


def breaker_from_hash(h: Mapping[str, str]) -> Breaker:
    """Parse a breaker hash (an empty one is a closed breaker that never counted anything)."""
    buckets: dict[int, list[int]] = {}
    for k, v in h.items():
        if k[:2] in ("o:", "e:"):
            start = _int(k[2:])
            counts = buckets.setdefault(start, [0, 0])
            counts[0 if k[0] == "o" else 1] += _int(v)
    try:
        state = BreakerState(_int(h.get("s", 0)))
    except ValueError:
        state = BreakerState.CLOSED
    values = {attr: _int(h.get(f, 0)) for attr, f in _STATE_FIELDS.items() if attr != "state"}
    return Breaker(state=state, total_ok=_int(h.get("to", 0)), total_err=_int(h.get("te", 0)),
                   window=tuple((s, c[0], c[1]) for s, c in sorted(buckets.items())), **values)  # fmt: skip


def state_fields(b: Breaker) -> list[str]:
    """The field/value pairs a compare-and-set writes (flat)."""
    out: list[str] = []
    for attr, f in _STATE_FIELDS.items():
        value = getattr(b, attr)
        out += [f, str(int(value))]
    return out


def summary_value(b: Breaker) -> str:
    return "" if b.state is BreakerState.CLOSED else f"{int(b.state)}|{b.open_until_ms}|{b.version}"


def stale_buckets(old: Breaker, new: Breaker) -> list[str]:
    """Bucket fields of ``old`` that ``new`` (pruned) no longer holds: deleted by the compare-and-set."""
    kept = {s for s, _, _ in new.window}
    out: list[str] = []
    for s, _, _ in old.window:
        if s not in kept:
            out += [f"o:{s}", f"e:{s}"]
    return out


@dataclass(frozen=True, slots=True)
class Write:
    """One compare-and-set: the breaker as read (its version is the token) and as it should become."""

    head_id: str
    old: Breaker
    new: Breaker
    transition: Transition | None = None


class BreakerStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._read = LoadedScript(redis, _READ)
        self._cas = LoadedScript(redis, _CAS)

    # --- counting (heads and routers) ----------------------------------------------------------------------

    def queue_counts(self, pipe: Any, counts: Mapping[str, tuple[int, int]], now_ms: int) -> None:
        """Queue ``head -> (ok, err)`` outcomes counted at ``now_ms`` on a pipeline the caller executes."""
        start = bucket_of(now_ms)
        dirty: list[str] = []
        for head_id, (ok, err) in counts.items():
            if not ok and not err:
                continue
            key = breaker_key(self.keys, head_id)
            if ok:
                pipe.hincrby(key, f"o:{start}", ok)
                pipe.hincrby(key, "to", ok)
            if err:
                pipe.hincrby(key, f"e:{start}", err)
                pipe.hincrby(key, "te", err)
                dirty.append(head_id)
            pipe.pexpire(key, KEY_TTL_MS)
        if dirty:
            pipe.sadd(dirty_key(self.keys), *dirty)

    async def count(self, counts: Mapping[str, tuple[int, int]], now_ms: int) -> None:
        """Add outcomes (one round trip)."""
        if not any(ok or err for ok, err in counts.values()):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_counts(pipe, counts, now_ms)
            await pipe.execute()

    # --- reading and writing (routers) ---------------------------------------------------------------------

    def scripts(self) -> tuple[LoadedScript, ...]:
        return (self._read, self._cas)

    async def ensure_scripts(self) -> None:
        await self._read.ensure()
        await self._cas.ensure()

    def scripts_lost(self) -> None:
        self._read.lost()
        self._cas.lost()

    def queue_read(self, pipe: Any, heads: Sequence[str] = (), *, forget_gone: bool = False) -> None:
        """Queue the read of every breaker that is not closed, every dirty one and ``heads``
        (call :meth:`ensure_scripts` before executing the pipeline). ``forget_gone`` (routers): the summary
        entries of heads that are not registered are deleted, not read: nobody reads or leases a probe on a
        gone head's breaker again, and its key expires (:data:`KEY_TTL_MS`)."""
        self._read.queue(pipe, [summary_key(self.keys), dirty_key(self.keys)],
                         [f"{self.keys.tag}:breaker:", self.keys.head("") if forget_gone else "",
                          *heads])  # fmt: skip

    @staticmethod
    def parse_read(reply: Sequence[Any]) -> dict[str, Breaker]:
        out: dict[str, Breaker] = {}
        for i in range(0, len(reply) - 1, 2):
            flat = reply[i + 1] or []
            if isinstance(flat, dict):
                h = {str(k): str(v) for k, v in flat.items()}
            else:
                h = {str(flat[j]): str(flat[j + 1]) for j in range(0, len(flat) - 1, 2)}
            out[str(reply[i])] = breaker_from_hash(h)
        return out

    async def write(self, writes: Iterable[Write], events_channel: str) -> list[bool]:
        """Apply compare-and-sets in one round trip; True for each one that won."""
        todo = list(writes)
        if not todo:
            return []
        await self._cas.ensure()
        async with self.redis.pipeline(transaction=False) as pipe:
            for w in todo:
                event = ""
                if w.transition is not None:
                    event = orjson.dumps({"event": w.transition.event, "head_id": w.head_id,
                                          "state": w.new.state.label,
                                          "open_until": w.new.open_until_ms}).decode()  # fmt: skip
                pairs = state_fields(w.new)
                args = [w.old.version, w.head_id, summary_value(w.new), events_channel, event, KEY_TTL_MS,
                        len(pairs) // 2, *pairs, *stale_buckets(w.old, w.new)]  # fmt: skip
                self._cas.queue(pipe, [breaker_key(self.keys, w.head_id), summary_key(self.keys)], args)
            res = await pipe.execute()
        return [int(r) == 1 for r in res]

    async def get(self, head_ids: Sequence[str]) -> dict[str, Breaker]:
        """The breakers of ``head_ids`` (closed when never written): for operators (``heads ls``, explain)."""
        if not head_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for head_id in head_ids:
                pipe.hgetall(breaker_key(self.keys, head_id))
            res = await pipe.execute()
        return {head_id: breaker_from_hash(h or {}) for head_id, h in zip(head_ids, res, strict=True)}


def describe(b: Breaker, now_ms: int) -> str:
    """Why a head with this breaker gets no jobs (explain, logs)."""
    if b.state is BreakerState.OPEN:
        return f"circuit breaker open for {max(0, b.open_until_ms - now_ms) / 1000:.1f} s more"
    if b.state is BreakerState.HALF_OPEN:
        return "circuit breaker half-open: probes in flight"
    return "circuit breaker closed"


async def blocking(store: BreakerStore, head_ids: Sequence[str], now_ms: int) -> dict[str, str]:
    """head -> why it gets no jobs, for every head whose breaker is not closed (what ``explain`` shows)."""
    return {h: describe(b, now_ms) for h, b in (await store.get(head_ids)).items()
            if b.state is not BreakerState.CLOSED}  # fmt: skip
