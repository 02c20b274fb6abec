"""Token buckets in Redis, shared by every router: one script call admits a whole batch.

Each bucket is one string key ``{p}:bucket:<t|tenant or m|model>`` holding its GCRA ``tat`` (ms; see
``core/admission.py``, whose :func:`~router_worker.core.admission.schedule` this script mirrors line for line).
The script takes every job of the batch in order, with the buckets it needs, and answers the time each may go:
now, or later, with its token reserved. A key expires once its bucket would be full again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from router_worker.core.admission import EPSILON_MS, Limit
from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

# KEYS: the buckets. ARGV[1]: now (ms); ARGV[2]: epsilon; then per bucket its interval and tolerance (ms); then per
# job the number of buckets it needs followed by their indexes. Returns each job's time (ms, rounded up).
_SCHEDULE = """
local now = tonumber(ARGV[1])
local eps = tonumber(ARGV[2])
local nb = #KEYS
local tat, T, tau = {}, {}, {}
for i = 1, nb do
  tat[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  T[i] = tonumber(ARGV[1 + 2 * i])
  tau[i] = tonumber(ARGV[2 + 2 * i])
end
local out = {}
local a = 3 + 2 * nb
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local at = now
  for k = 1, n do
    local b = tonumber(ARGV[a + k])
    local wait = math.max(tat[b], now) - now - tau[b]
    if wait > eps then at = math.max(at, now + wait) end
  end
  for k = 1, n do
    local b = tonumber(ARGV[a + k])
    tat[b] = math.max(tat[b], at) + T[b]
  end
  out[#out + 1] = string.format('%.0f', math.ceil(at))  -- tostring would write 1e14 and above as 1e+14
  a = a + n + 1
end
for i = 1, nb do
  local ttl = math.ceil(tat[i] - now + tau[i]) + 1000
  redis.call('SET', KEYS[i], string.format('%.6f', tat[i]), 'PX', ttl)
end
return out
"""


def bucket_key(keys: Keys, bucket: str) -> str:
    return f"{keys.tag}:bucket:{bucket}"


class Buckets:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = LoadedScript(redis, _SCHEDULE)

    def scripts(self) -> tuple[LoadedScript, ...]:
        return (self._script,)

    async def ensure_script(self) -> None:
        await self._script.ensure()

    def script_lost(self) -> None:
        self._script.lost()

    def queue(
        self, pipe: Any, limits: Mapping[str, Limit], jobs: Sequence[Sequence[str]], now_ms: int
    ) -> None:
        """Queue the schedule of ``jobs`` (each names the buckets it needs, keys of ``limits``) on a pipeline
        (call :meth:`ensure_script` before executing it). Its reply is each job's time, as strings."""
        names = list(limits)
        index = {b: i + 1 for i, b in enumerate(names)}
        args: list[Any] = [now_ms, repr(EPSILON_MS)]
        for b in names:
            lim = limits[b]
            args += [repr(lim.interval_ms), repr(lim.tolerance_ms)]
        for need in jobs:
            args.append(len(need))
            args += [index[b] for b in need]
        self._script.queue(pipe, [bucket_key(self.keys, b) for b in names], args)

    async def schedule(
        self, limits: Mapping[str, Limit], jobs: Sequence[Sequence[str]], now_ms: int
    ) -> list[int]:
        """When each job may go (epoch ms), reserving its tokens: one round trip."""
        if not jobs:
            return []
        await self._script.ensure()
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue(pipe, limits, jobs, now_ms)
            (res,) = await pipe.execute()
        return [int(x) for x in res]
