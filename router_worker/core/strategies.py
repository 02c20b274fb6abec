"""Routing strategies: functions from (candidate set, context) to a pick, with no I/O.

A strategy sees a :class:`CandidateSet` that passed the static filters (status, capabilities, quota, region
tier) and must return a head that also passes the dynamic ones (heartbeat alive, load under the threshold),
which it checks with ``cs.ok`` or gets for free from ``cs.best`` / ``cs.sample``; or None when no head is
eligible. Randomness comes from ``ctx.rng`` and time from ``ctx.now_ms``, so tests are deterministic.
The heaps, rings and cumulative weights kept on the set are memoised derivations of it, so a pick costs
O(log n) rather than a scan of every head.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from router_worker.core.adaptive import Profile, job_size, predict
from router_worker.core.candidates import CandidateSet
from router_worker.core.catalog import ModelSpec, backend_bonus
from router_worker.core.model import Head, Pick, RouterMemory, Scores
from router_worker.core.policy import Goal, Policy
from schemas.envelope import Job


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
    spec: ModelSpec | None = None
    """The registered characteristics of the model being routed, if any."""
    load_limit: float | None = None
    """The job's load threshold (the policy's, lowered for low priorities); None: the policy's."""

    @property
    def limit(self) -> float:
        return self.policy.max_load_threshold if self.load_limit is None else self.load_limit


Strategy = Callable[[CandidateSet, Context], Pick | None]


# --- component scores (0..1, higher is better) -------------------------------------------------------------


def quota_score(head: Head) -> float:
    return max(0.0, 1.0 - head.quota_used)


def latency_score(head: Head, best_ms: float) -> float:
    """Best candidate latency over this head's; 0.5 when the head has not reported one yet."""
    if head.latency_ms <= 0 or best_ms <= 0:
        return 0.5
    return min(1.0, best_ms / head.latency_ms)


def best_latency(cs: CandidateSet) -> float:
    best = cs.memo.get("best_latency")
    if best is None:
        known = [h.latency_ms for h in cs.heads if h.latency_ms > 0]
        best = cs.memo["best_latency"] = min(known) if known else 0.0
    return best  # type: ignore[return-value]


def scores_of(head: Head, ctx: Context, total: float, best_ms: float = 0.0) -> Scores:
    # Once per decision: written out (no helper calls, positional arguments), it costs half as much.
    infl = ctx.memory.pending.get(head.head_id, 0)
    if head.reported_inflight > infl:
        infl = head.reported_inflight
    cap = head.capacity
    free = 1.0 - infl / cap if cap > 0 else 0.0
    quota = 1.0 - head.quota_used
    lat = head.latency_ms
    return Scores(
        free if free > 0.0 else 0.0,
        head.cache_hit_rate,
        quota if quota > 0.0 else 0.0,
        1.0,
        0.5 if lat <= 0 or best_ms <= 0 else (best_ms / lat if best_ms < lat else 1.0),
        total,
    )


