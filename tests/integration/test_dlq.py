"""Dead letters on the real broker and Redis: listed, shown, redriven once each (the CLI and the admin API),
from the original record when the dead letter was cut, resumed after an interruption; typos refused."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.admin import AdminAuth
from router_worker.admin.api import new_app
from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.dlq.http import DlqDeps, add_dlq_routes
from router_worker.dlq.model import DeadLetter, Filter, Verdict, parse_filter
from router_worker.dlq.reader import read_dead_letters
from router_worker.dlq.redrive import execute, os_user, prepare
from router_worker.dlq.state import RedriveState
from router_worker.metrics import Metrics
from router_worker.pipeline.kafka import ensure_topics, make_producer
from router_worker.pipeline.publish import dead_letter_record
from router_worker.settings import Settings
from router_worker.state.idempotency import queue_done
from router_worker.state.keys import Keys
from router_worker.topics import Topics
from tests.helpers import Served, cli, cli_env, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration


async def _records(s: Settings, topic: str, at_least: int = 0, timeout: float = 30.0) -> list[DeadLetter]:
    """Every record of ``topic`` (read to its end), waiting until there are ``at_least``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await read_dead_letters(s, topic)
        if len(found) >= at_least or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)


async def _cli(s: Settings, *args: str, check: bool = True) -> Any:
    """A CLI command in a child process, off the event loop (routers and heads run in this one)."""
    return await asyncio.to_thread(cli, s, *args, check=check)


def _audit(s: Settings, event: str) -> list[dict[str, Any]]:
    lines = Path(s.audit_file).read_text().splitlines() if Path(s.audit_file).exists() else []
    return [r for r in map(orjson.loads, lines) if r.get("event") == event]


async def _dead_letters(
    s: Settings, jobs: list[str], model: str = "m", reason: str = "unknown_model", dlq_partitions: int = 2
) -> None:
    """Dead letters as a router writes them (for tests that need no router to make them)."""
    topics = Topics.from_settings(s)
    await ensure_topics(s, [(topics.dlq, dlq_partitions), (topics.requests, 2)])
    producer = make_producer(s)
    await producer.start()
    try:
        for i, job_id in enumerate(jobs):
            value = msgpack.packb({"job_id": job_id, "model_type": model, "payload": f"p{i}"})
            v, k, h = dead_letter_record(value, job_id.encode(), [("content-type", b"application/msgpack")], reason,
                                         "no head serves it", topics.requests, 0, 1000 + i, 3, limit=1 << 20,
                                         keep=64)  # fmt: skip
            await producer.send_and_wait(topics.dlq, v, key=k, headers=h)
    finally:
        await producer.stop()


