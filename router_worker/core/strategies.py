"""Routing strategies: pure functions from (eligible candidates, context) to a pick.

Every strategy receives a non-empty tuple of heads that already passed health, load, quota and capability
filtering (see :mod:`router_worker.core.engine`), so none can pick an excluded head. Randomness comes from
``ctx.rng`` and time from ``ctx.now_ms``, so tests are deterministic.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from router_worker.core.adaptive import Profile, predict
from router_worker.core.model import Head, Pick, RouterMemory, Scores
from router_worker.core.policy import Goal, Policy
from schemas.envelope import Job

Candidates = tuple[Head, ...]


@dataclass(slots=True)
class Context:
    """Everything a strategy may read besides the candidates."""

    job: Job
    policy: Policy
    memory: RouterMemory
    now_ms: int
    rng: random.Random
    goal: Goal = Goal.BALANCED
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    """head id -> learned profile (adaptive)."""


Strategy = Callable[[Candidates, Context], Pick]


# --- component scores (0..1, higher is better) -------------------------------------------------------------


def load_score(head: Head, mem: RouterMemory) -> float:
    return max(0.0, 1.0 - mem.load(head))


def quota_score(head: Head) -> float:
    return max(0.0, 1.0 - head.quota_used)


def latency_score(head: Head, best_ms: float) -> float:
    """Best candidate latency over this head's; 0.5 when the head has not reported one yet."""
    if head.latency_ms <= 0:
        return 0.5
    return min(1.0, best_ms / head.latency_ms) if best_ms > 0 else 0.5


def _best_latency(candidates: Candidates) -> float:
    known = [h.latency_ms for h in candidates if h.latency_ms > 0]
    return min(known) if known else 0.0


def _scores(head: Head, ctx: Context, total: float, best_ms: float = 0.0) -> Scores:
    return Scores(
        load=load_score(head, ctx.memory),
        cache=head.cache_hit_rate,
        quota=quota_score(head),
        health=1.0,
        latency=latency_score(head, best_ms),
        total=total,
    )


def _argmax(candidates: Candidates, key: Callable[[Head], float], rng: random.Random) -> tuple[Head, float]:
    """Highest key; ties broken uniformly at random (never toward the first head, the LiteLLM drift)."""
    best = candidates[0]
    best_value = key(best)
    ties = 1
    for head in candidates[1:]:
        value = key(head)
        if value > best_value:
            best, best_value, ties = head, value, 1
        elif value == best_value:
            ties += 1
            if rng.random() * ties < 1.0:  # reservoir sampling over the tied heads
                best = head
    return best, best_value


