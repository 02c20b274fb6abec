"""Review of the embedded stack's fetch wait: ``runtime()`` starts the embedded stack whenever Kafka *or* Redis
is not given, and then applies the embedded broker's 5 ms fetch wait even when Kafka is the operator's own
(only Redis embedded). Apache Kafka answers a waiting fetch as soon as records arrive: there the short wait buys
nothing and multiplies idle fetch requests by ten."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import router_worker.runtime as runtime_mod
from router_worker.localstack import EMBEDDED_FETCH_MAX_WAIT_MS, LocalStack
from router_worker.runtime import runtime
from router_worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration


async def test_an_operators_kafka_keeps_the_default_fetch_wait_when_only_redis_is_embedded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.kafka_bootstrap_servers
    assert settings.redis_url
    operators_kafka = settings.kafka_bootstrap_servers

    @contextlib.contextmanager
    def fake_stack(workdir: object = None) -> Iterator[LocalStack]:
        # The embedded stack: a broker that is never used (Kafka is given), and the test's Redis.
        yield LocalStack("127.0.0.1:1", settings.redis_url or "", Path("."))

    monkeypatch.setattr(runtime_mod, "local_stack", fake_stack)
    for name in ("ROUTER_REDIS_URL", "ROUTER_KAFKA_FETCH_MAX_WAIT_MS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROUTER_KAFKA_BOOTSTRAP_SERVERS", operators_kafka)
    s = load_settings()
    assert "kafka_fetch_max_wait_ms" not in s.model_fields_set
    default = Settings.model_fields["kafka_fetch_max_wait_ms"].default
    async with runtime(s) as rt:
        assert rt.stack is not None, "Redis was not given: the embedded stack is started for it"
        assert rt.settings.kafka_bootstrap_servers == operators_kafka, "the operator's Kafka is used"
        assert rt.settings.kafka_fetch_max_wait_ms == default, (
            f"the operator's Kafka is fetched with {rt.settings.kafka_fetch_max_wait_ms} ms, "
            f"the embedded broker's wait, not the default {default} ms"
        )


async def test_the_demo_settings_get_the_embedded_fetch_wait(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.contextmanager
    def fake_stack(workdir: object = None) -> Iterator[LocalStack]:
        # The embedded stack: the test's own broker and Redis (started already).
        yield LocalStack(settings.kafka_bootstrap_servers or "", settings.redis_url or "", Path("."))

    monkeypatch.setattr(runtime_mod, "local_stack", fake_stack)
    for name in ("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "ROUTER_REDIS_URL", "ROUTER_KAFKA_FETCH_MAX_WAIT_MS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(log_level="WARNING")  # what `router-worker demo` builds (cli._settings)
    async with runtime(s) as rt:
        assert rt.stack is not None
        assert rt.settings.kafka_fetch_max_wait_ms == EMBEDDED_FETCH_MAX_WAIT_MS, (
            f"the demo fetches the embedded broker with {rt.settings.kafka_fetch_max_wait_ms} ms "
            f"({len(s.model_fields_set)} fields count as the operator's)"
        )
