"""The plan of a batch: every admitted record's outcome, decided without I/O.

``plan(parts, claims, ...)`` walks each partition in offset order and gives each record exactly one
outcome (routed, retried, dead-lettered, duplicate) or cuts the partition with a hold (back-pressure, a
claim another record holds). It updates the router's memory as decisions are made (round-robin turns,
pending loads, pins), the one piece of state the engine reads back. Property tests check that every
record gets one outcome and that commit offsets never pass an unsettled record.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from router_worker.audit import decision_record, fallback_kind
from router_worker.core.admission import retry_tier_for
from router_worker.core.engine import HeadIndex, decide, record
from router_worker.core.model import Decision, Outcome, RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.fault_headers import (
    HEADROOM_REASON,
    SATURATED_REASON,
    THROTTLE_HEADERS,
    THROTTLE_REASON,
    excluded_heads,
    refusals,
    throttle_headers,
    with_refusals,
    without,
)
from router_worker.pipeline.intake import Parts
from router_worker.pipeline.messages import ROUTED_HEADERS_MAX, decided_at, retry_headers, routed_headers
from router_worker.pipeline.outcomes import DeadLettered, Duplicate, Hold, Incoming, Plan, Retried, Routed
from router_worker.pipeline.publish import Send, dead_letter_record
from router_worker.topics import Topics
from schemas.envelope import DeadLetterReason, Job

PUBLISH_FALLBACK = "publish_error"
"""The ``routing_fallbacks_total`` reason of a job moved to another head because its head's publish failed."""


_NO_HEADS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Admission:
    """A job's admission verdict: it may go at ``admit_at`` (epoch ms; its token is reserved), after ``trips``
    waits in the retry tiers so far."""

    admit_at: int
    trips: int = 0


class Claim(IntEnum):
    """What the claim step found for a record's idempotency key."""

    MINE = 0
    """Claimed by this record now (or claimed earlier by this same record, read again): handle it."""
    DONE = 1
    """Handled before: a duplicate."""
    BUSY = 2
    """Claimed by another record (the same job id sent twice) still in progress: wait for it."""


@dataclass(frozen=True, slots=True)
class PlanConfig:
    router_id: str
    topics: Topics
    max_attempts: int
    retry_backoff_ms: tuple[int, ...]
    max_message_bytes: int
    dlq_keep_bytes: int = 4096
    audit_decisions: bool = True
    backpressure_ms: int = 5
    claim_wait_ms: int = 200
    max_refusals: int = 50
    """Busy refusals a job may meet (``x-route-refusals``; they are not attempts) before it is dead-lettered as
    ``no_capacity`` (``ROUTER_MAX_REFUSALS``)."""


@dataclass(slots=True)
class Stats:
    decision_seconds: list[float] = field(default_factory=list)
    saturated: int = 0
    """Partitions held because a job had no head free (none under its load limit, or all behind open breakers)."""
    waited_aside: int = 0
    """Jobs with no head free sent to wait in a retry tier instead of holding their partition: a job behind them
    could go, or a higher-priority job would (``priority_headroom``)."""
    busy: int = 0


def dead_letter(inc: Incoming, reason: DeadLetterReason, detail: str, cfg: PlanConfig, now: int,
                force_truncate: bool = False) -> DeadLettered:  # fmt: skip
    """A dead letter for ``inc``: the original record, or a squeezed copy when it can not be published as it
    is (see :func:`publish.dead_letter_record`), with the reason and the origin."""
    tp = inc.tp
    value, key, headers = dead_letter_record(inc.value, inc.key, inc.headers, reason.value, detail, tp.topic,
                                             tp.partition, inc.offset, inc.attempt, limit=cfg.max_message_bytes,
                                             keep=cfg.dlq_keep_bytes, squeeze=force_truncate)  # fmt: skip
    job = inc.job
    audit: dict[str, Any] = {
        "ts": now, "event": "dead_letter", "router_id": cfg.router_id, "reason": reason.value,
        "detail": detail, "attempt": inc.attempt, "topic": tp.topic, "partition": tp.partition,
        "offset": inc.offset,
    }  # fmt: skip
    if job is not None:
        audit["job_id"] = job.job_id
        audit["model_type"] = job.model_type
        if job.tenant:
            audit["tenant"] = job.tenant
    if value is not inc.value:
        audit["truncated"] = len(inc.value or b"")
    return DeadLettered(inc, Send(cfg.topics.dlq, value, key, None, headers), audit, reason=reason,
                        detail=detail)  # fmt: skip