def stable_hash(*parts: str) -> int:
    """A hash that is the same in every router process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_interval(*parts: str) -> float:
    return stable_hash(*parts) / 2.0**64


# --- the strategies -----------------------------------------------------------------------------------------


def round_robin(c: Candidates, ctx: Context) -> Pick:
    n = ctx.memory.rr_counters.get(ctx.job.model_type, 0)
    head = c[n % len(c)]
    return Pick(head, _scores(head, ctx, 1.0), f"turn {n % len(c) + 1} of {len(c)}")


def least_loaded(c: Candidates, ctx: Context) -> Pick:
    mem = ctx.memory
    head, value = _argmax(c, lambda h: -mem.load(h), ctx.rng)
    return Pick(head, _scores(head, ctx, 1.0 + value), f"lowest load {-value:.2f} of {len(c)}")


def geo_preferred(c: Candidates, ctx: Context) -> Pick:
    # The engine has already narrowed the candidates to the nearest region tier that has eligible heads.
    pick = least_loaded(c, ctx)
    pick.reason = f"region {pick.head.region}, {pick.reason}"
    return pick


def _backend_weight(head: Head, policy: Policy) -> float:
    return policy.backend_weights.get(head.backend, 1.0)


def model_specific(c: Candidates, ctx: Context) -> Pick:
    # Capability criteria were applied by the engine's filter; among the heads that meet them, favour
    # the policy's backend weights, then the lighter load.
    mem, policy = ctx.memory, ctx.policy
    head, value = _argmax(c, lambda h: _backend_weight(h, policy) * (1.0 - min(1.0, mem.load(h))), ctx.rng)
    criteria = ", ".join(f"{k}={v}" for k, v in sorted((ctx.job.metadata or {}).items())) or "no criteria"
    return Pick(head, _scores(head, ctx, value), f"meets {criteria}; backend {head.backend}")


def hybrid(c: Candidates, ctx: Context) -> Pick:
    w = ctx.policy.hybrid_weights
    best_ms = _best_latency(c)
    mem = ctx.memory
    total_w = w.load + w.cache + w.quota + w.latency + w.health

    def score(h: Head) -> float:
        return (
            w.load * load_score(h, mem)
            + w.cache * h.cache_hit_rate
            + w.quota * quota_score(h)
            + w.latency * latency_score(h, best_ms)
            + w.health * 1.0
        ) / total_w

    head, value = _argmax(c, score, ctx.rng)
    return Pick(head, _scores(head, ctx, value, best_ms), f"best weighted score {value:.3f}")


def cache_aware(c: Candidates, ctx: Context) -> Pick:
    floor = ctx.policy.min_cache_hit_rate
    warm = tuple(h for h in c if h.cache_hit_rate >= floor) or c
    mem = ctx.memory
    head, value = _argmax(warm, lambda h: h.cache_hit_rate * (1.0 - min(1.0, mem.load(h))), ctx.rng)
    tier = "at or above" if head.cache_hit_rate >= floor else "none at or above"
    return Pick(
        head, _scores(head, ctx, value), f"cache hit rate {head.cache_hit_rate:.2f} ({tier} {floor:.2f})"
    )


def quota_aware(c: Candidates, ctx: Context) -> Pick:
    mem = ctx.memory
    head, value = _argmax(c, lambda h: quota_score(h) * (1.0 - min(1.0, mem.load(h))), ctx.rng)
    return Pick(head, _scores(head, ctx, value), f"most quota headroom {quota_score(head):.2f}")


def random_pick(c: Candidates, ctx: Context) -> Pick:
    head = c[int(ctx.rng.random() * len(c))]
    return Pick(head, _scores(head, ctx, 1.0 / len(c)), f"uniform among {len(c)}")


def _weight(head: Head, policy: Policy) -> float:
    base = policy.head_weights.get(head.head_id, head.weight)
    return max(0.0, base * _backend_weight(head, policy))


def weighted_random(c: Candidates, ctx: Context) -> Pick:
    weights = [_weight(h, ctx.policy) for h in c]
    total = sum(weights)
    if total <= 0:
        return random_pick(c, ctx)
    r = ctx.rng.random() * total
    acc = 0.0
    head = c[-1]
    for h, w in zip(c, weights, strict=True):
        acc += w
        if r < acc:
            head = h
            break
    share = _weight(head, ctx.policy) / total
    return Pick(head, _scores(head, ctx, share), f"weight share {share:.2f}")


def latency_based(c: Candidates, ctx: Context) -> Pick:
    # Expected wait grows with queue depth: latency x (1 + in-flight/capacity). Unknown latency counts as
    # the best known one, so a new head is tried rather than starved.
    best_ms = _best_latency(c) or 1.0
    mem = ctx.memory

    def expected(h: Head) -> float:
        return (h.latency_ms if h.latency_ms > 0 else best_ms) * (1.0 + mem.load(h))

    head, value = _argmax(c, lambda h: -expected(h), ctx.rng)
    return Pick(head, _scores(head, ctx, best_ms / -value, best_ms), f"expected latency {-value:.1f} ms")


def affinity(c: Candidates, ctx: Context) -> Pick:
    session = ctx.job.session_id
    if session:
        pinned = ctx.memory.affinity.get(session)
        if pinned is not None and pinned[1] > ctx.now_ms:
            for h in c:
                if h.head_id == pinned[0]:
                    return Pick(
                        h, _scores(h, ctx, 1.0), f"session {session} pinned", sticky=(session, h.head_id)
                    )
            why = "pinned head not eligible, re-pinned"
        else:
            why = "new session pin" if pinned is None else "pin expired, re-pinned"
        pick = least_loaded(c, ctx)
        pick.reason = f"{why}; {pick.reason}"
        pick.sticky = (session, pick.head.head_id)
        return pick
    pick = least_loaded(c, ctx)
    pick.reason = f"no session; {pick.reason}"
    return pick


def prefix_aware(c: Candidates, ctx: Context) -> Pick:
    # Rendezvous hashing: every router ranks heads the same way for a prefix with no shared state, and a
    # head over the load bound spills its prefixes to the next head in that prefix's own ranking.
    prefix = ctx.job.prefix_hash
    if not prefix:
        pick = least_loaded(c, ctx)
        pick.reason = f"no prefix; {pick.reason}"
        return pick
    bound = ctx.policy.prefix_load_bound
    mem = ctx.memory
    ranked = sorted(c, key=lambda h: stable_hash(prefix, h.head_id), reverse=True)
    for rank, head in enumerate(ranked):
        if mem.load(head) < bound:
            reason = (
                "prefix home" if rank == 0 else f"spilled to rank {rank + 1} (home over load {bound:.2f})"
            )
            return Pick(head, _scores(head, ctx, 1.0 / (rank + 1)), reason)
    pick = least_loaded(c, ctx)
    pick.reason = f"every head over prefix bound; {pick.reason}"
    return pick


def adaptive(c: Candidates, ctx: Context) -> Pick:
    goal = ctx.goal
    mem = ctx.memory
    preds = {h.head_id: predict(ctx.profiles.get(h.head_id), h, mem.load(h), ctx.job) for h in c}
    lat = [p.latency_ms for p in preds.values()]
    pw = [p.power_w for p in preds.values() if p.power_w > 0]
    best_lat = min(lat) if lat else 1.0
    best_pw = min(pw) if pw else 0.0
    best_tp = max((p.throughput for p in preds.values()), default=1.0) or 1.0

    def score(h: Head) -> float:
        p = preds[h.head_id]
        s_lat = best_lat / p.latency_ms if p.latency_ms > 0 else 0.5
        s_tp = p.throughput / best_tp
        s_pw = best_pw / p.power_w if p.power_w > 0 and best_pw > 0 else 0.5
        if goal is Goal.MINIMIZE_LATENCY:
            raw = s_lat
        elif goal is Goal.MAXIMIZE_THROUGHPUT:
            raw = s_tp
        elif goal is Goal.MINIMIZE_POWER:
            raw = s_pw
        else:
            raw = 0.5 * s_lat + 0.3 * s_tp + 0.2 * s_pw
        # Low confidence pulls the score toward the load-based one, so new heads are explored sensibly.
        conf = p.confidence
        return (conf * raw + (1.0 - conf) * load_score(h, mem)) * _backend_weight(h, ctx.policy)

    head, value = _argmax(c, score, ctx.rng)
    p = preds[head.head_id]
    scores = Scores(
        load=load_score(head, mem),
        cache=head.cache_hit_rate,
        quota=quota_score(head),
        health=1.0,
        latency=best_lat / p.latency_ms if p.latency_ms > 0 else 0.5,
        total=value,
    )
    return Pick(head, scores, f"{goal.value}: predicted {p.latency_ms:.1f} ms, confidence {p.confidence:.2f}")


STRATEGY_FUNCTIONS: dict[str, Strategy] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "geo_preferred": geo_preferred,
    "model_specific": model_specific,
    "hybrid": hybrid,
    "cache_aware": cache_aware,
    "quota_aware": quota_aware,
    "random": random_pick,
    "weighted_random": weighted_random,
    "latency_based": latency_based,
    "affinity": affinity,
    "adaptive": adaptive,
    "prefix_aware": prefix_aware,
}
"""``ab_test`` is not here: it chooses a variant (model or strategy) in the engine, then defers to it."""
