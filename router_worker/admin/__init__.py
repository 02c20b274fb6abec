"""The router's admin HTTP server: /metrics, /healthz, /readyz, /openapi.json and the admin API.

| method | path | what | access |
|---|---|---|---|
| GET | /metrics, /healthz, /readyz, /openapi.json | metrics, liveness, readiness, this API's description | open |
| GET | /heads, /heads/{id} | heads and their state | reads |
| POST | /heads | register a head | token |
| PUT | /heads/{id}/status | set a head's status | token |
| POST | /heads/{id}/drain, /heads/{id}/undrain | drain, undrain | token |
| DELETE | /heads/{id} | remove a head | token |
| GET | /policy, /policy/history | the policy in force, earlier ones | reads |
| PUT | /policy?expect_version=N | store a new policy (409 when N is not current) | token |
| POST | /policy/validate | check a policy | reads |
| POST | /explain | dry-run a decision | reads |
| GET | /audit | recent audit records | reads |
| GET | /dlq, /dlq/redrive/{id}, /dlq/redrives | dead letters, a redrive's progress (``dlq/http.py``) | token |
| POST | /dlq/redrive | redrive dead letters (or plan it) | token |

"reads" are open while ``ROUTER_ADMIN_READS_PUBLIC`` is true; "token" needs ``Authorization: Bearer <token>``
(``ROUTER_ADMIN_TOKEN``, named ``admin``, or a named one of ``ROUTER_ADMIN_TOKENS``). More route groups
plug in with :func:`add_group` before :func:`serve`, as the DLQ's does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from router_worker.admin.api import (
    Access,
    ApiError,
    Route,
    RouteGroup,
    actor,
    add_group,
    error_reply,
    json_reply,
    new_app,
    require_token,
)
from router_worker.admin.auth import AdminAuth
from router_worker.admin.routes import audit_group, explain_group, heads_group, policy_group, system_group
from router_worker.metrics import Metrics
from router_worker.ops import AdminOps
from router_worker.settings import Settings

if TYPE_CHECKING:
    from router_worker.pipeline.router import Router

__all__ = ["Access", "AdminAuth", "AdminOps", "ApiError", "Route", "RouteGroup", "actor", "add_group",
           "build_app", "error_reply", "json_reply", "require_token", "router_app", "serve"]  # fmt: skip


def _no_invalid_heads() -> Mapping[str, str]:
    return {}


def build_app(metrics: Metrics, admin: AdminOps, auth: AdminAuth, ready: Callable[[], bool],
              invalid_heads: Callable[[], Mapping[str, str]] = _no_invalid_heads) -> web.Application:  # fmt: skip
    """The admin application with the router's own route groups; add more with :func:`add_group`."""
    app = new_app(metrics, auth)
    for group in (system_group(metrics, ready, admin.origin), heads_group(admin, invalid_heads), policy_group(admin),
                  explain_group(admin), audit_group(admin)):  # fmt: skip
        add_group(app, group)
    return app


def router_app(router: Router, settings: Settings) -> web.Application:
    """The admin application of a running router: its metrics, registry, policy store and audit sink."""
    from router_worker.dlq.http import DlqDeps, add_dlq_routes  # the DLQ's group needs this package's API

    admin = AdminOps.create(settings, router.redis, router.audit, router.router_id, router.registry,
                            router.policies)  # fmt: skip
    app = build_app(router.metrics, admin, AdminAuth.from_settings(settings), router.is_ready,
                    lambda: router.invalid_heads)  # fmt: skip
    add_dlq_routes(app, DlqDeps(settings, router.redis, router.audit, router.router_id, router.metrics))
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
