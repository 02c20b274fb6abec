"""Audit records: one JSON object per decision, fallback, retry, dead letter and admin operation, published
to the Redis channel ``audit:routing:logs`` and appended as one line to a rotating log file.

The router hands a whole batch of records to :meth:`AuditSink.emit_many`: one pipelined round trip and one
file write per batch, never per job. Audit is best effort by design: a Redis outage is counted and logged
once, it does not stop routing (the log file still has every record).
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router_worker.clock import now_ms
from router_worker.core.model import Decision

log = logging.getLogger(__name__)


def audit_record(event: str, router_id: str, **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"ts": now_ms(), "event": event, "router_id": router_id}
    rec.update((k, v) for k, v in fields.items() if v is not None)
    return rec


def decision_record(decision: Decision, router_id: str, job_id: str, model_type: str,
                    region: str | None, ts: int) -> dict[str, Any]:  # fmt: skip
    event = "route" if decision.routed else decision.outcome.value
    if decision.routed and decision.fallback:
        event = "route_fallback"
    rec: dict[str, Any] = {
        "ts": ts,
        "event": event,
        "router_id": router_id,
        "job_id": job_id,
        "model_type": model_type,
        "strategy": decision.strategy,
        "reason": decision.reason,
        "attempt": decision.attempt,
        "fallback": decision.fallback,
    }
    if region:
        rec["region"] = region
    if decision.head is not None:
        rec["head_id"] = decision.head.head_id
        rec["model_id"] = decision.head.model_id
        rec["scores"] = decision.scores.as_dict()
    return rec


class AuditSink:
    def __init__(self, redis: Redis | None, channel: str, file_path: str | None, max_bytes: int = 50 << 20,
                 backups: int = 5) -> None:  # fmt: skip
        self.redis = redis
        self.channel = channel
        self.failures = 0
        self._file: logging.Logger | None = None
        self._handler: logging.Handler | None = None
        if file_path:
            path = Path(file_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
            handler.setFormatter(logging.Formatter("%(message)s"))
            # A private logger object (not from the global registry) so nothing else writes to our file.
            file_logger = logging.Logger(f"audit:{path}", logging.INFO)
            file_logger.addHandler(handler)
            file_logger.propagate = False
            self._file, self._handler = file_logger, handler

    async def emit(self, event: str, router_id: str, **fields: Any) -> dict[str, Any]:
        rec = audit_record(event, router_id, **fields)
        await self.emit_many((rec,))
        return rec

    def write_file(self, records: Iterable[Mapping[str, Any]]) -> list[bytes]:
        """Append the records to the log file (one write); return them encoded for publishing."""
        lines = [orjson.dumps(r) for r in records]
        if lines and self._file is not None:
            self._file.info(b"\n".join(lines).decode())
        return lines

    def publish_into(self, pipe: Any, lines: Iterable[bytes]) -> None:
        """Queue the encoded records on a pipeline the caller executes (shares its round trip)."""
        for line in lines:
            pipe.publish(self.channel, line)

    def publish_failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("audit publish to Redis failed (%d so far): %s", self.failures, exc)

    async def emit_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = self.write_file(records)
        if not lines or self.redis is None:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                self.publish_into(pipe, lines)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.publish_failed(exc)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
