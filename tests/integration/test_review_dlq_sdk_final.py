"""Final review of the dead-letter path and the SDKs, on the real broker and Redis: redrives run twice or
interrupted, redrive filter typos, dlq verbs on a missing topic, the producer SDK's client-side checks, the
worker SDK under odd handlers. Each test is one attack; those that reproduce a bug still open are
``xfail(strict=True)``."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from consumers.worker import JobContext, ModelWorker, WorkerConfig
from producers.producer import JobProducer, build_job
from router_worker.audit import AuditSink
from router_worker.dlq.model import Verdict, parse_filter
from router_worker.dlq.reader import read_dead_letters
from router_worker.dlq.redrive import execute, prepare
from router_worker.dlq.state import RedriveState
from router_worker.settings import Settings
from router_worker.topics import Topics
from schemas.envelope import EnvelopeError, Job
from tests.helpers import Served, cli, make_router, make_worker, read_topic, running, wait_until
from tests.integration.test_dlq import _dead_letters

pytestmark = pytest.mark.integration


def _audit(s: Settings, redis: Redis) -> AuditSink:
    return AuditSink(redis, s.audit_channel, s.audit_file)


async def _until_dlq(s: Settings, n: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(await read_dead_letters(s, Topics.from_settings(s).dlq)) < n:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {n} dead letters"
        await asyncio.sleep(0.2)


async def _redriven(s: Settings) -> list[tuple[str | None, str | None]]:
    """(job id, x-redrive) of every redriven record on the request topic."""
    recs = await read_dead_letters(s, Topics.from_settings(s).requests)
    return [(r.job_id, r.redrive) for r in recs if r.redrive is not None]


# ---------------------------------------------------------------- redrive: filter typos


@pytest.mark.parametrize("flag", ["--job-id", "--reason"])
async def test_an_empty_filter_word_is_refused_not_read_as_everything(settings: Settings, flag: str) -> None:
    """``router-worker dlq redrive --job-id "$JOB" --yes`` with JOB unset must not redrive the whole DLQ
    (``--model ""`` is refused with a clear line; ``--job-id ""`` and ``--reason ""`` are not)."""
    await _dead_letters(settings, ["a", "b", "c"])
    await _until_dlq(settings, 3)
    proc = await asyncio.to_thread(cli, settings, "dlq", "redrive", flag, "", "--yes", check=False)
    sent = await _redriven(settings)
    assert (proc.returncode, sent) == (2, []), (proc.stdout[-400:], proc.stderr[-400:])


# ---------------------------------------------------------------- redrive: two shells, one interrupted


async def test_a_plan_made_before_another_redrive_was_interrupted_does_not_send_its_jobs_again(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shells run the same ``dlq redrive`` and both sit at the confirmation prompt (prepare done). Shell A
    confirms and is interrupted (Ctrl-C) after the broker acknowledged its send and before the *sent* mark:
    the dead letter is left ``p|A``. Shell B then confirms: it must send it under A's id (as a fresh
    ``prepare`` would, verdict RESEND) so the router drops it as a duplicate; it sends it under B's own id and
    the router routes the job a second time."""
    await _dead_letters(settings, ["twice"])
    await _until_dlq(settings, 1)
    flt = parse_filter(["unknown_model"], now_ms=0)
    plan_a = await prepare(settings, redis, flt)
    plan_b = await prepare(settings, redis, flt)  # the second shell, waiting at its prompt
    assert [i.verdict for i in plan_b.items] == [Verdict.SEND]

    real_mark = RedriveState.mark

    async def ctrl_c_before_sent(self: RedriveState, state: str, entries: Any) -> None:
        if state == "s":  # the ack is in; Ctrl-C lands before the mark says so
            raise asyncio.CancelledError
        await real_mark(self, state, entries)

    served = Served()
    async with running(make_worker(settings, redis, served, "m"), make_router(settings, redis)):
        monkeypatch.setattr(RedriveState, "mark", ctrl_c_before_sent)
        with pytest.raises(asyncio.CancelledError):
            await execute(
                settings, redis, plan_a, rate=100, actor="a", source="test", audit=_audit(settings, redis)
            )
        monkeypatch.setattr(RedriveState, "mark", real_mark)
        await wait_until(lambda: "twice" in served.job_ids(), timeout=30)
        fresh = await prepare(settings, redis, flt)  # what a plan made now says: resend under A's id
        assert [(i.verdict, i.redrive_id) for i in fresh.items] == [(Verdict.RESEND, plan_a.redrive_id)]
        await execute(
            settings, redis, plan_b, rate=100, actor="b", source="test", audit=_audit(settings, redis)
        )
        async with JobProducer(settings) as p:
            await p.submit("m", "probe", job_id="probe")
        await wait_until(lambda: "probe" in served.job_ids(), timeout=30)
        await asyncio.sleep(0.5)
    ids = {rid for _, rid in await _redriven(settings)}
    assert (Counter(served.job_ids())["twice"], ids) == (1, {plan_a.redrive_id}), served.job_ids()


# ---------------------------------------------------------------- the producer SDK


