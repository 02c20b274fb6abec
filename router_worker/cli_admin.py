"""Operator commands: heads, policy, explain, bench (audit tail: cli_audit). They talk to a running deployment."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from router_worker import cli_audit, ops
from router_worker.audit import os_actor
from router_worker.cli import ConfigOpt, _run, _settings, console, err
from router_worker.core.model import Head, HeadStatus
from router_worker.core.policy import Policy
from router_worker.core.validity import split_valid
from router_worker.pipeline.topology import topics_partitions
from router_worker.runtime import Runtime, runtime
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics

heads_app = typer.Typer(help="List, register, show, drain, undrain and remove heads.", no_args_is_help=True)
policy_app = typer.Typer(help="Show, set, validate the routing policy; its history.", no_args_is_help=True)
models_app = typer.Typer(help="Register models with their characteristics (what heads they need).",
                         no_args_is_help=True)  # fmt: skip

OPERATOR = "cli"
"""The router_id of records the CLI writes."""
ACTOR = os_actor()
"""Who did it: the OS user running the command."""


def _ops(rt: Runtime) -> ops.AdminOps:
    return ops.AdminOps.create(rt.settings, rt.redis, rt.audit(), OPERATOR)


def _refuse(exc: ops.OpError | ValidationError, code: int = 1, label: str = "error") -> NoReturn:
    """An operator's mistake or a refused action: one line naming the problem, no traceback."""
    message = exc.message if isinstance(exc, ops.OpError) else ops.invalid_from(exc).message
    err.print(f"[red]{label}:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code) from None


async def _validity(settings: Settings, heads: list[Head]) -> dict[str, str | None]:
    """head id -> why it can not be addressed (None: it can), judged as a router does (split_valid) against
    broker metadata. A model topic that does not exist yet counts with ROUTER_MODEL_PARTITIONS (a router
    creates it with that many); when the broker can not be asked, every count is unknown."""
    topics = Topics.from_settings(settings)
    try:
        counts = await topics_partitions(settings, {topics.model(h.model_id) for h in heads})
    except Exception as exc:
        err.print(
            f"[yellow]warning:[/] could not read model topic metadata: {escape(repr(exc))}", soft_wrap=True
        )
        known: dict[str, int | None] = {}
    else:
        known = {t: settings.model_partitions if n is None else n for t, n in counts.items()}
    _, invalid = split_valid(heads, known.get, topics.model)
    why: dict[str, str | None] = {h.head_id: None for h in heads}
    why.update({h.head_id: reason for h, reason in invalid})
    return why


@heads_app.command("ls")
def heads_ls(config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every registered head with its state, and whether its partition exists in its model topic."""

    async def main() -> list[dict[str, Any]]:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            heads, inflight = await ops.list_heads(_ops(rt))
            why = await _validity(rt.settings, heads) if heads else {}
            rows = ops.views(heads, inflight, why)
            await _with_breakers(rt, rows)
        return rows

    rows = _run(main)
    if as_json:
        console.print_json(orjson.dumps(rows).decode())
        return
    table = Table(title=f"{len(rows)} heads")
    for col in (
        "head",
        "model",
        "region",
        "part",
        "status",
        "alive",
        "in-flight",
        "latency ms",
        "backend",
        "valid",
        "breaker",
        "err rate",
    ):
        table.add_column(col)
    for r in rows:
        reason = r["invalid_reason"]
        table.add_row(r["head_id"], r["model_id"], r["region"], str(r["partition"]), r["status"],
                      "yes" if r["alive"] else "[red]expired[/]", f"{r['inflight']}/{r['capacity']}",
                      f"{r['latency_ms']:.1f}", r["backend"],
                      "valid" if reason is None else f"[red]{escape(reason)}[/]",
                      r["breaker"] if r["breaker"] == "closed" else f"[red]{r['breaker']}[/]",
                      f"{r['error_rate']:.0%}")  # fmt: skip
    console.print(table)


async def _with_breakers(rt: Runtime, rows: list[dict[str, Any]]) -> None:
    """Add each head's circuit breaker state and its error rate over the breaker window in force."""
    from router_worker.clock import now_ms
    from router_worker.core.breaker import error_rate
    from router_worker.pipeline.faults import breaker_config
    from router_worker.state.breakers import BreakerStore
    from router_worker.state.policy_store import PolicyStore

    policy = await PolicyStore.for_settings(rt.redis, rt.settings).get()
    cfg = breaker_config(policy, rt.settings)
    got = await BreakerStore(rt.redis, Keys(rt.settings.redis_prefix)).get([r["head_id"] for r in rows])
    now = now_ms()
    for r in rows:
        b = got[r["head_id"]]
        r["breaker"] = b.state.label if cfg is not None else "off"
        r["error_rate"] = round(error_rate(b, cfg, now), 4) if cfg is not None else 0.0


@heads_app.command("register")
def heads_register(
    head_id: Annotated[str, typer.Argument()],
    model: Annotated[str, typer.Option("--model")],
    region: Annotated[str, typer.Option()] = "default",
    partition: Annotated[int, typer.Option()] = 0,
    capacity: Annotated[int, typer.Option()] = 8,
    backend: Annotated[str, typer.Option()] = "cpu",
    config: ConfigOpt = None,
) -> None:
    """Register a head by hand (for a server that does not use the worker SDK; it must heartbeat).
    Refused for a partition its model topic can not have, or the id of a live head (exit 2)."""
    try:
        reg = ops.HeadRegistration(head_id=head_id, model_id=model, region=region, partition=partition,
                                   capacity=capacity, backend=backend)  # fmt: skip
    except ValidationError as exc:
        _refuse(exc, 2)

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            await ops.register_head(_ops(rt), reg, ACTOR)

    try:
        _run(main)
    except ops.OpError as exc:
        _refuse(exc, 2)
    console.print(f"registered {head_id}")


def _set_status(config: Path | None, head_id: str, status: HeadStatus) -> None:
    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            await ops.set_head_status(_ops(rt), head_id, status, ACTOR)

    try:
        _run(main)
    except ops.OpError as exc:
        _refuse(exc)
    console.print(f"{head_id}: {status.value}")


@heads_app.command("drain")
def heads_drain(head_id: str, config: ConfigOpt = None) -> None:
    """Stop sending new jobs to a head; it finishes what it has."""
    _set_status(config, head_id, HeadStatus.DRAINING)


@heads_app.command("undrain")
def heads_undrain(head_id: str, config: ConfigOpt = None) -> None:
    """Send jobs to a drained head again (status healthy)."""
    _set_status(config, head_id, HeadStatus.HEALTHY)


@heads_app.command("status")
def heads_status(
    head_id: str,
    set_to: Annotated[
        HeadStatus | None, typer.Option("--set", help="Set the status (healthy undrains a head).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Show one head's state (JSON), or set its status with --set."""
    if set_to is not None:
        _set_status(config, head_id, set_to)
        return

    async def main() -> dict[str, Any]:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            head, inflight = await ops.get_head(_ops(rt), head_id)
            why = await _validity(rt.settings, [head])
        return ops.views([head], {head_id: inflight}, why)[0]

    try:
        view = _run(main)
    except ops.OpError as exc:
        _refuse(exc)
    console.print_json(orjson.dumps(view).decode())


@heads_app.command("remove")
def heads_remove(head_id: str, config: ConfigOpt = None) -> None:
    """Remove a head: routers stop routing to it at once."""

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            await ops.remove_head(_ops(rt), head_id, ACTOR)

    try:
        _run(main)
    except ops.OpError as exc:
        _refuse(exc)
    console.print(f"removed: {head_id}")


@models_app.command("register")
def models_register(
    model_id: str,
    params: Annotated[int, typer.Option("--params", help="Parameter count.")] = 0,
    backend: Annotated[list[str] | None, typer.Option("--backend", help="A backend that can run it.")] = None,
    prefer: Annotated[list[str] | None, typer.Option("--prefer", help="A preferred backend.")] = None,
    quantization: Annotated[
        str | None, typer.Option(help="Quantization it is served in (INT8, FP16).")
    ] = None,
    min_context: Annotated[int, typer.Option()] = 0,
    dynamic_shapes: Annotated[bool, typer.Option("--dynamic-shapes")] = False,
    config: ConfigOpt = None,
) -> None:
    """Register (or replace) a model's characteristics: routers use them at once."""
    from router_worker.core.catalog import ModelSpec
    from router_worker.state.catalog import ModelCatalog

    spec = ModelSpec(model_id=model_id, parameter_count=params, backends=backend or [], preferred_backends=prefer or [],
                     quantization=quantization, min_context=min_context, dynamic_shapes=dynamic_shapes)  # fmt: skip

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            await ModelCatalog(rt.redis, Keys(rt.settings.redis_prefix)).register(spec, ACTOR)
            await rt.audit().emit("model_registered", OPERATOR, model_id=model_id, actor=ACTOR)

    _run(main)
    console.print(f"registered model {model_id}")


@models_app.command("ls")
def models_ls(config: ConfigOpt = None) -> None:
    """List registered models (JSON, one a line)."""
    from router_worker.state.catalog import ModelCatalog

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            specs = await ModelCatalog(rt.redis, Keys(rt.settings.redis_prefix)).all()
        for spec in specs.values():
            print(spec.model_dump_json())

    _run(main)


@policy_app.command("show")
def policy_show(config: ConfigOpt = None) -> None:
    """Print the policy in force (JSON)."""

    async def main() -> Policy:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            return await ops.get_policy(_ops(rt))

    console.print_json(_run(main).model_dump_json())


@policy_app.command("history")
def policy_history(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=50, help="How many.")] = 10,
    config: ConfigOpt = None,
) -> None:
    """Print earlier policies, newest first (JSON, one a line)."""

    async def main() -> list[Policy]:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            return await ops.policy_history(_ops(rt), limit)

    for p in _run(main):
        print(p.model_dump_json())


def _policy_file(file: Path, label: str) -> Policy:
    try:
        return ops.validate_policy(ops.read_policy_file(file))
    except ops.OpError as exc:
        _refuse(exc, 1, label)


@policy_app.command("fields")
def policy_fields_cmd(
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per field, one a line.")] = False,
) -> None:
    """Every policy field (nested ones as breaker.window_s, list items as rules[].pattern): type, default,
    bounds and meaning, read from the policy's own schema."""
    from dataclasses import asdict

    from router_worker.policy_docs import policy_fields

    rows = policy_fields()
    if json_:
        for r in rows:
            print(orjson.dumps(asdict(r)).decode())
        return
    table = Table(title="policy fields (router-worker policy validate FILE checks a policy against them)")
    for col in ("field", "type", "default", "bounds", "meaning"):
        table.add_column(col, no_wrap=col == "field", overflow="fold")
    for r in rows:
        table.add_row(r.path, r.type, r.default, r.bounds, r.description)
    console.print(table)


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Check a policy file (JSON or YAML) without storing it."""
    _policy_file(file, "invalid")
    console.print(f"{file}: valid")


@policy_app.command("set")
def policy_set(
    file: Path,
    expect_version: Annotated[
        int | None, typer.Option(help="Refuse unless this is the current version.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Validate a policy file and make it the policy of every router (they reload it at once)."""
    policy = _policy_file(file, "refused")

    async def main() -> int:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            return (await ops.set_policy(_ops(rt), policy, expect_version, ACTOR)).version

    try:
        version = _run(main)
    except ops.OpError as exc:
        _refuse(exc, 1, "refused")
    console.print(f"policy version {version} in force")


def explain(
    model: Annotated[str, typer.Option("--model")],
    region: Annotated[str | None, typer.Option()] = None,
    session: Annotated[str | None, typer.Option()] = None,
    strategy: Annotated[str | None, typer.Option()] = None,
    prefix: Annotated[str | None, typer.Option("--prefix-hash")] = None,
    metadata: Annotated[
        str | None, typer.Option(help="Criteria as JSON, e.g. '{\"min_context\": 8192}'")
    ] = None,
    tokens: Annotated[int | None, typer.Option("--tokens")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the decision as JSON (as POST /explain).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Dry-run one decision against the live heads and policy; print candidates, exclusions, scores, pick."""
    try:
        criteria = json.loads(metadata) if metadata else None
        job = ops.ExplainRequest(model_type=model, region=region, session_id=session, strategy=strategy,
                                 prefix_hash=prefix, estimated_tokens=tokens, metadata=criteria).job()  # fmt: skip
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/] --metadata is not JSON: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        _refuse(exc, 2)
    except ops.OpError as exc:
        _refuse(exc, 2)

    async def main() -> ops.Explanation:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            return await ops.explain(_ops(rt), job)

    e = _run(main)
    if as_json:
        console.print_json(orjson.dumps(e.as_dict()).decode())
        return
    d = e.decision
    table = Table(title=f"candidates for {model} (policy v{e.policy_version})")
    for col in ("head", "model", "region", "status", "load", "latency ms", "cache", "quota", "verdict"):
        table.add_column(col)
    shown = {"pick": "[green]PICK[/]", "eligible": "eligible", "other_model": "other model"}
    for c in e.candidates:
        h = c.head
        verdict = f"[red]excluded: {escape(c.why or '')}[/]" if c.verdict == "excluded" else shown[c.verdict]
        table.add_row(h.head_id, h.model_id, h.region, h.status.value, f"{c.load:.2f}", f"{h.latency_ms:.1f}",
                      f"{h.cache_hit_rate:.2f}", f"{h.quota_used:.2f}", verdict)  # fmt: skip
    console.print(table)
    console.print(f"outcome: [bold]{d.outcome.value}[/]  strategy: {d.strategy}  fallback: {d.fallback}")
    console.print(f"reason: {escape(d.reason)}")
    if d.head:
        console.print(f"scores: {d.scores.as_dict()}")


def bench(
    what: Annotated[
        str, typer.Argument(help="decisions (routing decision time per strategy), e2e (the whole router "
                            "against a bare Kafka pipe), soak (a steady load with faults, every job checked) "
                            "or broker (one hop's latency through the broker, by partitions and fetch wait)")
    ] = "decisions",
    heads: Annotated[
        str | None, typer.Option(help="decisions: head counts, comma-separated (default 10,100,1000). "
                                 "e2e: heads registered (default 100).")
    ] = None,
    iterations: Annotated[int, typer.Option(help="decisions: decisions timed per strategy and size.")] = 2000,
    strategy: Annotated[
        list[str] | None, typer.Option(help="decisions: only these strategies. e2e: the routers' strategy "
                                       "(default least_loaded).")
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="decisions: one JSON object per strategy and size, one per line. "
                           "e2e: one JSON object (with --repeat: every round, and the spread).")
    ] = False,
    jobs: Annotated[int, typer.Option(help="e2e: backlog jobs preloaded to the request topic.")] = 100_000,
    models: Annotated[int, typer.Option(help="e2e: models the heads serve.")] = 4,
    regions: Annotated[int, typer.Option(help="e2e: regions of heads and jobs.")] = 2,
    payload_bytes: Annotated[int, typer.Option(help="e2e: payload size of each job.")] = 200,
    latency_jobs: Annotated[int, typer.Option(help="e2e: jobs sent at the fixed rate for latency.")] = 3000,
    rate: Annotated[
        float | None, typer.Option(help="e2e: offered load for latency, jobs/s (default: half the one-router "
                                   "drain rate). soak: jobs/s of the producers (default 200).")
    ] = None,
    minutes: Annotated[float, typer.Option(help="soak: how long the producers run.")] = 10.0,
    fault_every: Annotated[float, typer.Option(help="soak: seconds between faults (router kill, head kill, "
                                               "Redis restart, router pause, in turn).")] = 30.0,
    routers: Annotated[str, typer.Option(help="e2e: router process counts to measure, comma-separated.")] = "1,2",
    baseline: Annotated[bool, typer.Option(help="e2e: measure the bare aiokafka pipe too.")] = True,
    pipes: Annotated[
        str, typer.Option(help="e2e: bare pipe process counts to measure (one consumer group each), "
                          "comma-separated; must include 1. A router count with as many pipes is also compared "
                          "with them.")
    ] = "1",
    plot: Annotated[
        Path | None, typer.Option(help="e2e: draw drain and latency, router vs pipe, to this PNG "
                                  "(needs matplotlib: pip install 'router-worker[bench]').")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="e2e: write a py-spy flame graph of each router's drain to this folder "
                                  "(needs py-spy; with --repeat, the last round's).")
    ] = None,
    repeat: Annotated[
        int, typer.Option(help="e2e: rounds of every phase on one stack; prints the ratios' median and "
                          "spread across rounds (a shared machine's noise is a few tens of per cent).")
    ] = 1,
    config: ConfigOpt = None,
) -> None:  # fmt: skip
    """Benchmarks. decisions: routing decision time per strategy against a first-candidate baseline.
    e2e: the whole router (1, then 2 processes) against a bare consume-produce-commit pipe on the same broker:
    drain rate, latency, Redis commands per job, CPU and memory (starts the embedded stack unless
    ROUTER_KAFKA_BOOTSTRAP_SERVERS and ROUTER_REDIS_URL are set)."""
    import sys

    from router_worker.bench import bench_decisions, json_lines, print_table, render

    if what == "e2e":
        from router_worker.bench_e2e import BenchError, E2EConfig, command

        if not baseline and pipes.strip() != "1":
            err.print("[red]error:[/] --pipes measures bare pipes: it can not go with --no-baseline")
            raise typer.Exit(2)

        try:
            cfg = E2EConfig(jobs=jobs, heads=int(heads or 100), models=models, regions=regions,
                            payload_bytes=payload_bytes, latency_jobs=latency_jobs, rate=rate,
                            routers=tuple(int(x) for x in routers.split(",") if x.strip()),
                            pipes=tuple(int(x) for x in pipes.split(",") if x.strip()),
                            strategy=(strategy or ["least_loaded"])[0], baseline=baseline,
                            profile_dir=profile, repeat=repeat)  # fmt: skip
            if plot is not None and not (plot.parent.is_dir() and os.access(plot.parent, os.W_OK)):
                raise ValueError(f"--plot {plot}: its folder does not exist or is not writable")
        except ValueError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from exc
        s = _settings(config, log_level="WARNING")
        try:
            command(s, cfg, json_out=json_, plot_to=plot, console=console, err=err)
        except BenchError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from exc
        return
    if what == "soak":
        _bench_soak(config, minutes, rate, fault_every, json_)
        return
    if what == "broker":
        _bench_broker(config, json_)
        return
    if what != "decisions":
        err.print(f"[red]error:[/] unknown benchmark {what!r} (known: decisions, e2e, soak, broker)")
        raise typer.Exit(2)
    sizes = _decision_sizes(heads or "10,100,1000", iterations, strategy)
    t0 = time.perf_counter()
    rows = bench_decisions(sizes, iterations, strategy)
    if json_:
        sys.stdout.write(json_lines(rows))
        return
    print_table(console, render(rows))
    console.print(f"measured in {time.perf_counter() - t0:.1f}s; ratios are median / baseline median")


def _decision_sizes(heads: str, iterations: int, strategies: list[str] | None) -> list[int]:
    """``bench decisions``' head counts, its other options checked: a typo is refused before anything runs."""
    from router_worker.core.policy import STRATEGIES

    try:
        sizes = [int(x) for x in heads.split(",") if x.strip()]
    except ValueError:
        sizes = []
    problem = None
    if not sizes or min(sizes) < 1:
        problem = f"--heads {heads!r}: head counts of at least 1, comma-separated (e.g. 10,100,1000)"
    elif iterations < 1:
        problem = f"--iterations {iterations}: at least 1"
    elif unknown := [x for x in strategies or () if x not in STRATEGIES]:
        problem = f"unknown strategy {unknown[0]!r} (known: {', '.join(STRATEGIES)})"
    if problem is not None:
        err.print(f"[red]error:[/] {escape(problem)}", soft_wrap=True)
        raise typer.Exit(2)
    return sizes


def _bench_broker(config: Path | None, json_: bool) -> None:
    """``bench broker``: one hop's produce-to-arrival latency by partitions and fetch wait (bench_broker.py)."""
    import asyncio
    import sys

    from router_worker.bench_broker import run_broker_bench

    t0 = time.perf_counter()
    rows = asyncio.run(run_broker_bench(_settings(config, log_level="WARNING")))
    if json_:
        for r in rows:
            sys.stdout.write(json.dumps(r.to_json()) + "\n")
        return
    table = Table(title="one hop through the broker: produce to arrival (ms)")
    for col in ("partitions", "fetch wait ms", "records/s", "received", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r.partitions), str(r.fetch_wait_ms), f"{r.rate:,.0f}", f"{r.received}/{r.records}",
                      f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.max_ms:.1f}")  # fmt: skip
    console.print(table)
    console.print(f"measured in {time.perf_counter() - t0:.1f}s")


def _bench_soak(
    config: Path | None, minutes: float, rate: float | None, fault_every: float, json_: bool
) -> None:
    """``bench soak``: routers, heads and producers as processes with faults on a schedule (bench_soak.py)."""
    from router_worker.bench_soak import SoakConfig, SoakError, command

    try:
        cfg = SoakConfig(minutes=minutes, rate=200.0 if rate is None else rate, fault_every_s=fault_every)
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    try:
        command(_settings(config, log_level="WARNING"), cfg, json_out=json_, console=console, err=err)
    except SoakError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from exc


def register(app: typer.Typer) -> None:
    """Add the operator commands to the main app (once)."""
    if any(info.name == "heads" for info in app.registered_groups):
        return
    app.add_typer(heads_app, name="heads")
    app.add_typer(policy_app, name="policy")
    cli_audit.register(app)
    app.add_typer(models_app, name="models")
    app.command("explain")(explain)
    app.command("bench")(bench)
    from router_worker import cli_dlq

    cli_dlq.register(app)
