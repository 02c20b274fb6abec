"""The routing engine: filter, pick a strategy, apply it, fall back. Pure: plain data in, a Decision out.

Order of work for one job:
1. resolve the strategy (policy rule or default; the job's override if the policy allows it; an A/B test
   chooses a variant model or strategy, consistently per session or job);
2. for the model, then each fallback model: the *static* candidate sets (serves the model, healthy status,
   meets the job's capability criteria, under the quota limit; one set per region tier for
   ``geo_preferred``), cached per head snapshot and policy (seed 000's decision cache);
3. the strategy picks within a set, honouring the *dynamic* filters (heartbeat alive, load under
   ``max_load_threshold``) through the set's lazy heap or rejection sampling, so a pick is O(log n);
4. no pick anywhere is an explicit outcome: unknown model, saturated (live heads all at their threshold:
   the router holds the job back), or no capacity.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from router_worker.core.adaptive import Profile
from router_worker.core.candidates import CandidateSet
from router_worker.core.catalog import ModelSpec, spec_miss
from router_worker.core.model import Decision, Head, HeadStatus, Outcome, RouterMemory
from router_worker.core.policy import STRATEGIES, Policy
from router_worker.core.strategies import STRATEGY_FUNCTIONS, Context, unit_interval
from schemas.envelope import Job

Candidates = tuple[Head, ...]

_FALLBACK_STRATEGY = "least_loaded"


@dataclass(slots=True)
class HeadIndex:
    """An immutable snapshot of every head, indexed by the model names they serve, with its own cache.

    A new snapshot (a head joined, left, changed status) replaces the index and so drops its cache: the
    decision cache of seed 000 can never serve a set that includes a removed or inactive head.
    """

    heads: dict[str, Head]
    by_model: dict[str, Candidates]
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    cache: dict[tuple[object, ...], tuple[CandidateSet, ...]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def build(cls, heads: Iterable[Head], profiles: Mapping[str, Profile] | None = None,
              models: Mapping[str, ModelSpec] | None = None) -> HeadIndex:  # fmt: skip
        ordered = sorted(heads, key=lambda h: h.head_id)
        by_model: dict[str, list[Head]] = {}
        for h in ordered:
            by_model.setdefault(h.model_id, []).append(h)
            for fam in h.families:
                if fam != h.model_id:
                    by_model.setdefault(fam, []).append(h)
        return cls(
            heads={h.head_id: h for h in ordered},
            by_model={k: tuple(v) for k, v in by_model.items()},
            profiles=profiles or {},
            models=models or {},
        )


EMPTY_INDEX = HeadIndex.build(())


# --- capability criteria (model_specific) -------------------------------------------------------------------


def capability_miss(head: Head, meta: Mapping[str, object]) -> str | None:
    """Why ``head`` does not meet the job's metadata criteria, or None when it does."""
    min_ctx = meta.get("min_context")
    if isinstance(min_ctx, int) and head.max_context < min_ctx:
        return f"max_context {head.max_context} < {min_ctx}"
    quant = meta.get("quantization")
    if isinstance(quant, str) and quant.upper() not in head.quantizations:
        return f"no {quant.upper()} support"
    backend = meta.get("backend")
    if isinstance(backend, str) and head.backend != backend:
        return f"backend {head.backend} != {backend}"
    if meta.get("dynamic_shapes") is True and not head.dynamic_shapes:
        return "no dynamic shapes"
    tags = meta.get("tags")
    if isinstance(tags, list):
        missing = [t for t in tags if isinstance(t, str) and t not in head.tags]
        if missing:
            return f"missing tags {missing}"
    min_params = meta.get("min_params")
    if isinstance(min_params, int) and head.param_count < min_params:
        return f"param_count {head.param_count} < {min_params}"
    return None


def _meta_key(job: Job) -> tuple[object, ...]:
    meta = job.metadata
    if not meta:
        return ()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in meta.items()))