async def test_an_explicit_empty_job_id_is_refused_client_side(settings: Settings) -> None:
    """``job_id`` is the idempotency key (1 to 128 chars). ``submit(..., job_id=key)`` with ``key == ""`` (a
    missing field upstream) must raise, not publish under a fresh uuid: the caller's retry of the same
    request would get another fresh id and the job would run twice."""
    with pytest.raises(EnvelopeError):
        build_job("m", "x", job_id="")
    async with JobProducer(settings) as p:
        with pytest.raises(EnvelopeError):
            await p.submit("m", "x", job_id="")


async def test_a_job_over_the_routers_size_limit_is_refused_by_submit(
    settings: Settings, redis: Redis
) -> None:
    """``kafka_max_message_bytes`` ("jobs larger than this are refused"): a job a little over it is queued and
    acknowledged by ``submit``/``flush`` as if it will be routed, and only shows up in the DLQ later."""
    s = settings.model_copy(update={"kafka_max_message_bytes": 4096})
    try:
        async with JobProducer(s) as p:
            await p.submit("m", "x" * 8192, job_id="big")
    except (EnvelopeError, ValueError):
        return  # refused client-side, naming the limit: what the SDK should do
    async with running(make_router(s, redis)):
        dead = await read_topic(s, Topics.from_settings(s).dlq, expect=1, timeout=20)
    reasons = [dict(r.headers).get("x-dlq-reason") for r in dead]
    pytest.fail(f"submit and flush acknowledged the job; the router dead-lettered it: {reasons}")


# ---------------------------------------------------------------- the worker SDK


class _Abort(BaseException):
    """What some libraries raise out of user code (a BaseException, not an Exception): pytest's Failed,
    gevent's GreenletExit, a framework's own abort."""


async def test_a_handler_raising_a_base_exception_does_not_stall_the_head(settings: Settings,
                                                                         redis: Redis) -> None:  # fmt: skip
    """ "A handler that raises nacks the job." A BaseException subclass escapes ``_serve``'s ``except Exception``
    and ends that pool coroutine: with capacity 1 the head keeps heartbeating (routers keep sending it jobs)
    and never serves anything again; the job that raised is never handed back."""
    from tests.integration.test_worker_sdk import route_directly, start

    served: list[str] = []

    async def handler(job: Job, ctx: JobContext) -> Any:
        if job.job_id == "boom":
            raise _Abort("bail out")
        served.append(job.job_id)
        return "ok"

    worker = ModelWorker(settings, redis, WorkerConfig("m", head_id="h", capacity=1, partition=0), handler)
    task = await start(worker)
    try:
        await route_directly(settings, "m", 0, ["boom", "after"])
        try:
            await wait_until(lambda: "after" in served and worker.stats.nacked >= 1, timeout=6)
        except AssertionError:
            pytest.fail(f"the head stalled: served {served}, nacked {worker.stats.nacked}, "
                        f"open {sorted(worker._open)}")  # fmt: skip
    finally:
        worker.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 20)
    assert worker.stats.nacked >= 1, "the job whose handler raised was handed back"


async def test_a_nack_storm_dead_letters_each_job_exactly_once(settings: Settings, redis: Redis) -> None:
    """Every job fails on the only head (capacity 8, 16 jobs at once, short back-offs): each is tried exactly
    max_attempts times and ends in the DLQ exactly once as max_attempts; nothing is lost or doubled."""
    s = settings.model_copy(update={"max_attempts": 2, "breaker_cooldown_s": 0.5})
    tries: dict[str, list[int]] = {}

    async def broken(job: Job, ctx: JobContext) -> Any:
        tries.setdefault(job.job_id, []).append(ctx.attempt)
        raise RuntimeError("out of memory")

    ids = [f"storm-{i}" for i in range(16)]
    async with running(ModelWorker(s, redis, WorkerConfig("m", head_id="h", capacity=8), broken),
                       make_router(s, redis)):  # fmt: skip
        async with JobProducer(s) as p:
            for j in ids:
                await p.submit("m", j, job_id=j)
        await _until_dlq(s, len(ids), timeout=25)
        await asyncio.sleep(1.0)  # anything doubled would arrive by now
    dead = await read_dead_letters(s, Topics.from_settings(s).dlq)
    assert sorted(dl.job_id or "?" for dl in dead) == sorted(ids)
    assert {dl.reason for dl in dead} <= {"max_attempts", "no_capacity"}, Counter(dl.reason for dl in dead)
    assert all(len(a) == len(set(a)) for a in tries.values()), tries  # no attempt served twice


# ---------------------------------------------------------------- dlq verbs where there is no DLQ


async def test_dlq_show_status_and_redrive_on_a_missing_topic_answer_at_once(settings: Settings) -> None:
    """No DLQ topic and no redrive yet: ``show`` and ``status`` say so (exit 1), ``redrive`` plans nothing and
    sends nothing (exit 0), each without waiting out a read timeout."""
    t0 = asyncio.get_running_loop().time()
    show = await asyncio.to_thread(cli, settings, "dlq", "show", "nope", check=False)
    status = await asyncio.to_thread(cli, settings, "dlq", "status", check=False)
    redrive = await asyncio.to_thread(cli, settings, "dlq", "redrive", "--yes", check=False)
    assert (show.returncode, status.returncode, redrive.returncode) == (1, 1, 0), (show, status, redrive)
    assert "no dead letter" in show.stderr
    assert "no redrive" in status.stderr
    assert "nothing to send" in redrive.stdout
    assert asyncio.get_running_loop().time() - t0 < 30
    assert await _redriven(settings) == []
