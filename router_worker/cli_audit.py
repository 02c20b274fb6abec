"""``router-worker audit tail``: replay the audit stream from a point in time, then follow it live, filtered,
as readable lines or JSON (one object a line). The reading itself is :mod:`router_worker.audit_tail`."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape

from router_worker.audit import audit_stream_key
from router_worker.audit_tail import SinceError, StreamReader, TailFilter, follow_channel, parse_since
from router_worker.cli import ConfigOpt, _run, _settings, console, err
from router_worker.clock import now_ms
from router_worker.runtime import runtime

audit_app = typer.Typer(help="Replay and follow the audit records.", no_args_is_help=True)

_EVENT_STYLE = {"route": "green", "fallback": "yellow", "retry": "yellow", "dead_letter": "red",
                "throttled": "yellow", "breaker_opened": "red"}  # fmt: skip
_FIRST = ("job_id", "tenant", "model_type", "model_id", "head_id", "strategy", "attempt", "reason", "actor")
_HIDDEN = frozenset({"ts", "event", "scores", "fallback"})


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
"""What must not reach a terminal as it is: C0/C1 controls (escape sequences, newlines that forge a line) and
the bidirectional overrides. Job ids, tenants and models are the producer's choice."""


def _visible(text: str) -> str:
    """``text`` with every unprintable character as its Python escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


def format_record(rec: Mapping[str, Any]) -> str:
    """One readable line (rich markup): local time, event, then the fields that say what happened."""
    ts = rec.get("ts")
    when = "?"
    if isinstance(ts, int | float):
        with contextlib.suppress(ValueError, OverflowError, OSError):  # another writer's absurd time
            when = datetime.fromtimestamp(ts / 1000).isoformat(sep=" ", timespec="milliseconds")
    event = str(rec.get("event", "?"))
    style = _EVENT_STYLE.get(event, "cyan")
    keys = [k for k in _FIRST if k in rec] + sorted(k for k in rec if k not in _FIRST and k not in _HIDDEN)
    fields = " ".join(f"[dim]{escape(_visible(k))}=[/]{escape(_visible(str(rec[k])))}" for k in keys)
    return f"[dim]{when}[/] [{style}]{escape(_visible(event)):<14}[/] {fields}"


@audit_app.command("tail")
def audit_tail(
    since: Annotated[
        str | None,
        typer.Option(help="Replay from then first: 10m, 1h30m, 2d or an ISO time (needs the stream)."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Go on with live records.")] = True,
    count: Annotated[int, typer.Option("--count", "-n", help="Stop after N records (0: no limit).")] = 0,
    event: Annotated[
        list[str] | None, typer.Option("--event", "-e", help="Only this event (repeatable).")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Only this model_type or model_id (repeatable).")
    ] = None,
    head: Annotated[list[str] | None, typer.Option(help="Only this head (repeatable).")] = None,
    job: Annotated[list[str] | None, typer.Option(help="Only this job id (repeatable).")] = None,
    tenant: Annotated[list[str] | None, typer.Option(help="Only this tenant (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line, as recorded.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print audit records: with --since, replay them from the Redis stream and then follow live with no gap
    and no repeat at the seam; without, follow from now."""
    s = _settings(config)
    if count < 0:
        err.print("[red]error:[/] --count must be 0 or more")
        raise typer.Exit(2)
    since_ms: int | None = None
    if since is not None:
        try:
            since_ms = parse_since(since, now_ms())
        except SinceError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        if s.audit_stream_maxlen <= 0:
            err.print("[red]error:[/] --since needs the audit stream, and ROUTER_AUDIT_STREAM_MAXLEN is 0")
            raise typer.Exit(2)
    elif not follow:
        err.print("[red]error:[/] --no-follow without --since prints nothing: give --since")
        raise typer.Exit(2)
    where = TailFilter(*(frozenset(v or ()) for v in (event, model, head, job, tenant)))
    shown = 0

    def show(records: list[dict[str, Any]]) -> bool:
        """Print the matching records; True once --count is reached."""
        nonlocal shown
        for rec in records:
            if not where.matches(rec):
                continue
            if as_json:
                sys.stdout.write(orjson.dumps(rec).decode() + "\n")
            else:
                console.print(format_record(rec), soft_wrap=True, highlight=False)
            shown += 1
            if count and shown >= count:
                return True
        sys.stdout.flush()
        return False

    async def main() -> None:
        async with runtime(s, allow_embedded=False) as rt:
            if s.audit_stream_maxlen <= 0:
                async for records in follow_channel(rt.redis, s.audit_channel):
                    if show(records):
                        return
                return
            # One blocking read must fit in the client's socket timeout (ROUTER_REDIS_TIMEOUT_S).
            block_ms = max(1, min(1000, int(s.redis_timeout_s * 500)))
            warned = False

            def unreachable(exc: Exception) -> None:
                nonlocal warned
                if not warned:
                    err.print(
                        f"[yellow]warning:[/] Redis does not answer ({escape(str(exc))}); waiting for it"
                    )
                    warned = True

            def gap(cursor: str, trimmed: str) -> None:
                err.print(f"[yellow]warning:[/] records after {escape(cursor)} and before {escape(trimmed)} may have "
                          "been trimmed from the stream before this tail read them (ROUTER_AUDIT_STREAM_MAXLEN); "
                          "the audit file has them")  # fmt: skip

            reader = StreamReader(rt.redis, audit_stream_key(s.redis_prefix), block_ms=block_ms,
                                  on_unreachable=unreachable, on_gap=gap)  # fmt: skip
            if since_ms is None:
                reader.cursor = await reader.last_id()
            else:
                trimmed = await reader.trimmed_from(since_ms)
                if trimmed is not None:
                    err.print(f"[yellow]warning:[/] records up to {datetime.fromtimestamp(trimmed / 1000)} were "
                              "trimmed from the stream (ROUTER_AUDIT_STREAM_MAXLEN); the file has them")  # fmt: skip
                async for _, records in reader.replay(since_ms):
                    if show(records):
                        return
            if not follow:
                return
            async for _, records in reader.follow():
                if show(records):
                    return

    _run(main)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the main app."""
    app.add_typer(audit_app, name="audit")
