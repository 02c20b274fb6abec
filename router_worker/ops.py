"""Operator actions, one code path each, shared by the command line (``cli_admin``) and the admin HTTP API.

Each action takes an :class:`AdminOps` (the adapters: head registry, policy store, model catalog, audit sink)
and, when it changes something, the ``actor`` who asked: the CLI's OS user or the API token's name. Every
change writes one audit record with that actor. Refusals are :class:`OpError`: ``kind`` tells the caller how
to answer (exit code, HTTP status) and ``field`` names what was wrong. Request bodies are validated by the
pydantic models here, so the CLI's options and the API's JSON meet the same rules.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, cast

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.audit_recent import AuditFilter, recent_records, recent_stream_records
from router_worker.clock import now_ms
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import Decision, Head, HeadStatus, RouterMemory
from router_worker.core.policy import Policy, parse_policy_text
from router_worker.settings import Settings
from router_worker.state.breakers import BreakerStore, blocking
from router_worker.state.catalog import ModelCatalog
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyStore, PolicyVersionConflict, describe_errors
from schemas.envelope import Job, MetadataValue

PartitionCheck = Callable[[str, int], Awaitable[str | None]]
"""(model id, partition) -> why a head can not own that partition (None: it can)."""


class ErrorKind(StrEnum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


class OpError(Exception):
    """An action refused: what kind of refusal, why, and the offending field when one is to blame."""

    def __init__(self, kind: ErrorKind, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field


def invalid_from(exc: ValidationError, prefix: str = "", rename: Mapping[str, str] | None = None) -> OpError:
    """A pydantic refusal as an :class:`OpError` naming the first bad field (dotted path)."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    field = (rename or {}).get(field, field)
    return OpError(ErrorKind.INVALID, f"{prefix}{describe_errors(exc)}", field)


@dataclass(frozen=True, slots=True)
class AdminOps:
    """The adapters operator actions use, built once per process and passed in."""

    settings: Settings
    redis: Redis
    registry: HeadRegistry
    policies: PolicyStore
    catalog: ModelCatalog
    audit: AuditSink
    origin: str
    """``router_id`` of the audit records: the router's id for the API, ``cli`` for the command line."""
    check_partition: PartitionCheck

    @classmethod
    def create(cls, settings: Settings, redis: Redis, audit: AuditSink, origin: str,
               registry: HeadRegistry | None = None, policies: PolicyStore | None = None,
               check_partition: PartitionCheck | None = None) -> AdminOps:  # fmt: skip
        keys = Keys(settings.redis_prefix)
        if check_partition is None:
            from router_worker.pipeline.topology import check_head_partition

            async def broker_check(model_id: str, partition: int) -> str | None:
                return await check_head_partition(settings, model_id, partition)

            check_partition = broker_check
        return cls(settings, redis, registry or HeadRegistry(redis, keys, settings.head_ttl_ms),
                   policies or PolicyStore.for_settings(redis, settings), ModelCatalog(redis, keys), audit, origin,
                   check_partition)  # fmt: skip


# --- heads ------------------------------------------------------------------------------------------------


class HeadRegistration(BaseModel):
    """A head registered by hand (a model server that does not use the worker SDK; it must heartbeat)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    head_id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\s/]+$")]
    model_id: Annotated[str, Field(min_length=1, max_length=256)]
    region: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    partition: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    capacity: Annotated[int, Field(ge=1, le=1_000_000)] = 8
    backend: Annotated[str, Field(min_length=1, max_length=64)] = "cpu"


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: HeadStatus


def head_view(head: Head, inflight: int, now: int, invalid_reason: str | None = None) -> dict[str, Any]:
    """What operators see of a head (``heads ls --json`` and ``GET /heads``)."""
    return {
        "head_id": head.head_id, "model_id": head.model_id, "region": head.region, "partition": head.partition,
        "status": head.status.value, "alive": head.expires_at_ms >= now, "expires_at_ms": head.expires_at_ms,
        "inflight": inflight, "capacity": head.capacity, "latency_ms": head.latency_ms,
        "cache_hit_rate": head.cache_hit_rate, "quota_used": head.quota_used, "backend": head.backend,
        "weight": head.weight, "families": sorted(head.families), "tags": sorted(head.tags),
        "valid": invalid_reason is None, "invalid_reason": invalid_reason,
    }  # fmt: skip


async def list_heads(ops: AdminOps) -> tuple[list[Head], dict[str, int]]:
    """Every registered head and its in-flight count. Reads only."""
    heads, _profiles, inflight = await ops.registry.snapshot(prune=False)
    return heads, inflight


async def get_head(ops: AdminOps, head_id: str) -> tuple[Head, int]:
    found = await ops.registry.get(head_id)
    if found is None:
        raise OpError(ErrorKind.NOT_FOUND, f"no head {head_id!r}", "head_id")
    return found


async def register_head(ops: AdminOps, reg: HeadRegistration, actor: str) -> Head:
    """Register a head after checking its partition against the broker; a live head's id is refused."""
    problem = await ops.check_partition(reg.model_id, reg.partition)
    if problem:
        raise OpError(ErrorKind.INVALID, f"{problem}; {reg.head_id} not registered", "partition")
    existing = await ops.registry.get(reg.head_id)
    if existing is not None and existing[0].expires_at_ms >= now_ms():
        raise OpError(ErrorKind.CONFLICT,
                      f"head {reg.head_id!r} is registered and alive: remove it first", "head_id")  # fmt: skip
    rec = HeadRecord(reg.head_id, reg.model_id, reg.region, reg.capacity, reg.partition, backend=reg.backend)
    await ops.registry.register(rec)
    await ops.audit.emit(
        "head_registered", ops.origin, head_id=reg.head_id, model_id=reg.model_id, actor=actor
    )
    head, _ = await get_head(ops, reg.head_id)
    return head


