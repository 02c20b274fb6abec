"""Plain data the routing core works on: head snapshots, scores, decisions. No I/O, no clocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class HeadStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class Head:
    """A snapshot of one head (a running replica of a model) as the router last saw it."""

    head_id: str
    model_id: str
    region: str = "default"
    partition: int = 0
    status: HeadStatus = HeadStatus.HEALTHY
    capacity: int = 8
    expires_at_ms: int = 0
    """Heartbeat deadline: past it the head is not a candidate."""
    reported_inflight: int = 0
    """Jobs the head itself reports as being served."""
    cache_hit_rate: float = 0.0
    quota_used: float = 0.0
    """Fraction of the head's quota used, 0..1."""
    latency_ms: float = 0.0
    """Smoothed service latency the head reports (0: unknown)."""
    weight: float = 1.0
    families: frozenset[str] = frozenset()
    """Other names this head answers to (``chat``, a model family)."""
    backend: str = "cpu"
    quantizations: frozenset[str] = frozenset()
    max_context: int = 0
    dynamic_shapes: bool = False
    param_count: int = 0
    tags: frozenset[str] = frozenset()
    power_w: float = 0.0

    def serves(self, model_type: str) -> bool:
        return self.model_id == model_type or model_type in self.families


def _r4(x: float) -> float:
    """``x`` to four decimals, as ``round(x, 4)`` (but for exact ties) at a quarter of its cost: rounding to an
    integer is a fast path, and n / 1e4 prints as the shortest decimal that reads back the same. Values too
    large for that (or not finite) are returned as they are."""
    return round(x * 1e4) / 1e4 if -1e12 < x < 1e12 else x


@dataclass(slots=True)
class Scores:
    """Component scores of a pick, each in 0..1 where higher is better; ``total`` is the strategy's own.

    Not frozen only because frozen dataclasses cost a microsecond per construction on the hot path:
    treat it as immutable."""

    load: float = 0.0
    cache: float = 0.0
    quota: float = 0.0
    health: float = 0.0
    latency: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        load, cache, quota, health, latency, total = (self.load, self.cache, self.quota, self.health,
                                                      self.latency, self.total)  # fmt: skip
        if (-1e12 < load < 1e12 and -1e12 < cache < 1e12 and -1e12 < quota < 1e12 and -1e12 < health < 1e12
                and -1e12 < latency < 1e12 and -1e12 < total < 1e12):  # fmt: skip
            # _r4 written out: once per audited decision, six calls cost more than the rounding
            return {"load": round(load * 1e4) / 1e4, "cache": round(cache * 1e4) / 1e4,
                    "quota": round(quota * 1e4) / 1e4, "health": round(health * 1e4) / 1e4,
                    "latency": round(latency * 1e4) / 1e4, "total": round(total * 1e4) / 1e4}  # fmt: skip
        return {"load": _r4(load), "cache": _r4(cache), "quota": _r4(quota), "health": _r4(health),
                "latency": _r4(latency), "total": _r4(total)}  # fmt: skip


class Outcome(StrEnum):
    ROUTED = "routed"
    UNKNOWN_MODEL = "unknown_model"
    NO_CAPACITY = "no_capacity"
    SATURATED = "saturated"
    """Healthy heads exist but every one is at its load threshold: hold the job in Kafka (back-pressure)."""
    REFUSED = "refused"
    """The job asked for something the policy forbids or the router does not know (strategy name)."""


@dataclass(slots=True)
class Decision:
    """The receipt of one routing decision: what was picked and why (treat as immutable; see Scores)."""

    outcome: Outcome
    strategy: str
    reason: str
    head: Head | None = None
    model_id: str | None = None
    scores: Scores = field(default_factory=Scores)
    attempt: int = 1
    fallback: bool = False
    excluded: tuple[tuple[str, str], ...] = ()
    """(head id, why) for each head filtered out; filled only when explaining."""
    sticky: tuple[str, str] | None = None
    """(key, head id) the router should remember: a session or prefix pin made by this decision."""

    @property
    def routed(self) -> bool:
        return self.outcome is Outcome.ROUTED


@dataclass(slots=True)
class Pick:
    """What a strategy returns: the chosen head among the candidates, with its scores and reason."""

    head: Head
    scores: Scores
    reason: str
    sticky: tuple[str, str] | None = None


@dataclass(slots=True)
class RouterMemory:
    """Per-router mutable state the engine reads and the shell persists: counters, pins, pending loads.

    Kept apart from the strategies so they stay pure: a strategy reads it, the engine updates it.
    """

    rr_counters: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    """In-flight jobs per head as last reconciled with Redis, plus this router's picks since."""
    affinity: dict[str, tuple[str, int]] = field(default_factory=dict)
    """session key -> (head id, expires at ms)."""
    epoch: int = 0
    """Bumped when ``pending`` is replaced from Redis with a lower count for some head: loads fell, derived heaps
    rebuild. Counts that only rose keep them (a lazy heap re-scores a head whose load rose when it reaches it)."""
    blocked: dict[str, str] = field(default_factory=dict)
    """head id -> why it gets no jobs now: its circuit breaker is open (or half-open with no probe left)."""
    probes: dict[str, int] = field(default_factory=dict)
    """head id -> half-open probes this router holds a lease on: that many jobs may still go to it."""
    breaker_epoch: int = 0
    """Bumped whenever ``blocked`` or ``probes`` change: the cached candidate sets are rebuilt."""

    def set_breakers(self, blocked: dict[str, str], probes: dict[str, int]) -> None:
        """Replace the breaker view (from Redis); candidate sets are rebuilt only when it changed."""
        if blocked != self.blocked or probes != self.probes:
            self.blocked = blocked
            self.probes = probes
            self.breaker_epoch += 1

    def reset_pending(self, counts: dict[str, int]) -> None:
        """Take Redis's in-flight counts. The candidate heaps rebuild only if some head's count fell (a head
        gone from ``counts`` counts as 0): no rebuild per batch while nothing finished."""
        get = counts.get
        fell = any(get(head_id, 0) < n for head_id, n in self.pending.items())
        self.pending = counts
        if fell:
            self.epoch += 1

    def inflight(self, head: Head) -> int:
        return max(self.pending.get(head.head_id, 0), head.reported_inflight)

    def load(self, head: Head) -> float:
        return self.inflight(head) / head.capacity if head.capacity > 0 else 1.0