def _counted(attempt: int, refused: int) -> str:
    return f"{attempt - refused} attempts and {refused} busy refusals" if refused else f"{attempt} attempts"


def _retry_or_dead(inc: Incoming, job: Job, d: Decision, cfg: PlanConfig, now: int,
                   refused: int) -> Retried | DeadLettered:  # fmt: skip
    reason = DeadLetterReason(d.outcome.value)
    attempt = inc.attempt
    if attempt - refused >= cfg.max_attempts:  # busy refusals were waits, not attempts
        return dead_letter(inc, reason, f"{d.reason} (after {_counted(attempt, refused)})", cfg, now)
    backoff = cfg.retry_backoff_ms
    tier = min(attempt, len(backoff))
    not_before = now + backoff[tier - 1]
    tp = inc.tp
    headers = retry_headers(
        inc.headers, reason.value, tp.topic, tp.partition, inc.offset, attempt, not_before
    )
    if inc.headers and any(k in THROTTLE_HEADERS for k, _ in inc.headers):
        # Its admission wait (or a producer's forged one) is over: read back, it is a retry (the next attempt),
        # not a return from a wait (which would restore this attempt and meet this trip's own done mark).
        headers = without(headers, THROTTLE_HEADERS)
    headers = with_refusals(headers, refused)
    audit = {"ts": now, "event": "retry", "router_id": cfg.router_id, "job_id": job.job_id,
             "model_type": job.model_type, "strategy": d.strategy, "reason": d.reason, "attempt": attempt,
             "tier": tier, "not_before": not_before}  # fmt: skip
    if job.tenant:
        audit["tenant"] = job.tenant
    send = Send(cfg.topics.retry(tier), inc.value, inc.key, None, headers)
    return Retried(inc, send, audit, tier=tier)


def _throttle(inc: Incoming, job: Job, verdict: Admission, cfg: PlanConfig, now: int,
              sampled: dict[tuple[str, str], dict[str, Any]]) -> Retried:  # fmt: skip
    """A job over its admission limit waits in a retry tier until its reserved token is there (at most the
    longest back-off per trip: a retry tier honours no longer wait). Never a dead letter, never an attempt."""
    backoff = cfg.retry_backoff_ms
    not_before = min(verdict.admit_at, now + max(backoff))
    tier = retry_tier_for(not_before - now, backoff)
    tp = inc.tp
    headers = retry_headers(
        inc.headers, THROTTLE_REASON, tp.topic, tp.partition, inc.offset, inc.attempt, not_before
    )
    send = Send(cfg.topics.retry(tier), inc.value, inc.key, None,
                throttle_headers(headers, verdict.admit_at, verdict.trips + 1))  # fmt: skip
    audit = None
    if verdict.trips == 0:  # sampled: one record per tenant and model per batch, with the count
        group = (job.tenant or "", job.model_type)
        rec = sampled.get(group)
        if rec is None:
            audit = sampled[group] = {
                "ts": now, "event": "throttled", "router_id": cfg.router_id, "tenant": job.tenant,
                "model_type": job.model_type, "job_id": job.job_id, "count": 1, "admit_at": verdict.admit_at,
                "reason": f"over the admission limit; token reserved for {verdict.admit_at}",
            }  # fmt: skip
        else:
            rec["count"] += 1
            rec["admit_at"] = max(rec["admit_at"], verdict.admit_at)
    return Retried(inc, send, audit, tier=tier)


def _held_for_headroom(job: Job, policy: Policy, index: HeadIndex, memory: RouterMemory, now: int,
                       rng: random.Random, attempt: int, avoid: frozenset[str]) -> bool:  # fmt: skip
    """Whether a saturated job is held only by ``priority_headroom``: a job of higher priority would be routed
    now (its heads are between its lower load limit and ``max_load_threshold``)."""
    if policy.load_limit(job.priority) >= policy.max_load_threshold:
        return False
    higher = job.model_copy(update={"priority": 1})
    return decide(higher, index, policy, memory, now, rng, attempt, avoid=avoid).routed


