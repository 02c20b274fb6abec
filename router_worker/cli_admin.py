"""Operator commands: heads, policy, explain, bench (audit tail: cli_audit). They talk to a running deployment."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Annotated, cast

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from router_worker import cli_audit
from router_worker.audit import os_actor
from router_worker.cli import ConfigOpt, _run, _settings, console, err
from router_worker.clock import now_ms
from router_worker.core.model import Head, HeadStatus
from router_worker.core.validity import split_valid
from router_worker.pipeline.topology import check_head_partition, topics_partitions
from router_worker.runtime import Runtime, runtime
from router_worker.settings import Settings
from router_worker.state.catalog import ModelCatalog
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from router_worker.state.policy_store import PolicyError, PolicyStore, load_policy_file
from router_worker.topics import Topics

heads_app = typer.Typer(help="List, register, drain and remove heads.", no_args_is_help=True)
policy_app = typer.Typer(help="Show, set and validate the routing policy.", no_args_is_help=True)
models_app = typer.Typer(help="Register models with their characteristics (what heads they need).",
                         no_args_is_help=True)  # fmt: skip

OPERATOR = "cli"
"""The router_id of records the CLI writes."""
ACTOR = os_actor()
"""Who did it: the OS user running the command."""


def _registry(rt: Runtime) -> HeadRegistry:
    return HeadRegistry(rt.redis, Keys(rt.settings.redis_prefix), rt.settings.head_ttl_ms)


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

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            heads, _, inflight = await _registry(rt).snapshot()
            why = await _validity(rt.settings, heads) if heads else {}
        now = now_ms()
        if as_json:
            console.print_json(orjson.dumps([
                {"head_id": h.head_id, "model_id": h.model_id, "region": h.region, "partition": h.partition,
                 "status": h.status.value, "alive": h.expires_at_ms >= now, "inflight": inflight.get(h.head_id, 0),
                 "capacity": h.capacity, "latency_ms": h.latency_ms, "backend": h.backend,
                 "valid": why[h.head_id] is None, "invalid_reason": why[h.head_id]}
                for h in heads
            ]).decode())  # fmt: skip
            return
        table = Table(title=f"{len(heads)} heads")
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
        ):
            table.add_column(col)
        for h in heads:
            reason = why[h.head_id]
            table.add_row(h.head_id, h.model_id, h.region, str(h.partition), h.status.value,
                          "yes" if h.expires_at_ms >= now else "[red]expired[/]",
                          f"{inflight.get(h.head_id, 0)}/{h.capacity}", f"{h.latency_ms:.1f}", h.backend,
                          "valid" if reason is None else f"[red]{escape(reason)}[/]")  # fmt: skip
        console.print(table)

    _run(main)


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
    """Register a head by hand (for a server that does not use the worker SDK; it must heartbeat)."""

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            problem = await check_head_partition(rt.settings, model, partition)
            if problem:
                err.print(
                    f"[red]error:[/] {escape(problem)}; {escape(head_id)} not registered", soft_wrap=True
                )
                raise typer.Exit(2)
            rec = HeadRecord(head_id, model, region, capacity, partition, backend=backend)
            await _registry(rt).register(rec)
            await rt.audit().emit(
                "head_registered", OPERATOR, head_id=head_id, model_id=model, actor=ACTOR
            )
        console.print(f"registered {head_id}")

    _run(main)


def _admin_op(config: Path | None, head_id: str, op: str) -> None:
    async def main() -> bool:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            reg = _registry(rt)
            if op == "drain":
                ok = await reg.set_status(head_id, HeadStatus.DRAINING, ACTOR)
                event = "head_drained"
            else:
                ok = await reg.remove(head_id, ACTOR)
                event = "head_removed"
            if ok:
                await rt.audit().emit(event, OPERATOR, head_id=head_id, actor=ACTOR)
            return ok

    if not _run(main):
        err.print(f"[red]error:[/] no head {head_id}")
        raise typer.Exit(1)
    console.print(f"{op}: {head_id}")


@heads_app.command("drain")
def heads_drain(head_id: str, config: ConfigOpt = None) -> None:
    """Stop sending new jobs to a head; it finishes what it has."""
    _admin_op(config, head_id, "drain")


@heads_app.command("remove")
def heads_remove(head_id: str, config: ConfigOpt = None) -> None:
    """Remove a head: routers stop routing to it at once."""
    _admin_op(config, head_id, "remove")


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

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            p = await PolicyStore.for_settings(rt.redis, rt.settings).get()
        console.print_json(p.model_dump_json())

    _run(main)


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Check a policy file (JSON or YAML) without storing it."""
    try:
        load_policy_file(file)
    except (PolicyError, OSError) as exc:
        err.print(f"[red]invalid:[/] {exc}")
        raise typer.Exit(1) from exc
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
    try:
        policy = load_policy_file(file)
    except (PolicyError, OSError) as exc:
        err.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(1) from exc

    async def main() -> int:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            store = PolicyStore.for_settings(rt.redis, rt.settings)
            stored = await store.set(policy, expect_version, actor=ACTOR)
            await rt.audit().emit("policy_changed", OPERATOR, actor=ACTOR, version=stored.version,
                                  strategy=stored.default_strategy)  # fmt: skip
            return stored.version

    try:
        version = _run(main)
    except PolicyError as exc:
        err.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(1) from exc
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
    config: ConfigOpt = None,
) -> None:
    """Dry-run one decision against the live heads and policy; print candidates, exclusions, scores, pick."""
    from router_worker.core.engine import HeadIndex, decide
    from router_worker.core.model import RouterMemory
    from schemas.envelope import EnvelopeError, validate

    try:
        job = validate({"job_id": "explain", "model_type": model, "region": region, "session_id": session,
                        "strategy": strategy, "prefix_hash": prefix, "estimated_tokens": tokens,
                        "metadata": json.loads(metadata) if metadata else None})  # fmt: skip
    except (EnvelopeError, json.JSONDecodeError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc

    async def main() -> None:
        async with runtime(_settings(config), allow_embedded=False) as rt:
            keys = Keys(rt.settings.redis_prefix)
            heads, profiles, inflight = await _registry(rt).snapshot()
            policy = await PolicyStore.for_settings(rt.redis, rt.settings).get()
            specs = await ModelCatalog(rt.redis, keys).all()
            pinned = cast(str | None, await rt.redis.get(keys.affinity(session))) if session else None
        memory = RouterMemory(pending=inflight)
        if session and pinned:
            memory.affinity[session] = (pinned, now_ms() + int(policy.affinity_timeout_s * 1000))
        index = HeadIndex.build(heads, profiles, specs)
        d = decide(job, index, policy, memory, now_ms(), random.Random(), explain=True)
        table = Table(title=f"candidates for {model} (policy v{policy.version})")
        for col in ("head", "model", "region", "status", "load", "latency ms", "cache", "quota", "verdict"):
            table.add_column(col)
        why = dict(d.excluded)
        for h in index.heads.values():
            verdict = ("[green]PICK[/]" if d.head and h.head_id == d.head.head_id
                       else f"[red]excluded: {why[h.head_id]}[/]" if h.head_id in why
                       else "eligible" if h.serves(model) else "other model")  # fmt: skip
            table.add_row(h.head_id, h.model_id, h.region, h.status.value, f"{memory.load(h):.2f}",
                          f"{h.latency_ms:.1f}", f"{h.cache_hit_rate:.2f}", f"{h.quota_used:.2f}", verdict)  # fmt: skip
        console.print(table)
        console.print(f"outcome: [bold]{d.outcome.value}[/]  strategy: {d.strategy}  fallback: {d.fallback}")
        console.print(f"reason: {d.reason}")
        if d.head:
            console.print(f"scores: {d.scores.as_dict()}")

    _run(main)


def bench(
    what: Annotated[
        str, typer.Argument(help="decisions (routing decision time per strategy) or e2e (the whole router "
                            "against a bare Kafka pipe)")
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
                           "e2e: one JSON object.")
    ] = False,
    jobs: Annotated[int, typer.Option(help="e2e: backlog jobs preloaded to the request topic.")] = 100_000,
    models: Annotated[int, typer.Option(help="e2e: models the heads serve.")] = 4,
    regions: Annotated[int, typer.Option(help="e2e: regions of heads and jobs.")] = 2,
    payload_bytes: Annotated[int, typer.Option(help="e2e: payload size of each job.")] = 200,
    latency_jobs: Annotated[int, typer.Option(help="e2e: jobs sent at the fixed rate for latency.")] = 3000,
    rate: Annotated[
        float | None, typer.Option(help="e2e: offered load for latency, jobs/s (default: half the one-router "
                                   "drain rate).")
    ] = None,
    routers: Annotated[str, typer.Option(help="e2e: router process counts to measure, comma-separated.")] = "1,2",
    baseline: Annotated[bool, typer.Option(help="e2e: measure the bare aiokafka pipe too.")] = True,
    plot: Annotated[
        Path | None, typer.Option(help="e2e: draw drain and latency, router vs pipe, to this PNG "
                                  "(needs matplotlib: pip install 'router-worker[bench]').")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="e2e: write a py-spy flame graph of each router's drain to this folder "
                                  "(needs py-spy).")
    ] = None,
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

        try:
            cfg = E2EConfig(jobs=jobs, heads=int(heads or 100), models=models, regions=regions,
                            payload_bytes=payload_bytes, latency_jobs=latency_jobs, rate=rate,
                            routers=tuple(int(x) for x in routers.split(",") if x.strip()),
                            strategy=(strategy or ["least_loaded"])[0], baseline=baseline,
                            profile_dir=profile)  # fmt: skip
        except ValueError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from exc
        s = _settings(config, log_level="WARNING")
        try:
            command(s, cfg, json_out=json_, plot_to=plot, console=console, err=err)
        except BenchError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from exc
        return
    if what != "decisions":
        err.print(f"[red]error:[/] unknown benchmark {what!r} (known: decisions, e2e)")
        raise typer.Exit(2)
    sizes = [int(x) for x in (heads or "10,100,1000").split(",") if x.strip()]
    t0 = time.perf_counter()
    rows = bench_decisions(sizes, iterations, strategy)
    if json_:
        sys.stdout.write(json_lines(rows))
        return
    print_table(console, render(rows))
    console.print(f"measured in {time.perf_counter() - t0:.1f}s; ratios are median / baseline median")


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
