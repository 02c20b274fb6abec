"""Headers of routed messages, retries and dead letters (pure; the contract's names)."""

from __future__ import annotations

from collections.abc import Sequence

from router_worker.core.model import Decision

Headers = list[tuple[str, bytes | None]]
"""Kafka headers as aiokafka gives them: a header's value may be null."""

H_CONTENT_TYPE = "content-type"
H_JOB_ID = "x-job-id"
H_HEAD = "x-route-head"
H_STRATEGY = "x-route-strategy"
H_ATTEMPT = "x-route-attempt"
H_FALLBACK = "x-route-fallback"
H_DECIDED_AT = "x-route-decided-at"
H_DLQ_REASON = "x-dlq-reason"
H_DLQ_ERROR = "x-dlq-error"
H_ORIG_TOPIC = "x-original-topic"
H_ORIG_PARTITION = "x-original-partition"
H_ORIG_OFFSET = "x-original-offset"
H_NOT_BEFORE = "x-retry-not-before"
H_RETRY_REASON = "x-retry-reason"
H_DLQ_TRUNCATED = "x-dlq-truncated"
H_DLQ_SHA256 = "x-dlq-sha256"
H_DLQ_HEADERS_DROPPED = "x-dlq-headers-dropped"
H_DLQ_KEY_TRUNCATED = "x-dlq-key-truncated"

_OURS = frozenset(
    {H_JOB_ID, H_HEAD, H_STRATEGY, H_ATTEMPT, H_FALLBACK, H_DECIDED_AT, H_DLQ_REASON, H_DLQ_ERROR, H_NOT_BEFORE,
     H_RETRY_REASON, H_DLQ_TRUNCATED, H_DLQ_SHA256, H_DLQ_HEADERS_DROPPED, H_DLQ_KEY_TRUNCATED}
)  # fmt: skip
_ORIGIN = frozenset({H_ORIG_TOPIC, H_ORIG_PARTITION, H_ORIG_OFFSET})


