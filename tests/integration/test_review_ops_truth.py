"""Review: what ops see. Audit records, the audit tail, the audit file and the metrics must tell the truth about
what the routers and heads did, on the real broker and Redis: nothing left out, nothing told twice, nothing that
crashes the operator's tail."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.audit import STREAM_FIELD, AuditSink, audit_stream_key
from router_worker.audit_recent import recent_stream_records
from router_worker.metrics import Metrics
from router_worker.pipeline.router import Router
from router_worker.runtime import make_redis
from router_worker.settings import Settings
from schemas.envelope import Job
from tests.helpers import Served, cli, cli_env, make_worker, running, wait_until
from tests.procs import RedisServer, read_audit

pytestmark = pytest.mark.integration


def _own(s: Settings, **more: Any) -> Settings:
    """The test's own audit channel (the default one is shared by every test on this Redis)."""
    return s.model_copy(update={"audit_channel": f"audit:{s.redis_prefix}", **more})


def _tail_json(s: Settings, *args: str) -> list[dict[str, Any]]:
    proc = cli(s, "audit", "tail", "--since", "10m", "--no-follow", "--json", *args)
    return [orjson.loads(x) for x in proc.stdout.splitlines() if x.strip()]


# --- audit tail and records published by someone else -------------------------------------------------------


