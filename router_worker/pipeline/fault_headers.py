"""Headers of fault handling (pure): heads a job must avoid, and the reservation a throttled job carries.

- ``x-route-exclude``: a JSON list of the heads that refused or failed this job (a head's nack adds itself); the
  router passes them over on the next attempt while another head can take it.
- ``x-admit-at`` and ``x-throttle-n``: a job over its admission limit waits in a retry tier with its token
  reserved for ``x-admit-at`` (epoch ms); ``x-throttle-n`` counts its trips. A wait is not an attempt: the
  router keeps the job's attempt and keys its idempotency claim by the trip (:func:`throttle_claim_key`).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from router_worker.pipeline.messages import Headers, header

H_EXCLUDE = "x-route-exclude"
H_ADMIT_AT = "x-admit-at"
H_THROTTLE_N = "x-throttle-n"
THROTTLE_HEADERS = frozenset({H_ADMIT_AT, H_THROTTLE_N})
MAX_EXCLUDED = 16
"""At most this many heads are remembered per job (the most recent)."""
THROTTLE_REASON = "throttled"


def excluded_heads(headers: Sequence[tuple[str, bytes | None]] | None) -> frozenset[str]:
    """The heads a job's headers say to avoid (none when the header is absent or not a JSON list of strings)."""
    raw = header(headers, H_EXCLUDE)
    if not raw:
        return frozenset()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return frozenset()
    if not isinstance(value, list):
        return frozenset()
    return frozenset(v for v in value[-MAX_EXCLUDED:] if isinstance(v, str) and v)


def with_excluded(headers: Sequence[tuple[str, bytes | None]] | None, head_id: str) -> Headers:
    """``headers`` with ``head_id`` added to the heads to avoid (kept once, most recent last, bounded)."""
    raw = header(headers, H_EXCLUDE)
    current: list[str] = []
    if raw:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = []
        if isinstance(value, list):
            current = [v for v in value if isinstance(v, str) and v and v != head_id]
    current = [*current, head_id][-MAX_EXCLUDED:]
    out = [(k, v) for k, v in (headers or ()) if k != H_EXCLUDE]
    out.append((H_EXCLUDE, orjson.dumps(current)))
    return out


def without(headers: Sequence[tuple[str, bytes | None]] | None, names: frozenset[str]) -> Headers:
    return [(k, v) for k, v in (headers or ()) if k not in names]


def throttle_trips(headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """How many times a job already waited for its admission token (0: never; a bad value counts as none)."""
    raw = header(headers, H_THROTTLE_N)
    if raw is None or len(raw) > 6 or not raw.isdigit():
        return 0
    return int(raw)


def admit_at(headers: Sequence[tuple[str, bytes | None]] | None) -> int | None:
    """The time a throttled job's token was reserved for (None when absent or bad)."""
    raw = header(headers, H_ADMIT_AT)
    if raw is None or len(raw) > 16 or not raw.isdigit():
        return None
    return int(raw)


def throttle_claim_key(job_id: str, attempt: int, trips: int, redrive: str | None = None) -> str:
    """The idempotency key of a job's ``trips``-th return from an admission wait: its own per trip (the earlier
    trips are marked done), never equal to a plain ``j|<attempt>|<id>`` key (no ``|`` inside the attempt part).
    A redriven job's trips are keyed within its redrive (``jr|<redrive>|...``), as its attempts are, so they do
    not meet the done marks of the trips its dead-lettered run made."""
    if redrive is not None:
        return f"jr|{redrive}|{attempt}t{trips}|{job_id}"
    return f"j|{attempt}t{trips}|{job_id}"


def throttle_headers(retry: Headers, admit_at_ms: int, trips: int) -> Headers:
    """A throttled job's retry headers plus its reservation."""
    out = without(retry, THROTTLE_HEADERS)
    out += [(H_ADMIT_AT, str(admit_at_ms).encode()), (H_THROTTLE_N, str(trips).encode())]
    return out