async def set_head_status(ops: AdminOps, head_id: str, status: HeadStatus, actor: str) -> None:
    """Drain (``draining``), undrain (``healthy``) or mark a head; audited as ``head_drained`` or ``head_status``."""
    if not await ops.registry.set_status(head_id, status, actor):
        raise OpError(ErrorKind.NOT_FOUND, f"no head {head_id!r}", "head_id")
    event = "head_drained" if status is HeadStatus.DRAINING else "head_status"
    await ops.audit.emit(event, ops.origin, head_id=head_id, status=status.value, actor=actor)


async def remove_head(ops: AdminOps, head_id: str, actor: str) -> None:
    if not await ops.registry.remove(head_id, actor):
        raise OpError(ErrorKind.NOT_FOUND, f"no head {head_id!r}", "head_id")
    await ops.audit.emit("head_removed", ops.origin, head_id=head_id, actor=actor)


# --- policy -----------------------------------------------------------------------------------------------


def validate_policy(data: Any) -> Policy:
    """A policy document (parsed JSON or YAML) to a Policy, or INVALID naming the first bad field.

    Validated as strict JSON: a number must be a number (``true`` is not 1.0, ``"300"`` is not 300), as the
    policy's published schema says; names of enums and lists for tuples are JSON's own and accepted."""
    try:
        raw = orjson.dumps(data)
    except TypeError as exc:  # YAML can hold what JSON can not (keys that are not strings)
        raise OpError(ErrorKind.INVALID, f"invalid policy: not a JSON document: {exc}", "body") from exc
    try:
        return Policy.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc, "invalid policy: ") from exc


def read_policy_file(path: Path) -> Any:
    """A policy file's document (YAML for .yaml/.yml, else JSON), not yet validated."""
    yaml_file = path.suffix in (".yaml", ".yml")
    try:
        text = path.read_text()
        return parse_policy_text(text, yaml_file)  # bounded: size, no YAML aliases
    except OSError as exc:
        raise OpError(ErrorKind.INVALID, f"{path}: {exc.strerror or exc}", "file") from exc
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpError(ErrorKind.INVALID, f"{path}: not valid {'YAML' if yaml_file else 'JSON'}: {exc}",
                      "file") from exc  # fmt: skip


async def get_policy(ops: AdminOps) -> Policy:
    return await ops.policies.get()


async def set_policy(ops: AdminOps, policy: Policy, expect_version: int | None, actor: str) -> Policy:
    """Store a validated policy as the next version (CONFLICT when ``expect_version`` is not current)."""
    try:
        stored = await ops.policies.set(policy, expect_version, actor=actor)
    except PolicyVersionConflict as exc:
        raise OpError(ErrorKind.CONFLICT, str(exc), "expect_version") from exc
    await ops.audit.emit("policy_changed", ops.origin, actor=actor, version=stored.version,
                         strategy=stored.default_strategy)  # fmt: skip
    return stored


async def policy_history(ops: AdminOps, limit: int) -> list[Policy]:
    """Earlier policies, newest first."""
    return await ops.policies.history(limit)


# --- explain ----------------------------------------------------------------------------------------------


