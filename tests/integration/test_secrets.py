"""The planted-secret test: a secret in every secret setting and in the Redis URL, a real run (a router, a
head, the demo, jobs, admin calls, ops commands, ``--help`` of every verb, deliberate login and TLS failures),
and every byte it produced (logs, stdout, stderr, the audit file, everything in Redis, HTTP answers) searched
for each secret."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from redis import Redis

from router_worker.cli import app
from router_worker.cli_admin import register
from router_worker.localstack import _die_with_parent, free_port, redis_binary
from router_worker.settings import Settings
from tests.integration.test_security import server
from tests.tls import make_pki

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:8]
SECRETS = {
    name: f"PLANTED-{name}-{TAG}"
    for name in ("url_password", "redis_password", "admin_token", "ops_token", "kafka_sasl_password",
                 "kafka_key_password", "redis_key_password", "wrong_redis_password", "requirepass")
}  # fmt: skip


def verbs() -> list[list[str]]:
    """Every command path of the CLI: [], ["run"], ["heads"], ["heads", "ls"], ..."""
    register(app)
    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():  # a group
            walk(sub, [*path, name])

    walk(root, [])
    return out


class Run:
    """Every output of the run, by where it came from."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.texts: dict[str, str] = {}

    def cli(self, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "router_worker.cli", *args], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        key = f"{' '.join(args)} [{len(self.texts)}]"
        self.texts[key] = f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def spawn(self, name: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "router_worker.cli", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)  # fmt: skip

    def http(self, method: str, url: str, token: str | None = None, body: Any = None) -> int:
        req = urllib.request.Request(
            url, method=method, data=None if body is None else json.dumps(body).encode()
        )
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        self.texts[f"HTTP {method} {url} [{len(self.texts)}]"] = f"{status}\n{text}"
        return status

    def collect_files(self, *paths: Path) -> None:
        for path in paths:
            for p in sorted(path.parent.glob(path.name + "*")) if path.parent.exists() else ():
                self.texts[f"file {p}"] = p.read_text(errors="replace")

    def leaks(self) -> list[str]:
        return [f"{name} in {where}" for where, text in self.texts.items() for name, secret in SECRETS.items()
                if secret in text]  # fmt: skip


def dump_redis(url: str, password: str, prefix: str) -> str:
    """Every key this deployment wrote, with its value (strings, hashes, lists, sets, sorted sets, streams)."""
    r = Redis.from_url(url, username="svc", password=password, decode_responses=True)
    out = []
    try:
        for key in r.scan_iter(match=f"*{prefix}*", count=1000):
            kind = r.type(key)
            value: Any = {
                "string": lambda k: r.get(k),
                "hash": lambda k: r.hgetall(k),
                "list": lambda k: r.lrange(k, 0, -1),
                "set": lambda k: sorted(r.smembers(k)),
                "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
                "stream": lambda k: r.xrange(k),
            }.get(kind, lambda k: None)(key)
            out.append(f"{key} ({kind}): {value}")
    finally:
        r.close()
    return "\n".join(out)


