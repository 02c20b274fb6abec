"""Changes to the shared in-flight counts that are applied once, even when sent twice.

A pipeline whose reply is lost (a Redis that paused past the client's timeout, then ran what was already in
its socket) leaves the caller unsure whether its ``HINCRBY`` ran. Sending it again could count a batch
twice, and a head would look busier than it is for good. So every change carries a token: the script applies
the deltas only if it can create the token's key, and a replay finds it there.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from router_worker.state.keys import Keys

TOKEN_TTL_MS = 3_600_000
"""How long an applied change is remembered: longer than any replay of a buffered write."""

# KEYS[1]: the in-flight hash; KEYS[2]: the token key. ARGV[1]: token TTL; then head id, delta pairs.
_APPLY_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  for i = 2, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return 1
end
return 0
"""


def new_token() -> str:
    return uuid.uuid4().hex


class InflightChanges:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = redis.register_script(_APPLY_ONCE)

    async def apply(self, token: str, deltas: Mapping[str, int], client: Any = None) -> Any:
        """Add ``deltas`` (head id -> change) once per ``token``; on a pipeline when ``client`` is one."""
        args: list[Any] = [TOKEN_TTL_MS]
        for head_id, n in deltas.items():
            if n:
                args += [head_id, n]
        return await self._script(keys=[self.keys.inflight, self.keys.token(token)], args=args, client=client)