def _static_candidates(
    heads: Candidates,
    job: Job,
    strategy: str,
    policy: Policy,
    explain: bool,
    spec: ModelSpec | None = None,
    model: str = "",
    blocked: Mapping[str, str] | None = None,
    avoid: frozenset[str] = frozenset(),
) -> tuple[CandidateSet, ...]:
    """Filters that depend only on the snapshot, the job's criteria, the policy and the breakers (so they can
    be cached): status, circuit breaker, heads that refused or failed this job, capabilities, quota, zero
    weight. ``geo_preferred`` gets one set per region tier, nearest first
    (the preferred region, its fallbacks, then every other region), tried in order at decision time."""
    excluded: list[tuple[str, str]] = []
    meta = job.metadata or {}
    rule = policy.rule_for(model or job.model_type)
    max_latency = rule.max_latency_ms if rule is not None else None
    ok: list[Head] = []
    for h in heads:
        if h.status is not HeadStatus.HEALTHY:
            if explain:
                excluded.append((h.head_id, f"status {h.status.value}"))
            continue
        if blocked and h.head_id in blocked:
            if explain:
                excluded.append((h.head_id, blocked[h.head_id]))
            continue
        if avoid and h.head_id in avoid:
            if explain:
                excluded.append((h.head_id, "refused or failed this job before"))
            continue
        if meta:
            miss = capability_miss(h, meta)
            if miss:
                if explain:
                    excluded.append((h.head_id, miss))
                continue
        if spec is not None:
            miss = spec_miss(h, spec)
            if miss:
                if explain:
                    excluded.append((h.head_id, miss))
                continue
        if max_latency is not None and h.latency_ms > max_latency:
            if explain:
                excluded.append((h.head_id, f"latency {h.latency_ms:.1f} ms > rule max {max_latency:.1f} ms"))
            continue
        if h.quota_used >= policy.quota_limit:
            if explain:
                excluded.append((h.head_id, f"quota {h.quota_used:.2f} >= {policy.quota_limit:.2f}"))
            continue
        if policy.head_weights.get(h.head_id, 1.0) == 0.0:
            if explain:
                excluded.append((h.head_id, "head weight 0 in policy"))
            continue
        ok.append(h)
    excl = tuple(excluded)
    if strategy != "geo_preferred" or not ok:
        return (CandidateSet.of(tuple(ok), excl),)
    tiers: list[CandidateSet] = []
    listed = region_tiers(job, policy)
    for i, region in enumerate(listed):
        in_region = tuple(h for h in ok if h.region == region)
        if in_region:
            tiers.append(CandidateSet.of(in_region, excl if not tiers else (), region_fallback=i > 0))
    rest = tuple(h for h in ok if h.region not in listed)
    if rest:
        tiers.append(CandidateSet.of(rest, excl if not tiers else (), region_fallback=bool(listed)))
    return tuple(tiers)


def region_tiers(job: Job, policy: Policy) -> list[str]:
    """Preferred region first, then its fallbacks nearest first (from the policy), no repeats."""
    rule = policy.rule_for(job.model_type)
    first = [job.region] if job.region else list(rule.preferred_regions if rule else [])
    tiers: list[str] = []
    for region in first:
        for r in (region, *policy.region_fallbacks.get(region, ())):
            if r not in tiers:
                tiers.append(r)
    return tiers


def _dynamic_exclusions(
    cs: CandidateSet, mem: RouterMemory, limit: float, now_ms: int
) -> list[tuple[str, str]]:
    """Why each head of the set is not eligible right now (explain only: it scans every head)."""
    out = []
    for h in cs.heads:
        if h.expires_at_ms < now_ms:
            out.append((h.head_id, "heartbeat expired"))
        elif mem.load(h) >= limit:
            out.append((h.head_id, f"load {mem.load(h):.2f} >= {limit:.2f}"))
    return out


def _any_alive(cs: CandidateSet, now_ms: int) -> bool:
    return cs.min_expiry_ms >= now_ms or any(h.expires_at_ms >= now_ms for h in cs.heads)


