"""Changes to the shared in-flight counts that are applied once, even when sent twice.

A pipeline whose reply is lost (a Redis that paused past the client's timeout, then ran what was already in
its socket) leaves the caller unsure whether its ``HINCRBY`` ran. Sending it again could count a batch
twice, and a head would look busier (or idler) than it is for good. So every writer (a router process, a head
process) numbers its changes and sends them in order; the script applies a change only when its number is
above the last one applied for that writer, and a replay finds it already counted. One small key per live
writer (``{p}:seq:<writer>``), expiring a day after its last change: nothing accumulates per change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

SEQ_TTL_MS = 86_400_000
"""A writer's last applied number is kept this long after its last change (any replay comes far sooner)."""

# KEYS[1]: the in-flight hash; KEYS[2]: the writer's sequence key. ARGV[1]: its TTL; ARGV[2]: this change's
# number; then head id, delta pairs. Applied only when the number is above the last one applied.
_APPLY_ONCE = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""


class InflightChanges:
    """One writer's numbered changes. ``writer`` must be unique per process (include an instance token)."""

    def __init__(self, redis: Redis, keys: Keys, writer: str) -> None:
        self.keys = keys
        self.writer = writer
        self._seq = 0
        self._script = redis.register_script(_APPLY_ONCE)
        self.loaded = LoadedScript(redis, _APPLY_ONCE)
        """The same script, for pipelines (see :mod:`scripts`)."""

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _keys_args(self, seq: int, deltas: Mapping[str, int]) -> tuple[list[str], list[Any]]:
        args: list[Any] = [SEQ_TTL_MS, seq]
        for head_id, n in deltas.items():
            if n:
                args += [head_id, n]
        return [self.keys.inflight, self.keys.writer_seq(self.writer)], args

    async def apply(self, seq: int, deltas: Mapping[str, int]) -> Any:
        """Add ``deltas`` (head id -> change) unless change ``seq`` of this writer was applied already.
        Changes must be sent in the order of their numbers."""
        keys, args = self._keys_args(seq, deltas)
        return await self._script(keys=keys, args=args)

    def queue(self, pipe: Any, seq: int, deltas: Mapping[str, int]) -> None:
        """The same, queued on a pipeline (call ``await self.loaded.ensure()`` before executing it)."""
        keys, args = self._keys_args(seq, deltas)
        self.loaded.queue(pipe, keys, args)