async def test_unknown_model_dead_letters_are_redriven_once_each_to_a_new_head(settings: Settings, redis: Redis
                                                                              ) -> None:  # fmt: skip
    s = settings.model_copy(update={"max_attempts": 2})
    topics = Topics.from_settings(s)
    served = Served()
    ids = [f"late-{i}" for i in range(5)]
    async with running(make_router(s, redis)):
        async with JobProducer(s) as p:
            for i, job_id in enumerate(ids):
                await p.submit("late", f"job {i}", job_id=job_id)
        assert len(await _records(s, topics.dlq, 5)) == 5

        ls = await _cli(s, "dlq", "ls", "--reason", "unknown_model", "--json")
        listed = orjson.loads(ls.stdout)
        assert listed["count"] == 5
        assert listed["summary"] == {"unknown_model": 5}
        assert sorted(r["job_id"] for r in listed["dead_letters"]) == ids
        assert {r["original_topic"] for r in listed["dead_letters"]} == {topics.requests}
        table = await _cli(s, "dlq", "ls", "--since", "1h")
        assert "late-3" in table.stdout
        assert "by reason" in table.stdout
        show = await _cli(s, "dlq", "show", "late-0")
        assert "unknown_model" in show.stdout
        assert '"payload": "job 0"' in show.stdout, show.stdout
        assert topics.requests in show.stdout
        assert "x-dlq-reason" in show.stdout
        missing = await _cli(s, "dlq", "show", "nobody", check=False)
        assert missing.returncode == 1
        assert "no dead letter of job 'nobody'" in missing.stderr

        async with running(make_worker(s, redis, served, "late")):
            async with JobProducer(s) as p:  # once the head serves a job, the router knows it
                await p.submit("late", "probe", job_id="probe-1")
            await wait_until(lambda: "probe-1" in served.job_ids())
            first = await _cli(s, "dlq", "redrive", "--reason", "unknown_model", "--rate", "50/s", "--yes")
            assert "sent 5 of 5" in first.stdout, first.stdout + first.stderr
            await wait_until(lambda: set(ids) <= set(served.job_ids()))
            second = await _cli(s, "dlq", "redrive", "--reason", "unknown_model", "--yes")
            assert "nothing to send" in second.stdout, second.stdout + second.stderr
            assert "5 already redriven" in second.stderr
            async with JobProducer(
                s
            ) as p:  # a job after them all: anything the redrive sent twice shows first
                await p.submit("late", "probe", job_id="probe-2")
            await wait_until(lambda: "probe-2" in served.job_ids())

    counts = Counter(served.job_ids())
    assert all(counts[j] == 1 for j in ids), counts
    for job_id, _head, _model, _part, headers in served.rows:
        if job_id in ids:
            assert headers["x-redrive"].startswith(b"rd-")
            assert headers["x-route-attempt"] == b"1", "a fresh attempt count"
    redriven = [r for r in await read_dead_letters(s, topics.requests) if r.redrive is not None]
    assert sorted(r.job_id or "" for r in redriven) == ids, "the second redrive sent nothing"
    audits = _audit(s, "dlq_redrive")
    assert [(a["count"], a["status"]) for a in audits] == [(5, "done")]
    assert audits[0]["actor"] == os_user()
    assert audits[0]["filter"] == {"reason": ["unknown_model"]}


async def test_a_truncated_dead_letter_is_redriven_from_its_original_byte_for_byte(settings: Settings,
                                                                                   redis: Redis) -> None:  # fmt: skip
    small = settings.model_copy(update={"kafka_max_message_bytes": 2048})
    topics = Topics.from_settings(small)
    big_value = {"job_id": "big-1", "model_type": "m", "payload": "x" * 3000}
    async with running(make_router(small, redis)):
        async with JobProducer(settings) as p:  # the SDK refuses it under the small limit: another client's
            await p.submit("m", big_value["payload"], job_id="big-1")
        dead = await _records(small, topics.dlq, 1)
    assert len(dead) == 1
    dl = dead[0]
    assert dl.reason == "too_large"
    assert dl.truncated_from is not None
    original = (await read_dead_letters(small, topics.requests))[0]
    assert dl.truncated_from == len(original.value or b"")

    # Fakes that claim to be cut: one whose original differs, one whose original does not exist.
    producer = make_producer(small)
    await producer.start()
    try:
        for job_offset, sha in ((original.offset, "0" * 64), (original.offset + 999, "1" * 64)):
            v, k, h = dead_letter_record(b"cut", b"k", [], "too_large", "fake", topics.requests, original.partition,
                                         job_offset, 1, limit=1 << 20, keep=8)  # fmt: skip
            h += [
                ("x-dlq-truncated", str(len(original.value or b"")).encode()),
                ("x-dlq-sha256", sha.encode()),
            ]
            await producer.send_and_wait(topics.dlq, v, key=k, headers=h)
    finally:
        await producer.stop()
    assert len(await _records(small, topics.dlq, 3)) == 3

    dry = await _cli(small, "dlq", "redrive", "--reason", "too_large", "--dry-run")
    assert "would send 1" in dry.stdout, dry.stdout + dry.stderr
    assert "sha256 differs" in dry.stderr
    assert "does not exist" in dry.stderr
    real = await _cli(small, "dlq", "redrive", "--reason", "too_large", "--yes", check=False)
    assert real.returncode == 1, "two were refused: the operator must hear of it"
    assert "sent 1 of 1" in real.stdout, real.stdout + real.stderr
    redriven = [r for r in await _records(small, topics.requests, 2) if r.redrive is not None]
    assert len(redriven) == 1
    assert redriven[0].value == original.value, "the original bytes, from the request topic"
    assert redriven[0].key == original.key
    assert hashlib.sha256(redriven[0].value or b"").hexdigest() == dl.sha256

    # With the limit raised, the redriven job routes to a head, whole.
    served = Served()
    async with running(make_worker(settings, redis, served, "m"), make_router(settings, redis)):
        await wait_until(lambda: "big-1" in served.job_ids(), timeout=60)