class ExplainRequest(BaseModel):
    """The job fields a decision depends on (the envelope's names; ``job_id`` is not needed)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model_type: Annotated[str, Field(min_length=1, max_length=256)]
    region: Annotated[str | None, Field(max_length=64)] = None
    strategy: Annotated[str | None, Field(max_length=64)] = None
    session_id: Annotated[str | None, Field(max_length=256)] = None
    tenant: Annotated[str | None, Field(max_length=128)] = None
    prefix_hash: Annotated[str | None, Field(max_length=256)] = None
    metadata: dict[str, MetadataValue] | None = None
    estimated_tokens: Annotated[int | None, Field(ge=0)] = None
    priority: int | None = None

    def job(self) -> Job:
        try:
            return Job.model_validate({"job_id": "explain", **self.model_dump(exclude_none=True)})
        except ValidationError as exc:
            raise invalid_from(exc) from exc


@dataclass(frozen=True, slots=True)
class Candidate:
    head: Head
    load: float
    verdict: str
    """``pick``, ``excluded``, ``eligible`` or ``other_model``."""
    why: str | None


@dataclass(frozen=True, slots=True)
class Explanation:
    job: Job
    decision: Decision
    policy_version: int
    candidates: tuple[Candidate, ...]

    def as_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "model_type": self.job.model_type, "policy_version": self.policy_version, "outcome": d.outcome.value,
            "strategy": d.strategy, "reason": d.reason, "fallback": d.fallback, "attempt": d.attempt,
            "head_id": d.head.head_id if d.head else None, "model_id": d.model_id,
            "scores": d.scores.as_dict() if d.head else None,
            "candidates": [
                {"head_id": c.head.head_id, "model_id": c.head.model_id, "region": c.head.region,
                 "status": c.head.status.value, "load": round(c.load, 4), "latency_ms": c.head.latency_ms,
                 "cache_hit_rate": c.head.cache_hit_rate, "quota_used": c.head.quota_used, "verdict": c.verdict,
                 "why": c.why}
                for c in self.candidates
            ],
        }  # fmt: skip


def explain_decision(job: Job, index: HeadIndex, policy: Policy, memory: RouterMemory, now: int,
                     rng: random.Random) -> Explanation:  # fmt: skip
    """Pure: one decision in explain mode, with a verdict for every head."""
    d = decide(job, index, policy, memory, now, rng, explain=True)
    why = dict(d.excluded)
    rows = []
    for h in index.heads.values():
        if d.head is not None and h.head_id == d.head.head_id:
            verdict, reason = "pick", None
        elif h.head_id in why:
            verdict, reason = "excluded", why[h.head_id]
        else:
            verdict, reason = ("eligible" if h.serves(job.model_type) else "other_model"), None
        rows.append(Candidate(h, memory.load(h), verdict, reason))
    return Explanation(job, d, policy.version, tuple(rows))


async def explain(ops: AdminOps, job: Job) -> Explanation:
    """Dry-run one decision against the live heads, policy, model catalog and session pin. Reads only."""
    heads, profiles, inflight = await ops.registry.snapshot(prune=False)
    policy = await ops.policies.get()
    specs = await ops.catalog.all()
    keys = Keys(ops.settings.redis_prefix)
    pinned = cast(str | None, await ops.redis.get(keys.affinity(job.session_id))) if job.session_id else None
    memory = RouterMemory(pending=inflight)
    now = now_ms()
    memory.set_breakers(await blocking(BreakerStore(ops.redis, keys), [h.head_id for h in heads], now), {})
    if job.session_id and pinned:
        memory.affinity[job.session_id] = (pinned, now + int(policy.affinity_timeout_s * 1000))
    return explain_decision(
        job, HeadIndex.build(heads, profiles, specs), policy, memory, now, random.Random()
    )


# --- audit ------------------------------------------------------------------------------------------------


async def recent_audit(ops: AdminOps, limit: int, where: AuditFilter) -> list[dict[str, Any]]:
    """The newest ``limit`` audit records matching ``where``, newest first: from the deployment's audit
    stream when it keeps one (every router's records), else from this process's audit log file. Reads only."""
    if ops.audit.stream is not None:
        return await recent_stream_records(ops.redis, ops.audit.stream, limit, where)
    s = ops.settings
    if not s.audit_file:
        return []
    return await asyncio.to_thread(recent_records, Path(s.audit_file), s.audit_file_backups, limit, where)


def views(
    heads: Sequence[Head], inflight: Mapping[str, int], invalid: Mapping[str, str | None]
) -> list[dict[str, Any]]:
    now = now_ms()
    return [head_view(h, inflight.get(h.head_id, 0), now, invalid.get(h.head_id)) for h in heads]