def _wait_aside(inc: Incoming, job: Job, d: Decision, verdict: Admission | None, cfg: PlanConfig, now: int,
                reason: str, why: str) -> Retried:  # fmt: skip
    """A job that can not go now waits in a retry tier (growing back-off per trip) instead of holding its
    partition, so the jobs behind it go. A wait, not an attempt: it goes as a return from an admission wait (its
    attempt kept, its claim keyed by the trip), its admission done. ``reason``: the ``x-retry-reason``;
    ``why``: the audit record's reason."""
    trips = (verdict.trips if verdict is not None else 0) + 1
    backoff = cfg.retry_backoff_ms
    tier = min(trips, len(backoff))
    not_before = now + backoff[tier - 1]
    tp = inc.tp
    headers = retry_headers(inc.headers, reason, tp.topic, tp.partition, inc.offset, inc.attempt, not_before)
    admitted = verdict.admit_at if verdict is not None else now
    send = Send(cfg.topics.retry(tier), inc.value, inc.key, None, throttle_headers(headers, admitted, trips))
    audit = {"ts": now, "event": "retry", "router_id": cfg.router_id, "job_id": job.job_id,
             "model_type": job.model_type, "strategy": d.strategy, "attempt": inc.attempt, "tier": tier,
             "not_before": not_before, "reason": why}  # fmt: skip
    if job.tenant:
        audit["tenant"] = job.tenant
    return Retried(inc, send, audit, tier=tier, wait=reason)


def _headroom_wait(inc: Incoming, job: Job, d: Decision, verdict: Admission | None, cfg: PlanConfig,
                   now: int) -> Retried:  # fmt: skip
    """A low-priority job held back by ``priority_headroom`` waits aside (the higher-priority jobs behind it go)."""
    why = f"{HEADROOM_REASON}: {d.reason} for priority {job.priority}"
    return _wait_aside(inc, job, d, verdict, cfg, now, HEADROOM_REASON, why)


@dataclass(slots=True)
class _Behind:
    """Whether a saturated job's partition has a job behind it that the plan would route now (of another model,
    or of its own with other needs: a region, criteria, a priority): only then does the job wait aside (in a
    retry tier) rather than hold the partition. When nothing behind can go (every model saturated: the overload
    back-pressure is for), the hold costs nothing and keeps the order; a wait aside would only churn through the
    retry tiers.

    A job behind is asked through the plan's own gates (a duplicate, a job another record holds, over its
    attempts or refusals, expired, waiting for its admission token: none goes), then with a decision that
    records nothing. A "no" stays a "no" for the rest of the plan (loads only rise within it), so each record
    is decided at most once with that answer: a batch costs at most one extra decision per record, plus one per
    saturated job."""

    index: HeadIndex
    policy: Policy
    memory: RouterMemory
    heads_now: int
    rng: random.Random
    claims: Mapping[str, Claim]
    in_batch: set[str]
    owner: Mapping[str, Incoming]
    admission: Mapping[str, Admission] | None
    cfg: PlanConfig
    now: int
    stuck: set[int] = field(default_factory=set)
    """``id()`` of the records found unable to go in this plan: not asked again."""

    def can_go(self, items: list[Incoming], i: int) -> bool:
        for later in items[i + 1 :]:  # the plan loop's order of gates, up to its decision
            if id(later) in self.stuck:
                continue
            key = later.claim_key
            claim = self.claims.get(key, Claim.MINE)
            if claim is Claim.DONE or key in self.in_batch:
                continue  # a duplicate: settled, not routed
            if claim is Claim.BUSY or self.owner.get(key) is not later:
                return False  # another record holds its key (the saturated job, maybe): the plan stops there
            job = later.job
            if job is None or not self._admitted(later, job):
                self.stuck.add(id(later))
                continue
            avoid = excluded_heads(later.headers) if later.marked else _NO_HEADS
            d = decide(job, self.index, self.policy, self.memory, self.heads_now, self.rng, later.attempt,
                       avoid=avoid)  # fmt: skip
            if d.routed:
                return True
            self.stuck.add(id(later))
        return False

    def _admitted(self, inc: Incoming, job: Job) -> bool:
        """Whether the plan's gates after the claim let ``inc`` on to a decision (see :func:`plan`): not over its
        refusals or attempts, not expired, not waiting for its admission token."""
        refused = refusals(inc.headers, inc.attempt) if inc.marked else 0
        if refused > self.cfg.max_refusals or inc.attempt - refused > self.cfg.max_attempts:
            return False
        if job.deadline_ms is not None and job.deadline_ms < self.now:
            return False
        verdict = self.admission.get(inc.claim_key) if self.admission else None
        return verdict is None or verdict.admit_at <= self.now


