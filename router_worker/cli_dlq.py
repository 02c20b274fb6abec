"""``router-worker dlq``: list, show and redrive dead letters of a running deployment."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from router_worker.cli import ConfigOpt, _run, _settings, console, err
from router_worker.clock import now_ms
from router_worker.dlq.model import (
    NEVER_ROUTABLE,
    DeadLetter,
    Filter,
    Item,
    UsageError,
    Verdict,
    iso,
    parse_filter,
    parse_rate,
    peek_envelope,
    show_headers,
    show_value,
    summary,
    with_original,
)
from router_worker.dlq.reader import DlqReadError, OriginalGone, Originals, read_dead_letters
from router_worker.dlq.redrive import Prepared, RedriveBusy, execute, os_user, prepare
from router_worker.dlq.state import RedriveState
from router_worker.runtime import runtime
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from schemas.envelope import content_type_of

dlq_app = typer.Typer(help="Dead letters: list them, show one, redrive them to the request topic.",
                      no_args_is_help=True)  # fmt: skip

ReasonOpt = Annotated[
    list[str] | None,
    typer.Option("--reason", help="Only this reason (repeat, or comma-separate, for several)."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Only jobs of this model_type.")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="Only dead letters this recent: 30m, 1h, 2d.")]
JobOpt = Annotated[list[str] | None, typer.Option("--job-id", help="Only this job (repeat for several).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of tables.")]


def _usage(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(2)


def _filter(reason: list[str] | None, model: str | None, since: str | None, job: list[str] | None) -> Filter:
    try:
        return parse_filter(reason or (), model, since, job or (), now_ms=now_ms())
    except UsageError as exc:
        raise _usage(exc) from None


async def _read(s: Settings) -> list[DeadLetter]:
    try:
        return await read_dead_letters(s, Topics.from_settings(s).dlq)
    except DlqReadError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


def _cut(text: str | None, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


@dlq_app.command("ls")
def dlq_ls(reason: ReasonOpt = None, model: ModelOpt = None, since: SinceOpt = None, job_id: JobOpt = None,
           as_json: JsonOpt = False, config: ConfigOpt = None) -> None:  # fmt: skip
    """List dead letters (time, reason, error, job, model, origin, attempt, size) and a summary by reason."""
    flt = _filter(reason, model, since, job_id)
    s = _settings(config)

    async def main() -> list[DeadLetter]:
        async with runtime(s, allow_embedded=False) as rt:
            return [dl for dl in await _read(rt.settings) if flt.matches(dl)]

    found = _run(main)
    by_reason = summary(found)
    if as_json:
        sys.stdout.write(orjson.dumps({"dead_letters": [dl.as_row() for dl in found], "count": len(found),
                                       "summary": by_reason}).decode() + "\n")  # fmt: skip
        return
    table = Table(title=f"{len(found)} dead letters")
    for col in ("time", "reason", "error", "job id", "model", "origin", "att", "size", "cut"):
        table.add_column(col, overflow="fold")
    for dl in found:
        table.add_row(iso(dl.timestamp_ms), dl.reason, escape(_cut(dl.error, 60)), escape(dl.job_id or "?"),
                      escape(dl.model or "?"), escape(dl.origin), str(dl.attempt or "?"), str(dl.size),
                      f"yes ({dl.truncated_from})" if dl.truncated_from is not None else "")  # fmt: skip
    console.print(table)
    totals = Table(title="by reason")
    totals.add_column("reason")
    totals.add_column("count", justify="right")
    for r, n in by_reason.items():
        totals.add_row(r, str(n))
    console.print(totals)


@dlq_app.command("show")
def dlq_show(job_id: Annotated[str, typer.Argument(help="The job id.")], as_json: JsonOpt = False,
             config: ConfigOpt = None) -> None:  # fmt: skip
    """Print the dead letters of one job: the decoded envelope (where it decodes), the original coordinates,
    every header. A cut dead letter is shown with its original, read back from the request topic."""
    s = _settings(config)

    async def main() -> list[dict[str, Any]]:
        async with runtime(s, allow_embedded=False) as rt:
            out: list[dict[str, Any]] = []
            dls = await _read(rt.settings)
            async with Originals(rt.settings) as originals:
                for dl in dls:
                    value, ctype, note = dl.value, dl.content_type, None
                    if dl.job_id is None and dl.squeezed and dl.orig_topic is not None:
                        try:
                            orig = await originals.fetch(
                                dl.orig_topic, dl.orig_partition or 0, dl.orig_offset or 0
                            )
                        except OriginalGone as exc:
                            note = str(exc)
                        else:
                            dl = with_original(dl, orig)
                            value, ctype = orig.value, content_type_of(orig.headers)
                            note = f"envelope read from the original {dl.origin}"
                    if dl.job_id != job_id:
                        continue
                    env = peek_envelope(value, ctype)
                    out.append(dl.as_row() | {"headers": show_headers(dl.headers), "envelope": show_value(env),
                                              "note": note})  # fmt: skip
            return out

    found = _run(main)
    if not found:
        err.print(f"[red]error:[/] no dead letter of job {escape(job_id)!r}")
        raise typer.Exit(1)
    if as_json:
        sys.stdout.write(orjson.dumps(found).decode() + "\n")
        return
    for row in found:
        console.rule(f"{escape(job_id)}: {row['reason']} at {row['time']}")
        console.print(f"error: {escape(row['error'])}", soft_wrap=True)
        console.print(f"dead letter: {escape(Topics.from_settings(s).dlq)}[{row['dlq_partition']}]@{row['dlq_offset']}"
                      f"   original: {escape(str(row['original_topic']))}[{row['original_partition']}]"
                      f"@{row['original_offset']}   attempt {row['attempt']}   {row['size']} bytes"
                      + (f" (cut from {row['original_size']})" if row["truncated"] else ""),
                      soft_wrap=True)  # fmt: skip
        if row["note"]:
            console.print(f"note: {escape(row['note'])}", soft_wrap=True)
        headers = Table(title="headers")
        headers.add_column("name")
        headers.add_column("value", overflow="fold")
        for k, v in row["headers"]:
            headers.add_row(escape(k), "null" if v is None else escape(v))
        console.print(headers)
        if row["envelope"] is None:
            console.print("envelope: does not decode (see the error)")
        else:
            console.print("envelope:")
            console.print_json(orjson.dumps(row["envelope"]).decode())


def _plan_table(p: Prepared) -> Table:
    table = Table(title=f"redrive {p.redrive_id}: {len(p.to_send)} to send")
    for col in ("job id", "reason", "model", "origin", "bytes", "note"):
        table.add_column(col, overflow="fold")
    for it in p.to_send:
        out = p.outgoing[it.dl.coord]
        note = "original re-read" if it.dl.squeezed else ""
        if it.verdict is Verdict.RESEND:
            note = (note + "; " if note else "") + escape(it.why)
        table.add_row(escape(it.dl.job_id or "?"), it.dl.reason, escape(it.dl.model or "?"), escape(it.dl.origin),
                      str(len(out.value or b"")), note)  # fmt: skip
    return table


def _left_out(items: list[Item]) -> None:
    kept = [i for i in items if i.verdict not in (Verdict.SEND, Verdict.RESEND)]
    if not kept:
        return
    counts: dict[str, int] = {}
    for i in kept:
        counts[i.verdict.value] = counts.get(i.verdict.value, 0) + 1
    err.print("left out: " + ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in counts.items()))
    for i in kept:
        if i.verdict is Verdict.REFUSED:
            err.print(f"  [yellow]refused[/] {escape(i.dl.job_id or i.dl.coord)} ({i.dl.reason}): {escape(i.why)}",
                      soft_wrap=True)  # fmt: skip


@dlq_app.command("redrive")
def dlq_redrive(
    reason: ReasonOpt = None, model: ModelOpt = None, since: SinceOpt = None, job_id: JobOpt = None,
    rate: Annotated[str, typer.Option("--rate", help="Sends per second at most: 50/s (or N/m).")] = "100/s",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be sent; send nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Send decode_error and schema_error ones too.")] = False,
    config: ConfigOpt = None,
) -> None:  # fmt: skip
    """Re-publish matching dead letters to the request topic with their original bytes (read back from the
    request topic when the dead letter was cut) and header x-redrive; they are routed afresh. Jobs that reached
    a head, and dead letters an earlier redrive sent, are left out; an interrupted redrive is picked up by the
    next one of the same filter. Audited as dlq_redrive."""
    flt = _filter(reason, model, since, job_id)
    try:
        per_s = parse_rate(rate)
    except UsageError as exc:
        raise _usage(exc) from None
    never = sorted(flt.reasons & NEVER_ROUTABLE)
    if never and not force:
        raise _usage(UsageError(f"{', '.join(never)} dead letters can never be routed as they are; pass --force "
                                "to redrive them anyway"))  # fmt: skip
    if not yes and not dry_run and not sys.stdin.isatty():
        raise _usage(UsageError("stdin is not a terminal, so the redrive can not be confirmed: pass --yes"))
    s = _settings(config)
    actor = os_user()

    async def main() -> int:
        async with runtime(s, allow_embedded=False) as rt:
            try:
                p = await prepare(rt.settings, rt.redis, flt, force=force)
            except DlqReadError as exc:
                err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
                return 1
            if p.to_send:
                console.print(_plan_table(p))
            _left_out(p.items)
            refused = any(i.verdict is Verdict.REFUSED and i.dl.reason not in NEVER_ROUTABLE for i in p.items)
            if dry_run:
                console.print(f"dry run: would send {len(p.to_send)} to {Topics.from_settings(rt.settings).requests}"
                              f" at {per_s:g}/s; nothing sent")  # fmt: skip
                return 0
            if not p.to_send:
                console.print("nothing to send")
                return 1 if refused else 0
            if not yes and not await asyncio.to_thread(typer.confirm, f"Send {len(p.to_send)} dead letters?"):
                err.print("not confirmed: nothing sent")
                return 1
            with Progress(TextColumn("redrive"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err, transient=False) as bar:  # fmt: skip
                task = bar.add_task("redrive", total=len(p.to_send))
                try:
                    res = await execute(rt.settings, rt.redis, p, rate=per_s, actor=actor, source="cli",
                                        audit=rt.audit(),
                                        on_progress=lambda n, _: bar.update(task, completed=n))  # fmt: skip
                except RedriveBusy as exc:
                    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
                    return 1
            for it, why in res.failed:
                err.print(
                    f"[red]failed[/] {escape(it.dl.job_id or it.dl.coord)}: {escape(why)}", soft_wrap=True
                )
            if res.error:
                err.print(
                    f"[red]error:[/] {escape(res.error)} (run the same redrive again to resume)",
                    soft_wrap=True,
                )
            console.print(f"redrive {res.redrive_id}: {res.status}, sent {res.sent} of {res.total}")
            return 0 if res.status == "done" and not res.failed and not refused else 1

    code = _run(main)
    if code:
        raise typer.Exit(code)


@dlq_app.command("status")
def dlq_status(redrive_id: Annotated[str | None, typer.Argument(help="A redrive id (default: the latest).")] = None,
               config: ConfigOpt = None) -> None:  # fmt: skip
    """Progress of a redrive (JSON): its filter, actor, status and counts."""
    s = _settings(config)

    async def main() -> dict[str, Any] | None:
        async with runtime(s, allow_embedded=False) as rt:
            state = RedriveState(rt.redis, Keys(rt.settings.redis_prefix))
            rid = redrive_id or next(iter(await state.recent(1)), None)
            return None if rid is None else await state.progress(rid)

    found = _run(main)
    if found is None:
        err.print(f"[red]error:[/] no redrive {escape(redrive_id or '')}".rstrip())
        raise typer.Exit(1)
    console.print_json(orjson.dumps(found).decode())


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
