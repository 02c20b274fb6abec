"""Head registry in Redis: register, heartbeat, status, list, drain, remove. The adapter around HeadRecord.

Heads write their own hash; routers only read it. Every membership or status change is announced on the
events channel so routers refresh at once instead of waiting for their periodic resync.

Partition slots (``{p}:slot:<topic>:<partition>``, one owner each) are only ever taken, renewed and released
by compare-and-set, each in one server-side script: a head renews its slot only while the slot holds its own
id, re-takes it only if nobody holds it (SET NX), and learns from :meth:`HeadRegistry.heartbeat` that another
head took it (``HeartbeatResult.SLOT_LOST``), so two heads never serve one partition for long.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from router_worker.clock import now_ms
from router_worker.core.adaptive import Profile
from router_worker.core.model import Head, HeadStatus
from router_worker.state.breakers import breaker_key, dirty_key, summary_key
from router_worker.state.inflight import InflightChanges
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


class HeartbeatResult(Enum):
    """What a heartbeat found. Truthy only for ``OK``, so ``if not await registry.heartbeat(...)`` stops a head
    in both other cases."""

    OK = "ok"
    """The deadline and stats were written; the slot (if any) is this head's and was renewed or re-taken."""
    REMOVED = "removed"
    """The head's hash is gone (an operator removed it): nothing was written. The head must stop."""
    SLOT_LOST = "slot_lost"
    """Another head owns the slot now (this one missed its renewal window): nothing was written, the other
    head's slot is untouched and this head's deadline was not extended. The head must stop consuming the
    partition at once (both would serve every job of it) and deregister."""

    def __bool__(self) -> bool:
        return self is HeartbeatResult.OK


class PartitionOutOfRange(ValueError):
    """A head asked for a partition its model topic does not have."""


class HeadIdInUse(RuntimeError):
    """Another live process is registered under this head id: two would serve one partition."""


def slot_owner(head_id: str, instance: str | None) -> str:
    """The value a head's slot holds: its id and, for a running process, that process's own token, so two
    processes started with one head id never both own a partition."""
    return head_id if not instance else f"{head_id}@{instance}"


# KEYS[1] the head hash, KEYS[2] its slot (optional). ARGV: slot owner, slot ttl ms, hash ttl ms, instance ('' for
# none), field, value, ... Returns 1 OK, 0 removed, 2 slot owned by another head (or the head id registered again
# by another process). Nothing is written unless the result is 1.
_HEARTBEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' then
  local inst = redis.call('HGET', KEYS[1], 'instance')
  if inst and inst ~= '' and inst ~= ARGV[4] then return 2 end
end
if KEYS[2] then
  local owner = redis.call('GET', KEYS[2])
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  elseif owner then
    return 2
  else
    redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: slot keys in order of preference. ARGV: head id, ttl ms. Takes the first slot that is free or already
# this head's (renewing it); returns its index in KEYS, or -1 when every one is owned by another head.
_CLAIM_LUA = """
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then return i - 1 end
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    return i - 1
  end
end
return -1
"""

# KEYS[1] head hash, KEYS[2] heads set, KEYS[3] in-flight hash, KEYS[4] its slot (optional). ARGV[1] head id.
# The slot is deleted only while it is still this head's. Returns how many of hash and set entry were removed.
# KEYS: head hash, heads index, in-flight hash, breaker, breaker summary, breaker dirty set, [slot]. ARGV[1]: head.
_REMOVE_LUA = """
local n = redis.call('DEL', KEYS[1]) + redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
if KEYS[7] then
  local v = redis.call('GET', KEYS[7])
  if v == ARGV[1] or (v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '@') then redis.call('DEL', KEYS[7]) end
end
return n
"""

_DELETE_IF_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_HEARTBEAT_RESULTS = {0: HeartbeatResult.REMOVED, 1: HeartbeatResult.OK, 2: HeartbeatResult.SLOT_LOST}