@contextlib.contextmanager
def stopped_at_end(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_no_planted_secret_appears_anywhere(settings: Settings, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    run = Run(tmp_path)
    port = free_port()
    args = [redis_binary(), "--port", str(port), "--requirepass", SECRETS["requirepass"],
            "--user", "svc", "on", f">{SECRETS['url_password']}", f">{SECRETS['redis_password']}", "~*", "&*",
            "+@all"]  # fmt: skip
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for name in ("redis_password", "ops_token", "wrong_redis_password"):
        value = f"ops={SECRETS[name]}" if name == "ops_token" else SECRETS[name]
        (secret_dir / name).write_text(value + "\n")
    audit_file = tmp_path / "audit" / "routing_audit.log"
    admin_port = free_port()
    plain_url = f"redis://127.0.0.1:{port}/0"

    base = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    base.update(
        ROUTER_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers or "",
        ROUTER_TOPIC_PREFIX=settings.topic_prefix,
        ROUTER_REDIS_PREFIX=settings.redis_prefix,
        ROUTER_GROUP_ID=settings.group_id,
        ROUTER_AUDIT_FILE=str(audit_file),
        ROUTER_REDIS_TIMEOUT_S="3",
        ROUTER_KAFKA_SESSION_TIMEOUT_MS="6000",
        ROUTER_KAFKA_HEARTBEAT_INTERVAL_MS="500",
        ROUTER_HEAD_TTL_MS="2000",
        ROUTER_HEAD_HEARTBEAT_MS="200",
        ROUTER_HEAD_REFRESH_MS="200",
        ROUTER_ADMIN_TOKEN=SECRETS["admin_token"],
        ROUTER_ADMIN_TOKENS_FILE=str(secret_dir / "ops_token"),
        ROUTER_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    # A: the password in the URL; B: user and password settings, the password from a file.
    env_a = base | {
        "ROUTER_REDIS_URL": plain_url.replace("redis://", f"redis://svc:{SECRETS['url_password']}@")
    }
    env_b = base | {"ROUTER_REDIS_URL": plain_url, "ROUTER_REDIS_USERNAME": "svc",
                    "ROUTER_REDIS_PASSWORD_FILE": str(secret_dir / "redis_password")}  # fmt: skip

    with server(args, tmp_path / "valkey", port):
        router = run.spawn(
            "router", env_a | {"ROUTER_ADMIN_PORT": str(admin_port), "ROUTER_ROUTER_ID": "r1"}, "run"
        )
        head = run.spawn("head", env_b, "worker", "--model", "sec-m", "--region", "r1", "--head-id", "h1",
                         "--service-ms", "1")  # fmt: skip
        with stopped_at_end(router, head):

            def ready() -> bool:
                assert router.poll() is None, (tmp_path / "router.log").read_text()[-3000:]
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                        return bool(r.status == 200)
                except OSError:
                    return False

            wait_for(ready, 90, "router ready")
            submitted = run.cli(env_b, "submit", "--model", "sec-m", "--count", "3")
            assert submitted.returncode == 0, submitted.stderr
            wait_for(lambda: audit_file.exists() and audit_file.read_text().count('"event":"route"') >= 3, 60,
                     "3 jobs routed")  # fmt: skip

            admin = f"http://127.0.0.1:{admin_port}"
            assert (
                run.http("PUT", f"{admin}/policy", SECRETS["admin_token"], {"default_strategy": "random"})
                == 200
            )
            assert run.http("GET", f"{admin}/heads") == 200
            assert run.http("POST", f"{admin}/heads/h1/drain", SECRETS["ops_token"]) in (200, 202, 204)
            assert run.http("PUT", f"{admin}/policy", "not-a-token", {"default_strategy": "random"}) == 401
            assert run.http("GET", f"{admin}/metrics") == 200

            for cmd in (["heads", "ls"], ["heads", "ls", "--json"], ["policy", "show"], ["models", "ls"],
                        ["audit", "tail", "--since", "1h", "--no-follow", "-n", "100", "--json"]):  # fmt: skip
                for env in (env_a, env_b):
                    proc = run.cli(env, *cmd)
                    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
            assert "policy_changed" in run.texts[next(k for k in run.texts if k.startswith("audit tail"))]

            demo = run.cli(env_a | {"ROUTER_LOG_LEVEL": "INFO"}, "demo", "--jobs", "10", "--routers", "1",
                           "--rate", "0")  # fmt: skip
            assert "redis://svc:***@127.0.0.1" in demo.stdout, demo.stdout + demo.stderr

        # Every verb's --help, with every secret setting in the environment.
        everything = env_b | {
            "ROUTER_KAFKA_SASL_PASSWORD": SECRETS["kafka_sasl_password"],
            "ROUTER_KAFKA_SSL_KEY_PASSWORD": SECRETS["kafka_key_password"],
            "ROUTER_REDIS_SSL_KEY_PASSWORD": SECRETS["redis_key_password"],
        }
        paths = verbs()
        assert len(paths) > 20
        for path in paths:
            proc = run.cli(everything, *path, "--help")
            assert proc.returncode == 0, f"{path} --help: {proc.stderr}"

        # Deliberate failures, each with the planted secret in play.
        failures = {
            "wrong Redis password": (env_b | {"ROUTER_REDIS_PASSWORD_FILE": str(secret_dir / "wrong_redis_password")},
                                     ["heads", "ls"]),
            "wrong Redis password in the URL": (
                env_a | {"ROUTER_REDIS_URL": plain_url.replace("redis://", f"redis://svc:{SECRETS['wrong_redis_password']}@")},
                ["policy", "show"]),
            "Kafka SASL against a plaintext broker": (
                env_b | {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "ROUTER_KAFKA_SASL_MECHANISM": "PLAIN",
                         "ROUTER_KAFKA_SASL_USERNAME": "svc",
                         "ROUTER_KAFKA_SASL_PASSWORD": SECRETS["kafka_sasl_password"]},
                ["submit", "--model", "sec-m"]),
            "Kafka key password wrong": (
                env_b | {"ROUTER_KAFKA_SECURITY_PROTOCOL": "SSL", "ROUTER_KAFKA_SSL_CAFILE": str(pki.ca),
                         "ROUTER_KAFKA_SSL_CERTFILE": str(pki.client_cert),
                         "ROUTER_KAFKA_SSL_KEYFILE": str(pki.client_key_encrypted),
                         "ROUTER_KAFKA_SSL_KEY_PASSWORD": SECRETS["kafka_key_password"]},
                ["policy", "show"]),
            "Redis TLS to a plaintext server": (
                env_b | {"ROUTER_REDIS_URL": plain_url.replace("redis://", "rediss://"),
                         "ROUTER_REDIS_SSL_CAFILE": str(pki.ca), "ROUTER_REDIS_SSL_CERTFILE": str(pki.client_cert),
                         "ROUTER_REDIS_SSL_KEYFILE": str(pki.client_key_encrypted),
                         "ROUTER_REDIS_SSL_KEY_PASSWORD": SECRETS["redis_key_password"]},
                ["heads", "ls"]),
            "a password given twice": (env_a | {"ROUTER_REDIS_PASSWORD": SECRETS["redis_password"]}, ["heads", "ls"]),
            "two admin tokens equal": (
                env_b | {"ROUTER_ADMIN_TOKENS_FILE": "", "ROUTER_ADMIN_TOKENS": f"ci={SECRETS['admin_token']}"},
                ["heads", "ls"]),
        }  # fmt: skip
        for what, (env, cmd) in failures.items():
            proc = run.cli(env | {"ROUTER_KAFKA_REQUEST_TIMEOUT_MS": "3000", "ROUTER_CLAIM_TTL_MS": "300000"}, *cmd,
                           timeout=60)  # fmt: skip
            out = proc.stdout + proc.stderr
            assert proc.returncode == 2, f"{what}: rc={proc.returncode}\n{out}"
            assert "Traceback" not in out, f"{what}:\n{out}"
            assert any(line.startswith("error:") for line in out.splitlines()), f"{what}:\n{out}"

        redis_dump = dump_redis(plain_url, SECRETS["url_password"], settings.redis_prefix)
    run.texts["redis"] = redis_dump
    run.collect_files(tmp_path / "router.log", tmp_path / "head.log", audit_file)

    # What was captured is the real thing: a run that routed, audited admin calls by name, and logged.
    audit = run.texts[f"file {audit_file}"]
    assert '"actor":"admin"' in audit.replace(" ", "")
    assert '"actor":"ops"' in audit.replace(" ", "")
    assert "router_started" in redis_dump or "router_started" in audit
    assert len(run.texts[f"file {tmp_path / 'router.log'}"]) > 1000
    assert len(run.texts) > len(paths) + 20
    assert not run.leaks(), "\n".join(run.leaks())
