"""Audit records: one JSON object per decision, fallback, retry, dead letter and admin operation, published
to the Redis channel ``audit:routing:logs``, appended as one line to a rotating log file, and kept in a capped
Redis stream so ``router-worker audit tail --since`` can replay what happened before anyone was tailing.

The router hands a whole batch of records to :meth:`AuditSink.emit_many` (or queues them on its own pipeline
with :meth:`AuditSink.publish_into`): one pipelined round trip and one file write per batch, never per job.
The stream gets ONE entry per batch (field ``r``: the batch's JSON lines joined by newlines), so replay costs
Redis one command per batch, not per record. Audit is best effort by design: a Redis outage is counted and
logged once, it does not stop routing (the log file still has every record).

Decision records (event ``route``) can be sampled (``ROUTER_AUDIT_SAMPLE``), deterministically by job id, so
every router keeps or drops the same job's record; fallbacks, retries, dead letters and admin operations are
always written.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import logging.handlers
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router_worker.clock import now_ms
from router_worker.core.model import Decision, Outcome

if TYPE_CHECKING:
    from router_worker.settings import Settings

log = logging.getLogger(__name__)

STREAM_FIELD = "r"
"""The stream entry's one field: the batch's records, JSON lines joined by ``\\n``."""
STREAM_ENTRY_MAX_RECORDS = 1000
"""Most records in one stream entry (a batch is one entry; a backlog written after an outage is several)."""
SAMPLED_EVENTS = frozenset({"route"})
"""The only events ``ROUTER_AUDIT_SAMPLE`` may drop: plain decisions. Everything else is always kept."""
MODEL_FALLBACK = "model_fallback"
REGION_FALLBACK = "region_fallback"


_PUBLISH_ALL = (
    "local n = 0 for line in string.gmatch(ARGV[2], '[^\\n]+') do redis.call('PUBLISH', ARGV[1], line) n = n + 1 end "
    "return n"
)
"""PUBLISH each record of ARGV[2] (newline-separated: an encoded record holds no raw newline) to the channel
(ARGV[1]). One argument for the lot: the client encodes one string, not one per record. Sent as EVAL, source
and all: Redis caches it, and a Redis that restarted (and forgot its scripts) has no NOSCRIPT to answer."""
_PUBLISH_CHUNK = 1000


def audit_stream_key(redis_prefix: str) -> str:
    """The deployment's audit stream, under its hash tag like every other key (``state/keys.py``)."""
    return "{" + redis_prefix + "}:audit"


