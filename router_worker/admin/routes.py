"""The router's own route groups: system (metrics, health, API description), heads, policy, explain, audit.

Handlers only translate HTTP to the shared operator actions of :mod:`router_worker.ops` and back; every
rule (validation, audit, the actor) lives there, so the command line behaves the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from router_worker import __version__, ops
from router_worker.admin.api import (
    AUTH,
    GROUPS,
    Access,
    Route,
    RouteGroup,
    actor,
    body_json,
    body_model,
    error_reply,
    json_reply,
    json_response,
    openapi_document,
    query_int,
    query_str,
)
from router_worker.audit_recent import AuditFilter
from router_worker.core.model import HeadStatus
from router_worker.core.policy import Policy
from router_worker.metrics import Metrics

Ready = Callable[[], bool]
InvalidHeads = Callable[[], Mapping[str, str]]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _model_schemas() -> dict[str, Any]:
    """JSON Schemas of the request bodies (and the policy), as components."""
    _, top = models_json_schema(
        [(m, "validation") for m in (Policy, ops.HeadRegistration, ops.StatusChange, ops.ExplainRequest)],
        ref_template="#/components/schemas/{model}",
    )
    return dict(top["$defs"])


HEAD_VIEW: dict[str, Any] = {
    "type": "object",
    "required": ["head_id", "model_id", "region", "partition", "status", "alive", "inflight", "capacity"],
    "properties": {
        "head_id": {"type": "string"}, "model_id": {"type": "string"}, "region": {"type": "string"},
        "partition": {"type": "integer"}, "status": _ref("HeadStatus"), "alive": {"type": "boolean"},
        "expires_at_ms": {"type": "integer"}, "inflight": {"type": "integer"}, "capacity": {"type": "integer"},
        "latency_ms": {"type": "number"}, "cache_hit_rate": {"type": "number"}, "quota_used": {"type": "number"},
        "backend": {"type": "string"}, "weight": {"type": "number"},
        "families": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "valid": {"type": "boolean"}, "invalid_reason": {"type": ["string", "null"]},
    },
}  # fmt: skip
HEAD_STATE: dict[str, Any] = {
    "type": "object",
    "required": ["head_id", "status"],
    "properties": {"head_id": {"type": "string"}, "status": _ref("HeadStatus")},
}
EXPLANATION: dict[str, Any] = {
    "type": "object",
    "required": ["model_type", "policy_version", "outcome", "strategy", "reason", "fallback", "candidates"],
    "properties": {
        "model_type": {"type": "string"}, "policy_version": {"type": "integer"}, "outcome": {"type": "string"},
        "strategy": {"type": "string"}, "reason": {"type": "string"}, "fallback": {"type": "boolean"},
        "attempt": {"type": "integer"}, "head_id": {"type": ["string", "null"]},
        "model_id": {"type": ["string", "null"]},
        "scores": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
        "candidates": {"type": "array", "items": {
            "type": "object",
            "required": ["head_id", "verdict"],
            "properties": {"head_id": {"type": "string"}, "verdict": {
                "enum": ["pick", "excluded", "eligible", "other_model"]}, "why": {"type": ["string", "null"]}},
        }},
    },
}  # fmt: skip
AUDIT_RECORD: dict[str, Any] = {
    "type": "object",
    "required": ["ts", "event", "router_id"],
    "properties": {
        "ts": {"type": "integer"},
        "event": {"type": "string"},
        "router_id": {"type": "string"},
        "actor": {"type": "string"},
    },
}


def _query(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": dict(schema),
        "description": description,
    }


def system_group(metrics: Metrics, ready: Ready, router_id: str) -> RouteGroup:
    async def metrics_h(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return json_response({"status": "ok", "router_id": router_id})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    async def openapi(request: web.Request) -> web.Response:
        return json_response(openapi_document(request.app[GROUPS], request.app[AUTH], __version__))

    health = {"type": "object", "properties": {"status": {"const": "ok"}, "router_id": {"type": "string"}}}
    ready_schema = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
    return RouteGroup("system", "Metrics, health and this description: always open.", (
        Route("GET", "/metrics", metrics_h, Access.PUBLIC, "Prometheus metrics",
              {200: {"description": "Prometheus text format",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
              operation_id="metrics"),
        Route("GET", "/healthz", healthz, Access.PUBLIC, "200 while the process runs",
              {200: json_reply("Alive", health)},
              operation_id="healthz"),
        Route("GET", "/readyz", readyz, Access.PUBLIC, "200 once the router consumes (and Redis answers)",
              {200: json_reply("Ready", ready_schema), 503: json_reply("Not ready", ready_schema)},
              operation_id="readyz"),
        Route("GET", "/openapi.json", openapi, Access.PUBLIC, "This API description (OpenAPI 3.1)",
              {200: json_reply("The document", {"type": "object"})}, operation_id="openapi"),
    ))  # fmt: skip


def heads_group(admin: ops.AdminOps, invalid_heads: InvalidHeads) -> RouteGroup:
    async def list_h(_: web.Request) -> web.Response:
        heads, inflight = await ops.list_heads(admin)
        return json_response(ops.views(heads, inflight, invalid_heads()))

    async def get_h(request: web.Request) -> web.Response:
        head, inflight = await ops.get_head(admin, request.match_info["head_id"])
        return json_response(ops.views([head], {head.head_id: inflight}, invalid_heads())[0])

    async def register_h(request: web.Request) -> web.Response:
        reg = await body_model(request, ops.HeadRegistration)
        head = await ops.register_head(admin, reg, actor(request))
        return json_response(ops.views([head], {}, invalid_heads())[0], 201)

    async def set_status(request: web.Request, status: HeadStatus) -> web.Response:
        head_id = request.match_info["head_id"]
        await ops.set_head_status(admin, head_id, status, actor(request))
        return json_response({"head_id": head_id, "status": status.value})

    async def drain_h(request: web.Request) -> web.Response:
        return await set_status(request, HeadStatus.DRAINING)

    async def undrain_h(request: web.Request) -> web.Response:
        return await set_status(request, HeadStatus.HEALTHY)

    async def status_h(request: web.Request) -> web.Response:
        change = await body_model(request, ops.StatusChange)
        return await set_status(request, change.status)

    async def remove_h(request: web.Request) -> web.Response:
        head_id = request.match_info["head_id"]
        await ops.remove_head(admin, head_id, actor(request))
        return json_response({"head_id": head_id, "removed": True})

    state = {200: json_reply("The head's status now", HEAD_STATE)}
    return RouteGroup("heads", "Registered heads: list, register, status, drain, undrain, remove.", (
        Route("GET", "/heads", list_h, Access.READ, "Every registered head with its state",
              {200: json_reply("Heads", {"type": "array", "items": _ref("HeadView")})}, operation_id="listHeads"),
        Route("POST", "/heads", register_h, Access.MUTATION,
              "Register a head by hand (its partition is checked against the broker)",
              {201: json_reply("Registered", _ref("HeadView")),
               409: error_reply("A live head holds this id")},
              body=_ref("HeadRegistration"), operation_id="registerHead"),
        Route("GET", "/heads/{head_id}", get_h, Access.READ, "One head's state",
              {200: json_reply("The head", _ref("HeadView"))}, operation_id="getHead"),
        Route("PUT", "/heads/{head_id}/status", status_h, Access.MUTATION,
              "Set a head's status (healthy undrains it)", state, body=_ref("StatusChange"),
              operation_id="setHeadStatus"),
        Route("POST", "/heads/{head_id}/drain", drain_h, Access.MUTATION,
              "Stop sending new jobs to a head; it finishes what it has", state, operation_id="drainHead"),
        Route("POST", "/heads/{head_id}/undrain", undrain_h, Access.MUTATION,
              "Send jobs to a drained head again (status healthy)", state, operation_id="undrainHead"),
        Route("DELETE", "/heads/{head_id}", remove_h, Access.MUTATION, "Remove a head: routers stop at once",
              {200: json_reply("Removed", {"type": "object", "required": ["head_id", "removed"],
                                           "properties": {"head_id": {"type": "string"},
                                                          "removed": {"const": True}}})},
              operation_id="removeHead"),
    ), {"HeadView": HEAD_VIEW})  # fmt: skip


def policy_group(admin: ops.AdminOps) -> RouteGroup:
    async def get_h(_: web.Request) -> web.Response:
        return json_response((await ops.get_policy(admin)).model_dump(mode="json"))

    async def put_h(request: web.Request) -> web.Response:
        expect = query_int(request, "expect_version", None, 0, 2**53)
        policy = ops.validate_policy(await body_json(request))
        stored = await ops.set_policy(admin, policy, expect, actor(request))
        return json_response(stored.model_dump(mode="json"))

    async def validate_h(request: web.Request) -> web.Response:
        policy = ops.validate_policy(await body_json(request))
        return json_response({"valid": True, "policy": policy.model_dump(mode="json")})

    async def history_h(request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 10, 1, 50)
        assert limit is not None
        return json_response([p.model_dump(mode="json") for p in await ops.policy_history(admin, limit)])

    policy = json_reply("The policy", _ref("Policy"))
    return RouteGroup("policy", "The routing policy: versioned, validated on write, history kept.", (
        Route("GET", "/policy", get_h, Access.READ, "The policy in force", {200: policy}, operation_id="getPolicy"),
        Route("PUT", "/policy", put_h, Access.MUTATION,
              "Validate and store a new policy; every router reloads it at once",
              {200: json_reply("Stored, with its new version", _ref("Policy")),
               409: error_reply("expect_version is not the current version")},
              parameters=(_query("expect_version", {"type": "integer", "minimum": 0},
                                 "Refuse (409) unless this is the current version"),),
              body=_ref("Policy"), operation_id="putPolicy"),
        Route("POST", "/policy/validate", validate_h, Access.READ, "Check a policy without storing it",
              {200: json_reply("Valid", {"type": "object", "required": ["valid", "policy"],
                                         "properties": {"valid": {"const": True}, "policy": _ref("Policy")}})},
              body=_ref("Policy"), operation_id="validatePolicy"),
        Route("GET", "/policy/history", history_h, Access.READ, "Earlier policies, newest first",
              {200: json_reply("Policies", {"type": "array", "items": _ref("Policy")})},
              parameters=(_query("limit", {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
                                 "How many"),),
              operation_id="policyHistory"),
    ), _model_schemas())  # fmt: skip


def explain_group(admin: ops.AdminOps) -> RouteGroup:
    async def explain_h(request: web.Request) -> web.Response:
        req = await body_model(request, ops.ExplainRequest)
        return json_response((await ops.explain(admin, req.job())).as_dict())

    return RouteGroup("explain", "Dry-run a routing decision (nothing is published or written).", (
        Route("POST", "/explain", explain_h, Access.READ,
              "The decision a router would make for this job now: candidates, exclusions, scores, pick",
              {200: json_reply("The decision", _ref("Explanation"))}, body=_ref("ExplainRequest"),
              operation_id="explain"),
    ), {"Explanation": EXPLANATION})  # fmt: skip


def audit_group(admin: ops.AdminOps) -> RouteGroup:
    filters = ("event", "head_id", "job_id", "model_type", "actor")

    async def recent_h(request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, 1, 1000)
        assert limit is not None
        where = AuditFilter(**{name: query_str(request, name) for name in filters})
        return json_response(await ops.recent_audit(admin, limit, where))

    params = (
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "How many"),
        *(_query(n, {"type": "string", "maxLength": 256}, f"Only records with this {n}") for n in filters),
    )
    return RouteGroup("audit", "Recent audit records (decisions, retries, dead letters, admin operations).", (
        Route("GET", "/audit", recent_h, Access.READ, "The newest audit records, newest first",
              {200: json_reply("Records", {"type": "array", "items": _ref("AuditRecord")})},
              parameters=params, operation_id="recentAudit"),
    ), {"AuditRecord": AUDIT_RECORD})  # fmt: skip
