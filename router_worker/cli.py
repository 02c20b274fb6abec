"""``router-worker``: the command line. Each command builds settings, a runtime, and one service or action."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from router_worker.localstack import EMBEDDED_FETCH_MAX_WAIT_MS
from router_worker.loop import LoopChoice, tune_gc
from router_worker.settings import Settings, SettingsError, load_settings, settings_help

T = TypeVar("T")

SETTINGS_EPILOG = "Settings (environment variables, or keys of --config FILE):\n\n" + settings_help().replace(
    "\n", "\n\n"
)

app = typer.Typer(
    name="router-worker",
    help="Route model-inference jobs through Kafka to model heads tracked in Redis.",
    no_args_is_help=True,
    epilog=SETTINGS_EPILOG,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # a traceback's locals could show a secret (a URL, a password)
)
console = Console(stderr=False)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Settings file (TOML, YAML or JSON); env vars win over it.")
]


def _error(exc: BaseException) -> None:
    """One line on stderr, the message as given: no markup read into it, never folded (a service log has no
    terminal width)."""
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        s = load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        _error(exc)
        raise typer.Exit(2) from exc
    logging.basicConfig(
        level=s.log_level,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(s.log_level)))
    return s


def _run(coro_fn: Callable[[], Awaitable[T]], event_loop: LoopChoice | None = None) -> T:
    """Run a command's coroutine on the event loop its settings name (``ROUTER_EVENT_LOOP``; auto: uvloop where
    installed)."""
    from router_worker.loop import LoopUnavailable, run
    from router_worker.state.heads import HeadIdInUse, PartitionOutOfRange

    try:
        return run(coro_fn(), event_loop or "auto")  # type: ignore[arg-type]
    except LoopUnavailable as exc:
        _error(exc)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (HeadIdInUse, PartitionOutOfRange) as exc:  # an operator's mistake: one clear line, no traceback
        _error(exc)
        raise typer.Exit(2) from None


@app.command(epilog=SETTINGS_EPILOG)
def run(config: ConfigOpt = None) -> None:
    """Run one router: join the consumer group and route jobs until SIGINT/SIGTERM."""
    from router_worker.runtime import runtime
    from router_worker.services import build_router, run_router, until_signalled

    s = _settings(config)

    async def main() -> None:
        async with runtime(s) as rt:
            if rt.stack:
                err.print(f"embedded stack: export ROUTER_KAFKA_BOOTSTRAP_SERVERS={rt.stack.bootstrap_servers} "
                          f"ROUTER_REDIS_URL={rt.stack.redis_url} "
                          f"ROUTER_KAFKA_FETCH_MAX_WAIT_MS={EMBEDDED_FETCH_MAX_WAIT_MS}")  # fmt: skip
            router = build_router(rt)
            await until_signalled(router.stop)
            await run_router(rt, router)

    _run(main, s.event_loop)


@app.command(epilog=SETTINGS_EPILOG)
def worker(
    model: Annotated[str, typer.Option("--model", help="Model id this head serves.")],
    region: Annotated[str, typer.Option("--region")] = "default",
    capacity: Annotated[int, typer.Option(help="Jobs served at once.")] = 8,
    head_id: Annotated[str | None, typer.Option("--head-id")] = None,
    partition: Annotated[int | None, typer.Option(help="Preferred partition of the model topic.")] = None,
    service_ms: Annotated[float, typer.Option(help="Simulated service time per job.")] = 10.0,
    jitter_ms: Annotated[float, typer.Option()] = 2.0,
    fail_rate: Annotated[float, typer.Option(help="Share of jobs that fail (nacked to retry).")] = 0.0,
    backend: Annotated[str, typer.Option()] = "cpu",
    family: Annotated[
        list[str] | None, typer.Option("--family", help="Other names the head answers to.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run one demo head of MODEL in REGION until stopped."""
    from consumers.worker import WorkerConfig
    from router_worker.heap import heap_trimming
    from router_worker.runtime import runtime
    from router_worker.services import build_worker, until_signalled

    s = _settings(config)
    cfg = WorkerConfig(model, region, capacity=capacity, head_id=head_id, partition=partition,
                       families=tuple(family or ()), backend=backend)  # fmt: skip

    async def main() -> None:
        async with runtime(s) as rt:
            if partition is not None:
                from router_worker.pipeline.topology import check_head_partition

                problem = await check_head_partition(rt.settings, model, partition)
                if problem:
                    err.print(f"[red]error:[/] {escape(problem)}", soft_wrap=True)
                    raise typer.Exit(2)
            w = build_worker(rt, cfg, service_ms, jitter_ms, fail_rate)
            await until_signalled(w.stop)
            err.print(f"head {w.head_id} of {model} in {region} starting")
            tune_gc(s.gc_young_threshold)
            async with heap_trimming(s.heap_trim_s):
                await w.run()

    _run(main, s.event_loop)


@app.command(epilog=SETTINGS_EPILOG)
def demo(
    jobs: Annotated[int, typer.Option(help="Jobs to publish.")] = 3000,
    routers: Annotated[int, typer.Option(help="Routers in the consumer group.")] = 2,
    rate: Annotated[float, typer.Option(help="Jobs published per second (0: all at once).")] = 1000.0,
    config: ConfigOpt = None,
) -> None:
    """The whole thing on the embedded local stack: routers, heads, jobs, and a summary."""
    from router_worker.demo import run_demo
    from router_worker.runtime import runtime

    s = _settings(config, log_level="WARNING")

    async def main() -> bool:
        async with runtime(s) as rt:
            out = await run_demo(rt, jobs, routers, console, rate)
            return len(out.seen) == jobs and out.duplicates == 0

    if not _run(main, s.event_loop):
        raise typer.Exit(1)


@app.command(epilog=SETTINGS_EPILOG)
def submit(
    model: Annotated[str, typer.Option("--model", help="model_type of the jobs.")],
    count: Annotated[int, typer.Option(help="How many jobs.")] = 1,
    json_: Annotated[bool, typer.Option("--json", help="Encode as JSON instead of MessagePack.")] = False,
    region: Annotated[str | None, typer.Option()] = None,
    session: Annotated[str | None, typer.Option()] = None,
    strategy: Annotated[str | None, typer.Option()] = None,
    payload: Annotated[str, typer.Option(help="Payload text.")] = "hello",
    config: ConfigOpt = None,
) -> None:
    """Publish jobs to the request topic and print their job ids."""
    from producers.producer import JobProducer
    from router_worker.runtime import runtime
    from schemas.envelope import JSON, MSGPACK, EnvelopeError

    s = _settings(config)

    async def main() -> None:
        async with (
            runtime(s, allow_embedded=False) as rt,
            JobProducer(rt.settings, JSON if json_ else MSGPACK) as p,
        ):
            for _ in range(count):
                job_id = await p.submit(model, payload, region=region, session_id=session, strategy=strategy)
                console.print(job_id)

    try:
        _run(main, s.event_loop)
    except EnvelopeError as exc:
        _error(exc)
        raise typer.Exit(2) from exc


def main() -> None:
    from router_worker import cli_admin

    cli_admin.register(app)
    try:
        app()
    except RuntimeError as exc:  # configuration problems found at start-up: a message, not a traceback
        _error(exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
