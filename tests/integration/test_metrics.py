"""The router's /metrics on the real stack: route jobs (plain, by a model fallback, and some no head serves),
scrape, and check each contract metric's labels and movement; consumer lag from the fetch high watermark
moves and then drains to zero, and a rebalance leaves no stale lag series; ``promtool check metrics``
passes on the scraped text."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.admin import router_app, serve
from router_worker.audit import AuditSink
from router_worker.core.policy import Policy
from router_worker.localstack import free_port
from router_worker.metrics import Metrics
from router_worker.pipeline.kafka import ensure_topics
from router_worker.pipeline.router import Router
from router_worker.settings import Settings
from router_worker.state.policy_store import PolicyStore
from router_worker.topics import Topics
from tests.helpers import Served, make_worker, running, wait_until

pytestmark = pytest.mark.integration


class LagWatch(Metrics):
    """The real metrics, remembering the largest lag any batch reported (lag is a gauge: it drains)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_lag = 0.0

    def observe_batch(self, *args: Any, **kw: Any) -> None:
        super().observe_batch(*args, **kw)
        for fam in self.consumergroup_lag.collect():
            for sample in fam.samples:
                self.max_lag = max(self.max_lag, sample.value)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def lag_partitions(m: Metrics) -> set[tuple[str, int]]:
    return {(s.labels["topic"], int(s.labels["partition"])) for fam in m.consumergroup_lag.collect()
            for s in fam.samples}  # fmt: skip


def promtool() -> str:
    venv = Path(sys.executable).parent / "promtool"  # where `make test` puts it
    path = str(venv) if venv.is_file() else shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not found: install Debian's 'prometheus' package (make test tries apt-get as root)"
        )
    return path


async def test_contract_metrics_labels_and_movement(settings: Settings, redis: Redis) -> None:
    s = settings.model_copy(update={"max_attempts": 2, "batch_max_records": 5})
    topics = Topics.from_settings(s)
    await PolicyStore.for_settings(redis, s).set(
        Policy.model_validate({"fallback_models": {"big": ["llama"]}})
    )
    await ensure_topics(
        s, [(topics.requests, s.requests_partitions)]
    )  # as many partitions as the router makes
    served = Served()
    head = make_worker(s, redis, served, "llama", "us", head_id="llama-us", capacity=256)
    metrics = LagWatch()
    router = Router(s, redis, metrics, AuditSink.from_settings(redis, s))
    port = free_port()
    runner = await serve(router_app(router, s), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/metrics"
    plain, fallback, unknown = 60, 10, 5
    try:
        async with running(head):
            async with JobProducer(s) as producer:  # queued before any router reads: a backlog, so lag
                for i in range(plain):
                    await producer.submit("llama", b"x", job_id=f"p{i}")
                for i in range(fallback):
                    await producer.submit("big", b"x", job_id=f"f{i}")
                for i in range(unknown):
                    await producer.submit("nobody", b"x", job_id=f"u{i}")
            async with running(router):
                await wait_until(lambda: len(served.rows) >= plain + fallback, timeout=60)
                await wait_until(lambda: router.stats.dead_lettered >= unknown, timeout=60)

                async def scrape() -> str:
                    async with aiohttp.ClientSession() as http, http.get(url) as resp:
                        assert resp.status == 200
                        return await resp.text()

                text = ""

                async def drained() -> bool:
                    nonlocal text
                    text = await scrape()
                    lags = samples(text, "kafka_consumergroup_lag")
                    req = [v for k, v in lags.items() if dict(k)["topic"] == topics.requests]
                    return len(req) == s.requests_partitions and not any(req)

                for _ in range(100):
                    if await drained():
                        break
                    await asyncio.sleep(0.2)
                assert await drained(), samples(text, "kafka_consumergroup_lag")
                assert metrics.max_lag > 0, "a backlog read 5 records a batch must show lag"
                lag_keys = samples(text, "kafka_consumergroup_lag")
                for key in lag_keys:
                    labels = dict(key)
                    assert set(labels) == {"consumergroup", "topic", "partition"}
                    assert labels["consumergroup"] == s.group_id
                assert samples(text, "dead_letters_total") == {(("reason", "unknown_model"),): float(unknown)}
                assert samples(text, "retries_total") == {(("tier", "1"),): float(unknown)}
                assert samples(text, "routing_fallbacks_total") == {
                    (("model_type", "big"), ("reason", "model_fallback")): float(fallback)
                }
                owned = s.requests_partitions * (1 + len(s.retry_backoff_ms))
                assert samples(text, "router_assigned_partitions") == {(): float(owned)}
                assert samples(text, "router_subscribed_partitions") == {(): float(owned)}
                decisions = samples(text, "routing_decisions_total")
                assert sum(decisions.values()) == plain + fallback
                assert all(dict(k).keys() == {"strategy", "model_type", "region"} for k in decisions)
                assert samples(text, "router_batch_size_count")[()] >= (plain + fallback) / 5
                assert samples(text, "router_batch_duration_seconds_count")[()] > 0
                assert samples(text, "routing_decision_duration_seconds_count")[()] >= plain + fallback
                assert {dict(k)["topic"] for k in lag_keys} >= {topics.requests, topics.retry(1)}

                check = await asyncio.to_thread(subprocess.run, [promtool(), "check", "metrics"], input=text,
                                                capture_output=True, text=True, timeout=60)  # fmt: skip
                assert check.returncode == 0, check.stdout + check.stderr
    finally:
        await runner.cleanup()


async def test_a_rebalance_leaves_no_stale_lag_series(settings: Settings, redis: Redis) -> None:
    topics = Topics.from_settings(settings)
    served = Served()
    head = make_worker(settings, redis, served, "m", "eu", head_id="h", capacity=256)
    first = Router(settings, redis, Metrics(), AuditSink(None, "unused", None))
    second = Router(settings, redis, Metrics(), AuditSink(None, "unused", None))
    async with running(head, first):
        async with JobProducer(settings) as producer:
            for i in range(120):
                await producer.submit("m", b"x", job_id=f"a{i}")
        await wait_until(lambda: len(served.rows) >= 120, timeout=60)
        requests = {(topics.requests, p) for p in range(settings.requests_partitions)}
        await wait_until(lambda: requests <= lag_partitions(first.metrics), timeout=30)
        async with running(second):

            def split() -> bool:
                a = first.metrics.assigned_partitions._value.get()
                b = second.metrics.assigned_partitions._value.get()
                return (
                    a > 0
                    and b > 0
                    and a + b == settings.requests_partitions * (1 + len(settings.retry_backoff_ms))
                )

            await wait_until(split, timeout=60)
            for router in (first, second):
                assert router._consumer is not None
                owned = {(tp.topic, tp.partition) for tp in router._consumer.assignment()}
                assert lag_partitions(router.metrics) <= owned, "a revoked partition kept its lag series"
            assert not requests <= lag_partitions(first.metrics)
