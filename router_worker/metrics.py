"""Prometheus metrics with the contract's exact names, on a registry owned by one process (no globals)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

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
        self.consumer_lag = Gauge("router_consumer_lag", "Messages behind the highwater mark.", ["topic"],
                                  registry=r)  # fmt: skip
        self.inflight_sends = Gauge("router_inflight_sends", "Publishes awaiting broker ack.", registry=r)
        self.dead_letters = Counter("dead_letters_total", "Dead letters published, by reason.", ["reason"],
                                    registry=r)  # fmt: skip
        self.dead_letters_redriven = Counter("dead_letters_redriven_total", "Dead letters redriven to the "
                                             "request topic, by reason.", ["reason"], registry=r)  # fmt: skip
        self.retries = Counter("retries_total", "Jobs sent to a retry tier, by tier.", ["tier"], registry=r)
        self.duplicates = Counter(
            "router_duplicates_total", "Records skipped as already handled.", registry=r
        )
        self.redis_up = Gauge(
            "router_redis_available", "1 while Redis answers the router, else 0.", registry=r
        )
        self.outage_buffered = Gauge(
            "router_outage_buffered", "Writes waiting for Redis to answer.", registry=r
        )
        self.invalid_heads = Gauge("router_invalid_heads", "Heads that can not be addressed (bad partition).",
                                   registry=r)  # fmt: skip
        self.gaps_accepted = Counter("router_offset_gaps_accepted_total", "Offset gaps accepted as real.",
                                     registry=r)  # fmt: skip
        self.policy_version = Gauge("router_policy_version", "Version of the policy in force.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
