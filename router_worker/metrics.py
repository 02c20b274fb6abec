"""Prometheus metrics with the contract's exact names, on a registry owned by one process (no globals).

The router feeds them once per batch (:meth:`Metrics.observe_batch`), never per job. Consumer lag is the
fetch responses' high watermark minus the offset committed (the embedded broker's ListOffsets under-reports
the end of batched partitions, see BROKER-NOTES), one series per partition this router owns: a partition's
series goes when it is revoked, so a router never reports lag for what another one now reads.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from router_worker.pipeline.outcomes import DeadLettered, Retried, Routed


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``observe`` each value, for a whole batch at once: one increment per bucket hit and one of the sum,
    where ``observe`` takes two per value (a router observes every decision; prometheus_client has no bulk
    call, so this adds to the histogram's own bucket and sum values, as ``observe`` does)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # a prometheus_client that keeps them elsewhere
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    s = 0.0
    for v in values:
        s += v
        counts[bisect_left(bounds, v)] += 1  # the first bucket whose bound is >= v (the last is +Inf)
    total.inc(s)
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


_DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.routing_decisions = Counter(
            "routing_decisions_total",
            "Routing decisions made.",
            ["strategy", "model_type", "region"],
            registry=r,
        )
        self.head_registrations = Counter("head_registrations_total", "Head registrations.", registry=r)
        self.head_status_updates = Counter("head_status_updates_total", "Head status updates.", registry=r)
        self.active_heads = Gauge("active_heads", "Heads that are healthy and heartbeating.", registry=r)
        self.cache_hits = Counter("cache_hits_total", "Decision cache hits.", registry=r)
        self.cache_misses = Counter("cache_misses_total", "Decision cache misses.", registry=r)
        self.http_requests = Counter(
            "http_requests_total", "Admin HTTP requests.", ["method", "endpoint", "status"], registry=r
        )
        self.http_duration = Histogram("http_request_duration_seconds", "Admin HTTP latency.", registry=r)
        self.external_calls = Counter(
            "external_service_calls_total", "Calls to Kafka and Redis.", ["service", "status"], registry=r
        )
        self.queue_messages = Counter(
            "message_queue_messages_total", "Kafka messages by topic role and outcome.", ["queue", "status"],
            registry=r,
        )  # fmt: skip
        self.decision_duration = Histogram(
            "routing_decision_duration_seconds", "Time to decide one job (the pure engine).",
            buckets=_DECISION_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "router_batch_size", "Jobs per routed batch.", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )  # fmt: skip
        self.batch_duration = Histogram("router_batch_duration_seconds", "Decode, route, publish, commit.",
                                        registry=r)  # fmt: skip
        self.consumergroup_lag = Gauge(
            "kafka_consumergroup_lag", "Records behind: fetch high watermark minus the committed offset.",
            ["consumergroup", "topic", "partition"], registry=r,
        )  # fmt: skip
        self.assigned_partitions = Gauge("router_assigned_partitions", "Partitions this router consumes.",
                                         registry=r)  # fmt: skip
        self.subscribed_partitions = Gauge(
            "router_subscribed_partitions", "Partitions of the topics the router group reads (all routers' "
            "router_assigned_partitions should add up to it).", registry=r,
        )  # fmt: skip
        self.fallbacks = Counter("routing_fallbacks_total", "Jobs routed by a fallback (model or region).",
                                 ["model_type", "reason"], registry=r)  # fmt: skip
        self.inflight_sends = Gauge("router_inflight_sends", "Publishes awaiting broker ack.", registry=r)
        self.dead_letters = Counter("dead_letters_total", "Dead letters published, by reason.", ["reason"],
                                    registry=r)  # fmt: skip
        self.dead_letters_redriven = Counter("dead_letters_redriven_total", "Dead letters redriven to the "
                                             "request topic, by reason.", ["reason"], registry=r)  # fmt: skip
        self.retries = Counter("retries_total", "Jobs sent to a retry tier, by tier.", ["tier"], registry=r)
        self.waits_aside = Counter(
            "router_waits_aside_total", "Jobs that can not go now sent to wait in a retry tier instead of holding "
            "their partition (not attempts; also in retries_total), by model and reason (saturated, "
            "priority_headroom).", ["model_type", "reason"], registry=r)  # fmt: skip
        self.duplicates = Counter(
            "router_duplicates_total", "Records skipped as already handled.", registry=r
        )
        self.redis_up = Gauge(
            "router_redis_available", "1 while Redis answers the router, else 0.", registry=r
        )
        self.outage_buffered = Gauge(
            "router_outage_buffered", "Writes waiting for Redis to answer.", registry=r
        )
        self.outage_dropped = Counter(
            "router_outage_dropped_total", "Buffered writes dropped because a Redis outage outlasted "
            "ROUTER_OUTAGE_BUFFER_MAX, by kind (audit, pin, inflight, done).", ["kind"], registry=r)  # fmt: skip
        self.invalid_heads = Gauge("router_invalid_heads", "Heads that can not be addressed (bad partition).",
                                   registry=r)  # fmt: skip
        self.gaps_accepted = Counter("router_offset_gaps_accepted_total", "Offset gaps accepted as real.",
                                     registry=r)  # fmt: skip
        self.policy_version = Gauge("router_policy_version", "Version of the policy in force.", registry=r)
        self._owned: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._lag_series: set[tuple[str, str, str]] = set()

    # --- fed by the router ----------------------------------------------------------------------------------

    def observe_batch(self, group: str, consumer: Any, fetched: Iterable[TopicPartition],
                      committing: Mapping[TopicPartition, int], outcomes: Iterable[Any]) -> None:  # fmt: skip
        """One call per batch: count its settled outcomes, then the lag of the partitions it touched as of
        the offsets about to be committed."""
        t = tally(outcomes)
        for reason, n in t.dead.items():
            self.dead_letters.labels(reason).inc(n)
        for tier, n in t.retries.items():
            self.retries.labels(str(tier)).inc(n)
        for (model_type, reason), n in t.waits.items():
            self.waits_aside.labels(model_type, reason).inc(n)
        for (model_type, reason), n in t.fallbacks.items():
            self.fallbacks.labels(model_type, reason).inc(n)
        owned = consumer.assignment()  # the listener may still be reading start offsets: ask the consumer
        self.assigned_partitions.set(len(owned))
        for tp, off in committing.items():
            if tp in owned:
                self._committed[tp] = off
        for tp in {*fetched, *committing}:
            if tp in owned:
                self._set_lag(group, tp, consumer.highwater(tp))

    def partitions_assigned(self, consumer: Any, starts: Mapping[TopicPartition, int | None]) -> None:
        """After a rebalance: the partitions owned now and the offsets reading resumes from (committed). A
        batch may have committed further while the start offsets were read: its offset wins."""
        self._owned.update(starts)
        for tp, off in starts.items():
            if off is not None:
                self._committed.setdefault(tp, off)
        self.assigned_partitions.set(len(self._owned))
        subscribed = consumer.subscription() or ()
        self.subscribed_partitions.set(sum(len(consumer.partitions_for_topic(t) or ()) for t in subscribed))

    def partitions_revoked(self, group: str, revoked: Iterable[TopicPartition]) -> None:
        """Before partitions move to another router: drop their lag series (no stale numbers left behind)."""
        for tp in revoked:
            self._owned.discard(tp)
            self._committed.pop(tp, None)
            labels = (group, tp.topic, str(tp.partition))
            if labels in self._lag_series:
                self._lag_series.discard(labels)
                self.consumergroup_lag.remove(*labels)
        self.assigned_partitions.set(len(self._owned))

    def _set_lag(self, group: str, tp: TopicPartition, highwater: int | None) -> None:
        value = lag(highwater, self._committed.get(tp))
        if value is None:
            return
        labels = (group, tp.topic, str(tp.partition))
        self._lag_series.add(labels)
        self.consumergroup_lag.labels(*labels).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class BatchTally:
    """What a batch's settled outcomes add to the counters."""

    dead: Tally[str] = field(default_factory=Tally)
    retries: Tally[int] = field(default_factory=Tally)
    waits: Tally[tuple[str, str]] = field(default_factory=Tally)
    """(model_type, reason) of jobs waiting aside in a tier (counted in ``retries`` too)."""
    fallbacks: Tally[tuple[str, str]] = field(default_factory=Tally)


def tally(outcomes: Iterable[Any]) -> BatchTally:
    """Dead letters by reason, retries by tier and fallbacks by (model_type, reason) among the settled
    outcomes (``final``); what was not acknowledged is read again and counted then."""
    t = BatchTally()
    for o in outcomes:
        if not o.final:
            continue
        if isinstance(o, Routed):
            if o.fallback is not None:
                job = o.src.job
                t.fallbacks[(job.model_type if job else "", o.fallback)] += 1
        elif isinstance(o, Retried):
            t.retries[o.tier] += 1
            if o.wait is not None:
                job = o.src.job
                t.waits[(job.model_type if job else "", o.wait)] += 1
        elif isinstance(o, DeadLettered):
            t.dead[o.reason.value] += 1
    return t


def lag(highwater: int | None, committed: int | None) -> int | None:
    """Records behind (never negative); None while either end is unknown."""
    if highwater is None or committed is None:
        return None
    return max(0, highwater - committed)
