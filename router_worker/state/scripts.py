"""Lua scripts queued on pipelines by their SHA, loaded once.

redis-py asks Redis ``SCRIPT EXISTS`` before every pipeline that holds a registered script: one more round
trip per batch for nothing. These scripts are loaded once (and again after a NOSCRIPT answer, when Redis
restarted or flushed its scripts), then queued as plain ``EVALSHA`` commands.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis


class LoadedScript:
    def __init__(self, redis: Redis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # what SCRIPT LOAD answers: no round trip
        self._loaded = False

    async def ensure(self) -> None:
        """Load the script unless it is known to be there (a round trip only the first time, or after
        :meth:`lost`)."""
        if not self._loaded:
            await self.redis.script_load(self.source)
            self._loaded = True

    def lost(self) -> None:
        """Redis answered NOSCRIPT: load the script again before its next use."""
        self._loaded = False

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def preload(redis: Redis, scripts: Iterable[LoadedScript]) -> None:
    """Load every script not known to be loaded, in one round trip: at start-up, so that no batch pays for it
    (a batch's Redis work stays at two round trips from the first one)."""
    todo = [sc for sc in scripts if not sc._loaded]
    if not todo:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for sc in todo:
            pipe.script_load(sc.source)
        await pipe.execute()
    for sc in todo:
        sc._loaded = True
