"""Reading the audit back: replay the capped stream from a point in time, then follow it live.

The seam between replay and live is a stream id, not a guess: replay reads ``XRANGE key <since> +`` page by page
up to the last entry there is, and following goes on with ``XREAD BLOCK`` from that entry's id. Stream ids
only grow (Redis assigns them at ``XADD``, under its single command order), so every entry added after the
replay's last read has a larger id: none is missed at the seam and none is read twice. (Following the pub/sub
channel instead would need the replayed and live copies of a record matched by content: two equal records
could not be told apart.) Writers put the stream entry on the wire before the channel messages of the same
batch (:meth:`AuditSink.publish_into`), so whatever a channel subscriber saw can be replayed.

Without a stream (``ROUTER_AUDIT_STREAM_MAXLEN=0``) only the channel can be followed, from now on.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router_worker.audit import STREAM_FIELD

_MAX_SEQ = 18446744073709551615
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a Redis restart or failover looks like to a reader: it waits and reads on from its cursor."""
_RETRY_MAX_S = 5.0


class SinceError(ValueError):
    """A ``--since`` an operator typed that is neither a duration nor a time."""


def parse_since(text: str, now_ms: int) -> int:
    """Epoch ms of ``--since``: a duration back from now (``90s``, ``10m``, ``1h30m``, ``2d``) or an ISO 8601
    time (``2025-01-31T12:00:00Z``; without a zone, local time)."""
    t = text.strip()
    if t and _DURATION.sub("", t) == "":
        ms = sum(float(n) * _UNIT_MS[u] for n, u in _DURATION.findall(t))
        return now_ms - int(ms)
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise SinceError(
            f"--since {text!r}: expected a duration (30s, 10m, 1h30m, 2d) or an ISO time (2025-01-31T12:00:00Z)"
        ) from None
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class TailFilter:
    """Which records to show: for each field given, the record must hold one of the values (empty: any).
    A model matches the record's ``model_type`` or ``model_id``."""

    events: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    heads: frozenset[str] = frozenset()
    jobs: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()

    def matches(self, rec: Mapping[str, Any]) -> bool:
        if self.events and _text(rec, "event") not in self.events:
            return False
        if (
            self.models
            and _text(rec, "model_type") not in self.models
            and _text(rec, "model_id") not in self.models
        ):
            return False
        if self.heads and _text(rec, "head_id") not in self.heads:
            return False
        if self.jobs and _text(rec, "job_id") not in self.jobs:
            return False
        return not self.tenants or _text(rec, "tenant") in self.tenants


def _text(rec: Mapping[str, Any], name: str) -> str | None:
    """A field as the filters compare it: a string, or None (another writer's map or list matches nothing)."""
    value = rec.get(name)
    return value if isinstance(value, str) else None


