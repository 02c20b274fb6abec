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

The router mounts them with :func:`add_dlq_routes`, a route group of the admin API (guarded by its tokens,
described in its ``/openapi.json``); a redrive runs as a task of the app, cancelled (and so recorded as
interrupted, to be resumed by the next one) when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis

from router_worker.admin.api import (
    Access,
    ApiError,
    Route,
    RouteGroup,
    actor,
    add_group,
    body_json,
    error_reply,
    json_reply,
)
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


def _words(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, f"{name}: expected a string or a list of strings", name)


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is None or isinstance(v, str):
        return v
    raise ApiError(400, f"{name} must be a string", name)


def _flag(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if isinstance(v, bool):
        return v
    raise ApiError(400, f"{name} must be true or false", name)


def _filter(reason: list[str], model: str | None, since: str | None, job_id: list[str]) -> Filter:
    try:
        return parse_filter(reason, model, since, job_id, now_ms=now_ms())
    except UsageError as exc:
        text = str(exc)
        field = next((f for f, word in (("reason", "reason"), ("since", "duration"), ("job_id", "job"))
                      if word in text), None)  # fmt: skip
        raise ApiError(400, text, field) from exc


def _plan_json(p: Prepared) -> dict[str, Any]:
    return {
        "id": p.redrive_id, "to_send": len(p.to_send), "counts": p.counts(), "filter": p.flt.describe(),
        "items": [{"job_id": i.dl.job_id, "reason": i.dl.reason, "model": i.dl.model, "verdict": i.verdict.value,
                   "why": i.why, "dlq_partition": i.dl.partition, "dlq_offset": i.dl.offset} for i in p.items],
    }  # fmt: skip


_FILTER_PARAMS = (
    {"name": "reason", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only dead letters with this reason (repeatable)"},
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only jobs for this model"},
    {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only dead letters newer than this (30s, 10m, 1h, 2d)"},
    {"name": "job_id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only this job (repeatable)"},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0,
                                                                   "default": 1000},
     "description": "At most this many listed (the count and summary cover all)"},
)  # fmt: skip
_WORDS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_REDRIVE_BODY = {
    "type": "object",
    "properties": {
        "reason": _WORDS, "model": {"type": "string"}, "since": {"type": "string"}, "job_id": _WORDS,
        "rate": {"oneOf": [{"type": "string"}, {"type": "number", "exclusiveMinimum": 0}],
                 "description": "N/s or N/m (a number: per second), 1/m to 10000/s; 100/s by default"},
        "force": {"type": "boolean", "description": "Send decode_error and schema_error dead letters too"},
        "dry_run": {"type": "boolean", "description": "Plan only: send nothing"},
    },
}  # fmt: skip
_PLAN = {"type": "object", "required": ["id", "to_send", "counts", "filter", "items"],
         "properties": {"id": {"type": "string"}, "to_send": {"type": "integer"}, "counts": {"type": "object"},
                        "filter": {"type": "object"}, "items": {"type": "array", "items": {"type": "object"}},
                        "status": {"type": "string"}, "dry_run": {"type": "boolean"},
                        "progress": {"type": "string"}}}  # fmt: skip
_PROGRESS = {"type": "object", "required": ["id", "status"],
             "properties": {"id": {"type": "string"}, "status": {"type": "string"}}}  # fmt: skip


def dlq_group(deps: DlqDeps, running: set[asyncio.Task[Any]]) -> RouteGroup:
    """The dead-letter routes. Every one needs a token, reads included: dead letters carry whole jobs."""
    state = RedriveState(deps.redis, Keys(deps.settings.redis_prefix))

    async def list_h(request: web.Request) -> web.Response:
        q = request.query
        flt = _filter(q.getall("reason", []), q.get("model"), q.get("since"), q.getall("job_id", []))
        try:
            limit = int(q.get("limit", "1000"))
        except ValueError:
            limit = -1
        if limit < 0:
            raise ApiError(400, "limit must be a non-negative integer", "limit")
        try:
            found = [dl for dl in await read_dead_letters(deps.settings, Topics.from_settings(deps.settings).dlq)
                     if flt.matches(dl)]  # fmt: skip
        except DlqReadError as exc:
            raise ApiError(503, str(exc)) from exc
        return _json({"dead_letters": [dl.as_row() for dl in found[:limit]], "count": len(found),
                      "summary": summary(found)})  # fmt: skip

    async def redrive_h(request: web.Request) -> web.Response:
        who = actor(request)
        body = await body_json(request)  # required (``{}`` for every dead letter that may be sent)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "body")
        flt = _filter(_words(body.get("reason"), "reason"), _opt_str(body, "model"), _opt_str(body, "since"),
                      _words(body.get("job_id"), "job_id"))  # fmt: skip
        raw_rate = body.get("rate", "100/s")
        try:
            rate = parse_rate(str(raw_rate) if isinstance(raw_rate, int | float | str) else "?")
        except UsageError as exc:
            raise ApiError(400, str(exc), "rate") from exc
        force, dry_run = _flag(body, "force"), _flag(body, "dry_run")
        never = sorted(flt.reasons & NEVER_ROUTABLE)
        if never and not force:
            raise ApiError(400, f"{', '.join(never)} dead letters can never be routed as they are; set force to "
                           "send them", "force")  # fmt: skip
        try:
            p = await prepare(deps.settings, deps.redis, flt, force=force)
        except DlqReadError as exc:
            raise ApiError(503, str(exc)) from exc
        if dry_run or not p.to_send:
            return _json(
                _plan_json(p) | {"dry_run": dry_run, "status": "planned" if dry_run else "nothing_to_send"}
            )
        try:
            await lock(deps.settings, deps.redis, p.redrive_id)
        except RedriveBusy as exc:
            raise ApiError(409, str(exc)) from exc
        task = asyncio.create_task(execute(deps.settings, deps.redis, p, rate=rate, actor=who, source=deps.source,
                                           audit=deps.audit, metrics=deps.metrics, locked=True))  # fmt: skip
        running.add(task)
        task.add_done_callback(running.discard)
        return _json(_plan_json(p) | {"status": "running", "progress": f"/dlq/redrive/{p.redrive_id}"}, 202)

    async def progress_h(request: web.Request) -> web.Response:
        rid = request.match_info["redrive_id"]
        found = await state.progress(rid)
        if found is None:
            raise ApiError(404, f"no redrive {rid}", "redrive_id")
        return _json(found)

    async def recent_h(request: web.Request) -> web.Response:
        return _json([p for rid in await state.recent() if (p := await state.progress(rid)) is not None])

    token = Access.MUTATION  # dead letters carry whole jobs: a token even to read them
    return RouteGroup("dlq", "Dead letters: list them, redrive them to the request topic, follow a redrive.", (
        Route("GET", "/dlq", list_h, token, "Dead letters matching a filter, with a summary by reason",
              {200: json_reply("Dead letters", {"type": "object", "required": ["dead_letters", "count", "summary"],
                                                "properties": {"dead_letters": {"type": "array"},
                                                               "count": {"type": "integer"},
                                                               "summary": {"type": "object"}}})},
              parameters=_FILTER_PARAMS, operation_id="listDeadLetters"),
        Route("POST", "/dlq/redrive", redrive_h, token, "Redrive matching dead letters (or plan it: dry_run)",
              {200: json_reply("Planned, or nothing to send", _PLAN), 202: json_reply("Started", _PLAN),
               409: error_reply("Another redrive is running")},
              body=_REDRIVE_BODY, operation_id="redriveDeadLetters"),
        Route("GET", "/dlq/redrive/{redrive_id}", progress_h, token, "A redrive's progress",
              {200: json_reply("Progress", _PROGRESS)}, operation_id="redriveProgress"),
        Route("GET", "/dlq/redrives", recent_h, token, "The latest redrives' progress",
              {200: json_reply("Progress of each", {"type": "array", "items": _PROGRESS})},
              operation_id="recentRedrives"),
    ))  # fmt: skip


def add_dlq_routes(app: web.Application, deps: DlqDeps) -> None:
    """Serve the dead-letter routes on an admin app (see :func:`router_worker.admin.add_group`); a redrive still
    running when the app stops is cancelled, recorded as interrupted, and resumed by the next one."""
    running: set[asyncio.Task[Any]] = set()
    app[TASKS] = running
    add_group(app, dlq_group(deps, running))

    async def stop_redrives(_: web.Application) -> None:
        tasks = list(running)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    app.on_cleanup.append(stop_redrives)