class HeadRegistry:
    """Reads and writes head state. One instance per process, given its Redis client."""

    def __init__(self, redis: Redis, keys: Keys, ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_ms
        self._heartbeat_script = redis.register_script(_HEARTBEAT_LUA)
        self._claim_script = redis.register_script(_CLAIM_LUA)
        self._remove_script = redis.register_script(_REMOVE_LUA)
        self._delete_if_script = redis.register_script(_DELETE_IF_LUA)

    @property
    def _gc_ms(self) -> int:
        # The hash outlives its heartbeat deadline so ops can still see a lapsed head for a while.
        return self.ttl_ms * 20

    async def publish_event(self, event: str, **fields: Any) -> None:
        await self.redis.publish(self.keys.events, orjson.dumps({"event": event, **fields}))

    async def claim_partition(
        self,
        head_id: str,
        topic: str,
        partitions: int,
        preferred: int | None,
        *,
        valid_partitions: int | None = None,
        instance: str | None = None,
    ) -> int:
        """Own a partition of the model topic: the preferred one if it is free (or already ours), else the
        first free one. One atomic script: a slot is taken only with SET NX, or renewed while it is ours.

        The partitions considered are ``range(valid_partitions)`` when given (the topic's real partition count
        from broker metadata: the truth), else ``range(partitions)`` (the configured count). Raises
        :class:`PartitionOutOfRange` for a preferred partition outside that range, and RuntimeError when
        every partition is owned by a live head.
        """
        bound = valid_partitions if valid_partitions is not None else partitions
        if preferred is not None and not 0 <= preferred < bound:
            raise PartitionOutOfRange(
                f"partition {preferred} out of range: {topic} has {bound} partitions (valid: 0..{bound - 1})"
            )
        order = list(range(bound))
        if preferred is not None:
            order = [preferred] + [p for p in order if p != preferred]
        if order:
            keys = [self.keys.slot(topic, p) for p in order]
            i = int(await self._claim_script(keys=keys, args=[slot_owner(head_id, instance), self.ttl_ms]))
            if i >= 0:
                return order[i]
        raise RuntimeError(f"all {bound} partitions of {topic} are owned by live heads")

    async def previous_partition(self, head_id: str, topic: str) -> int | None:
        """The partition of ``topic`` an earlier process of this head id owned, if its registration is still
        there: a restarted head takes it back, and so serves what it left unfinished there."""
        got = await self.redis.hmget(self.keys.head(head_id), ["slot_topic", "partition"])
        slot_topic, partition = cast(list[str | None], got)
        if slot_topic != topic or partition is None or not partition.lstrip("-").isdigit():
            return None
        return int(partition)

    async def assert_free(self, head_id: str, instance: str) -> None:
        """Raise :class:`HeadIdInUse` when another live process (heartbeat deadline not passed) is registered
        under ``head_id``."""
        ts = now_ms()
        got = await self.redis.hmget(self.keys.head(head_id), ["instance", "expires_at"])
        other, expires = cast(list[str | None], got)
        if other and other != instance and expires and int(float(expires)) > ts:
            raise HeadIdInUse(
                f"head id {head_id!r} is in use by a live head (instance {other}, heartbeat deadline in "
                f"{int(float(expires)) - ts} ms): choose another --head-id, or stop that one first"
            )

    async def register(
        self, record: HeadRecord, slot_topic: str | None = None, instance: str | None = None
    ) -> None:
        """Write the head's registration. With ``instance`` (a running process's token), refuse when another
        live process holds this head id (:class:`HeadIdInUse`); a lapsed one is replaced."""
        key = self.keys.head(record.head_id)
        ts = now_ms()
        if instance:
            await self.assert_free(record.head_id, instance)
        fields = record.to_hash() | {
            "instance": instance or "",
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

    async def release(
        self, head_id: str, n: int, changes: InflightChanges | None = None, seq: int = 0
    ) -> None:
        """The head finished ``n`` jobs: take them off the shared in-flight count. A head process passes its
        own numbered ``changes`` and retries a failed release with the same ``seq``, so a release whose reply
        was lost is not applied twice."""
        if changes is None:
            await self.redis.hincrby(self.keys.inflight, head_id, -n)
            return
        await changes.apply(seq, {head_id: -n})

    async def heartbeat(
        self, head_id: str, stats: HeadStats, slot: tuple[str, int] | None = None, instance: str | None = None
    ) -> HeartbeatResult:
        """Extend the head's deadline, report its stats and renew its slot ``(topic, partition)``: one script,
        one round trip, all or nothing.

        The slot is renewed only while it holds this head's id, re-taken (SET NX) when it lapsed and nobody
        took it, and never overwritten. Returns ``OK`` (truthy), ``REMOVED`` when an operator removed the
        head, or ``SLOT_LOST`` when another head owns the slot now: the caller must then stop serving the
        partition. Nothing is written unless the result is ``OK``.
        """
        fields = stats.to_hash() | {"expires_at": str(now_ms() + self.ttl_ms)}
        keys = [self.keys.head(head_id)]
        if slot is not None:
            keys.append(self.keys.slot(*slot))
        args: list[str | int] = [slot_owner(head_id, instance), self.ttl_ms, self._gc_ms, instance or ""]
        for k, v in fields.items():
            args += [k, v]
        res = int(await self._heartbeat_script(keys=keys, args=args))
        return _HEARTBEAT_RESULTS.get(res, HeartbeatResult.REMOVED)

    async def set_status(self, head_id: str, status: HeadStatus, actor: str = "") -> bool:
        key = self.keys.head(head_id)
        if not await self.redis.exists(key):
            return False
        await self.redis.hset(key, "status", status.value)
        await self.publish_event("head_status", head_id=head_id, status=status.value, actor=actor)
        return True

    async def remove(self, head_id: str, actor: str = "", if_registered_at: str | None = None,
                     instance: str | None = None, own_slot: tuple[str, int] | None = None) -> bool:  # fmt: skip
        """Remove a head: its hash, index entry, in-flight count, circuit breaker (routers stop reading and
        leasing it) and its slot (only while the slot is still this head's, so a head that lost its slot never
        frees the new owner's). One script.

        With ``if_registered_at``, only the registration seen then is removed: a head that registered again
        under the same id meanwhile (a restart) is left alone. With ``instance`` (a head process removing
        itself), a registration another process holds under the same id is left alone too; only the
        leaving process's ``own_slot`` is freed."""
        key = self.keys.head(head_id)
        h = cast(dict[str, str], await self.redis.hgetall(key))
        if if_registered_at is not None and h and h.get("registered_at") != if_registered_at:
            return False
        if instance and h and h.get("instance") not in (None, "", instance):
            # A process leaving whose head id another process took over: free its own slot, nothing else.
            if own_slot is not None:
                await self._delete_if_script(
                    keys=[self.keys.slot(*own_slot)], args=[slot_owner(head_id, instance)]
                )
            return False
        keys = [key, self.keys.heads, self.keys.inflight, breaker_key(self.keys, head_id), summary_key(self.keys),
                dirty_key(self.keys)]  # fmt: skip
        if h.get("slot_topic"):
            keys.append(self.keys.slot(h["slot_topic"], _i(h, "partition")))
        removed = int(await self._remove_script(keys=keys, args=[head_id]))
        await self.publish_event("head_removed", head_id=head_id, actor=actor)
        return removed > 0

    async def get(self, head_id: str) -> tuple[Head, int] | None:
        """One head and its shared in-flight count (reads only); None when it is not registered."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.head(head_id))
            pipe.hget(self.keys.inflight, head_id)
            h, inflight = await pipe.execute()
        head = head_from_hash(h) if h else None
        return None if head is None else (head, int(inflight or 0))

    async def snapshot(self, *, prune: bool = True) -> tuple[list[Head], dict[str, Profile], dict[str, int]]:
        """Every registered head, learned profiles and shared in-flight counts: two round trips. With
        ``prune`` (routers), index entries of expired hashes are deleted; without it (admin reads) nothing is
        written."""
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
        if gone and prune:  # hashes that expired (head died long ago): drop them from the index
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.srem(self.keys.heads, *gone)
                pipe.hdel(self.keys.inflight, *gone)
                await pipe.execute()
        return heads, profiles, inflight
