"""What a record read by the router becomes: plain data, no I/O.

Every record the router reads ends in exactly one place. The plan gives each admitted record one outcome:

| outcome | publishes | then |
|---|---|---|
| :class:`Routed` | the original bytes to the head's model-topic partition | marked done, audited, counted |
| :class:`Retried` | the original bytes to a retry tier, with the attempt and not-before | marked done |
| :class:`DeadLettered` | the original bytes (truncated if too large) to the DLQ, with the reason | marked done |
| :class:`Duplicate` | nothing: the same job id and attempt was already handled | committed |

A record that can not be handled yet is *held*: its partition is paused at it and read again later
(back-pressure, a retry not due, a claim another router holds, a missing offset). Held records are not
outcomes: nothing after them in their partition is planned, and the commit stops before them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from router_worker.pipeline.messages import Headers
from router_worker.pipeline.publish import Send
from schemas.envelope import DeadLetterReason, EnvelopeError, Job


@dataclass(slots=True)
class Incoming:
    """One admitted record, decoded: the job or the error that says why it is not one."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    content_type: str
    attempt: int
    job: Job | None
    error: EnvelopeError | None
    claim_key: str
    """The idempotency key this record is claimed and marked under (see :func:`claim_key_of`)."""
    marked: bool = True
    """Whether its headers may hold the router's own (``x-...``): False for a producer's plain record (at most
    a ``content-type``), whose headers the plan then never searches."""
    size: int = -1
    """Its value, key and headers, in bytes, as read (-1: not measured)."""


H_REDRIVE = "x-redrive"
"""The contract's header on a redriven dead letter: the redrive's id."""
REDRIVE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What a redrive id may hold: never a '|', so a key's fields stay unambiguous."""


def redrive_of(headers: Headers | None) -> str | None:
    """The record's redrive id (``x-redrive``), or None when absent or not a valid id (then the record is
    keyed as any other: a header written by hand can not open a new idempotency namespace at will)."""
    for k, v in headers or ():
        if k == H_REDRIVE:
            if v is None or len(v) > 64:
                return None
            text = v.decode("ascii", errors="replace")
            return text if REDRIVE_ID.fullmatch(text) else None
    return None


def claim_key_of(job: Job | None, attempt: int, tp: TopicPartition, offset: int, redrive: str | None = None
                 ) -> str:  # fmt: skip
    """What "handled once" means: once per job id and attempt (a nacked or retried job is handled again
    as its next attempt; a replay of one attempt is a duplicate). A record that is not a job has no id:
    it is handled once per coordinates, so its dead letter is written once even when the batch replays.
    A redriven job (``x-redrive``, kept through its retries) is keyed within its redrive, so it routes
    afresh instead of colliding with the done mark of its dead-lettered attempt."""
    if job is None:
        return f"r|{tp.topic}|{tp.partition}|{offset}"
    # The attempt (digits, no '|') comes first and the id is the whole rest: no two (job id, attempt) pairs,
    # whatever the ids hold, share a key, and no job key is a record key ("j|" and "r|" namespaces).
    if redrive is not None:  # "jr|" namespace; the redrive id holds no '|' (REDRIVE_ID)
        return f"jr|{redrive}|{attempt}|{job.job_id}"
    return f"j|{attempt}|{job.job_id}"


@dataclass(slots=True)
class Hold:
    """Stop reading ``tp`` at ``offset`` until ``until_ms``; the record is read again then."""

    tp: TopicPartition
    offset: int
    until_ms: int
    why: str  # saturated | not_due | claimed_elsewhere | gap | publish_unsent | redis_unavailable


@dataclass(slots=True)
class _Outcome:
    src: Incoming
    send: Send | None = None
    audit: dict[str, Any] | None = None
    final: bool = False
    """Set once the outcome is settled: its publish acknowledged (or nothing to publish)."""


@dataclass(slots=True)
class Routed(_Outcome):
    head_id: str = ""
    region: str = ""
    strategy: str = ""
    pin: tuple[str, str] | None = None
    """(session, head) when the decision pinned a session."""
    new_pin: bool = False
    """The session had no pin: written only if still absent, so of two routers racing the first wins."""
    fallback: str | None = None
    """Why the decision fell back (``model_fallback``, ``region_fallback``; see ``audit.fallback_kind``)."""
    probe: bool = False
    """The decision spent one of this router's half-open probes on the head: given back if it is never sent."""


@dataclass(slots=True)
class Retried(_Outcome):
    tier: int = 1
    wait: str | None = None
    """Why a job that is not failing waits in a tier (``saturated``, ``priority_headroom``); None: a retry."""


@dataclass(slots=True)
class DeadLettered(_Outcome):
    reason: DeadLetterReason = DeadLetterReason.SCHEMA_ERROR
    detail: str = ""


@dataclass(slots=True)
class Duplicate(_Outcome):
    pass


Outcome = Routed | Retried | DeadLettered | Duplicate


@dataclass(slots=True)
class Plan:
    """Every admitted record's outcome in offset order per partition, the holds, and how far each
    partition may be committed once every outcome before that point is final."""

    outcomes: list[Outcome] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    next_offset: dict[TopicPartition, int] = field(default_factory=dict)
    """Per partition: the offset after the last planned record (or the held one)."""

    def sends(self) -> list[Send]:
        return [o.send for o in self.outcomes if o.send is not None]


def commit_offsets(plan: Plan) -> dict[TopicPartition, int]:
    """The offset each partition may commit: its first unsettled record's, else the planned end."""
    out = dict(plan.next_offset)
    first_open: dict[TopicPartition, int] = {}
    for o in plan.outcomes:
        if not o.final:
            tp = o.src.tp
            if tp not in first_open or o.src.offset < first_open[tp]:
                first_open[tp] = o.src.offset
    out.update(first_open)
    return out
