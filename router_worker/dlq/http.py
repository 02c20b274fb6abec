"""Dead letters on the admin API: list with filters, start a redrive, read its progress. Every route needs the
admin token (dead letters carry jobs); the token's name is the redrive's actor.

| method | path | what |
|---|---|---|
| GET | /dlq?reason=R&model=M&since=1h&job_id=J&limit=N | dead letters and a summary by reason |
| POST | /dlq/redrive | start a redrive (body below): 202 with its id and plan; 200 with the plan for a dry run |
| GET | /dlq/redrive/{id} | a redrive's progress |
| GET | /dlq/redrives | the latest redrives' progress |

The redrive body: ``{"reason": [...], "model": M, "since": "1h", "job_id": [...], "rate": "50/s", "force": false,
"dry_run": false}`` (every field optional). A typo answers 400 naming it; a redrive already running, 409.

The router mounts them with :func:`add_dlq_routes`; a redrive runs as a task of the app, cancelled (and so
recorded as interrupted, to be resumed by the next one) when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.dlq.model import NEVER_ROUTABLE, Filter, UsageError, parse_filter, parse_rate, summary
from router_worker.dlq.reader import DlqReadError, read_dead_letters
from router_worker.dlq.redrive import Prepared, RedriveBusy, execute, lock, prepare
from router_worker.dlq.state import RedriveState
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics

Actor = Callable[[web.Request], str]
"""Checks the request's token: returns its name, or raises ``HTTPUnauthorized``/``HTTPForbidden``."""


@dataclass(frozen=True, slots=True)
class DlqDeps:
    settings: Settings
    redis: Redis
    audit: AuditSink
    source: str
    """The ``router_id`` of the audit records (the serving router's id)."""
    metrics: Metrics | None = None


TASKS = web.AppKey("dlq_redrive_tasks", set[asyncio.Task[Any]])


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


def _error(message: str, status: int = 400) -> web.Response:
    return _json({"error": message}, status)


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise UsageError(f"expected a string or a list of strings, got {orjson.dumps(value).decode()[:80]}")


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is None or isinstance(v, str):
        return v
    raise UsageError(f"{name} must be a string")


def _plan_json(p: Prepared) -> dict[str, Any]:
    return {
        "id": p.redrive_id, "to_send": len(p.to_send), "counts": p.counts(), "filter": p.flt.describe(),
        "items": [{"job_id": i.dl.job_id, "reason": i.dl.reason, "model": i.dl.model, "verdict": i.verdict.value,
                   "why": i.why, "dlq_partition": i.dl.partition, "dlq_offset": i.dl.offset} for i in p.items],
    }  # fmt: skip


def add_dlq_routes(app: web.Application, deps: DlqDeps, actor: Actor) -> None:
    """Register the dead-letter routes on ``app`` (see the module docstring)."""
    state = RedriveState(deps.redis, Keys(deps.settings.redis_prefix))
    running: set[asyncio.Task[Any]] = set()
    app[TASKS] = running

    async def list_h(request: web.Request) -> web.Response:
        actor(request)
        q = request.query
        try:
            flt = parse_filter(q.getall("reason", []), q.get("model"), q.get("since"), q.getall("job_id", []),
                               now_ms=now_ms())  # fmt: skip
            limit = int(q.get("limit", "1000"))
            if limit < 0:
                raise ValueError
        except UsageError as exc:
            return _error(str(exc))
        except ValueError:
            return _error("limit must be a non-negative integer")
        try:
            found = [dl for dl in await read_dead_letters(deps.settings, Topics.from_settings(deps.settings).dlq)
                     if flt.matches(dl)]  # fmt: skip
        except DlqReadError as exc:
            return _error(str(exc), 503)
        return _json({"dead_letters": [dl.as_row() for dl in found[:limit]], "count": len(found),
                      "summary": summary(found)})  # fmt: skip

    async def redrive_h(request: web.Request) -> web.Response:
        who = actor(request)
        try:
            body = orjson.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise UsageError("the body must be a JSON object")
            flt: Filter = parse_filter(_words(body.get("reason")), _opt_str(body, "model"), _opt_str(body, "since"),
                                       _words(body.get("job_id")), now_ms=now_ms())  # fmt: skip
            raw_rate = body.get("rate", "100/s")
            rate = parse_rate(str(raw_rate) if isinstance(raw_rate, int | float | str) else "?")
            force, dry_run = bool(body.get("force", False)), bool(body.get("dry_run", False))
        except orjson.JSONDecodeError as exc:
            return _error(f"not JSON: {exc}")
        except UsageError as exc:
            return _error(str(exc))
        never = sorted(flt.reasons & NEVER_ROUTABLE)
        if never and not force:
            return _error(
                f"{', '.join(never)} dead letters can never be routed as they are; set force to send them"
            )
        try:
            p = await prepare(deps.settings, deps.redis, flt, force=force)
        except DlqReadError as exc:
            return _error(str(exc), 503)
        if dry_run or not p.to_send:
            return _json(
                _plan_json(p) | {"dry_run": dry_run, "status": "planned" if dry_run else "nothing_to_send"}
            )
        try:
            await lock(deps.settings, deps.redis, p.redrive_id)
        except RedriveBusy as exc:
            return _error(str(exc), 409)
        task = asyncio.create_task(execute(deps.settings, deps.redis, p, rate=rate, actor=who, source=deps.source,
                                           audit=deps.audit, metrics=deps.metrics, locked=True))  # fmt: skip
        running.add(task)
        task.add_done_callback(running.discard)
        return _json(_plan_json(p) | {"status": "running", "progress": f"/dlq/redrive/{p.redrive_id}"}, 202)

    async def progress_h(request: web.Request) -> web.Response:
        actor(request)
        rid = request.match_info["redrive_id"]
        found = await state.progress(rid)
        return _json(found) if found is not None else _error(f"no redrive {rid}", 404)

    async def recent_h(request: web.Request) -> web.Response:
        actor(request)
        out = [p for rid in await state.recent() if (p := await state.progress(rid)) is not None]
        return _json(out)

    async def stop_redrives(_: web.Application) -> None:
        tasks = list(running)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    app.router.add_get("/dlq", list_h)
    app.router.add_post("/dlq/redrive", redrive_h)
    app.router.add_get("/dlq/redrive/{redrive_id}", progress_h)
    app.router.add_get("/dlq/redrives", recent_h)
    app.on_cleanup.append(stop_redrives)