# --- the decision -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    model_type: str
    strategy: str
    note: str
    refused: str | None = None


def resolve_strategy(job: Job, policy: Policy) -> Resolved:
    """Which model and strategy a job gets, after overrides and A/B tests."""
    if not job.strategy:  # the common case: one answer per (policy, model), computed once
        fast = policy.resolved.get(job.model_type)
        if fast is not None and fast.strategy != "ab_test":
            return fast  # type: ignore[no-any-return]
    model = job.model_type
    note = ""
    strategy = policy.strategy_for(model)
    if job.strategy:
        if job.strategy not in STRATEGIES:
            return Resolved(model, strategy, "", refused=f"unknown strategy {job.strategy!r}")
        if policy.allows_override(job.strategy):
            strategy = job.strategy
        else:
            note = f"override {job.strategy} not allowed; "
    if strategy == "ab_test":
        test = policy.ab_test_for(model)
        if test is None:
            return Resolved(model, _FALLBACK_STRATEGY, note + "no A/B test for this model; ")
        key = job.session_id if test.key == "session" and job.session_id else job.job_id
        variant_b = unit_interval(test.name, key) < test.share_b
        v_model = (test.b_model if variant_b else test.a_model) or model
        v_strategy = (test.b_strategy if variant_b else test.a_strategy) or policy.strategy_for(v_model)
        if v_strategy == "ab_test":
            v_strategy = _FALLBACK_STRATEGY
        label = "b" if variant_b else "a"
        return Resolved(v_model, v_strategy, f"{note}ab {test.name} variant {label}; ")
    resolved = Resolved(model, strategy, note)
    if not job.strategy:
        memo = policy.resolved
        if len(memo) >= 4096:  # made-up model types filled it: start afresh rather than stop caching
            memo.clear()
        memo[model] = resolved
    return resolved


def decide(
    job: Job,
    index: HeadIndex,
    policy: Policy,
    memory: RouterMemory,
    now_ms: int,
    rng: random.Random,
    attempt: int = 1,
    explain: bool = False,
    avoid: frozenset[str] = frozenset(),
) -> Decision:
    """Route one job. Never raises for a routable-looking job; every outcome is a Decision.

    ``avoid``: heads that refused or failed this job before (its nack said so); they are passed over while
    any other head can take it (or will, once it has room), and tried again only when no other head is
    eligible at all (better than no route)."""
    if avoid:
        d = _decide(job, index, policy, memory, now_ms, rng, attempt, explain, avoid)
        if d.routed or d.outcome is Outcome.SATURATED:  # saturated: wait for another head, not an avoided one
            return d
    return _decide(job, index, policy, memory, now_ms, rng, attempt, explain, frozenset())