async def test_dry_run_sends_nothing_and_an_interrupted_redrive_resumes(
    settings: Settings, redis: Redis
) -> None:
    topics = Topics.from_settings(settings)
    ids = [f"job-{i:02d}" for i in range(12)]
    await _dead_letters(settings, ids)
    assert len(await _records(settings, topics.dlq, 12)) == 12

    dry = await _cli(settings, "dlq", "redrive", "--reason", "unknown_model", "--dry-run")
    assert "would send 12" in dry.stdout
    assert all(j in dry.stdout for j in ids)
    assert await read_dead_letters(settings, topics.requests) == [], "a dry run sends nothing"

    flt: Filter = parse_filter(["unknown_model"], now_ms=0)
    audit = AuditSink(redis, settings.audit_channel, settings.audit_file)
    state = RedriveState(redis, Keys(settings.redis_prefix))
    first = await prepare(settings, redis, flt)
    task: asyncio.Task[Any] | None = None

    def stop_after_four(sent: int, _total: int) -> None:
        if sent >= 4 and task is not None:
            task.cancel()

    task = asyncio.create_task(execute(settings, redis, first, rate=10, actor="tester", source="test", audit=audit,
                                       on_progress=stop_after_four))  # fmt: skip
    with pytest.raises(asyncio.CancelledError):
        await task
    progress = await state.progress(first.redrive_id)
    assert progress is not None
    assert progress["status"] == "interrupted"
    assert 4 <= progress["sent"] < 12

    served = Served()
    async with running(make_worker(settings, redis, served, "m"), make_router(settings, redis)):
        second = await prepare(settings, redis, flt)
        counts = second.counts()
        assert counts["already_redriven"] == progress["sent"]
        assert counts.get("send", 0) + counts.get("resend", 0) == 12 - progress["sent"]
        res = await execute(settings, redis, second, rate=100, actor="tester", source="test", audit=audit)
        assert res.status == "done"
        await wait_until(lambda: set(ids) <= set(served.job_ids()), timeout=60)
        async with JobProducer(settings) as p:
            await p.submit("m", "probe", job_id="probe")
        await wait_until(lambda: "probe" in served.job_ids())
    counts_served = Counter(served.job_ids())
    assert all(counts_served[j] == 1 for j in ids), counts_served
    sent = [r for r in await read_dead_letters(settings, topics.requests) if r.redrive is not None]
    assert {r.job_id for r in sent} == set(ids)
    by_job: dict[str | None, set[str | None]] = {}
    for r in sent:
        by_job.setdefault(r.job_id, set()).add(r.redrive)
    assert all(len(v) == 1 for v in by_job.values()), "a job sent twice is sent under one redrive id"
    assert [a["status"] for a in _audit(settings, "dlq_redrive")] == ["interrupted", "done"]


