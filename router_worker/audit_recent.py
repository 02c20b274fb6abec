"""Recent audit records read back from the rotating audit log file, newest first.

The admin API's ``GET /audit`` shows what happened before anyone was tailing. The file is read from its
end in blocks (then its rotated backups ``.1``, ``.2``, ...), so asking for the last hundred records of a
50 MiB log reads a few kilobytes. A line that is not a JSON object (a torn write, a hand edit) is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

BLOCK = 64 * 1024


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


def recent_records(
    path: Path, backups: int, limit: int, where: AuditFilter = AuditFilter()
) -> list[dict[str, Any]]:
    """Up to ``limit`` records matching ``where``, newest first, across the file and its backups."""
    out: list[dict[str, Any]] = []
    if limit <= 0:
        return out
    for file in audit_files(path, backups):
        for line in lines_backwards(file):
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and where.matches(rec):
                out.append(rec)
                if len(out) >= limit:
                    return out
    return out
