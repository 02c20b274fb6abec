"""Session fixtures: one real broker and one real Redis for the whole run; each test isolates itself by a
topic prefix, a Redis key prefix and a consumer group of its own."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router_worker.localstack import LocalStack, local_stack, wait_kafka_ready
from router_worker.runtime import connect_redis
from router_worker.settings import Settings, load_settings


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    kafka = os.environ.get("ROUTER_KAFKA_BOOTSTRAP_SERVERS")
    redis = os.environ.get("ROUTER_REDIS_URL")
    if kafka and redis:  # an external deployment: use it, start nothing
        yield LocalStack(kafka, redis, Path("."))
        return
    # ROUTER_TEST_STACK_DIR keeps the broker's and Redis' logs after the run (one folder per xdist worker).
    keep = os.environ.get("ROUTER_TEST_STACK_DIR")
    workdir = Path(keep) / os.environ.get("PYTEST_XDIST_WORKER", "main") if keep else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with local_stack(workdir) as st:
        asyncio.run(wait_kafka_ready(st.bootstrap_servers))
        yield st


@pytest.fixture
def settings(stack: LocalStack, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return load_settings(
        kafka_bootstrap_servers=stack.bootstrap_servers,
        redis_url=stack.redis_url,
        topic_prefix=f"t{tag}.",
        redis_prefix=f"t{tag}",
        group_id=f"router-{tag}",
        audit_file=str(tmp_path / "audit.log"),
        head_ttl_ms=2_000,
        head_heartbeat_ms=200,
        head_refresh_ms=200,
        kafka_session_timeout_ms=6_000,
        kafka_heartbeat_interval_ms=500,
        retry_backoff_ms=[100, 200, 400],
        # A breaker opened by the embedded broker refusing a fresh topic's partition (it has, for 30 s) holds a
        # lone head's jobs for this long, not 30 s.
        breaker_cooldown_s=3.0,
        requests_partitions=6,
        model_partitions=8,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[object]:
    assert settings.redis_url
    client = connect_redis(
        settings
    )  # the deployment's login and TLS, where the suite runs against a real one
    yield client
    await client.aclose()


_BROKER_LOG_LINES = 60
"""At most this many of the broker's warning and error lines are shown under a failed test."""
_BROKER_LOG = pytest.StashKey[tuple[Path, int]]()


@pytest.fixture(autouse=True)
def broker_log_mark(request: pytest.FixtureRequest) -> None:
    """Where the embedded broker's log stood when the test began (tests using the stack only)."""
    if "stack" in request.fixturenames:
        st: LocalStack = request.getfixturevalue("stack")
        log = st.workdir / "broker.log"
        request.node.stash[_BROKER_LOG] = (log, log.stat().st_size if log.exists() else 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries what the broker logged meanwhile: a broker-side cause (a produce refused
    for many seconds, a storage error) is then visible in CI, where the broker's log is gone after the run."""
    report = yield
    mark = item.stash.get(_BROKER_LOG, None)
    if mark is not None and report.failed:
        log, start = mark
        try:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            text = f"(broker log unreadable: {exc})"
        lines = [ln for ln in text.splitlines() if "ERROR" in ln or "WARN" in ln]
        shown = "\n".join(lines[-_BROKER_LOG_LINES:]) or "(no warnings or errors)"
        report.sections.append(("broker log (warnings and errors during the test)", shown))
    return report