def _decide(job: Job, index: HeadIndex, policy: Policy, memory: RouterMemory, now_ms: int, rng: random.Random,
            attempt: int, explain: bool, avoid: frozenset[str]) -> Decision:  # fmt: skip
    r = resolve_strategy(job, policy)
    if r.refused:
        return Decision(Outcome.REFUSED, r.strategy, r.refused, attempt=attempt)
    strategy_fn = STRATEGY_FUNCTIONS[r.strategy]
    fallbacks = policy.fallback_models.get(r.model_type)
    models = (r.model_type, *fallbacks) if fallbacks else (r.model_type,)
    excluded: list[tuple[str, str]] = []
    known = False
    saturated = False
    limit = policy.load_limit(job.priority)
    blocked = memory.blocked
    for tier, model in enumerate(models):
        heads = index.by_model.get(model)
        if not heads:
            continue
        known = True
        key = (model, job.region, r.strategy, _meta_key(job), policy.version, id(policy), memory.breaker_epoch,
               avoid)  # fmt: skip
        tiers = None if explain else index.cache.get(key)
        if tiers is None:
            index.misses += 1
            tiers = _static_candidates(
                heads, job, r.strategy, policy, explain, index.models.get(model), model, blocked, avoid
            )
            if not explain:
                index.cache[key] = tiers
        else:
            index.hits += 1
        ctx = Context(job, policy, memory, now_ms, rng, policy.goal_for(model), index.profiles,
                      index.models.get(model), limit)  # fmt: skip
        for cs in tiers:
            if explain:
                excluded.extend(cs.excluded)
            if not cs.heads:
                continue
            pick = strategy_fn(cs, ctx)
            if pick is None:
                if explain:
                    excluded.extend(_dynamic_exclusions(cs, memory, limit, now_ms))
                saturated = saturated or _any_alive(cs, now_ms)
                continue
            if explain:
                excluded.extend(_dynamic_exclusions(cs, memory, limit, now_ms))
            prefix = r.note + (f"fallback model {model}; " if tier > 0 else "") if (r.note or tier) else ""
            reason = prefix + pick.reason if prefix else pick.reason
            if memory.probes and pick.head.head_id in memory.probes:
                reason += "; half-open breaker probe"
            return Decision(
                Outcome.ROUTED,
                r.strategy,
                reason,
                head=pick.head,
                model_id=pick.head.model_id,
                scores=pick.scores,
                attempt=attempt,
                fallback=tier > 0 or cs.region_fallback,
                excluded=tuple(excluded),
                sticky=pick.sticky,
            )
    names = " or ".join(models)
    if not known:
        return Decision(Outcome.UNKNOWN_MODEL, r.strategy, f"no head serves {names}", attempt=attempt,
                        excluded=tuple(excluded))  # fmt: skip
    if saturated:
        return Decision(Outcome.SATURATED, r.strategy, r.note + f"every live head of {names} is at its load threshold",
                        attempt=attempt, excluded=tuple(excluded))  # fmt: skip
    if blocked and _breakers_hold(models, index, blocked, now_ms):
        # Open breakers are a wait, not a verdict: the job waits for a half-open probe (held, no attempt spent)
        # instead of running out of attempts and being dead-lettered while its heads cool down.
        return Decision(Outcome.SATURATED, r.strategy, r.note + f"every live head of {names} that could take it "
                        "has an open circuit breaker: waiting for a half-open probe", attempt=attempt,
                        excluded=tuple(excluded))  # fmt: skip
    return Decision(Outcome.NO_CAPACITY, r.strategy, r.note + f"no eligible head for {names}", attempt=attempt,
                    excluded=tuple(excluded))  # fmt: skip


def _breakers_hold(
    models: tuple[str, ...], index: HeadIndex, blocked: Mapping[str, str], now_ms: int
) -> bool:
    """Whether a live, healthy head of these models is passed over only for its circuit breaker."""
    for model in models:
        for h in index.by_model.get(model, ()):
            if h.head_id in blocked and h.status is HeadStatus.HEALTHY and h.expires_at_ms >= now_ms:
                return True
    return False


def record(decision: Decision, memory: RouterMemory, job: Job, policy: Policy, now_ms: int) -> None:
    """Apply a routed decision to the router's memory: round-robin turn, pending load, pins."""
    head = decision.head
    if head is None:
        return
    model = job.model_type
    memory.rr_counters[model] = memory.rr_counters.get(model, 0) + 1
    memory.pending[head.head_id] = memory.pending.get(head.head_id, 0) + 1
    probes = memory.probes
    if probes and head.head_id in probes:  # a half-open probe: once the lease is spent, no more jobs go there
        left = probes[head.head_id] - 1
        if left > 0:
            probes[head.head_id] = left
        else:
            del probes[head.head_id]
            memory.blocked[head.head_id] = "circuit breaker half-open: probes in flight"
            memory.breaker_epoch += 1
    if decision.sticky is not None:
        key, head_id = decision.sticky
        memory.affinity[key] = (head_id, now_ms + int(policy.affinity_timeout_s * 1000))
