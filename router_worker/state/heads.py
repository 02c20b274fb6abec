"""Head registry in Redis: register, heartbeat, status, list, drain, remove. The adapter around HeadRecord.

Heads write their own hash; routers only read it. Every membership or status change is announced on the
events channel so routers refresh at once instead of waiting for their periodic resync.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from router_worker.clock import now_ms
from router_worker.core.adaptive import Profile
from router_worker.core.model import Head, HeadStatus
from router_worker.state.keys import Keys


@dataclass(frozen=True, slots=True)
class HeadRecord:
    """What a head registers: identity, placement and capabilities (the static part of a Head)."""

    head_id: str
    model_id: str
    region: str = "default"
    capacity: int = 8
    partition: int = 0
    families: tuple[str, ...] = ()
    backend: str = "cpu"
    quantizations: tuple[str, ...] = ()
    max_context: int = 0
    dynamic_shapes: bool = False
    param_count: int = 0
    tags: tuple[str, ...] = ()
    weight: float = 1.0
    power_w: float = 0.0
    host: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_hash(self) -> dict[str, str]:
        d = asdict(self)
        out = {k: str(v) for k, v in d.items() if k not in ("families", "quantizations", "tags", "extra")}
        out["dynamic_shapes"] = "1" if self.dynamic_shapes else "0"
        for k in ("families", "quantizations", "tags"):
            out[k] = orjson.dumps(list(d[k])).decode()
        out["extra"] = orjson.dumps(self.extra).decode()
        return out


def _json_list(raw: str | None) -> frozenset[str]:
    if not raw:
        return frozenset()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return frozenset()
    return frozenset(str(v) for v in value) if isinstance(value, list) else frozenset()


def _f(h: Mapping[str, str], key: str, default: float = 0.0) -> float:
    try:
        return float(h.get(key, default))
    except ValueError:
        return default


def _i(h: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(float(h.get(key, default)))
    except ValueError:
        return default


def head_from_hash(h: Mapping[str, str]) -> Head | None:
    """Parse a head hash; None for a hash that lacks its identity (a half-written or foreign key)."""
    if "head_id" not in h or "model_id" not in h:
        return None
    try:
        status = HeadStatus(h.get("status", "healthy"))
    except ValueError:
        status = HeadStatus.UNHEALTHY
    return Head(
        head_id=h["head_id"],
        model_id=h["model_id"],
        region=h.get("region", "default"),
        partition=_i(h, "partition"),
        status=status,
        capacity=max(1, _i(h, "capacity", 8)),
        expires_at_ms=_i(h, "expires_at"),
        reported_inflight=_i(h, "inflight"),
        cache_hit_rate=_f(h, "cache_hit_rate"),
        quota_used=_f(h, "quota_used"),
        latency_ms=_f(h, "latency_ms"),
        weight=_f(h, "weight", 1.0),
        families=_json_list(h.get("families")),
        backend=h.get("backend", "cpu"),
        quantizations=frozenset(q.upper() for q in _json_list(h.get("quantizations"))),
        max_context=_i(h, "max_context"),
        dynamic_shapes=h.get("dynamic_shapes") == "1",
        param_count=_i(h, "param_count"),
        tags=_json_list(h.get("tags")),
        power_w=_f(h, "power_w"),
    )


def profile_from_hash(h: Mapping[str, str]) -> Profile | None:
    raw = h.get("profile")
    if not raw:
        return None
    try:
        return Profile.from_dict(orjson.loads(raw))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class HeadStats:
    """What a head reports with each heartbeat."""

    inflight: int = 0
    latency_ms: float = 0.0
    cache_hit_rate: float = 0.0
    quota_used: float = 0.0
    completed: int = 0
    profile: Profile | None = None

    def to_hash(self) -> dict[str, str]:
        out = {
            "inflight": str(self.inflight),
            "latency_ms": f"{self.latency_ms:.3f}",
            "cache_hit_rate": f"{self.cache_hit_rate:.4f}",
            "quota_used": f"{self.quota_used:.4f}",
            "completed": str(self.completed),
        }
        if self.profile is not None:
            out["profile"] = orjson.dumps(self.profile.to_dict()).decode()
        return out


class HeadRegistry:
    """Reads and writes head state. One instance per process, given its Redis client."""

    def __init__(self, redis: Redis, keys: Keys, ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_ms

    @property
    def _gc_ms(self) -> int:
        # The hash outlives its heartbeat deadline so ops can still see a lapsed head for a while.
        return self.ttl_ms * 20

    async def publish_event(self, event: str, **fields: Any) -> None:
        await self.redis.publish(self.keys.events, orjson.dumps({"event": event, **fields}))

    async def claim_partition(self, head_id: str, topic: str, partitions: int, preferred: int | None) -> int:
        """Own a free partition of the model topic (or the preferred one); refuse when all are taken."""
        order = list(range(partitions))
        if preferred is not None:
            order = [preferred] + [p for p in order if p != preferred]
        for p in order:
            key = self.keys.slot(topic, p)
            if await self.redis.set(key, head_id, nx=True, px=self.ttl_ms):
                return p
            if await self.redis.get(key) == head_id:
                await self.redis.pexpire(key, self.ttl_ms)
                return p
        raise RuntimeError(f"all {partitions} partitions of {topic} are owned by live heads")

    async def register(self, record: HeadRecord, slot_topic: str | None = None) -> None:
        key = self.keys.head(record.head_id)
        ts = now_ms()
        fields = record.to_hash() | {
            "status": HeadStatus.HEALTHY.value,
            "registered_at": str(ts),
            "expires_at": str(ts + self.ttl_ms),
            "inflight": "0",
            "slot_topic": slot_topic or "",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=cast(Any, fields))
            pipe.pexpire(key, self._gc_ms)
            pipe.sadd(self.keys.heads, record.head_id)
            pipe.hset(self.keys.inflight, record.head_id, 0)
            await pipe.execute()
        await self.publish_event("head_registered", head_id=record.head_id, model_id=record.model_id)

    async def release(self, head_id: str, n: int) -> None:
        """The head finished ``n`` jobs: take them off the shared in-flight count."""
        await self.redis.hincrby(self.keys.inflight, head_id, -n)

    async def heartbeat(self, head_id: str, stats: HeadStats, slot: tuple[str, int] | None = None) -> bool:
        """Extend the head's deadline and report its stats, in one round trip. False if it was removed."""
        key = self.keys.head(head_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.hset(key, mapping=cast(Any, stats.to_hash() | {"expires_at": str(now_ms() + self.ttl_ms)}))
            pipe.pexpire(key, self._gc_ms)
            if slot is not None:
                pipe.set(self.keys.slot(*slot), head_id, px=self.ttl_ms)
            res = await pipe.execute()
        if not res[0]:  # removed by ops while we ran: undo the write we just made, tell the caller
            await self.redis.delete(key)
            return False
        return True

    async def set_status(self, head_id: str, status: HeadStatus, actor: str = "") -> bool:
        key = self.keys.head(head_id)
        if not await self.redis.exists(key):
            return False
        await self.redis.hset(key, "status", status.value)
        await self.publish_event("head_status", head_id=head_id, status=status.value, actor=actor)
        return True

    async def remove(self, head_id: str, actor: str = "") -> bool:
        key = self.keys.head(head_id)
        h = cast(dict[str, str], await self.redis.hgetall(key))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.srem(self.keys.heads, head_id)
            pipe.hdel(self.keys.inflight, head_id)
            if h.get("slot_topic"):
                pipe.delete(self.keys.slot(h["slot_topic"], int(h.get("partition", 0))))
            res = await pipe.execute()
        await self.publish_event("head_removed", head_id=head_id, actor=actor)
        return bool(res[0] or res[1])

    async def snapshot(self) -> tuple[list[Head], dict[str, Profile], dict[str, int]]:
        """Every registered head, learned profiles and shared in-flight counts: two round trips."""
        ids = sorted(cast(set[str], await self.redis.smembers(self.keys.heads)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for head_id in ids:
                pipe.hgetall(self.keys.head(head_id))
            pipe.hgetall(self.keys.inflight)
            res = await pipe.execute()
        inflight = {k: int(v) for k, v in res[-1].items()}
        heads: list[Head] = []
        profiles: dict[str, Profile] = {}
        gone: list[str] = []
        for head_id, h in zip(ids, res[:-1], strict=True):
            head = head_from_hash(h) if h else None
            if head is None:
                gone.append(head_id)
                continue
            heads.append(head)
            prof = profile_from_hash(h)
            if prof is not None:
                profiles[head_id] = prof
        if gone:  # hashes that expired (head died long ago): drop them from the index
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.srem(self.keys.heads, *gone)
                pipe.hdel(self.keys.inflight, *gone)
                await pipe.execute()
        return heads, profiles, inflight