def _routed(inc: Incoming, job: Job, d: Decision, memory: RouterMemory, policy: Policy, cfg: PlanConfig,
            now: int, refused: int | None = None, stamp: tuple[str, bytes] | None = None) -> Routed:  # fmt: skip
    """``refused``: the job's busy refusals as the plan counted them (None: count them here). ``stamp``: the
    batch's ``x-route-decided-at`` header (:func:`decided_at` of ``now``)."""
    head = d.head
    assert head is not None
    new_pin = d.sticky is not None and d.sticky[0] not in memory.affinity
    probe = bool(memory.probes) and head.head_id in memory.probes
    record(d, memory, job, policy, now)
    marked = inc.marked
    headers = routed_headers(inc.headers, job.job_id, d, inc.content_type, now, plain=not marked, stamp=stamp)
    if marked:
        if any(k in THROTTLE_HEADERS for k, _ in inc.headers):  # its wait is over: not the head's
            headers = without(headers, THROTTLE_HEADERS)
        # The count as the router took it (bounded by the trips made): the head adds its own refusal to it.
        headers = with_refusals(headers, refusals(inc.headers, inc.attempt) if refused is None else refused)
    # The record's own headers less the router's, plus the router's: within what was read, plus what they add.
    size = inc.size + ROUTED_HEADERS_MAX + 4 * len(head.head_id) if inc.size >= 0 else -1
    send = Send(cfg.topics.model(head.model_id), inc.value, inc.key, head.partition, headers, size=size)
    audit = (
        decision_record(d, cfg.router_id, job.job_id, job.model_type, job.region, now, job.tenant)
        if cfg.audit_decisions
        else None
    )
    # Positional (src, send, audit, final, head_id, region, strategy, pin, new_pin, fallback, probe): once per
    # routed job, keywords cost a third more.
    return Routed(inc, send, audit, False, head.head_id, head.region, d.strategy, d.sticky, new_pin,
                  fallback_kind(d) if d.fallback else None, probe)  # fmt: skip


def reroute(o: Routed, failed: frozenset[str], why: str, index: HeadIndex, policy: Policy, memory: RouterMemory,
            now: int, rng: random.Random, cfg: PlanConfig) -> bool:  # fmt: skip
    """Move a routed job whose publish to its head kept failing to the next candidate (then the policy's fallback
    models), passing over ``failed`` and the heads its headers exclude. The outcome is changed in place (its
    send too, so a caller's references stay valid); False when no other head can take it."""
    inc = o.src
    job = inc.job
    if job is None:
        return False
    avoid = failed | excluded_heads(inc.headers)
    d = decide(job, index, policy, memory, now, rng, inc.attempt, avoid=avoid)
    if not d.routed or d.head is None or d.head.head_id in avoid:
        return False
    d.fallback = True
    d.reason = f"{why}; {d.reason}"
    new = _routed(inc, job, d, memory, policy, cfg, now)
    if new.audit is not None:
        new.audit["fallback_reason"] = PUBLISH_FALLBACK
    assert o.send is not None
    assert new.send is not None
    o.send.topic, o.send.partition, o.send.headers, o.send.error = (new.send.topic, new.send.partition,
                                                                    new.send.headers, None)  # fmt: skip
    o.send.size = new.send.size
    o.audit, o.head_id, o.region, o.strategy = new.audit, new.head_id, new.region, new.strategy
    o.pin, o.new_pin, o.fallback, o.probe = new.pin, new.new_pin, PUBLISH_FALLBACK, new.probe
    return True