def parse_lines(data: str | bytes) -> list[dict[str, Any]]:
    """The records of a stream entry or a channel message (JSON lines); a line that is not an object is
    skipped (written by hand or by something else)."""
    out: list[dict[str, Any]] = []
    raw = data.encode() if isinstance(data, str) else data
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def id_before(ms: int) -> str:
    """The largest stream id below ``<ms>-0``: ``XREAD`` from it returns every entry from ``ms`` on."""
    return f"{ms - 1}-{_MAX_SEQ}" if ms > 0 else "0-0"


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``"1700000000000-3"`` -> ``(1700000000000, 3)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(resp: Any) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(id, fields) of an XREAD answer."""
    if not resp:
        return ()
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[str, Mapping[str, Any]]] = []
    for _key, entries in streams:
        out.extend((str(eid), fields) for eid, fields in entries)
    return out


@dataclass(slots=True)
class StreamReader:
    """Replays and follows one audit stream. ``cursor`` is the id of the last entry read."""

    redis: Redis
    key: str
    page: int = 200
    block_ms: int = 1000
    """How long one ``XREAD BLOCK`` waits: keep it under the client's socket timeout."""
    cursor: str = "0-0"
    on_unreachable: Callable[[Exception], None] | None = None
    """Called each time following fails for want of Redis (it then waits and reads on from ``cursor``)."""
    on_gap: Callable[[str, str], None] | None = None
    """Called with (cursor, the stream's oldest entry) when the capped stream trimmed past the last entry read (a
    reader slower than the writers): records between the two may be missing from what it yields."""
    gaps: list[tuple[str, str]] = field(default_factory=list)
    _trimmed_seen: str = "0-0"

    async def _first_id(self) -> str:
        try:
            info = await self.redis.xinfo_stream(self.key)
        except ResponseError:  # no such stream yet
            return "0-0"
        return str(info.get("recorded-first-entry-id") or "0-0")

    async def _check_gap(self) -> None:
        """Before each page: if the capped stream trimmed past the last entry read (its oldest entry is newer than
        the cursor), the records between may be lost to this reader: said once per trim."""
        if self.cursor == "0-0":
            return
        first = await self._first_id()
        if id_key(first) > id_key(self.cursor) and id_key(first) > id_key(self._trimmed_seen):
            self.gaps.append((self.cursor, first))
            if self.on_gap is not None:
                self.on_gap(self.cursor, first)
            self._trimmed_seen = first

    async def last_id(self) -> str:
        newest = await self.redis.xrevrange(self.key, count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def trimmed_from(self, since_ms: int) -> int | None:
        """When records at or after ``since_ms`` were already trimmed from the capped stream: the time up to
        which they are missing (None: nothing asked for was trimmed, or the server can not tell)."""
        try:
            info = await self.redis.xinfo_stream(self.key)
        except ResponseError:  # no such stream yet
            return None
        deleted = str(info.get("max-deleted-entry-id") or "0-0")
        ms = int(deleted.split("-", 1)[0])
        return ms if ms >= since_ms and deleted != "0-0" else None

    async def replay(self, since_ms: int) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
        """Every entry from ``since_ms`` to the newest there is now, oldest first.

        ``since_ms`` comes from the caller's clock, stream ids from the Redis server's: when it lies past the
        newest entry (a clock running ahead, a time typed in the future) the seam is the newest entry there
        is, so following starts from now rather than skip what is written until Redis' clock gets there."""
        newest = await self.last_id()
        self.cursor = min(id_before(since_ms), newest, key=id_key)
        self._trimmed_seen = (
            await self._first_id()
        )  # what was trimmed before the start is told by trimmed_from
        start = f"{since_ms}-0"
        while True:
            await self._check_gap()
            page = await self.redis.xrange(self.key, min=start, max="+", count=self.page) or []
            for eid, fields in page:
                self.cursor = str(eid)
                yield self.cursor, parse_lines((fields or {}).get(STREAM_FIELD, ""))
            if len(page) < self.page:
                return
            start = "(" + self.cursor

    async def follow(self) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
        """Every entry after ``cursor``, as it is added, forever; across a Redis restart too (it reads on from
        ``cursor`` once Redis answers again)."""
        delay = 0.1
        while True:
            try:
                await self._check_gap()
                resp = await self.redis.xread({self.key: self.cursor}, count=self.page, block=self.block_ms)
            except _UNREACHABLE as exc:
                if self.on_unreachable is not None:
                    self.on_unreachable(exc)
                await asyncio.sleep(delay)
                delay = min(_RETRY_MAX_S, delay * 2)
                continue
            delay = 0.1
            for eid, fields in _entries(resp):
                self.cursor = eid
                yield eid, parse_lines(fields.get(STREAM_FIELD, ""))


async def follow_channel(redis: Redis, channel: str) -> AsyncIterator[list[dict[str, Any]]]:
    """The records published on the channel from now on (no stream to replay from); subscribed again after a
    Redis restart (what was published meanwhile is not seen: the channel keeps nothing)."""
    delay = 0.1
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            delay = 0.1
            async for msg in pubsub.listen():
                yield parse_lines(msg["data"])
        except _UNREACHABLE:
            await asyncio.sleep(delay)
            delay = min(_RETRY_MAX_S, delay * 2)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