def stable_hash(*parts: str) -> int:
    """A hash that is the same in every router process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_interval(*parts: str) -> float:
    return stable_hash(*parts) / 2.0**64


def _backend_weight(head: Head, policy: Policy) -> float:
    return policy.backend_weights.get(head.backend, 1.0)


def _free(load: float) -> float:
    return 1.0 - (load if load < 1.0 else 1.0)


def _best(cs: CandidateSet, ctx: Context, name: str, score: Callable[[Head, float], float]) -> Head | None:
    return cs.best(name, score, ctx.memory, ctx.limit, ctx.now_ms, ctx.rng)


# --- the strategies -----------------------------------------------------------------------------------------


def round_robin(cs: CandidateSet, ctx: Context) -> Pick | None:
    n = len(cs)
    start = ctx.memory.rr_counters.get(ctx.job.model_type, 0)
    mem, limit, now = ctx.memory, ctx.limit, ctx.now_ms
    for step in range(n):  # the next eligible head in turn; O(1) unless most are ineligible
        turn = (start + step) % n
        head = cs.heads[turn]
        if cs.ok(head, mem, limit, now):
            skipped = f", skipped {step}" if step else ""
            return Pick(head, scores_of(head, ctx, 1.0), f"turn {turn + 1} of {n}{skipped}")
    return None


def _neg_load(h: Head, load: float) -> float:
    return -load


def least_loaded(cs: CandidateSet, ctx: Context) -> Pick | None:
    head = _best(cs, ctx, "least_loaded", _neg_load)
    if head is None:
        return None
    load = ctx.memory.load(head)
    return Pick(head, scores_of(head, ctx, 1.0 - load), _load_text(cs, load))


_TEXTS_KEPT = 1024


def _load_text(cs: CandidateSet, load: float) -> str:
    """The reason, formatted once per set and load: loads repeat (in-flight counts over a capacity), and
    formatting a float cost a tenth of a least-loaded decision."""
    texts = cast("dict[float, str] | None", cs.memo.get("least_loaded_text"))
    if texts is None:
        texts = cs.memo["least_loaded_text"] = {}
    text = texts.get(load)
    if text is None:
        if len(texts) >= _TEXTS_KEPT:
            texts.clear()
        text = texts[load] = f"lowest load {load:.2f} of {len(cs)}"
    return text


def geo_preferred(cs: CandidateSet, ctx: Context) -> Pick | None:
    # The engine has already narrowed the candidates to the nearest region tier that has eligible heads.
    pick = least_loaded(cs, ctx)
    if pick is not None:
        pick.reason = f"region {pick.head.region}, {pick.reason}"
    return pick


def model_specific(cs: CandidateSet, ctx: Context) -> Pick | None:
    # Capability criteria were applied by the static filter; among the heads that meet them, favour the
    # policy's backend weights, then the lighter load.
    policy, spec = ctx.policy, ctx.spec

    def score(h: Head, load: float) -> float:
        return _backend_weight(h, policy) * backend_bonus(h, spec) * _free(load)

    head = _best(cs, ctx, "model_specific", score)
    if head is None:
        return None
    # A set is cached per job criteria (the engine's key), so its text is built once per set.
    criteria = cs.memo.get("criteria")
    if criteria is None:
        text = ", ".join(f"{k}={v}" for k, v in sorted((ctx.job.metadata or {}).items())) or "no criteria"
        criteria = cs.memo["criteria"] = f"meets {text}; backend "
    total = score(head, ctx.memory.load(head))
    return Pick(head, scores_of(head, ctx, total), f"{criteria}{head.backend}")


def hybrid(cs: CandidateSet, ctx: Context) -> Pick | None:
    w = ctx.policy.hybrid_weights
    total_w = w.load + w.cache + w.quota + w.latency + w.health
    best_ms = best_latency(cs)
    static: dict[str, float] | None = cs.memo.get("hybrid_static")  # type: ignore[assignment]
    if static is None:
        static = cs.memo["hybrid_static"] = {
            h.head_id: (w.cache * h.cache_hit_rate + w.quota * quota_score(h) + w.latency * latency_score(h, best_ms)
                        + w.health) / total_w
            for h in cs.heads
        }  # fmt: skip
    w_load = w.load / total_w

    def score(h: Head, load: float) -> float:
        return static[h.head_id] + w_load * _free(load)

    head = _best(cs, ctx, "hybrid", score)
    if head is None:
        return None
    value = score(head, ctx.memory.load(head))
    return Pick(head, scores_of(head, ctx, value, best_ms), f"best weighted score {value:.3f}")


def cache_aware(cs: CandidateSet, ctx: Context) -> Pick | None:
    floor = ctx.policy.min_cache_hit_rate
    lw = ctx.policy.load_weight

    def score(h: Head, load: float) -> float:
        # Heads at or above the floor always rank first; within a tier the warmest head wins until its
        # queue outweighs its hit rate (load_weight per unit of load).
        return (2.0 if h.cache_hit_rate >= floor else 0.0) + h.cache_hit_rate - lw * load

    head = _best(cs, ctx, "cache_aware", score)
    if head is None:
        return None
    tier = "at or above" if head.cache_hit_rate >= floor else "none at or above"
    value = head.cache_hit_rate - lw * ctx.memory.load(head)
    return Pick(
        head, scores_of(head, ctx, value), f"cache hit rate {head.cache_hit_rate:.2f} ({tier} {floor:.2f})"
    )


def quota_aware(cs: CandidateSet, ctx: Context) -> Pick | None:
    lw = ctx.policy.load_weight

    def score(h: Head, load: float) -> float:
        return quota_score(h) - lw * load

    head = _best(cs, ctx, "quota_aware", score)
    if head is None:
        return None
    value = score(head, ctx.memory.load(head))
    return Pick(head, scores_of(head, ctx, value), f"most quota headroom {quota_score(head):.2f}")


def random_pick(cs: CandidateSet, ctx: Context) -> Pick | None:
    head = cs.sample(ctx.memory, ctx.limit, ctx.now_ms, ctx.rng)
    if head is None:
        return None
    return Pick(head, scores_of(head, ctx, 1.0 / len(cs)), f"uniform among {len(cs)}")


def head_weight(head: Head, policy: Policy) -> float:
    return max(0.0, policy.head_weights.get(head.head_id, head.weight) * _backend_weight(head, policy))


def weighted_random(cs: CandidateSet, ctx: Context) -> Pick | None:
    policy = ctx.policy
    cum: list[float] | None = cs.memo.get("weights")  # type: ignore[assignment]
    if cum is None:
        cum = cs.cumulative("weights", lambda h: head_weight(h, policy))
    if cum[-1] <= 0:
        return random_pick(cs, ctx)
    head = cs.sample(ctx.memory, ctx.limit, ctx.now_ms, ctx.rng, cum)
    if head is None:
        return None
    share = head_weight(head, policy) / cum[-1]
    return Pick(head, scores_of(head, ctx, share), f"weight share {share:.2f}")


def latency_based(cs: CandidateSet, ctx: Context) -> Pick | None:
    # Expected wait grows with queue depth: latency x (1 + load). Unknown latency counts as the best known
    # one, so a new head is tried rather than starved.
    best_ms = best_latency(cs) or 1.0

    def score(h: Head, load: float) -> float:
        return -(h.latency_ms if h.latency_ms > 0 else best_ms) * (1.0 + load)

    head = _best(cs, ctx, "latency_based", score)
    if head is None:
        return None
    expected = -score(head, ctx.memory.load(head))
    return Pick(
        head, scores_of(head, ctx, best_ms / expected, best_ms), f"expected latency {expected:.1f} ms"
    )


def affinity(cs: CandidateSet, ctx: Context) -> Pick | None:
    session = ctx.job.session_id
    if session:
        pinned = ctx.memory.affinity.get(session)
        if pinned is not None and pinned[1] > ctx.now_ms:
            for h in cs.heads:  # a pin is one of few heads; the scan stops at the first match
                if h.head_id == pinned[0]:
                    if cs.ok(h, ctx.memory, ctx.limit, ctx.now_ms):
                        return Pick(
                            h,
                            scores_of(h, ctx, 1.0),
                            f"session {session} pinned",
                            sticky=(session, h.head_id),
                        )
                    break
            why = "pinned head not eligible, re-pinned"
        else:
            why = "new session pin" if pinned is None else "pin expired, re-pinned"
        pick = least_loaded(cs, ctx)
        if pick is not None:
            pick.reason = f"{why}; {pick.reason}"
            pick.sticky = (session, pick.head.head_id)
        return pick
    pick = least_loaded(cs, ctx)
    if pick is not None:
        pick.reason = f"no session; {pick.reason}"
    return pick


_PREFIX_MEMO = 65_536
"""Prefixes whose ring place a candidate set remembers (then it starts afresh)."""


def _ring_hash(key: str) -> int:
    return stable_hash("ring", key)


def prefix_aware(cs: CandidateSet, ctx: Context) -> Pick | None:
    # Consistent hashing: every router maps a prefix to the same head with no shared state, and a head over
    # the load bound spills the prefix to the next head on that prefix's ring walk (few prefixes move when
    # heads join or leave).
    prefix = ctx.job.prefix_hash
    if not prefix:
        pick = least_loaded(cs, ctx)
        if pick is not None:
            pick.reason = f"no prefix; {pick.reason}"
        return pick
    points, owners = cs.ring(_ring_hash)
    bound = min(ctx.policy.prefix_load_bound, ctx.limit)
    mem, now = ctx.memory, ctx.now_ms
    # Prefixes repeat (that is the point of routing by them): each one's place on the ring is hashed once.
    homes: dict[str, int] = cs.memo.get("prefix_homes")  # type: ignore[assignment]
    if homes is None or len(homes) >= _PREFIX_MEMO:
        homes = cs.memo["prefix_homes"] = {}
    start = homes.get(prefix)
    if start is None:
        start = homes[prefix] = bisect.bisect_left(points, _ring_hash(prefix))
    tried: set[int] = set()
    n = len(points)
    for step in range(n):
        i = owners[(start + step) % n]
        if i in tried:
            continue
        tried.add(i)
        head = cs.heads[i]
        if cs.ok(head, mem, bound, now):
            rank = len(tried)
            reason = (
                "prefix home"
                if rank == 1
                else f"spilled to ring rank {rank} (earlier heads over load {bound:.2f})"
            )
            return Pick(head, scores_of(head, ctx, 1.0 / rank), reason)
        if len(tried) == len(cs):
            break
    pick = least_loaded(cs, ctx)  # every head over the prefix bound but some under the load threshold
    if pick is not None:
        pick.reason = f"every head over prefix bound; {pick.reason}"
    return pick


_CLASS_BOUNDS = (2.0, 16.0, 256.0)
_CLASS_SIZES = (1.0, 5.0, 64.0, 1024.0)
"""Four size classes (1, 2-15, 16-255, 256+) and the size each is scored at: predicted latency depends on
size, and each class keeps its own heap, rebuilt once per load epoch. Single-item jobs, the commonest, are
scored exactly."""


def _size_class(size: float) -> int:
    return bisect.bisect_right(_CLASS_BOUNDS, size)


_TABLE_KEYS = tuple(f"adaptive:{k}" for k in range(len(_CLASS_SIZES)))
_HEAP_NAMES = {(g, k): f"adaptive:{g.value}:{k}" for g in Goal for k in range(len(_CLASS_SIZES))}
_GOAL_NAMES = {g: g.value for g in Goal}
_SCORER_KEYS = {(g, k): f"adaptive-scorers:{g.value}:{k}" for g in Goal for k in range(len(_CLASS_SIZES))}
"""Names built once: an f-string (and an enum's ``.value``) per decision is a measurable share of it."""


@dataclass(frozen=True, slots=True)
class _AdaptiveRow:
    base_ms: float
    """Predicted latency at zero load for the class's size (0: unknown)."""
    per_load_ms: float
    confidence: float
    power_w: float
    capacity: int
    backend_weight: float


def _adaptive_table(
    cs: CandidateSet, ctx: Context, klass: int
) -> tuple[dict[str, _AdaptiveRow], float, float, float]:
    """Per-head coefficients for one size class, and the best latency, power and throughput as normalisers.
    Computed once per candidate set and class, so scoring a head is a few multiplications."""
    key = _TABLE_KEYS[klass]
    memo = cs.memo.get(key)
    if memo is None:
        size = _CLASS_SIZES[klass]
        rows: dict[str, _AdaptiveRow] = {}
        for h in cs.heads:
            prof = ctx.profiles.get(h.head_id)
            base = predict(prof, h, 0.0, size)
            slope = max(0.0, prof.coef[2]) if prof is not None and prof.samples >= 3 else 0.0  # as predict()
            weight = _backend_weight(h, ctx.policy) * backend_bonus(h, ctx.spec)
            rows[h.head_id] = _AdaptiveRow(
                base.latency_ms, slope, base.confidence, base.power_w, h.capacity, weight
            )
        lat = [r.base_ms for r in rows.values() if r.base_ms > 0]
        pw = [r.power_w for r in rows.values() if r.power_w > 0]
        tp = [r.capacity * 1000.0 / r.base_ms for r in rows.values() if r.base_ms > 0]
        memo = cs.memo[key] = (rows, min(lat, default=0.0), min(pw, default=0.0), max(tp, default=0.0))
    return memo  # type: ignore[return-value]


def _adaptive_scorers(cs: CandidateSet, ctx: Context, goal: Goal, klass: int) -> tuple[
    Callable[[Head, float], tuple[float, float]], Callable[[Head, float], float], dict[str, _AdaptiveRow], float
]:  # fmt: skip
    """The (score and predicted latency, score) functions of one candidate set, goal and size class, and their
    table and best latency: built once per set, not two closures per decision."""
    key = _SCORER_KEYS[goal, klass]
    memo = cs.memo.get(key)
    if memo is not None:
        return memo  # type: ignore[return-value]
    rows, best_lat, best_pw, best_tp = _adaptive_table(cs, ctx, klass)

    def parts(h: Head, load: float) -> tuple[float, float]:
        r = rows[h.head_id]
        lat = max(0.01, r.base_ms + r.per_load_ms * load) if r.base_ms > 0 else 0.0
        s_lat = best_lat / lat if lat > 0 and best_lat > 0 else 0.5
        if goal is Goal.MINIMIZE_LATENCY:
            raw = s_lat
        else:
            s_tp = (r.capacity * 1000.0 / lat) / best_tp if lat > 0 and best_tp > 0 else 0.5
            s_pw = best_pw / r.power_w if r.power_w > 0 and best_pw > 0 else 0.5
            if goal is Goal.MAXIMIZE_THROUGHPUT:
                raw = s_tp
            elif goal is Goal.MINIMIZE_POWER:
                raw = s_pw
            else:
                raw = 0.5 * s_lat + 0.3 * s_tp + 0.2 * s_pw
        # Low confidence pulls toward the load-based score, so a head with few samples is explored sensibly.
        conf = r.confidence
        return (conf * raw + (1.0 - conf) * _free(load)) * r.backend_weight, lat

    def score(h: Head, load: float) -> float:
        return parts(h, load)[0]

    memo = cs.memo[key] = (parts, score, rows, best_lat)
    return memo


def adaptive(cs: CandidateSet, ctx: Context) -> Pick | None:
    goal = ctx.goal
    klass = _size_class(job_size(ctx.job))
    parts, score, rows, best_lat = _adaptive_scorers(cs, ctx, goal, klass)
    head = _best(cs, ctx, _HEAP_NAMES[goal, klass], score)
    if head is None:
        return None
    load = ctx.memory.load(head)
    total, lat = parts(head, load)  # once: the heap's own score of the head is not kept
    r = rows[head.head_id]
    scores = Scores(_free(load), head.cache_hit_rate, quota_score(head), 1.0,
                    best_lat / lat if lat > 0 and best_lat > 0 else 0.5, total)  # fmt: skip
    return Pick(head, scores, f"{_GOAL_NAMES[goal]}: predicted {lat:.1f} ms, confidence {r.confidence:.2f}")


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
