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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from router_worker.core.adaptive import Profile
from router_worker.core.candidates import CandidateSet
from router_worker.core.catalog import ModelSpec, spec_miss
from router_worker.core.model import Decision, Head, HeadStatus, Outcome, Pick, RouterMemory
from router_worker.core.policy import STRATEGIES, ABTest, Policy
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
    routes: dict[tuple[object, ...], _Route | _Split | None] = field(default_factory=dict)
    """(model, override, region, priority, criteria, avoided heads) -> the route such jobs take under
    ``route_policy`` and breaker epoch ``route_breakers`` (None: an A/B test, resolved per job)."""
    sides: dict[tuple[int, str], bool] = field(default_factory=dict)
    """(A/B test, session) -> the session's side (variant b or not), for ``route_policy``."""
    route_policy: Policy | None = None
    route_breakers: int = -1
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


def _route_meta(meta: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """The criteria part of a route key: the items in the order they come (one order a producer repeats is one
    key; another order of the same criteria is a second key for the same candidate sets), each value with its
    type (``True == 1`` in Python, yet ``dynamic_shapes: true`` and ``dynamic_shapes: 1`` are not the same
    criterion); a list as a tuple of its items, typed the same way."""
    return tuple((k, _typed(v)) for k, v in meta.items())


def _typed(v: object) -> object:
    if isinstance(v, list):
        return tuple((x.__class__, x) for x in v)
    return (v.__class__, v)


def _meta_key(job: Job) -> tuple[object, ...]:
    """The criteria part of a candidate-set key: :func:`_route_meta`, sorted (the order is not a criterion)."""
    if not job.metadata:
        return ()
    items = list(_route_meta(job.metadata))
    items.sort(key=_name)
    return tuple(items)


def _name(item: tuple[str, object]) -> str:
    return item[0]


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
        return ab_variant(test, model, note, in_variant_b(test, job), policy)
    resolved = Resolved(model, strategy, note)
    if not job.strategy:
        memo = policy.resolved
        if len(memo) >= 4096:  # made-up model types filled it: start afresh rather than stop caching
            memo.clear()
        memo[model] = resolved
    return resolved


def in_variant_b(test: ABTest, job: Job) -> bool:
    """The job's side of an A/B test: the same in every router, per session (or per job without one)."""
    key = job.session_id if test.key == "session" and job.session_id else job.job_id
    return unit_interval(test.name, key) < test.share_b


def ab_variant(test: ABTest, model: str, note: str, variant_b: bool, policy: Policy) -> Resolved:
    """The model and strategy of one side of an A/B test."""
    v_model = (test.b_model if variant_b else test.a_model) or model
    v_strategy = (test.b_strategy if variant_b else test.a_strategy) or policy.strategy_for(v_model)
    if v_strategy == "ab_test":
        v_strategy = _FALLBACK_STRATEGY
    label = "b" if variant_b else "a"
    return Resolved(v_model, v_strategy, f"{note}ab {test.name} variant {label}; ")


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
    if not explain:
        if not avoid:
            return _decide_fast(job, index, policy, memory, now_ms, rng, attempt, avoid)
        d = _decide_fast(job, index, policy, memory, now_ms, rng, attempt, avoid)
        if d.routed or d.outcome is Outcome.SATURATED:  # saturated: wait for another head, not an avoided one
            return d
        return _decide_fast(job, index, policy, memory, now_ms, rng, attempt, _NOTHING)
    if avoid:
        d = _decide(job, index, policy, memory, now_ms, rng, attempt, True, avoid)
        if d.routed or d.outcome is Outcome.SATURATED:
            return d
    return _decide(job, index, policy, memory, now_ms, rng, attempt, True, _NOTHING)


_NOTHING: frozenset[str] = frozenset()
_MISS = object()
_CACHE_MAX = 4096
"""Entries of each cache of a snapshot (routes, candidate sets, A/B sides) before it starts afresh."""
_DONE = Job(job_id="-", model_type="-")
"""What a cached route's context holds between decisions: never the last job (its payload may be a MiB)."""


@dataclass(slots=True)
class _Step:
    """One model of a route (the job's own, then its fallbacks): its candidate sets and a strategy context
    kept for it (only the job, clock, random source and memory change from one job to the next)."""

    tier: int
    sets: tuple[CandidateSet, ...]
    ctx: Context
    prefix: str
    """What a pick's reason starts with here (an override refused, an A/B variant, a fallback model)."""


@dataclass(slots=True)
class _Route:
    """Everything about a decision that depends on the job's key and not the job: built once per snapshot,
    policy and breaker view, so a decision is a dictionary lookup and a strategy call."""

    strategy: str
    fn: Callable[[CandidateSet, Context], Pick | None]
    steps: tuple[_Step, ...]
    models: tuple[str, ...]
    known: bool
    note: str


@dataclass(slots=True)
class _Split:
    """The two routes of an A/B test: which one a job takes is decided per job (by session or id)."""

    test: ABTest
    a: _Route
    b: _Route

    def side(self, job: Job, sides: dict[tuple[int, str], bool]) -> _Route:
        """``sides``: (test, session) -> in variant b, as hashed once (a session's jobs repeat it)."""
        test = self.test
        if test.key != "session" or not job.session_id:
            return self.b if in_variant_b(test, job) else self.a
        key = (id(test), job.session_id)  # two tests may share a name; a test lives as long as its policy
        b = sides.get(key)
        if b is None:
            if len(sides) >= _CACHE_MAX:
                sides.clear()
            b = sides[key] = in_variant_b(test, job)
        return self.b if b else self.a


def _route(job: Job, index: HeadIndex, policy: Policy, memory: RouterMemory, rng: random.Random,
           avoid: frozenset[str]) -> _Route | _Split | None:  # fmt: skip
    """The route of jobs keyed like ``job`` (None: refused, which is rare and cheap as it is)."""
    r = resolve_strategy(job, policy)
    if r.refused:
        return None
    model = job.model_type
    override = job.strategy
    allowed = not override or policy.allows_override(override)
    base = override if override and allowed else policy.strategy_for(model)
    test = policy.ab_test_for(model) if base == "ab_test" else None
    if test is None:
        return _route_of(r, job, index, policy, memory, rng, avoid)
    note = "" if allowed else f"override {override} not allowed; "
    a, b = (_route_of(ab_variant(test, model, note, side, policy), job, index, policy, memory, rng, avoid)
            for side in (False, True))  # fmt: skip
    return _Split(test, a, b)


def _route_of(r: Resolved, job: Job, index: HeadIndex, policy: Policy, memory: RouterMemory, rng: random.Random,
              avoid: frozenset[str]) -> _Route:  # fmt: skip
    fallbacks = policy.fallback_models.get(r.model_type)
    models = (r.model_type, *fallbacks) if fallbacks else (r.model_type,)
    limit = policy.load_limit(job.priority)
    steps: list[_Step] = []
    known = False
    for tier, model in enumerate(models):
        heads = index.by_model.get(model)
        if not heads:
            continue
        known = True
        sets = tuple(cs for cs in _cached_sets(index, heads, job, r.strategy, policy, model, memory, avoid, False)
                     if cs.heads)  # fmt: skip
        if not sets:
            continue
        ctx = Context(job, policy, memory, 0, rng, policy.goal_for(model), index.profiles,
                      index.models.get(model), limit)  # fmt: skip
        prefix = r.note + (f"fallback model {model}; " if tier > 0 else "")
        steps.append(_Step(tier, sets, ctx, prefix))
    return _Route(r.strategy, STRATEGY_FUNCTIONS[r.strategy], tuple(steps), models, known, r.note)


def _decide_fast(job: Job, index: HeadIndex, policy: Policy, memory: RouterMemory, now_ms: int,
                 rng: random.Random, attempt: int, avoid: frozenset[str]) -> Decision:  # fmt: skip
    """:func:`_decide` for the common case (no explanation asked): the job's route comes from the index's
    route cache, and only the strategy's pick is computed per job. Same outcomes, same reasons."""
    if index.route_policy is not policy or index.route_breakers != memory.breaker_epoch:
        index.routes.clear()
        index.sides.clear()
        index.route_policy = policy
        index.route_breakers = memory.breaker_epoch
    meta = job.metadata
    key = (job.model_type, job.strategy, job.region, job.priority, _route_meta(meta) if meta else (), avoid)
    routes = index.routes
    route = routes.get(key, _MISS)
    if route is _MISS:
        index.misses += 1
        if len(routes) >= _CACHE_MAX:  # made-up keys filled it: start afresh rather than grow without bound
            routes.clear()
            index.sides.clear()
        route = routes[key] = _route(job, index, policy, memory, rng, avoid)
    else:
        index.hits += 1
    if route is None:
        return _decide(job, index, policy, memory, now_ms, rng, attempt, False, avoid)
    if type(route) is _Split:
        route = route.side(job, index.sides)
    assert type(route) is _Route
    fn = route.fn
    saturated = False
    for step in route.steps:
        ctx = step.ctx
        ctx.job = job
        ctx.now_ms = now_ms
        ctx.rng = rng
        ctx.memory = memory
        for cs in step.sets:
            pick = fn(cs, ctx)
            if pick is None:
                saturated = saturated or _any_alive(cs, now_ms)
                continue
            ctx.job = _DONE
            head = pick.head
            reason = step.prefix + pick.reason if step.prefix else pick.reason
            if memory.probes and head.head_id in memory.probes:
                reason += "; half-open breaker probe"
            return Decision(Outcome.ROUTED, route.strategy, reason, head, head.model_id, pick.scores, attempt,
                            step.tier > 0 or cs.region_fallback, (), pick.sticky)  # fmt: skip
        ctx.job = _DONE
    return _no_route(route.strategy, route.note, route.models, route.known, saturated, index, memory.blocked,
                     now_ms, attempt, ())  # fmt: skip


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
        if explain:
            tiers = _static_candidates(heads, job, r.strategy, policy, True, index.models.get(model), model,
                                       blocked, avoid)  # fmt: skip
        else:
            tiers = _cached_sets(index, heads, job, r.strategy, policy, model, memory, avoid)
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
    return _no_route(r.strategy, r.note, models, known, saturated, index, blocked, now_ms, attempt,
                     tuple(excluded))  # fmt: skip


def _cached_sets(
    index: HeadIndex,
    heads: Candidates,
    job: Job,
    strategy: str,
    policy: Policy,
    model: str,
    memory: RouterMemory,
    avoid: frozenset[str],
    count: bool = True,
) -> tuple[CandidateSet, ...]:
    """The static candidate sets of one model for the job's criteria, shared by every job (and route) with the
    same ones until the snapshot (a new index), the policy or the breakers change."""
    key = (
        model,
        job.region,
        strategy,
        _meta_key(job),
        policy.version,
        id(policy),
        memory.breaker_epoch,
        avoid,
    )
    tiers = index.cache.get(key)
    if tiers is None:
        if count:
            index.misses += 1
        if len(index.cache) >= _CACHE_MAX:  # made-up criteria filled it: start afresh rather than grow
            index.cache.clear()
        tiers = index.cache[key] = _static_candidates(heads, job, strategy, policy, False, index.models.get(model),
                                                      model, memory.blocked, avoid)  # fmt: skip
    elif count:
        index.hits += 1
    return tiers


def _no_route(strategy: str, note: str, models: tuple[str, ...], known: bool, saturated: bool, index: HeadIndex,
              blocked: Mapping[str, str], now_ms: int, attempt: int,
              excluded: tuple[tuple[str, str], ...]) -> Decision:  # fmt: skip
    """The outcome when no head was picked: unknown model, saturated (a wait), or no capacity."""
    names = " or ".join(models)
    if not known:
        return Decision(Outcome.UNKNOWN_MODEL, strategy, f"no head serves {names}", attempt=attempt,
                        excluded=excluded)  # fmt: skip
    if saturated:
        return Decision(Outcome.SATURATED, strategy, note + f"every live head of {names} is at its load threshold",
                        attempt=attempt, excluded=excluded)  # fmt: skip
    if blocked and _breakers_hold(models, index, blocked, now_ms):
        # Open breakers are a wait, not a verdict: the job waits for a half-open probe (held, or aside in a retry
        # tier: see plan._Behind; no attempt spent) instead of running out of attempts while its heads cool down.
        return Decision(Outcome.SATURATED, strategy, note + f"every live head of {names} that could take it "
                        "has an open circuit breaker: waiting for a half-open probe", attempt=attempt,
                        excluded=excluded)  # fmt: skip
    return Decision(Outcome.NO_CAPACITY, strategy, note + f"no eligible head for {names}", attempt=attempt,
                    excluded=excluded)  # fmt: skip


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