async def test_audit_tail_survives_a_foreign_record_with_an_absurd_ts(
    settings: Settings, redis: Redis
) -> None:
    s = _own(settings)
    key = audit_stream_key(s.redis_prefix)
    # Someone else's tool writes to the deployment's stream: valid JSON objects, odd values.
    await redis.xadd(key, {STREAM_FIELD: b'{"ts": 100000000000000000, "event": "route", "job_id": "odd-1"}'})
    await redis.xadd(key, {STREAM_FIELD: b'{"ts": 1e300, "event": "route", "job_id": "odd-2"}'})
    sink = AuditSink.from_settings(redis, s, with_file=False)
    await sink.emit("policy_changed", "review", actor="ops", version=7)
    proc = cli(s, "audit", "tail", "--since", "10m", "--no-follow", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "policy_changed" in proc.stdout, "the real record after the odd ones is shown"


async def test_audit_tail_skips_non_objects_and_torn_lines_on_the_stream(
    settings: Settings, redis: Redis
) -> None:
    """Refuted: lines that are not JSON objects (a list, a torn line, a string) are skipped, the
    records around them shown, in both output modes."""
    s = _own(settings)
    key = audit_stream_key(s.redis_prefix)
    sink = AuditSink.from_settings(redis, s, with_file=False)
    await sink.emit("head_drained", "review", head_id="h-before", actor="ops")
    await redis.xadd(key, {STREAM_FIELD: b'[1,2]\n{"ts": 1, "event": "x"\n"str"\n{"event": 3, "ts": "?"}'})
    await redis.xadd(key, {"other": b"no r field"})
    await sink.emit("head_drained", "review", head_id="h-after", actor="ops")
    heads = [r.get("head_id") for r in _tail_json(s, "--event", "head_drained")]
    assert heads == ["h-before", "h-after"]
    proc = cli(s, "audit", "tail", "--since", "10m", "--no-follow", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "h-before" in proc.stdout
    assert "h-after" in proc.stdout


async def test_filtered_audit_tail_survives_a_foreign_record_with_a_map_field(
    settings: Settings, redis: Redis
) -> None:
    s = _own(settings)
    key = audit_stream_key(s.redis_prefix)
    sink = AuditSink.from_settings(redis, s, with_file=False)
    await sink.emit("head_drained", "review", head_id="h-before", actor="ops")
    await redis.xadd(key, {STREAM_FIELD: b'{"ts": 1, "event": {"name": "route"}, "head_id": ["a"]}'})
    await sink.emit("head_drained", "review", head_id="h-after", actor="ops")
    proc = cli(s, "audit", "tail", "--since", "10m", "--no-follow", "--json", "--event", "head_drained",
               check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    heads = [orjson.loads(x).get("head_id") for x in proc.stdout.splitlines() if x.strip()]
    assert heads == ["h-before", "h-after"]


async def test_audit_tail_survives_a_foreign_entry_that_is_not_utf8(settings: Settings, redis: Redis) -> None:
    s = _own(settings)
    key = audit_stream_key(s.redis_prefix)
    sink = AuditSink.from_settings(redis, s, with_file=False)
    await sink.emit("head_drained", "review", head_id="h-before", actor="ops")
    await redis.xadd(key, {STREAM_FIELD: b'{"event": "x"}\n\xff\xfe'})
    await sink.emit("head_drained", "review", head_id="h-after", actor="ops")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router_worker.cli", "audit", "tail", "--since", "10m", "--no-follow", "--json",
        env=cli_env(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errs.decode(errors="replace").strip().splitlines()[-1:]
    heads = [orjson.loads(x).get("head_id") for x in out.splitlines() if x.strip()]
    assert [h for h in heads if h] == ["h-before", "h-after"]


async def test_recent_audit_survives_a_foreign_entry_that_is_not_utf8(
    settings: Settings, redis: Redis
) -> None:
    s = _own(settings)
    key = audit_stream_key(s.redis_prefix)
    sink = AuditSink.from_settings(redis, s, with_file=False)
    await sink.emit("head_drained", "review", head_id="h-before", actor="ops")
    await redis.xadd(key, {STREAM_FIELD: b"\xff\xfe"})
    await sink.emit("head_drained", "review", head_id="h-after", actor="ops")
    recent = await recent_stream_records(redis, key, 10)
    assert [r.get("head_id") for r in recent] == ["h-after", "h-before"]


# --- event names --------------------------------------------------------------------------------------------


async def test_a_region_fallback_is_audited_under_the_contract_event_name(
    settings: Settings, redis: Redis
) -> None:
    s = _own(settings)
    served = Served()
    head = make_worker(s, redis, served, "m", "us", head_id="only-us")
    router = Router(s, redis, Metrics(), AuditSink.from_settings(redis, s))
    async with running(head, router):
        async with JobProducer(s) as producer:
            await producer.submit("m", b"x", job_id="wants-eu", region="eu", strategy="geo_preferred")
        await wait_until(lambda: len(served.rows) >= 1, timeout=30)
        await wait_until(lambda: router.stats.routed >= 1 and not router.marks.buffered, timeout=20)
    records = [r for r in _tail_json(s, "--job", "wants-eu")]
    assert len(records) == 1, records
    assert records[0].get("fallback") is True, "the decision was a fallback (head outside the job's region)"
    fam = {f.name: f for f in text_string_to_metric_families(router.metrics.render().decode())}[
        "routing_fallbacks"
    ]
    assert sum(x.value for x in fam.samples if x.name.endswith("_total")) == 1
    assert [r["job_id"] for r in _tail_json(s, "--event", "fallback")] == ["wants-eu"]


# --- heads' retries -----------------------------------------------------------------------------------------


async def test_a_job_a_head_nacks_has_a_retry_record(settings: Settings, redis: Redis) -> None:
    s = _own(settings)
    calls: Counter[str] = Counter()

    async def flaky(job: Job, ctx: JobContext) -> Any:
        calls[job.job_id] += 1
        if calls[job.job_id] == 1:
            raise RuntimeError("model crashed")
        return {"ok": True}

    # As services.make_worker builds a head: an audit sink on the deployment's channel and stream, no file.
    head = ModelWorker(s, redis, WorkerConfig("m", head_id="flaky"), flaky,
                       audit=AuditSink.from_settings(redis, s, with_file=False))  # fmt: skip
    router = Router(s, redis, Metrics(), AuditSink.from_settings(redis, s))
    async with running(head, router):
        async with JobProducer(s) as producer:
            await producer.submit("m", b"x", job_id="nacked-once")
        await wait_until(lambda: calls["nacked-once"] >= 2, timeout=30)
        await wait_until(lambda: router.stats.routed >= 2 and not router.marks.buffered, timeout=20)
    records = _tail_json(s, "--job", "nacked-once")
    events = [(r["event"], r.get("attempt")) for r in records]
    assert [e for e in events if e[0] == "route"] == [("route", 1), ("route", 2)], events
    assert any(e == "retry" for e, _ in events), f"the head's nack left no audit record: {events}"


# --- Redis outage -------------------------------------------------------------------------------------------


async def test_audit_records_dropped_past_the_outage_buffer_show_in_a_metric(
    settings: Settings, tmp_path: Path
) -> None:
    async with RedisServer(tmp_path / "redis") as server:
        s = _own(settings, redis_url=server.url, redis_timeout_s=1.0, redis_staleness_ms=60_000,
                 head_ttl_ms=60_000, outage_buffer_max=10)  # fmt: skip
        redis = make_redis(server.url, 1.0)
        try:
            served = Served()
            router = Router(s, redis, Metrics(), AuditSink.from_settings(redis, s))
            head = make_worker(s, redis, served, "m", head_id="h", capacity=64)
            async with running(head, router), JobProducer(s) as producer:
                await producer.submit("m", b"x", job_id="before")
                await wait_until(lambda: router.stats.routed >= 1 and not router.marks.buffered, timeout=30)
                await server.stop()
                for i in range(40):
                    await producer.submit("m", b"x", job_id=f"during-{i}")
                await producer.flush()
                await wait_until(lambda: router.stats.routed >= 41, timeout=25)
                await server.start()
                await wait_until(lambda: router.marks.buffered == 0, timeout=20)
            text = router.metrics.render().decode()
        finally:
            await redis.aclose()
        file_records, _ = read_audit(s.audit_file)
        in_file = {r["job_id"] for r in file_records if r.get("event") == "route"}
        assert {f"during-{i}" for i in range(40)} <= in_file, "the file has every record"
        on_stream = {r["job_id"] for r in _tail_json(s, "--event", "route")}
        lost = {f"during-{i}" for i in range(40)} - on_stream
        assert lost, "precondition: the outage outlasted the buffer and records never reached the stream"
        assert router.marks.dropped >= len(lost)
        shown = {
            sample.name: sample.value
            for fam in text_string_to_metric_families(text)
            for sample in fam.samples
            if "drop" in sample.name or "lost" in sample.name
        }
        assert any(v >= len(lost) for v in shown.values()), (
            f"{len(lost)} audit records never reached Redis; metrics say: {shown or 'nothing'}"
        )


# --- the audit file -----------------------------------------------------------------------------------------


async def test_the_audit_file_is_reopened_after_an_external_rotation(
    settings: Settings, redis: Redis
) -> None:
    s = _own(settings)
    sink = AuditSink.from_settings(redis, s)
    try:
        await sink.emit("head_drained", "review", head_id="h1", actor="ops")
        path = Path(s.audit_file)
        rotated = path.with_name(path.name + "-20250101")
        os.rename(
            path, rotated
        )  # logrotate's default (create) mode: rename, then the writer opens a new file
        await sink.emit("head_drained", "review", head_id="h2", actor="ops")
        await asyncio.sleep(0)
        assert path.exists(), "records written after the rotation went to the rotated file"
        heads = [r.get("head_id") for r in read_audit(path)[0]]
        assert heads == ["h2"]
    finally:
        sink.close()