async def test_admin_api_lists_and_redrives_with_a_token(settings: Settings, redis: Redis) -> None:
    topics = Topics.from_settings(settings)
    ids = ["api-1", "api-2", "api-3"]
    await _dead_letters(settings, ids, reason="no_capacity")
    await _dead_letters(settings, ["bad-1"], reason="schema_error")
    assert len(await _records(settings, topics.dlq, 4)) == 4

    metrics = Metrics()
    app = new_app(metrics, AdminAuth.of({"ops-token": "s3cret"}))  # the admin API's own guard and errors
    audit = AuditSink(redis, settings.audit_channel, settings.audit_file)
    add_dlq_routes(app, DlqDeps(settings, redis, audit, "router-test", metrics))
    auth = {"Authorization": "Bearer s3cret"}
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/dlq")).status == 401, "a token even to read: dead letters carry jobs"
        assert (await client.post("/dlq/redrive", json={})).status == 401
        wrong = await client.get("/dlq", headers={"Authorization": "Bearer s3cre7"})
        assert wrong.status == 401
        listed = await (await client.get("/dlq", params={"reason": "no_capacity"}, headers=auth)).json()
        assert listed["count"] == 3
        assert listed["summary"] == {"no_capacity": 3}
        typo = await client.get("/dlq", params={"reason": "no_capactiy"}, headers=auth)
        assert typo.status == 400
        assert "unknown reason" in (await typo.json())["error"]
        assert (await typo.json())["field"] == "reason"
        bad_rate = await client.post("/dlq/redrive", json={"rate": "fast"}, headers=auth)
        assert bad_rate.status == 400
        assert "bad rate" in (await bad_rate.json())["error"]
        assert (await bad_rate.json())["field"] == "rate"
        refused = await client.post("/dlq/redrive", json={"reason": "schema_error"}, headers=auth)
        assert refused.status == 400
        assert "force" in (await refused.json())["error"]
        dry = await (await client.post("/dlq/redrive", json={"dry_run": True}, headers=auth)).json()
        assert dry["to_send"] == 3, "schema_error is left out without force"
        assert dry["counts"] == {"send": 3, "refused": 1}
        started = await client.post(
            "/dlq/redrive", json={"reason": ["no_capacity"], "rate": "20/s"}, headers=auth
        )
        assert started.status == 202
        body = await started.json()
        progress: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal progress
            progress = await (await client.get(body["progress"], headers=auth)).json()
            return bool(progress["status"] == "done")

        deadline = asyncio.get_running_loop().time() + 30
        while not await done():
            assert asyncio.get_running_loop().time() < deadline, progress
            await asyncio.sleep(0.1)
        assert progress["sent"] == 3
        assert progress["actor"] == "ops-token"
        recent = await (await client.get("/dlq/redrives", headers=auth)).json()
        assert [r["id"] for r in recent] == [body["id"]]
        again = await (await client.post("/dlq/redrive", json={"reason": "no_capacity"}, headers=auth)).json()
        assert again["status"] == "nothing_to_send"
    sent = [r for r in await read_dead_letters(settings, topics.requests) if r.redrive is not None]
    assert sorted(r.job_id or "" for r in sent) == ids
    assert metrics.registry.get_sample_value("dead_letters_redriven_total", {"reason": "no_capacity"}) == 3
    audits = _audit(settings, "dlq_redrive")
    assert [(a["actor"], a["count"], a["router_id"]) for a in audits] == [("ops-token", 3, "router-test")]


@pytest.mark.parametrize(("args", "says"), [
    (["ls", "--reason", "unknwon_model"], "unknown reason 'unknwon_model'"),
    (["ls", "--since", "1 hour"], "bad duration '1 hour'"),
    (["redrive", "--rate", "fast", "--yes"], "bad rate 'fast'"),
    (["redrive", "--rate", "0/s", "--yes"], "above 0"),
    (["redrive", "--reason", "decode_error", "--yes"], "pass --force"),
    (["redrive", "--reason", "unknown_model"], "pass --yes"),
])  # fmt: skip
def test_an_operators_typo_gets_a_clear_message_and_exit_2(
    settings: Settings, args: list[str], says: str
) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "router_worker.cli", "dlq", *args], env=cli_env(settings),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_job_that_already_reached_a_head_is_not_redriven(settings: Settings, redis: Redis) -> None:
    """The routers' done marks (state/idempotency.py) say the dead-lettered attempt was routed since (another
    copy of its record got through): its dead letter is stale."""
    ids = ["stale-1", "fresh-1"]
    await _dead_letters(settings, ids)
    await _records(settings, Topics.from_settings(settings).dlq, 2)
    async with redis.pipeline(transaction=False) as pipe:
        marks = [("j|3|stale-1", "d|routed|h1"), ("j|2|fresh-1", "d|routed|h1")]  # dead-lettered at attempt 3
        queue_done(pipe, Keys(settings.redis_prefix), marks, now_ms(), settings.dedupe_ttl_s * 1000)
        await pipe.execute()
    plan = await prepare(settings, redis, parse_filter(["unknown_model"], now_ms=0))
    verdicts = {item.dl.job_id: item.verdict for item in plan.items}
    assert verdicts == {"stale-1": Verdict.DELIVERED, "fresh-1": Verdict.SEND}, (
        "attempt 2 is history, not news"
    )
