"""Review of issue 10 (security), pure parts: what the process harness hands its children, and the soak's
settings for a Redis of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from router_worker.bench_soak import soak_settings
from router_worker.harness.procs import Procs
from router_worker.runtime import redis_options
from router_worker.settings import load_settings


def test_a_child_of_a_process_whose_secret_came_from_a_file_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent read ROUTER_ADMIN_TOKEN from ROUTER_ADMIN_TOKEN_FILE; its children got the token's value and
    the inherited ..._FILE variable both, and refused to start ("set ROUTER_ADMIN_TOKEN or
    ROUTER_ADMIN_TOKEN_FILE, not both")."""
    (tmp_path / "token").write_text("file-token-1\n")
    (tmp_path / "redis-pw").write_text("redis-pw-1\n")
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("ROUTER_REDIS_PASSWORD_FILE", str(tmp_path / "redis-pw"))
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://r:6379/0")
    env = Procs(s, tmp_path / "w", quiet=True).child_env()
    assert "ROUTER_ADMIN_TOKEN_FILE" not in env
    assert "ROUTER_REDIS_PASSWORD_FILE" not in env
    with monkeypatch.context() as m:
        for k in list(os.environ):
            m.delenv(k)
        for k, v in env.items():
            m.setenv(k, v)
        child = load_settings()
    assert child.admin_token is not None
    assert child.admin_token.get_secret_value() == "file-token-1"
    assert child.redis_password is not None
    assert child.redis_password.get_secret_value() == "redis-pw-1"


def test_a_child_gets_the_settings_objects_values_not_the_parents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_MAX_ATTEMPTS", "3")
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://r:6379/0").model_copy(
        update={"max_attempts": 6}  # the default: settings_env leaves it out
    )
    env = Procs(s, tmp_path / "w", quiet=True).child_env()
    assert "ROUTER_MAX_ATTEMPTS" not in env


def test_the_soak_talks_to_its_own_redis_without_the_configured_redis_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak runs a plaintext Redis of its own: the configured Redis's password would be sent to it (AUTH
    to a server without one fails) and its TLS files would make the children refuse a redis:// URL."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    base = load_settings(kafka_bootstrap_servers="k:9092", redis_url="rediss://r:6379/0", redis_username="svc",
                         redis_password="configured-pw", redis_ssl_cafile=str(ca))  # fmt: skip
    s = soak_settings(base, "k:9092", "redis://127.0.0.1:7000/0", tmp_path)
    assert redis_options(s) == {}
    assert s.redis_url == "redis://127.0.0.1:7000/0"
    env = Procs(s, tmp_path / "w", quiet=True).child_env()
    assert not [
        k
        for k in env
        if k.startswith("ROUTER_REDIS_") and k not in ("ROUTER_REDIS_URL", "ROUTER_REDIS_PREFIX")
    ]
    load_settings(**s.model_dump())  # a valid combination (no TLS files with redis://)
