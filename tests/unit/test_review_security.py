"""Review of issue 10 (security), pure parts: what the process harness hands its children, and the soak's
settings for a Redis of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router_worker.bench_soak import soak_settings
from router_worker.harness.procs import Procs
from router_worker.runtime import redis_options
from router_worker.security import MAX_SECRET_FILE_BYTES, redact_text, redact_url
from router_worker.settings import SettingsError, load_settings


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


# --- a Redis URL's typos and its query string ------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:S3CRET-pw@127.0.0.1:notaport/0",
        "redis://u:S3CRET-pw@127.0.0.1:99999/0",
        "redis://u:S3CRET-pw@127.0.0.1:6379/0?socket_timeout=abc",
    ],
)
def test_a_redis_url_the_client_can_not_parse_is_refused_naming_the_setting(url: str) -> None:
    """Refused at start-up, naming ROUTER_REDIS_URL; it used to pass, then end the command in a 130-line
    traceback from redis-py's URL parser."""
    with pytest.raises(SettingsError, match="ROUTER_REDIS_URL") as info:
        load_settings(kafka_bootstrap_servers="k:9092", redis_url=url)
    assert "S3CRET" not in str(info.value)


def test_a_redis_url_with_a_bad_port_ends_a_command_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env |= {"ROUTER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "COLUMNS": "300",
            "ROUTER_REDIS_URL": "redis://u:S3CRET-pw@127.0.0.1:notaport/0"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "router_worker.cli", "policy", "show"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert "ROUTER_REDIS_URL" in out
    assert "S3CRET" not in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0?password=S3CRET", "redis://127.0.0.1:6379/0?password=***"),
        ("rediss://h/0?username=svc&password=S3CRET&db=1", "rediss://h/0?username=svc&password=***&db=1"),
        ("rediss://u:S3CRET@h/0?ssl_password=S3CRET", "rediss://u:***@h/0?ssl_password=***"),
    ],
)
def test_a_password_in_the_redis_urls_query_is_redacted(url: str, shown: str) -> None:
    """redis-py logs in with a URL's ``?password=`` (its query parameters are client options): it was shown as
    it is in errors ("Redis at redis://...?password=S3CRET could not be reached"), repr(settings) and the demo
    banner."""
    assert redact_url(url) == shown
    assert "S3CRET" not in redact_text(f"Redis at {url} could not be reached")
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url=url)
    assert "S3CRET" not in repr(s)
    assert "S3CRET" not in str(s)


def test_a_password_in_the_urls_query_and_in_the_setting_is_given_twice() -> None:
    with pytest.raises(SettingsError, match="given twice"):
        load_settings(
            kafka_bootstrap_servers="k:9092", redis_url="redis://h/0?password=a", redis_password="b"
        )


# --- secret files that are no secret files ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "big", "dir"])
def test_a_secret_file_that_is_not_a_small_regular_file_is_refused(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROUTER_ADMIN_TOKEN_FILE=/dev/zero used to read for ever (into all of memory); a FIFO blocked start-up."""
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "fifo", "big": tmp_path / "big",
            "dir": tmp_path}[target]  # fmt: skip
    if target == "fifo":
        os.mkfifo(path)
    if target == "big":
        path.write_bytes(b"x" * (MAX_SECRET_FILE_BYTES + 1))
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN_FILE", str(path))
    with pytest.raises(SettingsError, match="ROUTER_ADMIN_TOKEN_FILE"):
        load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://h/0")


def test_a_secret_file_with_crlf_and_a_symlinked_one_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").write_bytes(b"tok-crlf\r\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")  # as Kubernetes mounts secrets
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN_FILE", str(tmp_path / "link"))
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://h/0")
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "tok-crlf"


@pytest.mark.parametrize(
    "tokens", ["Zm9v+YmFy/c2VjcmV0X3Rva2Vu=ops", '{"Zm9v+YmFy/c2VjcmV0X3Rva2Vu": "ops"}']
)
def test_a_token_written_where_its_name_goes_is_not_printed(tokens: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://h/0", admin_tokens=tokens)
    assert "c2VjcmV0X3Rva2Vu" not in str(info.value)
