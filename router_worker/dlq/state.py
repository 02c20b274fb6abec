"""What redrives remember, in Redis under the deployment's key prefix (a Redis adapter).

| key | type | holds |
|---|---|---|
| ``{p}:dlq:sent:<dlq topic>|<part>|<offset>`` | string | ``p|<redrive id>`` being sent, ``s|<id>`` acknowledged |
| ``{p}:dlq:redrive:<id>`` | hash | one redrive's progress: filter, actor, status, counts, times |
| ``{p}:dlq:redrives`` | list | the latest redrive ids, newest first |
| ``{p}:dlq:lock`` | string | the redrive running now (one at a time per deployment; expires unless renewed) |

A dead letter is marked *being sent* before its publish and *sent* after the broker's acknowledgement: a redrive
that stops in between leaves ``p|<id>``, and the next one sends it again under that same id, which the routers
then take for a duplicate if the first copy did arrive (their idempotency key holds the redrive id). Marks
outlive the routers' dedupe window (:data:`KEEP_MS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from router_worker.clock import now_ms
from router_worker.state.idempotency import read_done, redrive_key
from router_worker.state.keys import Keys

KEEP_MS = 30 * 86_400_000
"""How long redrive marks and progress are kept: longer than any sane dead-letter retention."""
LOCK_MS = 15_000
"""A redrive's lock lapses this long after its last renewal (a killed redrive blocks the next one no longer)."""
_RECENT = 100
_CHUNK = 500

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedriveState:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def _sent(self, coord: str) -> str:
        return f"{self.keys.tag}:dlq:sent:{coord}"

    def _progress(self, redrive_id: str) -> str:
        return redrive_key(
            self.keys, redrive_id
        )  # its existence makes an x-redrive header genuine (marks.py)

    @property
    def _recent(self) -> str:
        return f"{self.keys.tag}:dlq:redrives"

    @property
    def _lock(self) -> str:
        return f"{self.keys.tag}:dlq:lock"

    async def _mget(self, keys: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(keys), _CHUNK):
            out.extend(cast(list[str | None], await self.redis.mget(keys[i : i + _CHUNK])))
        return out

    async def marks(self, coords: Sequence[str]) -> list[str | None]:
        """Each dead letter's redrive mark (``p|id``, ``s|id`` or None)."""
        return await self._mget([self._sent(c) for c in coords])

    async def done_marks(self, claim_keys: Sequence[str], dedupe_ttl_ms: int) -> list[str | None]:
        """The routers' idempotency marks of these keys (``d|routed|head`` and so on; see state/idempotency)."""
        if dedupe_ttl_ms <= 0:  # the routers remember nothing
            return [None] * len(claim_keys)
        done: dict[str, str] = {}
        for i in range(0, len(claim_keys), _CHUNK):
            done |= await read_done(
                self.redis, self.keys, claim_keys[i : i + _CHUNK], now_ms(), dedupe_ttl_ms
            )
        return [done.get(k) for k in claim_keys]

    async def mark(self, state: str, entries: Sequence[tuple[str, str]]) -> None:
        """Mark dead letters (coord, redrive id) as ``p`` (being sent) or ``s`` (sent), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for coord, redrive_id in entries:
                pipe.set(self._sent(coord), f"{state}|{redrive_id}", px=KEEP_MS)
            await pipe.execute()

    async def lock(self, redrive_id: str) -> str | None:
        """Take the deployment's redrive lock; None when taken, else the id of the redrive holding it."""
        if await self.redis.set(self._lock, redrive_id, px=LOCK_MS, nx=True):
            return None
        holder = cast(str | None, await self.redis.get(self._lock))
        return holder or "?"

    async def renew(self, redrive_id: str) -> bool:
        """Extend the lease; False when ``redrive_id`` no longer holds the lock (it lapsed or was taken)."""
        return bool(await self.redis.eval(_RENEW, 1, self._lock, redrive_id, LOCK_MS))

    async def holder(self) -> str | None:
        return cast(str | None, await self.redis.get(self._lock))

    @staticmethod
    def lease_s() -> float:
        """How long the lock lasts without a renewal, in seconds."""
        return LOCK_MS / 1000

    async def unlock(self, redrive_id: str) -> None:
        await self.redis.eval(_RELEASE, 1, self._lock, redrive_id)

    async def save(self, redrive_id: str, fields: Mapping[str, Any], new: bool = False) -> None:
        """Write progress fields (JSON-encoded); a new redrive also goes on the recent list."""
        key = self._progress(redrive_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={k: orjson.dumps(v).decode() for k, v in fields.items()})
            pipe.pexpire(key, KEEP_MS)
            if new:
                pipe.lpush(self._recent, redrive_id)
                pipe.ltrim(self._recent, 0, _RECENT - 1)
            await pipe.execute()

    async def progress(self, redrive_id: str) -> dict[str, Any] | None:
        raw = cast(dict[str, str], await self.redis.hgetall(self._progress(redrive_id)))
        if not raw:
            return None
        return {k: orjson.loads(v) for k, v in raw.items()}

    async def recent(self, n: int = 20) -> list[str]:
        return cast(list[str], await self.redis.lrange(self._recent, 0, n - 1))
