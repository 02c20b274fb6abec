"""The routing policy: one validated document every router applies, held in Redis and hot-reloaded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from enum import StrEnum
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from router_worker.core.admission import Limit
from router_worker.core.breaker import BreakerConfig

STRATEGIES: tuple[str, ...] = (
    "round_robin",
    "least_loaded",
    "geo_preferred",
    "model_specific",
    "hybrid",
    "cache_aware",
    "quota_aware",
    "random",
    "weighted_random",
    "latency_based",
    "affinity",
    "ab_test",
    "adaptive",
    "prefix_aware",
)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

# Limits of a policy document. A policy comes from an operator's file or the admin API and every router
# keeps it in memory and matches every job against its rules: these bound its size and the cost of a match,
# far above what a real deployment writes, so a typo or a hostile document is refused with the field named.
MAX_RULES = 1_000
MAX_AB_TESTS = 100
MAX_PATTERN_CHARS = 256
MAX_PATTERN_WILDCARDS = 16
"""``*``, ``?`` and ``[`` in one pattern (each is a branch of the match)."""
MAX_NAME_CHARS = 256
"""A model id, region, backend, head id or tenant named in a policy."""
MAX_LIST_ITEMS = 64
"""Items of one list: preferred regions, one model's fallbacks, one region's fallbacks, allowed overrides."""
MAX_MAP_ENTRIES = 10_000
"""Entries of one mapping: fallback_models, region_fallbacks, backend_weights, head_weights, admission's
per-tenant and per-model overrides."""

MAX_DOCUMENT_CHARS = 1 << 20
"""A policy file's size (the admin API's body limit is the same 1 MiB)."""

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Names = Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)]


def _bounded_pattern(pattern: str) -> str:
    wildcards = sum(pattern.count(c) for c in "*?[")
    if wildcards > MAX_PATTERN_WILDCARDS:
        raise ValueError(f"pattern has {wildcards} wildcards (*, ?, [); at most {MAX_PATTERN_WILDCARDS}")
    return pattern


Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS), AfterValidator(_bounded_pattern)]


class Goal(StrEnum):
    MINIMIZE_LATENCY = "minimize_latency"
    MAXIMIZE_THROUGHPUT = "maximize_throughput"
    MINIMIZE_POWER = "minimize_power"
    BALANCED = "balanced"


def _known_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HybridWeights(_Strict):
    load: Annotated[float, Field(ge=0)] = 0.4
    cache: Annotated[float, Field(ge=0)] = 0.2
    quota: Annotated[float, Field(ge=0)] = 0.1
    latency: Annotated[float, Field(ge=0)] = 0.2
    health: Annotated[float, Field(ge=0)] = 0.1

    @model_validator(mode="after")
    def _not_all_zero(self) -> HybridWeights:
        if self.load + self.cache + self.quota + self.latency + self.health <= 0:
            raise ValueError("at least one hybrid weight must be positive")
        return self


class Rule(_Strict):
    """Settings for models whose id matches ``pattern`` (shell-style: ``resnet*``, ``bert_*``)."""

    pattern: Pattern
    strategy: str | None = None
    goal: Goal | None = None
    preferred_regions: Names = Field(default_factory=list)
    max_latency_ms: Annotated[float | None, Field(gt=0)] = None

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        return None if v is None else _known_strategy(v)


class ABTest(_Strict):
    """Split the jobs for ``model`` between two variants; each variant is a model id or a strategy."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    model: Annotated[Pattern, Field(description="model_type the test applies to ('*' for all)")]
    share_b: Fraction = 0.5
    a_model: Name | None = None
    b_model: Name | None = None
    a_strategy: str | None = None
    b_strategy: str | None = None
    key: Literal["session", "job"] = "session"

    @field_validator("a_strategy", "b_strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        if v == "ab_test":
            raise ValueError("an A/B variant can not itself be ab_test")
        return None if v is None else _known_strategy(v)

    @model_validator(mode="after")
    def _variants(self) -> ABTest:
        if not ((self.a_model or self.a_strategy) and (self.b_model or self.b_strategy)):
            raise ValueError(f"ab test {self.name!r} needs a model or a strategy for both variants a and b")
        return self


class BreakerPolicy(_Strict):
    """Circuit breakers of every head (see ``core/breaker.py``). Absent from a policy: the router's settings
    (``ROUTER_BREAKER_*``) apply."""

    enabled: bool = True
    window_s: Annotated[float, Field(ge=0.5, le=3600, description="Sliding window of outcomes counted.")] = (
        10.0
    )
    min_volume: Annotated[int, Field(ge=1, description="Outcomes in the window before it may open.")] = 20
    error_threshold: Annotated[float, Field(gt=0.0, le=1.0, description="Failure share that opens it.")] = 0.5
    cooldown_s: Annotated[float, Field(ge=0, le=86_400, description="Open this long, at least.")] = 30.0
    half_open_probes: Annotated[int, Field(ge=1, le=1000, description="Jobs let through half-open.")] = 1

    def config(self) -> BreakerConfig:
        return BreakerConfig(window_ms=int(self.window_s * 1000), min_volume=self.min_volume,
                             error_threshold=self.error_threshold, cooldown_ms=int(self.cooldown_s * 1000),
                             half_open_probes=self.half_open_probes)  # fmt: skip


class RateLimit(_Strict):
    """A token bucket: ``rate`` jobs per second, up to ``burst`` at once (default: one second's worth)."""

    rate: Annotated[float, Field(gt=0, allow_inf_nan=False, description="Jobs per second.")]
    burst: Annotated[int | None, Field(ge=1, description="Jobs at once after a quiet spell.")] = None

    def limit(self) -> Limit:
        return Limit(self.rate, self.burst or max(1, math.ceil(self.rate)))


class AdmissionPolicy(_Strict):
    """Token buckets per tenant and per model, shared by every router. A job over a limit waits in the retry
    topics until its token is there; it is never dropped or dead-lettered for it. Jobs without a ``tenant``
    have no tenant limit."""

    tenant: RateLimit | None = None
    """Default limit of every tenant (None: unlimited)."""
    model: RateLimit | None = None
    """Default limit of every model_type (None: unlimited)."""
    tenants: dict[Name, RateLimit | None] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    """Per-tenant overrides (null: that tenant is unlimited)."""
    models: dict[Name, RateLimit | None] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    """Per-model overrides (null: that model is unlimited)."""

    @property
    def active(self) -> bool:
        return bool(self.tenant or self.model or any(self.tenants.values()) or any(self.models.values()))

    def tenant_limit(self, tenant: str | None) -> Limit | None:
        if not tenant:
            return None
        rl = self.tenants.get(tenant, self.tenant)
        return rl.limit() if rl is not None else None

    def model_limit(self, model: str) -> Limit | None:
        rl = self.models.get(model, self.model)
        return rl.limit() if rl is not None else None


class Policy(_Strict):
    """Everything a router needs to decide. Validated on write; an invalid one never replaces a valid one."""

    version: Annotated[int, Field(ge=0)] = 0
    default_strategy: str = "least_loaded"
    goal: Goal = Goal.BALANCED
    max_load_threshold: Annotated[float, Field(gt=0.0)] = 0.9
    """Heads at or over this load (in-flight / capacity) get no new jobs."""
    min_cache_hit_rate: Fraction = 0.3
    """cache_aware prefers heads at or above this hit rate."""
    load_weight: Annotated[float, Field(ge=0.0)] = 0.1
    """cache_aware and quota_aware: how much a unit of load (in-flight / capacity) counts against the hit
    rate or quota headroom. Small: the warmest head keeps its jobs until its queue is clearly longer."""
    quota_limit: Fraction = 0.95
    """Heads whose quota use reaches this get no new jobs."""
    affinity_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    prefix_load_bound: Annotated[float, Field(gt=0.0)] = 0.8
    """prefix_aware keeps a prefix on its head while the head's load stays under this bound."""
    allowed_overrides: Names | Literal["*"] = "*"
    """Strategies a job may ask for in its ``strategy`` field ('*': any)."""
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    fallback_models: dict[Name, Names] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    """model_type -> other models to try, in order, when it has no eligible head."""
    region_fallbacks: dict[Name, Names] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    """region -> other regions, nearest first."""
    ab_tests: list[ABTest] = Field(default_factory=list, max_length=MAX_AB_TESTS)
    hybrid_weights: HybridWeights = HybridWeights()
    backend_weights: dict[Name, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    head_weights: dict[Name, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    adaptive_min_samples: Annotated[int, Field(ge=1)] = 5
    """Below this many samples the adaptive profile's confidence is low and load dominates."""
    breaker: BreakerPolicy | None = None
    """Circuit breakers of heads (None: the router's ``ROUTER_BREAKER_*`` settings)."""
    admission: AdmissionPolicy = AdmissionPolicy()
    """Rate limits per tenant and per model."""
    priority_headroom: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Load share kept for higher-priority jobs: jobs with priority <= 0 (or none) stop at
    ``max_load_threshold - priority_headroom``, negative priorities at twice that below; so as heads saturate,
    lower-priority jobs are the ones held back first."""

    @cached_property
    def _rules(self) -> dict[str, Rule | None]:
        return {}

    @cached_property
    def resolved(self) -> dict[str, Any]:
        """model_type -> resolved strategy, memoised by the engine (plain dict: no pydantic access cost)."""
        return {}

    @field_validator("default_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return _known_strategy(v)

    @field_validator("allowed_overrides")
    @classmethod
    def _overrides(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            for name in v:
                _known_strategy(name)
        return v

    def rule_for(self, model_type: str) -> Rule | None:
        memo = self._rules  # once per job on the hot path: the memo first, no closure built
        if model_type in memo:
            return memo[model_type]
        return _first_match(memo, model_type, self.rules, _rule_pattern)

    def strategy_for(self, model_type: str) -> str:
        rule = self.rule_for(model_type)
        return rule.strategy if rule and rule.strategy else self.default_strategy

    def goal_for(self, model_type: str) -> Goal:
        rule = self.rule_for(model_type)
        return rule.goal if rule and rule.goal else self.goal

    def load_limit(self, priority: int | None) -> float:
        """The load threshold a job of ``priority`` sees (see ``priority_headroom``)."""
        headroom = self.priority_headroom
        if not headroom or (priority is not None and priority > 0):
            return self.max_load_threshold
        return self.max_load_threshold - headroom * (2 if priority is not None and priority < 0 else 1)

    def allows_override(self, strategy: str) -> bool:
        return self.allowed_overrides == "*" or strategy in self.allowed_overrides

    @cached_property
    def _ab_by_model(self) -> dict[str, ABTest | None]:
        return {}

    def ab_test_for(self, model_type: str) -> ABTest | None:
        return _first_match(self._ab_by_model, model_type, self.ab_tests, lambda t: t.model)


T = TypeVar("T")
_MEMO_LIMIT = 4096


def _rule_pattern(rule: Rule) -> str:
    return rule.pattern


def _first_match(
    memo: dict[str, T | None], model_type: str, items: list[T], pattern: Callable[[T], str]
) -> T | None:
    """The first item whose shell-style pattern matches ``model_type``, memoised per policy (bounded)."""
    if model_type in memo:
        return memo[model_type]
    found = next((item for item in items if fnmatchcase(model_type, pattern(item))), None)
    # Emptied when full, not frozen: a stream of made-up model types (any producer's) filled it once, and every
    # real one not seen before scanned every rule (up to MAX_RULES patterns) on each of its jobs from then on.
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[model_type] = found
    return found


DEFAULT_POLICY = Policy()


class _PolicyYamlLoader(yaml.SafeLoader):
    """YAML without aliases: a policy needs none, and a few nested aliases (``*a`` ten times in ``&b``, ...)
    expand a 300-byte file into billions of nodes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a policy", mark)
        return super().compose_node(parent, index)


def parse_policy_text(text: str, yaml_doc: bool) -> Any:
    """A policy file's text to its document (not yet validated), within the limits: at most
    MAX_DOCUMENT_CHARS, YAML without aliases. Raises ValueError (yaml.YAMLError, json.JSONDecodeError)."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise yaml.YAMLError(f"{len(text):,} characters; a policy has at most {MAX_DOCUMENT_CHARS:,}")
    return yaml.load(text, Loader=_PolicyYamlLoader) if yaml_doc else json.loads(text)
