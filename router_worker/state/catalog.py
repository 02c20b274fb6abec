"""The model catalog in Redis: registered model characteristics, announced to routers on change."""

from __future__ import annotations

from typing import cast

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from router_worker.core.catalog import ModelSpec
from router_worker.state.keys import Keys


class ModelCatalog:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def register(self, spec: ModelSpec, actor: str = "") -> None:
        await self.redis.hset(self.keys.models, spec.model_id, spec.model_dump_json())
        event = {"event": "model_registered", "model_id": spec.model_id, "actor": actor}
        await self.redis.publish(self.keys.events, orjson.dumps(event))

    async def remove(self, model_id: str, actor: str = "") -> bool:
        removed = bool(await self.redis.hdel(self.keys.models, model_id))
        if removed:
            event = {"event": "model_removed", "model_id": model_id, "actor": actor}
            await self.redis.publish(self.keys.events, orjson.dumps(event))
        return removed

    async def all(self) -> dict[str, ModelSpec]:
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.models))
        out: dict[str, ModelSpec] = {}
        for model_id, doc in raw.items():
            try:
                out[model_id] = ModelSpec.model_validate_json(doc)
            except ValidationError:
                continue  # written past validation by hand: ignored rather than fatal
        return out
