"""Admit and decode a fetched batch: the first step of the router's loop, with no I/O.

Per partition, in offset order: the gap guard admits records only up to a missing offset; a retry-tier
record whose back-off has not elapsed cuts its partition there (a hold); every admitted record is decoded
into an :class:`Incoming` carrying its job or the typed error that says why it is not one. Decoding is
total: no input makes this step raise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from router_worker.pipeline.gaps import RETRY_MS, GapGuard
from router_worker.pipeline.messages import H_NOT_BEFORE, attempt_of, header, header_int, headers_size
from router_worker.pipeline.outcomes import Hold, Incoming, claim_key_of, redrive_of
from schemas.envelope import MSGPACK, DeadLetterReason, EnvelopeError, Job, content_type_of, decode_job

Parts = list[tuple[TopicPartition, list[Incoming]]]


def decode_one(rec: Any, tp: TopicPartition, attempt: int, max_bytes: int,
               attempt_error: str | None = None) -> Incoming:  # fmt: skip
    headers = list(rec.headers or ())
    marked = len(headers) > 1 or (len(headers) == 1 and headers[0][0] != "content-type")
    ctype = MSGPACK
    job: Job | None = None
    error: EnvelopeError | None = None
    size = -1
    try:
        size = len(rec.value or b"") + len(rec.key or b"") + headers_size(headers)
        if size > max_bytes:  # the producer counts key and headers too: a routed copy could never be sent
            raise EnvelopeError(DeadLetterReason.TOO_LARGE,
                                f"{size} bytes (value, key and headers) exceeds the limit of {max_bytes}")  # fmt: skip
        ctype = content_type_of(headers)
        job = decode_job(rec.value, ctype, max_bytes)
    except EnvelopeError as exc:
        error = exc
    except Exception as exc:  # a decoder bug must not stop the stream: the record is dead-lettered instead
        error = EnvelopeError(DeadLetterReason.DECODE_ERROR, f"undecodable ({type(exc).__name__}: {exc})")
    if error is None and attempt_error is not None:
        error = EnvelopeError(DeadLetterReason.SCHEMA_ERROR, attempt_error)
    if error is not None:
        job = None
    return Incoming(tp, rec.offset, rec.key, rec.value, headers, ctype, attempt, job, error,
                    claim_key_of(job, attempt, tp, rec.offset, redrive_of(headers) if marked else None),
                    marked, size)  # fmt: skip


def intake(batch: Mapping[TopicPartition, Sequence[Any]], gaps: GapGuard, retry_topics: frozenset[str],
           now: int, max_bytes: int, max_hold_ms: int = 60_000) -> tuple[Parts, list[Hold]]:  # fmt: skip
    """Admitted records decoded per partition, and the holds that cut partitions short.

    A retry record's ``x-retry-not-before`` is honoured only when it lies within ``max_hold_ms`` (the longest
    back-off) from now; one further away is taken as due: any client can write a retry tier, and one record
    must not pause a partition for years."""
    parts: Parts = []
    holds: list[Hold] = []
    for tp, fetched in batch.items():
        records, gap_at = gaps.admit(tp, fetched, now)
        retry_tier = tp.topic in retry_topics
        items: list[Incoming] = []
        for rec in records:
            attempt, attempt_error = 1, None
            if retry_tier:
                prev = attempt_of(rec.headers)
                if prev is None:
                    raw = header(rec.headers, "x-route-attempt")
                    attempt_error = (
                        "retry record without a valid x-route-attempt header "
                        f"(got {'none' if raw is None else repr(raw[:20])})"
                    )
                else:
                    not_before = header_int(rec.headers, H_NOT_BEFORE)
                    if now < not_before <= now + max_hold_ms:  # further than any back-off: bogus, due now
                        holds.append(Hold(tp, rec.offset, not_before, "not_due"))
                        gap_at = None  # held before the gap: the gap is read again anyway
                        break
                    attempt = prev + 1
            items.append(decode_one(rec, tp, attempt, max_bytes, attempt_error))
        if gap_at is not None:  # an offset is missing: read again from it shortly (see gaps.py)
            holds.append(Hold(tp, gap_at, now + RETRY_MS, "gap"))
        if items:
            parts.append((tp, items))
    return parts, holds