def headers_size(headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """Bytes the headers add to a record (names, in UTF-8 as they are sent, and values; what counts against
    the producer's limit)."""
    n = 0
    for k, v in headers or ():  # a loop, not sum() over a generator: twice as fast for a few headers
        n += len(k) if k.isascii() else len(k.encode(errors="surrogatepass"))
        if v is not None:
            n += len(v)
    return n


_ORIGIN_MAX = 256


def origin_only(headers: Sequence[tuple[str, bytes | None]] | None) -> Headers:
    """Just the origin headers (where a record was first read): what a squeezed dead letter keeps. Any
    client can write them, so they are kept only when all three are there and short; else none (the dead
    letter then names the record's own coordinates)."""
    kept = [(k, v) for k, v in (headers or ()) if k in _ORIGIN]
    if len(kept) != len(_ORIGIN) or any(v is None or len(v) > _ORIGIN_MAX for _, v in kept):
        return []
    return kept


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The first value of header ``name`` (None when absent or null)."""
    if headers:
        for k, v in headers:
            if k == name:
                return v
    return None


def header_int(headers: Sequence[tuple[str, bytes | None]] | None, name: str, default: int = 0) -> int:
    raw = header(headers, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return default


def attempt_of(headers: Sequence[tuple[str, bytes | None]] | None) -> int | None:
    """The ``x-route-attempt`` a retry record carries: a positive integer, or None when missing or bad."""
    raw = header(headers, H_ATTEMPT)
    if raw is None or len(raw) > 9 or not raw.isdigit():
        return None
    n = int(raw)
    return n if n >= 1 else None


def _passthrough(headers: Sequence[tuple[str, bytes | None]] | None, keep_origin: bool) -> Headers:
    """The producer's own headers (``traceparent`` among them) minus the router's, which are rewritten."""
    if not headers:
        return []
    drop = _OURS if keep_origin else _OURS | _ORIGIN
    return [(k, v) for k, v in headers if k not in drop]


_PAIRS_KEPT = 4096
_ATTEMPTS = tuple((H_ATTEMPT, str(n).encode()) for n in range(32))
_FALLBACK_NO, _FALLBACK_YES = (H_FALLBACK, b"0"), (H_FALLBACK, b"1")
ROUTED_HEADERS_MAX = 1024
"""Most bytes :func:`routed_headers` (and a refusal count) add to a record's own headers, head id aside: names,
a job id of up to 128 characters (512 bytes), a strategy name of up to 64, an attempt, a count and a time."""


def _pair(pairs: dict[str, tuple[str, bytes]], name: str, text: str) -> tuple[str, bytes]:
    """The header ``(name, text)``, encoded once: head ids and strategy names repeat from job to job."""
    got = pairs.get(text)
    if got is None:
        if len(pairs) >= _PAIRS_KEPT:
            pairs.clear()
        got = pairs[text] = (name, text.encode())
    return got


def decided_at(ms: int) -> tuple[str, bytes]:
    """The ``x-route-decided-at`` header: one per batch, shared by its records (header pairs are immutable)."""
    return (H_DECIDED_AT, str(ms).encode())


def routed_headers(original: Sequence[tuple[str, bytes | None]] | None, job_id: str, decision: Decision,
                   content_type: str, decided_at_ms: int, *, plain: bool = False,
                   stamp: tuple[str, bytes] | None = None) -> Headers:  # fmt: skip
    """``plain``: the original headers are at most a ``content-type`` (nothing of the router's to drop).
    ``stamp``: :func:`decided_at` of ``decided_at_ms``, made once for the batch."""
    head = decision.head
    if plain:
        out = list(original) if original else []
        if not out or out[0][1] is None:
            out.append(_pair(_CONTENT_TYPES, H_CONTENT_TYPE, content_type))
    else:
        out = _passthrough(original, keep_origin=False)
        if header(out, H_CONTENT_TYPE) is None:
            out.append(_pair(_CONTENT_TYPES, H_CONTENT_TYPE, content_type))
    attempt = decision.attempt
    out += (
        (H_JOB_ID, job_id.encode()),
        _pair(_HEADS, H_HEAD, head.head_id if head else ""),
        _pair(_STRATEGIES, H_STRATEGY, decision.strategy),
        _ATTEMPTS[attempt] if 0 <= attempt < len(_ATTEMPTS) else (H_ATTEMPT, str(attempt).encode()),
        _FALLBACK_YES if decision.fallback else _FALLBACK_NO,
        stamp if stamp is not None else decided_at(decided_at_ms),
    )
    return out


_CONTENT_TYPES: dict[str, tuple[str, bytes]] = {}
_HEADS: dict[str, tuple[str, bytes]] = {}
_STRATEGIES: dict[str, tuple[str, bytes]] = {}


def _origin(
    original: Sequence[tuple[str, bytes | None]] | None, topic: str, partition: int, offset: int
) -> Headers:
    # A record read from a retry topic keeps the origin of its first read, so ops see where it came from.
    if header(original, H_ORIG_TOPIC) is not None:
        return [(k, v) for k, v in (original or ()) if k in _ORIGIN]
    return [
        (H_ORIG_TOPIC, topic.encode()),
        (H_ORIG_PARTITION, str(partition).encode()),
        (H_ORIG_OFFSET, str(offset).encode()),
    ]


def dead_letter_headers(original: Sequence[tuple[str, bytes | None]] | None, reason: str, error: str, topic: str,
                        partition: int, offset: int, attempt: int) -> Headers:  # fmt: skip
    out = _passthrough(original, keep_origin=False)
    out += _origin(original, topic, partition, offset)
    out += [
        (H_DLQ_REASON, reason.encode()),
        (H_DLQ_ERROR, error[:1000].encode(errors="replace")),
        (H_ATTEMPT, str(attempt).encode()),
    ]
    return out


def retry_headers(original: Sequence[tuple[str, bytes | None]] | None, reason: str, topic: str, partition: int,
                  offset: int, attempt: int, not_before_ms: int) -> Headers:  # fmt: skip
    out = _passthrough(original, keep_origin=False)
    out += _origin(original, topic, partition, offset)
    out += [
        (H_ATTEMPT, str(attempt).encode()),
        (H_NOT_BEFORE, str(not_before_ms).encode()),
        (H_RETRY_REASON, reason.encode()),
    ]
    return out
