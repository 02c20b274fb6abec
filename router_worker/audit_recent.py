"""Recent audit records, newest first: from the deployment's capped audit stream in Redis (every router's
records) or, without one, from this process's rotating audit log file.

The admin API's ``GET /audit`` shows what happened before anyone was tailing. The stream is read with
``XREVRANGE`` a page at a time (reads only); the file from its end in blocks (then its rotated backups
``.1``, ``.2``, ...), so asking for the last hundred records of a 50 MiB log reads a few kilobytes. At most
:data:`SCAN_LIMIT` records are examined per call, so a filter that matches nothing answers quickly; the stream
is read a few entries at a time, yielding to the event loop after each, so a scan never holds a router's loop
(its Kafka heartbeats and publishes) for long. A line
that is not a JSON object (a torn write, a hand edit) is skipped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from router_worker.audit import STREAM_FIELD
from router_worker.audit_tail import parse_lines

BLOCK = 64 * 1024
SCAN_LIMIT = 200_000
"""Most records one call examines (newest first) looking for matches."""
STREAM_PAGE = 4
"""Stream entries per ``XREVRANGE`` (an entry is a routed batch: up to a thousand records)."""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which records to keep: every given field must equal the record's (absent: any)."""

    event: str | None = None
    head_id: str | None = None
    job_id: str | None = None
    model_type: str | None = None
    actor: str | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        for name in ("event", "head_id", "job_id", "model_type", "actor"):
            want = getattr(self, name)
            if want is not None and record.get(name) != want:
                return False
        return True


def lines_backwards(path: Path, block: int = BLOCK) -> Iterator[bytes]:
    """The file's lines, last first (without their newlines); nothing for a file that does not exist."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + tail
            parts = chunk.split(b"\n")
            tail = parts[0]  # may continue in the block before this one
            for line in reversed(parts[1:]):
                if line:
                    yield line
        if tail:
            yield tail


def audit_files(path: Path, backups: int) -> list[Path]:
    """The log and its rotated backups, newest first (``RotatingFileHandler`` naming)."""
    return [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, backups + 1))]


def recent_records(path: Path, backups: int, limit: int, where: AuditFilter = AuditFilter(),
                   scan_limit: int = SCAN_LIMIT) -> list[dict[str, Any]]:  # fmt: skip
    """Up to ``limit`` records matching ``where``, newest first, across the file and its backups."""
    out: list[dict[str, Any]] = []
    if limit <= 0:
        return out
    scanned = 0
    for file in audit_files(path, backups):
        for line in lines_backwards(file):
            scanned += 1
            if scanned > scan_limit:
                return out
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and where.matches(rec):
                out.append(rec)
                if len(out) >= limit:
                    return out
    return out


async def recent_stream_records(redis: Redis, key: str, limit: int, where: AuditFilter = AuditFilter(),
                                scan_limit: int = SCAN_LIMIT) -> list[dict[str, Any]]:  # fmt: skip
    """The same from the audit stream (one entry per batch of records, newest entry first)."""
    out: list[dict[str, Any]] = []
    scanned = 0
    top = "+"
    while limit > 0 and scanned < scan_limit:
        page = await redis.xrevrange(key, max=top, min="-", count=STREAM_PAGE) or []
        for entry_id, fields in page:
            records = parse_lines((fields or {}).get(STREAM_FIELD, ""))
            scanned += len(records)
            out.extend(r for r in reversed(records) if where.matches(r))
            await asyncio.sleep(0)  # the router's own loop serves this: let it route between entries
            if len(out) >= limit or scanned >= scan_limit:
                return out[:limit]
            top = f"({entry_id!s}"
        if len(page) < STREAM_PAGE:
            break
    return out[:limit]
