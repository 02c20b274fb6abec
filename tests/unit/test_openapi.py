"""The admin API's description matches what the server serves: every route documented, every documented
path served, the same methods; guards and documented security agree; the document is valid OpenAPI."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import schemathesis
from aiohttp import web
from redis.asyncio import Redis

from router_worker import __version__
from router_worker.admin import (
    Access,
    AdminAuth,
    AdminOps,
    Route,
    RouteGroup,
    add_group,
    build_app,
    json_reply,
)
from router_worker.admin.api import AUTH, GROUPS, openapi_document
from router_worker.audit import AuditSink
from router_worker.metrics import Metrics
from router_worker.settings import Settings

Served = set[tuple[str, str]]


def _app(auth: AdminAuth) -> web.Application:
    """The router's admin app; nothing connects (the Redis client is lazy and never used here)."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    ops = AdminOps.create(settings, Redis.from_url("redis://127.0.0.1:1/0"), AuditSink(None, "c", None), "r1")
    return build_app(Metrics(), ops, auth, lambda: True)


def served(app: web.Application) -> Served:
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


def documented(doc: dict[str, Any]) -> Served:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def document(app: web.Application) -> dict[str, Any]:
    return openapi_document(app[GROUPS], app[AUTH], __version__)


@pytest.mark.parametrize("reads_public", [True, False])
def test_every_route_is_documented_and_every_documented_path_served(reads_public: bool) -> None:
    app = _app(AdminAuth.of({"ops": "t"}, reads_public))
    doc = document(app)
    assert served(app) == documented(doc)
    expected = {("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json"),
                ("GET", "/heads"), ("POST", "/heads"), ("GET", "/heads/{head_id}"),
                ("PUT", "/heads/{head_id}/status"), ("POST", "/heads/{head_id}/drain"),
                ("POST", "/heads/{head_id}/undrain"), ("DELETE", "/heads/{head_id}"),
                ("GET", "/policy"), ("PUT", "/policy"), ("POST", "/policy/validate"), ("GET", "/policy/history"),
                ("POST", "/explain"), ("GET", "/audit")}  # fmt: skip
    assert served(app) == expected
    assert not any(m == "HEAD" for m, _ in served(app)), "no undocumented HEAD twins of the GET routes"


def test_a_route_added_around_the_groups_is_caught() -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app = _app(AdminAuth())
    app.router.add_get("/secret", handler)
    assert served(app) - documented(document(app)) == {("GET", "/secret"), ("HEAD", "/secret")}


def test_a_plugged_in_group_is_served_guarded_and_documented() -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    group = RouteGroup("dlq", "Dead letters.", (
        Route("GET", "/dlq", handler, Access.READ, "List", {200: json_reply("Rows", {"type": "array"})},
              operation_id="listDlq"),
        Route("POST", "/dlq/redrive", handler, Access.MUTATION, "Redrive",
              {202: json_reply("Started", {"type": "object"})}, body={"type": "object"}, operation_id="redrive"),
    ), {"DeadLetter": {"type": "object"}})  # fmt: skip
    app = _app(AdminAuth.of({"ops": "t"}, reads_public=False))
    add_group(app, group)
    doc = document(app)
    assert served(app) == documented(doc)
    assert doc["paths"]["/dlq/redrive"]["post"]["security"] == [{"bearerAuth": []}]
    assert {"401", "503", "400"} <= set(doc["paths"]["/dlq/redrive"]["post"]["responses"])
    assert doc["paths"]["/dlq"]["get"]["security"] == [{"bearerAuth": []}], "reads closed: documented so"
    assert "DeadLetter" in doc["components"]["schemas"]
    clash = RouteGroup("x", "", (), {"DeadLetter": {"type": "string"}})
    add_group(app, clash)
    with pytest.raises(ValueError, match="redefines schema 'DeadLetter'"):
        document(app)


@pytest.mark.parametrize("reads_public", [True, False])
def test_security_and_error_statuses_follow_the_access_rules(reads_public: bool) -> None:
    app = _app(AdminAuth.of({"ops": "t"}, reads_public))
    doc = document(app)
    access = {(r.method, r.path): r.access for g in app[GROUPS] for r in g.routes}
    for (method, path), rule in access.items():
        op = doc["paths"][path][method.lower()]
        guarded = rule is Access.MUTATION or (rule is Access.READ and not reads_public)
        assert op["security"] == ([{"bearerAuth": []}] if guarded else []), (method, path)
        assert ("401" in op["responses"]) == guarded, (method, path)
        if rule is not Access.PUBLIC:
            assert "503" in op["responses"], (method, path)
        if "{head_id}" in path:
            assert "404" in op["responses"], (method, path)
        if "requestBody" in op:
            assert "400" in op["responses"], (method, path)
    mutations = {k for k, v in access.items() if v is Access.MUTATION}
    assert mutations == {("POST", "/heads"), ("PUT", "/heads/{head_id}/status"),
                         ("POST", "/heads/{head_id}/drain"), ("POST", "/heads/{head_id}/undrain"),
                         ("DELETE", "/heads/{head_id}"), ("PUT", "/policy")}  # fmt: skip
    assert all(m != "GET" for m, _ in mutations)


def test_the_document_is_valid_openapi_with_valid_schemas() -> None:
    doc = document(_app(AdminAuth.of({"ops": "t"})))
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]  # raises on an invalid operation
    assert len(operations) == len(documented(doc))
    refs = _refs(doc)
    assert refs, "the document refers to its components"
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"]), "every $ref resolves"


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def test_the_routers_own_admin_app_serves_exactly_what_it_documents() -> None:
    """``router_app`` is what ``router-worker run`` serves: a route group plugged in there (the DLQ's) must
    come with its description, or this fails."""
    from router_worker.admin import router_app
    from router_worker.pipeline.router import Router

    settings = Settings(redis_url="redis://127.0.0.1:1/0", admin_tokens={"ops": "t"})
    redis = Redis.from_url("redis://127.0.0.1:1/0")
    router = Router(settings, redis, Metrics(), AuditSink(None, "c", None))
    app = router_app(router, settings)
    assert served(app) == documented(document(app))
    assert app[AUTH].identify("Bearer t") == "ops"
