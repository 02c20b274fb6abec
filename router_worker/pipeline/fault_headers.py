"""Headers of fault handling (pure): heads a job must avoid, and the reservation a throttled job carries.

- ``x-route-exclude``: a JSON list of the heads that refused or failed this job (a head's nack adds itself); the
  router passes them over on the next attempt while another head can take it.
- ``x-admit-at`` and ``x-throttle-n``: a job over its admission limit waits in a retry tier with its token
  reserved for ``x-admit-at`` (epoch ms); ``x-throttle-n`` counts its trips. A wait is not an attempt: the
  router keeps the job's attempt and keys its idempotency claim by the trip (:func:`throttle_claim_key`).
- ``x-route-refusals``: how many of a job's trips were ``busy`` refusals (a head's ``JobRefused("busy")``): a
  wait, not a failure. Each still is an attempt (a new attempt number, so idempotency keys stay unique per
  trip), but the router's ``max_attempts`` check does not count them; ``max_refusals`` bounds them instead.
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
HEADROOM_REASON = "priority_headroom"
"""The retry reason of a low-priority job waiting for ``priority_headroom`` (a wait like a throttle: no attempt)."""
SATURATED_REASON = "saturated"
"""The retry reason of a job with no head free (every one at its load threshold, or behind an open breaker) while
a job behind it in its partition could go: it waits aside, as a wait (no attempt), instead of holding that job."""
H_REFUSALS = "x-route-refusals"
BUSY = "busy"
"""The refusal reason that is a wait (the head has no room now), not a failure."""


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


def refusal_count(headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """The ``x-route-refusals`` a record carries as written (0 when absent or bad)."""
    raw = header(headers, H_REFUSALS)
    if raw is None or len(raw) > 9 or not raw.isdigit():
        return 0
    return int(raw)


def refusals(headers: Sequence[tuple[str, bytes | None]] | None, attempt: int) -> int:
    """How many of a job's trips so far were busy refusals, as the router counts them: never more than the trips
    it made (``attempt - 1``: every refusal is a trip), so a forged or stale header can not hide attempts."""
    return min(refusal_count(headers), max(0, attempt - 1))


def with_refusals(headers: Sequence[tuple[str, bytes | None]] | None, n: int) -> Headers:
    """``headers`` with ``x-route-refusals`` set to ``n`` (removed when 0)."""
    out = [(k, v) for k, v in (headers or ()) if k != H_REFUSALS]
    if n > 0:
        out.append((H_REFUSALS, str(n).encode()))
    return out