def os_actor() -> str:
    """Who runs a CLI admin command: the OS user (the actor of its audit record)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry and no USER/LOGNAME
        return f"uid:{os.getuid()}"


def keep_decision(job_id: str, sample: float) -> bool:
    """Whether a sampled decision record is kept: the same answer for a job id in every router and run."""
    if sample >= 1.0:
        return True
    if sample <= 0.0:
        return False
    return zlib.crc32(job_id.encode()) < sample * 4294967296.0


def fallback_kind(decision: Decision) -> str | None:
    """Why a routed decision is a fallback: another model of the policy's ``fallback_models``
    (``model_fallback``) or a head outside the job's preferred region (``region_fallback``); None otherwise.
    The engine marks a model fallback in the reason (``fallback model <id>; ...``)."""
    if not decision.fallback:
        return None
    return MODEL_FALLBACK if "fallback model " in decision.reason else REGION_FALLBACK


def audit_record(event: str, router_id: str, **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"ts": now_ms(), "event": event, "router_id": router_id}
    rec.update((k, v) for k, v in fields.items() if v is not None)
    return rec


def decision_record(decision: Decision, router_id: str, job_id: str, model_type: str,
                    region: str | None, ts: int, tenant: str | None = None) -> dict[str, Any]:  # fmt: skip
    fallback = decision.fallback
    routed = decision.outcome is Outcome.ROUTED
    event = ("fallback" if fallback else "route") if routed else decision.outcome.value
    rec: dict[str, Any] = {
        "ts": ts,
        "event": event,
        "router_id": router_id,
        "job_id": job_id,
        "model_type": model_type,
        "strategy": decision.strategy,
        "reason": decision.reason,
        "attempt": decision.attempt,
        "fallback": fallback,
    }
    if fallback:
        rec["fallback_reason"] = fallback_kind(decision)
    if region:
        rec["region"] = region
    if tenant:
        rec["tenant"] = tenant
    if decision.head is not None:
        rec["head_id"] = decision.head.head_id
        rec["model_id"] = decision.head.model_id
        rec["scores"] = decision.scores.as_dict()
    return rec


def encode_lines(records: list[Mapping[str, Any]]) -> list[bytes]:
    """Each record as one line of JSON, as ``orjson.dumps`` writes it alone. The batch is encoded in one call
    and cut between records: a third of the cost of a call per record, most of which was allocating each
    call's buffer. A cut is where ``},{`` joins two records; when some string (or a nested list of maps) holds
    one too, the pieces outnumber the records, and each record is encoded alone instead."""
    if len(records) > 1:
        # A record nested to orjson's limit encodes alone but not one level down the batch's list.
        try:
            blob = orjson.dumps(records)
        except orjson.JSONEncodeError:
            blob = b""
        lines = blob[1:-1].replace(b"},{", b"}\n{").split(b"\n")  # no raw newline inside one
        if len(lines) == len(records):
            return lines
    return [orjson.dumps(r) for r in records]


class AuditFileHandler(logging.handlers.RotatingFileHandler):
    """Rotated by size like its base, and reopened, as ``WatchedFileHandler`` is, when another tool moved or
    removed the file (logrotate without ``copytruncate``): else the records would go on into the renamed file
    and the configured path would stay missing. One ``stat`` per write, and a write is a batch."""

    _ident: tuple[int, int] | None = None

    def _open(self) -> Any:
        stream = super()._open()
        st = os.fstat(stream.fileno())
        self._ident = (st.st_dev, st.st_ino)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:
            try:
                st = os.stat(self.baseFilename)
                moved = (st.st_dev, st.st_ino) != self._ident
            except OSError:
                moved = True
            if moved:  # the base opens the path again before it writes (its folder too, if that went)
                self.stream.close()
                self.stream = None
                with contextlib.suppress(OSError):
                    Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        super().emit(record)


class AuditSink:
    def __init__(self, redis: Redis | None, channel: str, file_path: str | None, max_bytes: int = 50 << 20,
                 backups: int = 5, *, stream: str | None = None, stream_maxlen: int = 0,
                 sample: float = 1.0) -> None:  # fmt: skip
        self.redis = redis
        self.channel = channel
        self.stream = stream if stream and stream_maxlen > 0 else None
        """The capped stream records are replayed from (None: no stream)."""
        self.stream_maxlen = stream_maxlen
        self.sample = sample
        self.failures = 0
        self._file: logging.Logger | None = None
        self._handler: logging.Handler | None = None
        if file_path:
            path = Path(file_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = AuditFileHandler(path, maxBytes=max_bytes, backupCount=backups)
            handler.setFormatter(logging.Formatter("%(message)s"))
            # A private logger object (not from the global registry) so nothing else writes to our file.
            file_logger = logging.Logger(f"audit:{path}", logging.INFO)
            file_logger.addHandler(handler)
            file_logger.propagate = False
            self._file, self._handler = file_logger, handler

    @classmethod
    def from_settings(cls, redis: Redis | None, s: Settings, with_file: bool = True) -> AuditSink:
        return cls(redis, s.audit_channel, s.audit_file if with_file else None, s.audit_file_max_bytes,
                   s.audit_file_backups, stream=audit_stream_key(s.redis_prefix),
                   stream_maxlen=s.audit_stream_maxlen, sample=s.audit_sample)  # fmt: skip

    async def emit(self, event: str, router_id: str, **fields: Any) -> dict[str, Any]:
        rec = audit_record(event, router_id, **fields)
        await self.emit_many((rec,))
        return rec

    def _kept(self, records: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        sample = self.sample
        if sample >= 1.0:
            return records
        return (r for r in records
                if r.get("event") not in SAMPLED_EVENTS or keep_decision(str(r.get("job_id", "")), sample))  # fmt: skip

    def write_file(self, records: Iterable[Mapping[str, Any]]) -> list[bytes]:
        """Append the records (sampled) to the log file, one write; return them encoded for publishing."""
        lines = encode_lines(list(self._kept(records)))
        if lines and self._file is not None:
            self._file.info(b"\n".join(lines).decode())
        return lines

    def publish_into(self, pipe: Any, lines: Iterable[bytes]) -> None:
        """Queue the encoded records on a pipeline the caller executes (shares its round trip): one stream
        entry for the lot (``XADD ... MAXLEN ~``; one per thousand records for a backlog), then one channel
        message per record, all sent by one small script (a PUBLISH per record from the client cost the
        router about a quarter of its CPU: a command to encode and a reply to parse each). The entry goes
        first, so a record is on the channel only once it can be replayed."""
        batch = lines if isinstance(lines, list) else list(lines)
        if not batch:
            return
        if self.stream is not None:
            step = STREAM_ENTRY_MAX_RECORDS
            for i in range(0, len(batch), step):
                pipe.xadd(self.stream, {STREAM_FIELD: b"\n".join(batch[i : i + step])},
                          maxlen=self.stream_maxlen, approximate=True)  # fmt: skip
        for i in range(0, len(batch), _PUBLISH_CHUNK):
            pipe.eval(_PUBLISH_ALL, 0, self.channel, b"\n".join(batch[i : i + _PUBLISH_CHUNK]))

    def publish_failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("audit publish to Redis failed (%d so far): %s", self.failures, exc)

    async def emit_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        await self.publish_lines(self.write_file(records))

    async def publish_lines(self, lines: list[bytes]) -> None:
        """Publish records :meth:`write_file` encoded (one round trip); a Redis failure is counted, not raised."""
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
