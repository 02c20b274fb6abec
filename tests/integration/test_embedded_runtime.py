"""The embedded stack's runtime: its consumers poll the broker every few milliseconds, because the embedded
broker often answers a waiting fetch well after records arrive (``bench broker`` measures it; a setting the operator
gave is kept)."""

from __future__ import annotations

import pytest

from router_worker.localstack import EMBEDDED_FETCH_MAX_WAIT_MS
from router_worker.runtime import runtime
from router_worker.settings import load_settings

pytestmark = pytest.mark.integration


async def test_the_embedded_stack_fetches_with_a_short_wait_unless_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "ROUTER_REDIS_URL", "ROUTER_KAFKA_FETCH_MAX_WAIT_MS"):
        monkeypatch.delenv(name, raising=False)
    async with runtime(load_settings()) as rt:
        assert rt.stack is not None
        assert rt.settings.kafka_fetch_max_wait_ms == EMBEDDED_FETCH_MAX_WAIT_MS
    monkeypatch.setenv("ROUTER_KAFKA_FETCH_MAX_WAIT_MS", "40")
    async with runtime(load_settings()) as rt:
        assert rt.settings.kafka_fetch_max_wait_ms == 40, "the operator's setting is kept"