def plan(parts: Parts, claims: Mapping[str, Claim], index: HeadIndex, policy: Policy, memory: RouterMemory,
         now: int, heads_now: int, rng: random.Random, cfg: PlanConfig, stats: Stats,
         admission: Mapping[str, Admission] | None = None) -> Plan:  # fmt: skip
    """Every record's outcome. ``heads_now`` is the clock heads' heartbeats are judged by (``now``, or the
    time of the last snapshot while Redis is unreachable, so heads do not expire for want of news).
    ``admission``: claim key -> verdict for the jobs an admission limit applies to; a job whose token is not
    there yet waits in a retry tier (see :func:`_throttle`)."""
    out = Plan()
    sampled: dict[tuple[str, str], dict[str, Any]] = {}
    outcomes = out.outcomes
    in_batch: set[str] = set()
    timings = stats.decision_seconds
    owner: dict[str, Incoming] = {}  # a key's first record in the batch: the one the claim was made for
    behind: _Behind | None = None  # made when a saturated job first asks whether a job behind it can go
    stamp = decided_at(now)
    for _, items in parts:
        for inc in items:
            owner.setdefault(inc.claim_key, inc)
    for tp, items in parts:
        end: int | None = None
        for i, inc in enumerate(items):
            end = inc.offset + 1
            key = inc.claim_key
            claim = claims.get(key, Claim.MINE)
            if claim is Claim.DONE or key in in_batch:
                outcomes.append(Duplicate(inc, final=True))
                continue
            if claim is Claim.BUSY or owner[key] is not inc:  # another record holds it (maybe in this batch)
                out.holds.append(Hold(tp, inc.offset, now + cfg.claim_wait_ms, "claimed_elsewhere"))
                stats.busy += 1
                end = inc.offset
                break
            job = inc.job
            if job is None:
                err = inc.error
                assert err is not None
                outcomes.append(dead_letter(inc, err.reason, err.detail, cfg, now))
                in_batch.add(key)
                continue
            refused = refusals(inc.headers, inc.attempt) if inc.marked else 0
            if refused > cfg.max_refusals:
                detail = (f"refused as busy {refused} times by its heads (max_refusals {cfg.max_refusals}): no "
                          f"head had room for it")  # fmt: skip
                outcomes.append(dead_letter(inc, DeadLetterReason.NO_CAPACITY, detail, cfg, now))
                in_batch.add(key)
                continue
            if inc.attempt - refused > cfg.max_attempts:
                detail = f"attempt {inc.attempt - refused} exceeds max_attempts {cfg.max_attempts}"
                if refused:
                    detail += f" (not counting {refused} busy refusals)"
                outcomes.append(dead_letter(inc, DeadLetterReason.MAX_ATTEMPTS, detail, cfg, now))
                in_batch.add(key)
                continue
            if job.deadline_ms is not None and job.deadline_ms < now:
                detail = f"deadline {job.deadline_ms} passed {now - job.deadline_ms} ms before routing"
                outcomes.append(dead_letter(inc, DeadLetterReason.EXPIRED, detail, cfg, now))
                in_batch.add(key)
                continue
            verdict = admission.get(key) if admission else None
            if verdict is not None and verdict.admit_at > now:
                outcomes.append(_throttle(inc, job, verdict, cfg, now, sampled))
                in_batch.add(key)
                continue
            avoid = excluded_heads(inc.headers) if inc.marked else _NO_HEADS
            t0 = time.perf_counter_ns()
            d = decide(job, index, policy, memory, heads_now, rng, inc.attempt, avoid=avoid)
            timings.append((time.perf_counter_ns() - t0) / 1e9)
            if d.outcome is Outcome.SATURATED:
                if _held_for_headroom(job, policy, index, memory, heads_now, rng, inc.attempt, avoid):
                    # Always aside, whatever the fetch shows behind it: a higher-priority job further back must
                    # never wait behind a run of lower-priority ones.
                    outcomes.append(_headroom_wait(inc, job, d, verdict, cfg, now))
                    in_batch.add(key)
                    stats.waited_aside += 1
                    continue
                if behind is None:
                    behind = _Behind(index, policy, memory, heads_now, rng, claims, in_batch, owner, admission,
                                     cfg, now)  # fmt: skip
                if behind.can_go(items, i):  # a job that can not go must not stall one behind it that can
                    why = f"{SATURATED_REASON}: {d.reason}; a job behind it can go"
                    outcomes.append(_wait_aside(inc, job, d, verdict, cfg, now, SATURATED_REASON, why))
                    in_batch.add(key)
                    stats.waited_aside += 1
                    continue
                # back-pressure: nothing behind it can go either: leave it and the rest of the partition in Kafka
                out.holds.append(Hold(tp, inc.offset, now + cfg.backpressure_ms, "saturated"))
                stats.saturated += 1
                end = inc.offset
                break
            in_batch.add(key)
            if d.outcome is Outcome.ROUTED:
                outcomes.append(_routed(inc, job, d, memory, policy, cfg, now, refused, stamp))
            elif d.outcome is Outcome.REFUSED:
                outcomes.append(dead_letter(inc, DeadLetterReason.SCHEMA_ERROR, d.reason, cfg, now))
            else:
                outcomes.append(_retry_or_dead(inc, job, d, cfg, now, refused))
        if end is not None:
            out.next_offset[tp] = end
    return out
