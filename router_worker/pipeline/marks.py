"""The router's two Redis round trips per batch: claims before the plan, marks after the acknowledgements.
(The fault state's reads, breakers and admission, ride on the claim round trip: :class:`Rider`.)

Idempotency is claim-then-complete, keyed by job id and attempt (:func:`outcomes.claim_key_of`):

1. **claim** (one server-side script for the whole batch): a key that is free is claimed for this record
   (``c|topic|partition|offset``, kept at least ``claim_ttl_ms``); a key this same record claimed before
   (read again after a crash, a rebalance or an unsent publish) is taken over; a key marked done is a
   duplicate; a key another record claimed is busy, and that record waits. The sessions' pins are read in
   the same round trip.
2. **mark** (one pipeline, after the broker acknowledged the publishes): each settled record's key is
   marked done (``d|routed|head``, ``d|retry|tier``, ``d|dlq|reason``, kept at least the dedupe TTL),
   pins are written, shared in-flight counts added and read back, audit records published.

Both live as fields of time-bucketed hashes (:mod:`state.idempotency`): a batch's claims are one script call
and its done marks one ``HSET``, whatever the batch's size.

While Redis is unreachable the router keeps routing for a bounded window (see the router): claims are
skipped (every record is taken as its own) and marks, in-flight additions and audit records are buffered,
bounded, and written when Redis answers again.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.pipeline.outcomes import DeadLettered, Incoming, Outcome, Retried, Routed
from router_worker.pipeline.plan import Claim
from router_worker.state.idempotency import (
    CLAIM_LUA,
    LIFETIMES_KEPT,
    claim_args,
    claim_keys,
    queue_done,
    redrive_key,
)
from router_worker.state.inflight import InflightChanges
from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

log = logging.getLogger(__name__)


def claim_value(inc: Incoming) -> str:
    return f"c|{inc.tp.topic}|{inc.tp.partition}|{inc.offset}"


def done_value(o: Outcome) -> str:
    if isinstance(o, Routed):
        return f"d|routed|{o.head_id}"
    if isinstance(o, Retried):
        return f"d|retry|{o.tier}"
    if isinstance(o, DeadLettered):
        return f"d|dlq|{o.reason.value}"
    return "d|duplicate"


@dataclass(slots=True)
class _Pending:
    """Writes that waited for Redis."""

    done: list[tuple[str, str]] = field(default_factory=list)
    pins: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """session -> (head, only if absent): the newest write of a session wins."""
    inflight: list[tuple[int, Counter[str]]] = field(default_factory=list)
    """(number, per-head additions) of each batch, in order: applied once however often they are sent."""
    audit: deque[bytes] = field(default_factory=deque)

    def size(self) -> int:
        return len(self.done) + len(self.pins) + len(self.inflight) + len(self.audit)


class Rider(Protocol):
    """Commands another step queues on the claim round trip (the fault state's: ``faults.FaultRide``)."""

    @property
    def active(self) -> bool: ...

    async def ensure(self) -> None: ...

    def lost(self) -> None: ...

    def queue(self, pipe: Any) -> None: ...

    def received(self, replies: list[Any]) -> None: ...


_CLAIMS = {0: Claim.MINE, 1: Claim.DONE, 2: Claim.BUSY}
"""The script's answers (ints from Redis) as claims: a lookup, not an enum call per job."""


class Marks:
    def __init__(self, redis: Redis, keys: Keys, audit: AuditSink, *, claim_ttl_ms: int, dedupe_ttl_ms: int,
                 buffer_max: int, writer: str, on_drop: Callable[[str, int], None] | None = None) -> None:  # fmt: skip
        self.redis = redis
        self.on_drop = on_drop
        """Told of each kind of buffered write dropped (audit, pin, inflight, done) and how many: a metric."""
        self.keys = keys
        self.audit = audit
        self.claim_ttl_ms = claim_ttl_ms
        self.dedupe_ttl_ms = dedupe_ttl_ms
        self.buffer_max = buffer_max
        self.pending = _Pending()
        self.dropped = 0
        """Buffered writes dropped because the outage outlasted the buffer."""
        self.forged = 0
        """Records whose ``x-redrive`` named no redrive (keyed as plain jobs)."""
        self.errors = 0
        """Commands Redis refused (answered with an error): logged, never retried."""
        self._claim = LoadedScript(redis, CLAIM_LUA)
        self._inflight = InflightChanges(redis, keys, writer)

    @property
    def dedupe(self) -> bool:
        return self.dedupe_ttl_ms > 0

    def scripts(self) -> tuple[LoadedScript, ...]:
        """The scripts a batch's claims and marks run (loaded at start-up by ``scripts.preload``)."""
        return (self._claim, self._inflight.loaded)

    async def claim(self, parts: Iterable[tuple[Any, Sequence[Incoming]]], sessions: Sequence[str],
                    rider: Rider | None = None,
                    unforged: bool = False) -> tuple[dict[str, Claim], list[str | None]]:  # fmt: skip
        """Claim each key's first record of the batch; read the sessions' pins; queue what ``rider`` needs on
        the same round trip (it gets the pipeline's replies). Raises on Redis errors. ``unforged``: the caller
        ran :meth:`unforge` on these parts already."""
        first: dict[str, Incoming] = {}
        if self.dedupe:
            if not unforged:
                await self.unforge(parts)
            for _, items in parts:
                for inc in items:
                    first.setdefault(inc.claim_key, inc)
        riding = rider is not None and rider.active
        if not first and not sessions and not riding:
            return {}, []
        keys = list(first)
        for last_try in (False, True):
            if keys:
                await self._claim.ensure()
            if riding:
                assert rider is not None
                await rider.ensure()
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    if keys:
                        args = claim_args(LIFETIMES_KEPT * self.claim_ttl_ms,
                                          ((k, claim_value(first[k])) for k in keys))  # fmt: skip
                        hashes = claim_keys(self.keys, now_ms(), self.claim_ttl_ms, self.dedupe_ttl_ms)
                        self._claim.queue(pipe, hashes, args)
                    at_pins = len(pipe)
                    if sessions:
                        pipe.mget([self.keys.affinity(sid) for sid in sessions])
                    if riding:
                        assert rider is not None
                        rider.queue(pipe)
                    res = await pipe.execute()
                break
            except NoScriptError:  # Redis restarted or flushed its scripts
                self._claim.lost()
                if rider is not None:
                    rider.lost()
                if last_try:
                    raise
        if riding:
            assert rider is not None
            rider.received(res)
        claims = dict(zip(keys, map(_CLAIMS.__getitem__, res[0]), strict=True)) if keys else {}
        pins = cast(list[str | None], res[at_pins]) if sessions else []
        return claims, pins

    async def unforge(self, parts: Iterable[tuple[Any, Sequence[Incoming]]]) -> None:
        """A redriven job is keyed within its redrive (``jr|``) only if that redrive exists: an ``x-redrive``
        header a producer wrote by hand would otherwise open a fresh key, and route a job that was routed
        already. One more round trip, only for a batch that holds redriven jobs (rare)."""
        redriven = [inc for _, items in parts for inc in items if inc.claim_key.startswith("jr|")]
        if not redriven:
            return
        ids = sorted({inc.claim_key.split("|", 2)[1] for inc in redriven})
        found = (
            await self.redis.exists(*(redrive_key(self.keys, rid) for rid in ids)) if len(ids) == 1 else None
        )
        if found is not None:
            real = set(ids) if found else set()
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.exists(redrive_key(self.keys, rid))
                real = {rid for rid, n in zip(ids, await pipe.execute(), strict=True) if n}
        for inc in redriven:
            _, rid, attempt, job_id = inc.claim_key.split("|", 3)
            if rid not in real:
                inc.claim_key = f"j|{attempt}|{job_id}"
                self.forged += 1

    async def mark(self, settled: Sequence[Outcome], pin_ms: int) -> dict[str, int] | None:
        """Write what the settled outcomes imply (plus anything buffered); return the shared in-flight
        counts, or None when Redis did not answer (the writes are then buffered, bounded)."""
        p = self.pending
        per_head: Counter[str] = Counter()
        for o in settled:
            if self.dedupe and o.send is not None:
                p.done.append((o.src.claim_key, done_value(o)))
            if isinstance(o, Routed):
                per_head[o.head_id] += 1
                if o.pin is not None:  # sliding timeout: every routed job of a session renews its pin
                    sid, head_id = o.pin
                    p.pins.pop(sid, None)
                    p.pins[sid] = (head_id, o.new_pin)
        if per_head:
            p.inflight.append((self._inflight.next_seq(), per_head))
        lines = self.audit.write_file(o.audit for o in settled if o.audit is not None)
        p.audit.extend(lines)
        pin_ms = max(1, pin_ms)
        try:
            if p.inflight:
                await self._inflight.loaded.ensure()
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_done(pipe, self.keys, p.done, now_ms(), self.dedupe_ttl_ms)
                for sid, (head_id, nx) in p.pins.items():
                    pipe.set(self.keys.affinity(sid), head_id, px=pin_ms, nx=nx)
                first_change = len(pipe)
                for seq, deltas in p.inflight:
                    self._inflight.queue(pipe, seq, deltas)
                at = len(pipe)
                pipe.hgetall(self.keys.inflight)
                self.audit.publish_into(pipe, p.audit)
                res = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self.audit.publish_failed(exc)
            self._bound()
            return None
        changes = p.inflight
        self.pending = _Pending()
        if any(isinstance(r, NoScriptError) for r in res[first_change:at]):
            # Redis lost its scripts (a restart): apply the changes again, loaded anew; numbered, so once only.
            self._inflight.loaded.lost()
            try:
                for seq, deltas in changes:
                    await self._inflight.apply(seq, deltas)
            except (RedisError, OSError):
                self.pending.inflight = changes
            res = [r for r in res if not isinstance(r, NoScriptError)]
            at -= len(changes)
        refused = [r for r in res if isinstance(r, Exception)]
        if refused:  # Redis answered, with an error for some command: a bug or a bad value, not an outage
            self.errors += len(refused)
            log.error("Redis refused %d of %d writes after a batch: %s", len(refused), len(res), refused[0])
        inflight = res[at]
        if isinstance(inflight, Exception):
            return {}
        return {k: int(v) for k, v in inflight.items()}

    def _bound(self) -> None:
        """Keep the buffer within ``buffer_max`` entries. The oldest audit records go first, then pins, then
        in-flight additions; done marks (what keeps replays from routing twice) go last."""
        p = self.pending
        over = p.size() - self.buffer_max
        if over <= 0:
            return
        first = self.dropped == 0
        dropped: Counter[str] = Counter()
        while over > 0 and p.audit:
            p.audit.popleft()
            over -= 1
            dropped["audit"] += 1
        while over > 0 and p.pins:
            del p.pins[next(iter(p.pins))]
            over -= 1
            dropped["pin"] += 1
        if over > 0 and p.inflight:
            n = min(over, len(p.inflight))
            del p.inflight[:n]
            over -= n
            dropped["inflight"] += n
        if over > 0:
            del p.done[:over]
            dropped["done"] += over
        self.dropped += dropped.total()
        if self.on_drop is not None:
            for kind, n in dropped.items():
                self.on_drop(kind, n)
        if first:
            log.warning("Redis outage outlasted the write buffer (%d entries): dropping the oldest writes",
                        self.buffer_max)  # fmt: skip

    @property
    def buffered(self) -> int:
        return self.pending.size()
