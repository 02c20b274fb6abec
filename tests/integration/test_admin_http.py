"""The admin HTTP server: health, readiness, the contract's metric names, and the token-guarded admin API."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from producers.producer import JobProducer
from router_worker.admin import router_app, serve
from router_worker.localstack import free_port
from router_worker.settings import Settings, load_settings
from tests.helpers import Served, make_router, make_worker, running, wait_until

pytestmark = pytest.mark.integration

CONTRACT_METRICS = (
    "routing_decisions_total", "head_registrations_total", "head_status_updates_total", "active_heads",
    "cache_hits_total", "cache_misses_total", "http_requests_total", "http_request_duration_seconds",
    "external_service_calls_total", "message_queue_messages_total", "process_cpu_seconds_total",
    "process_resident_memory_bytes", "routing_decision_duration_seconds",
)  # fmt: skip


async def test_health_metrics_and_admin_api(settings: Settings, redis: Redis) -> None:
    served = Served()
    router = make_router(settings, redis)
    token = "s3cret"
    app = router_app(router, load_settings(**(settings.model_dump() | {"admin_token": token})))
    port = free_port()
    runner = await serve(app, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503, "not ready before it consumes"
            async with running(router):
                worker = make_worker(settings, redis, served, "m", "eu", head_id="h1")
                async with running(worker):
                    async with JobProducer(settings) as p:
                        for i in range(50):
                            await p.submit("m", i)
                    await wait_until(lambda: len(served.rows) >= 50)
                    async with http.get(f"{base}/healthz") as resp:
                        assert resp.status == 200
                    async with http.get(f"{base}/readyz") as resp:
                        assert resp.status == 200
                    await wait_until(lambda: router.metrics.head_registrations._value.get() >= 1, timeout=5)
                    async with http.get(f"{base}/metrics") as resp:
                        text = await resp.text()
                    for name in CONTRACT_METRICS:
                        assert f"\n{name}" in text, name
                    assert (
                        'routing_decisions_total{model_type="m",region="eu",strategy="least_loaded"} 50.0'
                        in text
                    )
                    assert 'message_queue_messages_total{queue="routed",status="ok"} 50.0' in text
                    assert "head_registrations_total 1.0" in text

                    async with http.get(f"{base}/heads") as resp:
                        heads = await resp.json()
                    assert [h["head_id"] for h in heads] == ["h1"]
                    async with http.post(f"{base}/heads/h1/drain") as resp:
                        assert resp.status == 401, "mutations need the token"
                    auth = {"Authorization": f"Bearer {token}", "X-Actor": "alice"}
                    async with http.post(f"{base}/heads/h1/drain", headers=auth) as resp:
                        assert resp.status == 200
                    with open(settings.audit_file, "rb") as f:
                        drained = [r for r in map(orjson.loads, f) if r["event"] == "head_drained"]
                    assert [(r["actor"], r["router_id"]) for r in drained] == [("admin", router.router_id)], (
                        "the token's name is the actor, never a header the caller chose"
                    )
                    async with http.put(
                        f"{base}/policy", headers=auth, json={"default_strategy": "nope"}
                    ) as resp:
                        assert resp.status == 400
                        assert "default_strategy" in (await resp.json())["error"]
                    async with http.put(
                        f"{base}/policy", headers=auth, json={"default_strategy": "hybrid"}
                    ) as resp:
                        assert resp.status == 200
                        assert (await resp.json())["version"] == 1
                    await wait_until(lambda: router.state.policy.default_strategy == "hybrid", timeout=2)
                    async with http.get(f"{base}/metrics") as resp:
                        text = await resp.text()
                    assert (
                        'http_requests_total{endpoint="/heads/{head_id}/drain",method="POST",status="401"} 1.0'
                        in text
                    )
    finally:
        await runner.cleanup()
