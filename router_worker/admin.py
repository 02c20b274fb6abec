"""The admin HTTP server of a router: /metrics, /healthz, /readyz, and a small token-guarded admin API.

| method | path | what |
|---|---|---|
| GET | /metrics | Prometheus metrics |
| GET | /healthz | 200 while the process runs |
| GET | /readyz | 200 once the router consumes; 503 before |
| GET | /heads | every head with its state |
| POST | /heads/{id}/drain | stop sending new jobs to a head (token) |
| DELETE | /heads/{id} | remove a head (token) |
| GET | /policy | the policy in force |
| PUT | /policy | validate and store a new policy (token) |
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from router_worker.audit import AuditSink
from router_worker.core.model import HeadStatus
from router_worker.metrics import Metrics
from router_worker.state.heads import HeadRegistry
from router_worker.state.policy_store import PolicyError, PolicyStore, parse_policy

Ready = Callable[[], bool]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


def build_app(metrics: Metrics, registry: HeadRegistry, policies: PolicyStore, audit: AuditSink, router_id: str,
              token: str | None, ready: Ready) -> web.Application:  # fmt: skip
    @web.middleware
    async def observe(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:  # fmt: skip
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

    def actor(request: web.Request) -> str:
        if token is None:
            raise web.HTTPForbidden(text="admin API disabled: set ROUTER_ADMIN_TOKEN")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="bad or missing bearer token")
        return request.headers.get("X-Actor", "admin-api")

    async def metrics_h(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok", "router_id": router_id})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def heads(_: web.Request) -> web.Response:
        found, _profiles, inflight = await registry.snapshot()
        return _json([asdict(h) | {"inflight": inflight.get(h.head_id, 0)} for h in found])

    async def drain(request: web.Request) -> web.Response:
        who = actor(request)
        head_id = request.match_info["head_id"]
        if not await registry.set_status(head_id, HeadStatus.DRAINING, who):
            raise web.HTTPNotFound(text=f"no head {head_id}")
        await audit.emit("head_drained", router_id, head_id=head_id, actor=who)
        return _json({"head_id": head_id, "status": "draining"})

    async def remove(request: web.Request) -> web.Response:
        who = actor(request)
        head_id = request.match_info["head_id"]
        if not await registry.remove(head_id, who):
            raise web.HTTPNotFound(text=f"no head {head_id}")
        await audit.emit("head_removed", router_id, head_id=head_id, actor=who)
        return _json({"head_id": head_id, "removed": True})

    async def get_policy(_: web.Request) -> web.Response:
        return _json((await policies.get()).model_dump(mode="json"))

    async def put_policy(request: web.Request) -> web.Response:
        who = actor(request)
        try:
            policy = parse_policy(orjson.loads(await request.read()))
            stored = await policies.set(policy, actor=who)
        except orjson.JSONDecodeError as exc:
            return _json({"error": f"not JSON: {exc}"}, 400)
        except PolicyError as exc:
            return _json({"error": str(exc)}, 400)
        await audit.emit("policy_changed", router_id, actor=who, version=stored.version)
        return _json(stored.model_dump(mode="json"))

    app = web.Application(middlewares=[observe])
    app.router.add_get("/metrics", metrics_h)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/heads", heads)
    app.router.add_post("/heads/{head_id}/drain", drain)
    app.router.add_delete("/heads/{head_id}", remove)
    app.router.add_get("/policy", get_policy)
    app.router.add_put("/policy", put_policy)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
