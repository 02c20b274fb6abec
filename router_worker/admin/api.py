"""The admin API's frame: route groups that carry their own OpenAPI description and access rule, the bearer
token guard, JSON errors, request metrics, and the OpenAPI document built from whatever groups were added.

A route group (heads, policy, the DLQ's, ...) is plugged in with :func:`add_group` before the server starts:
its routes get the guard their :class:`Access` asks for, and its paths and schemas appear in
``/openapi.json``. One table drives both, so a route can not be served undocumented or unguarded.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from router_worker.admin.auth import HOW_TO_SET, AdminAuth
from router_worker.metrics import Metrics
from router_worker.ops import ErrorKind, OpError, invalid_from

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

AUTH = web.AppKey("admin_auth", AdminAuth)
GROUPS = web.AppKey("admin_groups", list["RouteGroup"])
ACTOR = web.RequestKey("admin_actor", str)

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "field"],
    "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
}
_STATUS_OF_KIND = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409}


class Access(StrEnum):
    PUBLIC = "public"
    """Always open (metrics, health, the API description)."""
    READ = "read"
    """Open while ``ROUTER_ADMIN_READS_PUBLIC`` is true, else a token is needed. Never writes."""
    MUTATION = "mutation"
    """A token is needed, always; its name is the audit record's actor."""


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    access: Access
    summary: str
    responses: Mapping[int, Mapping[str, Any]]
    """Status -> OpenAPI response object; 400/401/404/503 for the guard and errors are added as they apply."""
    parameters: tuple[Mapping[str, Any], ...] = ()
    """Query parameters (path parameters are derived from the path)."""
    body: Mapping[str, Any] | None = None
    """The JSON request body's schema, when the route takes one."""
    operation_id: str = ""


@dataclass(frozen=True, slots=True)
class RouteGroup:
    tag: str
    description: str
    routes: tuple[Route, ...]
    schemas: Mapping[str, Any] = field(default_factory=dict)
    """components/schemas entries the group's routes refer to."""


class ApiError(Exception):
    """An HTTP refusal with a JSON body ``{"error": ..., "field": ...}``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:  # fmt: skip
    resp = json_response({"error": message, "field": field}, status)
    resp.headers.update(headers or {})
    return resp


def actor(request: web.Request) -> str:
    """The name of the token that authorised this request (set by the guard on every mutation)."""
    return request[ACTOR]


async def body_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "a JSON request body is required", "body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}", "body") from exc


async def body_model(request: web.Request, model: type[M]) -> M:
    data = await body_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from(exc) from exc


def query_int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw[:40]!r}", name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def query_str(request: web.Request, name: str, max_len: int = 256) -> str | None:
    raw = request.query.get(name)
    if raw is not None and len(raw) > max_len:
        raise ApiError(400, f"{name} is longer than {max_len} characters", name)
    return raw


def _needs_token(access: Access, auth: AdminAuth) -> bool:
    return access is Access.MUTATION or (access is Access.READ and not auth.reads_public)


def require_token(request: web.Request, what: str = "changes") -> str:
    """The name of the configured token the request carries; else 401 (a missing or unknown token) or 503
    (no token configured at all). The guard calls it for every route that needs a token; a handler that
    needs one for part of its work may call it too."""
    auth = request.app[AUTH]
    if not auth.enabled:
        raise ApiError(503, f"admin API {what} are refused: no admin token is configured ({HOW_TO_SET})")
    name = auth.identify(request.headers.get("Authorization"))
    if name is None:
        raise ApiError(401, f"admin API {what} need 'Authorization: Bearer <token>' with a configured token",
                       headers={"WWW-Authenticate": 'Bearer realm="router-worker admin"'})  # fmt: skip
    request[ACTOR] = name
    return name


def _guard(route: Route) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if _needs_token(route.access, request.app[AUTH]):
            require_token(request, "changes" if route.access is Access.MUTATION else "reads")
        return await route.handler(request)

    return guarded


def add_group(app: web.Application, group: RouteGroup) -> None:
    """Serve a route group (guarded as each route's access says) and describe it in ``/openapi.json``."""
    for route in group.routes:
        app.router.add_route(route.method, route.path, _guard(route))
    app[GROUPS].append(group)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as JSON ``{"error", "field"}``: the API's own, the router's (404, 405), a Redis outage."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.field, exc.headers)
    except OpError as exc:
        return error_response(_STATUS_OF_KIND[exc.kind], exc.message, exc.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        text = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return error_response(exc.status, text, None, keep)
    except (RedisError, ConnectionError, TimeoutError) as exc:
        log.warning("admin API %s %s: Redis unavailable: %s", request.method, request.path, exc)
        return error_response(503, f"Redis is unavailable: {exc}")
    except Exception:  # a bug: logged with its traceback here, a plain JSON 500 for the caller
        log.exception("admin API %s %s failed", request.method, request.path)
        return error_response(500, "internal error (logged by the router)")


def observe(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = request.match_info.route.resource
            endpoint = route.canonical if route is not None else "unmatched"
            metrics.http_requests.labels(request.method, endpoint, str(status)).inc()
            metrics.http_duration.observe(time.perf_counter() - t0)

    return middleware


def new_app(metrics: Metrics, auth: AdminAuth) -> web.Application:
    """An empty admin application: middlewares, auth and no groups yet (see :func:`add_group`)."""
    app = web.Application(middlewares=[observe(metrics), json_errors])
    app[AUTH] = auth
    app[GROUPS] = []
    return app


# --- the OpenAPI document ---------------------------------------------------------------------------------

_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def error_reply(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def json_reply(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": dict(schema)}}}


def _operation(group: RouteGroup, route: Route, auth: AdminAuth) -> dict[str, Any]:
    responses: dict[str, Any] = {str(k): dict(v) for k, v in route.responses.items()}
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in _PATH_PARAM.findall(route.path)
    ]
    params += [dict(p) for p in route.parameters]
    if route.body is not None or route.parameters:
        responses.setdefault("400", error_reply("Malformed request: `field` names what is wrong"))
    if params and params[0]["in"] == "path":
        responses.setdefault("404", error_reply("No such resource"))
    if route.access is not Access.PUBLIC:
        responses.setdefault("503", error_reply("Redis is unavailable, or no admin token is configured"))
    op: dict[str, Any] = {
        "tags": [group.tag],
        "summary": route.summary,
        "operationId": route.operation_id or f"{route.method.lower()}_{route.path}",
        "responses": responses,
    }
    if _needs_token(route.access, auth):
        op["security"] = [{"bearerAuth": []}]
        responses.setdefault("401", error_reply("Missing or unknown bearer token"))
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": dict(route.body)}}}
    return op


def openapi_document(groups: list[RouteGroup], auth: AdminAuth, version: str) -> dict[str, Any]:
    """OpenAPI 3.1 of every route of every group, as the running server guards it."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for group in groups:
        for name, schema in group.schemas.items():
            if name in schemas and schemas[name] != schema:
                raise ValueError(f"route group {group.tag!r} redefines schema {name!r}")
            schemas[name] = schema
        for route in group.routes:
            paths.setdefault(route.path, {})[route.method.lower()] = _operation(group, route, auth)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "router-worker admin API",
            "version": version,
            "description": "Heads, routing policy, decision dry-runs and audit records of a router-worker "
            "deployment. Changes need `Authorization: Bearer <token>`; the token's name is the audit actor.",
        },
        "tags": [{"name": g.tag, "description": g.description} for g in groups],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
