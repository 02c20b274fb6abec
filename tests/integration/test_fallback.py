"""Fallback that says so, on the real broker and Redis: a head whose partition refuses every publish loses its
jobs to the next candidate (then the policy's fallback model); the routed headers, the audit records and
``routing_fallbacks_total`` say a fallback was used and why, the router's publish failures feed the head's
breaker, and heads that refuse or fail a job are passed over on its next attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from redis.asyncio import Redis

import router_worker.pipeline.faults as faults_module
from consumers.worker import JobContext, JobRefused, ModelWorker, WorkerConfig
from producers.producer import JobProducer
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send
from router_worker.pipeline.publish import publish as real_publish
from router_worker.settings import Settings
from router_worker.state.policy_store import PolicyStore
from router_worker.topics import Topics
from schemas.envelope import Job
from tests.helpers import Served, make_router, make_worker, running, wait_until
from tests.procs import read_audit

pytestmark = pytest.mark.integration


def _refusing(settings: Settings, partition: int, error: BaseException) -> Any:
    """A publish whose sends to one partition of the model topic fail with ``error`` (everything else goes to the
    real broker)."""
    model_topic = Topics.from_settings(settings).model("m")

    async def publish(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        bad = [x for x in sends if x.topic == model_topic and x.partition == partition]
        good = [x for x in sends if not (x.topic == model_topic and x.partition == partition)]
        report = await real_publish(producer, good, budget) if good else PublishReport()
        for x in bad:
            x.error = error
        if isinstance(
            error, KafkaTimeoutError | NotLeaderForPartitionError
        ):  # retriable: unsent after retries
            report.unsent += bad
        else:
            report.fatal += bad
        return report

    return publish


@pytest.mark.parametrize("error", [ValueError("partition refuses records"), KafkaTimeoutError("leader gone")])
async def test_jobs_whose_head_refuses_publishes_go_to_the_next_candidate_and_say_so(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    s = settings.model_copy(update={"breaker_min_volume": 5, "breaker_cooldown_s": 60.0})
    served = Served()
    bad = make_worker(s, redis, served, "m", head_id="bad", partition=0, capacity=500)
    good = make_worker(s, redis, served, "m", head_id="good", partition=1, capacity=500)
    monkeypatch.setattr(faults_module, "publish", _refusing(s, 0, error))
    router = make_router(s, redis)
    n = 60
    async with running(bad, good), running(router):
        async with JobProducer(s) as p:
            for i in range(n):
                await p.submit("m", {"i": i}, job_id=f"f{i}", strategy="round_robin")
        await wait_until(lambda: len(served.rows) >= n, timeout=30)
        first = list(served.rows)
        # The next batch brings the router's publish failures to the head's breaker, which opens: from then on the
        # head is no candidate at all, so nothing needs moving.
        async with JobProducer(s) as p:
            for i in range(n, 2 * n):
                await p.submit("m", {"i": i}, job_id=f"f{i}", strategy="round_robin")
        await wait_until(lambda: len(served.rows) >= 2 * n, timeout=30)
    assert router.faults.view.get("bad") is not None
    assert sorted(served.job_ids()) == sorted(f"f{i}" for i in range(2 * n)), "every job once, none lost"
    assert {r[1] for r in served.rows} == {"good"}
    moved = [r for r in served.rows if r[4]["x-route-fallback"] == b"1"]
    assert moved, "some jobs were first routed to the refusing head and moved"
    assert {r[0] for r in moved} <= {r[0] for r in first}, "after the breaker opened no job tried the head"
    assert router.stats.dead_lettered == 0
    records, _ = read_audit(s.audit_file)
    fallbacks = [
        r for r in records if r.get("event") == "fallback" and r.get("fallback_reason") == "publish_error"
    ]
    assert {r["job_id"] for r in fallbacks} == {r[0] for r in moved}
    assert all("publish to head bad failed" in r["reason"] for r in fallbacks)
    assert all(r["head_id"] == "good" for r in fallbacks)
    metric = router.metrics.registry.get_sample_value(
        "routing_fallbacks_total", {"model_type": "m", "reason": "publish_error"}
    )
    assert metric == len(moved)
    opened = [r for r in records if r.get("event") == "breaker_opened"]
    assert [r["head_id"] for r in opened] == ["bad"], "the router's publish failures fed the head's breaker"


async def test_a_publish_fallback_uses_the_policys_fallback_model_when_no_head_of_the_model_is_left(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await PolicyStore.for_settings(redis, settings).set(
        PolicyStore.for_settings(redis, settings).default.model_copy(
            update={"fallback_models": {"m": ["small"]}}
        )
    )
    served = Served()
    only = make_worker(settings, redis, served, "m", head_id="only", partition=0)
    small = make_worker(settings, redis, served, "small", head_id="small-1", partition=0)
    monkeypatch.setattr(faults_module, "publish", _refusing(settings, 0, ValueError("refused")))
    router = make_router(settings, redis)
    async with running(only, small), running(router):
        async with JobProducer(settings) as p:
            for i in range(5):
                await p.submit("m", i, job_id=f"s{i}")
        await wait_until(lambda: len(served.rows) >= 5, timeout=30)
    assert {r[1] for r in served.rows} == {"small-1"}
    assert all(r[4]["x-route-fallback"] == b"1" for r in served.rows)


async def test_a_head_that_refuses_or_fails_a_job_is_passed_over_on_its_next_attempt(
    settings: Settings, redis: Redis
) -> None:
    seen: dict[str, list[tuple[str, int]]] = {}

    def handler(head: str, how: str) -> Any:
        async def handle(job: Job, ctx: JobContext) -> Any:
            seen.setdefault(job.job_id, []).append((head, ctx.attempt))
            if how == "busy":
                raise JobRefused("busy")
            if how == "fail":
                raise RuntimeError("GPU fell over")
            return "ok"

        return handle

    workers = [
        ModelWorker(settings, redis, WorkerConfig("m", head_id="busy", partition=0), handler("busy", "busy")),
        ModelWorker(settings, redis, WorkerConfig("m", head_id="fail", partition=1), handler("fail", "fail")),
        ModelWorker(settings, redis, WorkerConfig("m", head_id="fine", partition=2), handler("fine", "ok")),
    ]
    router = make_router(settings, redis)
    async with running(*workers), running(router):
        async with JobProducer(settings) as p:
            for i in range(30):
                await p.submit("m", i, job_id=f"x{i}", strategy="round_robin")
        await wait_until(
            lambda: len(seen) == 30 and all(h[-1][0] == "fine" for h in seen.values()), timeout=30
        )
    for job_id, tries in seen.items():
        heads = [h for h, _ in tries]
        assert len(heads) == len(set(heads)), (
            f"{job_id} went twice to a head that refused or failed it: {tries}"
        )
        assert [a for _, a in tries] == list(range(1, len(tries) + 1))
    assert workers[0].stats.refused > 0
    assert workers[1].stats.failed > 0
    assert router.stats.dead_lettered == 0


async def test_one_publish_that_fails_for_good_opens_the_heads_breaker_though_the_window_is_far_from_full(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish fails for good only after the producer's whole retry budget (30 s and more): a head whose
    partition stays unwritable would make every batch holding a job for it wait that long. A few jobs per batch
    never fill the breaker's window (20 outcomes in 10 s), so such a failure counts as a full window: the breaker
    opens after the first batch, and later jobs never try the head."""
    assert settings.breaker_min_volume == 20
    served = Served()
    bad = make_worker(settings, redis, served, "m", head_id="bad", partition=0, capacity=500)
    good = make_worker(settings, redis, served, "m", head_id="good", partition=1, capacity=500)
    failed_sends: list[int] = []
    refusing = _refusing(settings, 0, KafkaTimeoutError("leader gone"))

    async def counting(producer: Any, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
        report = await refusing(producer, sends, budget)
        failed_sends.append(len([x for x in report.unsent if x.partition == 0]))
        return report

    monkeypatch.setattr(faults_module, "publish", counting)
    router = make_router(settings, redis)
    n = 8
    async with running(bad, good):
        async with JobProducer(settings) as p:  # waiting before the router starts: one batch, half for "bad"
            for i in range(n):
                await p.submit("m", {"i": i}, job_id=f"w{i}", strategy="round_robin")
        async with running(router):
            await wait_until(lambda: len(served.rows) >= n, timeout=30)
            first_round = sum(failed_sends)
            after = len(failed_sends)
            async with JobProducer(settings) as p:
                for i in range(n, 3 * n):
                    await p.submit("m", {"i": i}, job_id=f"w{i}", strategy="round_robin")
                    await asyncio.sleep(0.02)  # batches of a job or two
            await wait_until(lambda: len(served.rows) >= 3 * n, timeout=30)
    assert sorted(served.job_ids()) == sorted(f"w{i}" for i in range(3 * n)), "every job once, none lost"
    assert {r[1] for r in served.rows} == {"good"}
    assert 0 < first_round < settings.breaker_min_volume
    assert sum(failed_sends[after:]) == 0, f"no job tried the head once its breaker was open: {failed_sends}"
    assert router.faults.view["bad"].state.label == "open"
    records, _ = read_audit(settings.audit_file)
    assert [r["head_id"] for r in records if r.get("event") == "breaker_opened"] == ["bad"]


@pytest.mark.parametrize("error", [NotLeaderForPartitionError(), KafkaTimeoutError("no answer")])
async def test_a_lone_job_whose_heads_partition_the_broker_says_takes_nothing_moves_on_at_once(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """A batch holding only jobs for one head, whose publishes all stay unsent: with nothing acknowledged the
    broker may be down (timeouts: the records are read again, no head is blamed), unless the broker answered
    that the head's partition takes nothing (NotLeaderForPartition after every retry): then the jobs move to
    the next candidate at once and the head's breaker opens, instead of the job trying that head again and
    again, each time after the whole retry budget."""
    served = Served()
    bad = make_worker(settings, redis, served, "m", head_id="bad", partition=0, capacity=500)
    good = make_worker(settings, redis, served, "m", head_id="good", partition=1, capacity=500)
    monkeypatch.setattr(faults_module, "publish", _refusing(settings, 0, error))
    router = make_router(settings, redis)
    async with running(bad, good), running(router), JobProducer(settings) as p:
        await p.submit("m", {"i": 0}, job_id="lone", strategy="round_robin")
        await wait_until(lambda: len(served.rows) >= 1, timeout=30)
        await p.submit("m", {"i": 1}, job_id="next", strategy="round_robin")  # its batch reads the breaker
        await wait_until(lambda: len(served.rows) >= 2, timeout=30)
    assert served.job_ids() == ["lone", "next"]
    assert [r[1] for r in served.rows] == ["good", "good"]
    records, _ = read_audit(settings.audit_file)
    opened = [r["head_id"] for r in records if r.get("event") == "breaker_opened"]
    if isinstance(error, NotLeaderForPartitionError):
        assert served.rows[0][4]["x-route-fallback"] == b"1", "moved within the batch, not read again"
        assert served.rows[1][4]["x-route-fallback"] == b"0", "the head was no candidate any more"
        assert router.stats.unsent == 0
        assert opened == ["bad"]
    else:
        assert router.stats.unsent >= 1, "read again: a broker that is down blames no head"
        assert opened == []


async def test_with_breakers_off_publish_failures_are_not_counted_for_later(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing reads breaker counts while breakers are off: failures counted then would pile up and land on the
    window in force the moment breakers are turned on."""
    s = settings.model_copy(update={"breaker_enabled": False})
    served = Served()
    bad = make_worker(s, redis, served, "m", head_id="bad", partition=0, capacity=500)
    good = make_worker(s, redis, served, "m", head_id="good", partition=1, capacity=500)
    monkeypatch.setattr(faults_module, "publish", _refusing(s, 0, NotLeaderForPartitionError()))
    router = make_router(s, redis)
    async with running(bad, good), running(router), JobProducer(s) as p:
        for i in range(6):
            await p.submit("m", {"i": i}, job_id=f"off{i}", strategy="round_robin")
        await wait_until(lambda: len(served.rows) >= 6, timeout=30)
    assert {r[1] for r in served.rows} == {"good"}
    assert any(r[4]["x-route-fallback"] == b"1" for r in served.rows), "jobs still move off a failing head"
    assert not router.faults.feed, f"failures counted with breakers off: {dict(router.faults.feed)}"
