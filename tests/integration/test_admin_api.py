"""The admin API against a real Redis (and broker): named bearer tokens, the audit actor, heads and policy
life cycles, explain, recent audit records, JSON errors naming the field, and reads that never write."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from router_worker.admin import AdminAuth, AdminOps, build_app, serve
from router_worker.audit import AuditSink
from router_worker.localstack import free_port
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.state.heads import HeadRecord, HeadRegistry
from router_worker.state.keys import Keys
from tests.helpers import Served, cli, make_worker, running

pytestmark = pytest.mark.integration

OPS, CI = "ops-0123456789abcdef", "ci-fedcba9876543210"


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


class Api:
    """A little client of one admin server: every call returns (status, JSON body or text)."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.update(bearer(token))
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base + path, data=data, headers=hdrs) as resp:
            text = await resp.text()
            self.last_headers = resp.headers
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


@contextlib.asynccontextmanager
async def admin_api(settings: Settings, redis: Redis, auth: AdminAuth, router_id: str = "r-api",
                    ready: bool = True, stream: bool = False) -> AsyncIterator[Api]:  # fmt: skip
    """An admin server on this test's Redis; its audit goes to the file only, or (``stream``) as a router's
    does, to the file and the deployment's audit stream too."""
    if stream:
        audit = AuditSink.from_settings(redis, settings)
    else:
        audit = AuditSink(redis, settings.audit_channel, settings.audit_file)
    # Heads registered by hand here do not heartbeat: a long TTL keeps them alive for the whole test.
    ops = AdminOps.create(settings.model_copy(update={"head_ttl_ms": 600_000}), redis, audit, router_id)
    app = build_app(Metrics(), ops, auth, lambda: ready)
    port = free_port()
    runner = await serve(app, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Api(http, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        audit.close()


def tokens(reads_public: bool = True) -> AdminAuth:
    return AdminAuth.of({"ops": OPS, "ci": CI}, reads_public)


def audit_lines(settings: Settings) -> list[dict[str, Any]]:
    with open(settings.audit_file, "rb") as f:
        return [orjson.loads(line) for line in f.read().splitlines() if line.strip()]


async def test_head_life_cycle_needs_a_token_and_is_audited_with_its_name(
    settings: Settings, redis: Redis
) -> None:
    async with admin_api(settings, redis, tokens()) as api:
        reg = {"head_id": "h1", "model_id": "m", "region": "eu", "partition": 1, "capacity": 4}
        status, body = await api.call("POST", "/heads", body=reg)
        assert status == 401, body
        assert body["error"].startswith("admin API changes need")
        assert api.last_headers["WWW-Authenticate"].startswith("Bearer")
        assert (await api.call("POST", "/heads", "wrong-token", reg))[0] == 401
        assert (await api.call("POST", "/heads", "Bearer", reg))[0] == 401
        assert not await redis.exists(Keys(settings.redis_prefix).head("h1")), "a refused call wrote nothing"

        status, head = await api.call("POST", "/heads", OPS, reg, headers={"X-Actor": "mallory"})
        assert status == 201, head
        assert (head["head_id"], head["model_id"], head["partition"], head["status"]) == (
            "h1",
            "m",
            1,
            "healthy",
        )
        status, body = await api.call("POST", "/heads", CI, reg)
        assert (status, body["field"]) == (409, "head_id"), "a live head's id is not taken over"
        status, body = await api.call("POST", "/heads", OPS, reg | {"head_id": "h9", "partition": 999})
        assert (status, body["field"]) == (400, "partition"), body
        assert "partition 999 out of range" in body["error"]

        status, heads = await api.call("GET", "/heads")
        assert status == 200
        assert [h["head_id"] for h in heads] == ["h1"]
        assert (await api.call("GET", "/heads/h1"))[1]["region"] == "eu"

        assert await api.call("POST", "/heads/h1/drain", CI) == (200, {"head_id": "h1", "status": "draining"})
        assert (await api.call("GET", "/heads/h1"))[1]["status"] == "draining"
        assert await api.call("POST", "/heads/h1/undrain", OPS) == (
            200,
            {"head_id": "h1", "status": "healthy"},
        )
        status, body = await api.call("PUT", "/heads/h1/status", CI, {"status": "degraded"})
        assert (status, body) == (200, {"head_id": "h1", "status": "degraded"})
        status, body = await api.call("PUT", "/heads/h1/status", CI, {"status": "sleepy"})
        assert (status, body["field"]) == (400, "status"), body
        assert (await api.call("GET", "/heads/h1"))[1]["status"] == "degraded"

        assert await api.call("DELETE", "/heads/h1", OPS) == (200, {"head_id": "h1", "removed": True})
        status, body = await api.call("GET", "/heads/h1")
        assert (status, body["field"]) == (404, "head_id")
        assert (await api.call("DELETE", "/heads/h1", OPS))[0] == 404
        assert (await api.call("POST", "/heads/h1/drain", OPS))[0] == 404

        expected = [("head_registered", "ops", None), ("head_drained", "ci", "draining"),
                    ("head_status", "ops", "healthy"), ("head_status", "ci", "degraded"),
                    ("head_removed", "ops", None)]  # fmt: skip
        admin = [r for r in audit_lines(settings) if r["event"].startswith("head_")]
        assert [(r["event"], r["actor"], r.get("status")) for r in admin] == expected
        assert all(r["router_id"] == "r-api" and r["head_id"] == "h1" for r in admin)

        # The same records, newest first, from the API; filtered by actor and by event.
        status, recent = await api.call("GET", "/audit?limit=10")
        assert status == 200
        assert [(r["event"], r["actor"]) for r in recent] == [(e, a) for e, a, _ in reversed(expected)]
        assert [r["event"] for r in (await api.call("GET", "/audit?actor=ci"))[1]] == [
            "head_status",
            "head_drained",
        ]
        assert len((await api.call("GET", "/audit?event=head_status&limit=1"))[1]) == 1
        assert (await api.call("GET", "/audit?limit=0"))[1]["field"] == "limit"


async def test_policy_put_with_expected_version_validate_and_history(
    settings: Settings, redis: Redis
) -> None:
    async with admin_api(settings, redis, tokens()) as api:
        status, current = await api.call("GET", "/policy")
        assert (status, current["version"]) == (200, 0)
        doc = {"default_strategy": "hybrid", "max_load_threshold": 0.8}
        assert (await api.call("PUT", "/policy", None, doc))[0] == 401
        status, stored = await api.call("PUT", "/policy?expect_version=0", OPS, doc)
        assert (status, stored["version"], stored["default_strategy"]) == (200, 1, "hybrid"), stored

        status, body = await api.call(
            "PUT", "/policy?expect_version=0", CI, doc | {"default_strategy": "random"}
        )
        assert (status, body["field"]) == (409, "expect_version"), body
        assert "expected version 0, found 1" in body["error"]
        assert (await api.call("GET", "/policy"))[1]["default_strategy"] == "hybrid", (
            "the conflict changed nothing"
        )

        bad = [({"default_strategy": "nope"}, "default_strategy"),
               ({"rules": [{"pattern": "x", "strategy": "nope"}]}, "rules.0.strategy"),
               ({"max_load_threshold": "high"}, "max_load_threshold"), ({"bogus": 1}, "bogus"),
               ([], "body")]  # fmt: skip
        for body_in, field in bad:
            status, body = await api.call("PUT", "/policy", OPS, body_in)
            assert (status, body["field"]) == (400, field), (body_in, body)
            status, body = await api.call("POST", "/policy/validate", None, body_in)
            assert (status, body["field"]) == (400, field), (body_in, body)
        status, body = await api.call("PUT", "/policy", OPS, raw=b"{not json")
        assert (status, body["field"]) == (400, "body")
        assert "not JSON" in body["error"]
        status, body = await api.call("PUT", "/policy?expect_version=soon", OPS, doc)
        assert (status, body["field"]) == (400, "expect_version")

        status, body = await api.call("POST", "/policy/validate", None, {"default_strategy": "random"})
        assert (status, body["valid"], body["policy"]["default_strategy"]) == (200, True, "random")
        assert (await api.call("GET", "/policy"))[1]["version"] == 1, "validate stores nothing"

        status, stored = await api.call(
            "PUT", "/policy?expect_version=1", CI, {"default_strategy": "round_robin"}
        )
        assert (status, stored["version"]) == (200, 2)
        status, history = await api.call("GET", "/policy/history?limit=5")
        assert status == 200
        assert [(p["version"], p["default_strategy"]) for p in history] == [(1, "hybrid")]

        changes = [r for r in audit_lines(settings) if r["event"] == "policy_changed"]
        assert [(r["actor"], r["version"]) for r in changes] == [("ops", 1), ("ci", 2)]


async def test_explain_over_the_api_agrees_with_the_cli(settings: Settings, redis: Redis) -> None:
    served = Served()
    workers = [make_worker(settings, redis, served, "llama", region, head_id=f"llama-{region}", capacity=8)
               for region in ("eu", "us")]  # fmt: skip
    async with running(*workers), admin_api(settings, redis, tokens()) as api:
        assert (await api.call("POST", "/heads/llama-us/drain", OPS))[0] == 200
        ask = {"model_type": "llama", "region": "eu", "strategy": "geo_preferred"}
        status, d = await api.call("POST", "/explain", None, ask)
        assert status == 200, d
        assert (d["outcome"], d["head_id"], d["strategy"]) == ("routed", "llama-eu", "geo_preferred")
        verdicts = {c["head_id"]: (c["verdict"], c["why"]) for c in d["candidates"]}
        assert verdicts == {"llama-eu": ("pick", None), "llama-us": ("excluded", "status draining")}
        assert set(d["scores"]) == {"load", "cache", "quota", "health", "latency", "total"}

        args = ("explain", "--model", "llama", "--region", "eu", "--strategy", "geo_preferred")
        out = (await asyncio.to_thread(cli, settings, *args)).stdout
        pick = next(line for line in out.splitlines() if "PICK" in line)
        assert "llama-eu" in pick
        assert "excluded: status draining" in out

        status, d = await api.call("POST", "/explain", None, {"model_type": "nobody"})
        assert (status, d["outcome"], d["head_id"]) == (200, "unknown_model", None)
        for body_in, field in [({"model_type": ""}, "model_type"), ({"region": "eu"}, "model_type"),
                               ({"model_type": "m", "estimated_tokens": -1}, "estimated_tokens"),
                               ({"model_type": "m", "job_id": "x"}, "job_id")]:  # fmt: skip
            status, body = await api.call("POST", "/explain", None, body_in)
            assert (status, body["field"]) == (400, field), (body_in, body)


async def test_reads_can_be_closed_and_changes_refused_without_any_token(
    settings: Settings, redis: Redis
) -> None:
    open_paths = ("/metrics", "/healthz", "/readyz", "/openapi.json")
    async with admin_api(settings, redis, AdminAuth()) as api:  # no token configured at all
        status, body = await api.call("POST", "/heads/h1/drain", OPS)
        assert status == 503
        assert "ROUTER_ADMIN_TOKEN=" in body["error"]
        assert "ROUTER_ADMIN_TOKENS=" in body["error"]
        assert (await api.call("PUT", "/policy", None, {}))[0] == 503
        assert (await api.call("GET", "/heads"))[0] == 200, "reads are open by default"
    async with admin_api(settings, redis, AdminAuth(reads_public=False)) as api:
        assert (await api.call("GET", "/heads"))[0] == 503
        for path in open_paths:
            assert (await api.call("GET", path))[0] == 200, path
    async with admin_api(settings, redis, tokens(reads_public=False)) as api:
        for path in ("/heads", "/policy", "/policy/history", "/audit"):
            assert (await api.call("GET", path))[0] == 401, path
            assert (await api.call("GET", path, CI))[0] == 200, path
        assert (await api.call("POST", "/explain", None, {"model_type": "m"}))[0] == 401
        assert (await api.call("POST", "/explain", CI, {"model_type": "m"}))[0] == 200
        for path in open_paths:
            assert (await api.call("GET", path))[0] == 200, path
        doc = (await api.call("GET", "/openapi.json"))[1]
        assert doc["paths"]["/heads"]["get"]["security"] == [{"bearerAuth": []}], "the document says so too"


async def test_unknown_routes_wrong_methods_and_malformed_bodies(settings: Settings, redis: Redis) -> None:
    async with admin_api(settings, redis, tokens()) as api:
        status, body = await api.call("GET", "/nope")
        assert (status, body["field"]) == (404, None)
        assert isinstance(body["error"], str)
        status, body = await api.call("PATCH", "/heads", OPS)
        assert status == 405
        assert set(api.last_headers["Allow"].split(",")) == {"GET", "POST"}
        assert isinstance(body["error"], str)
        assert (await api.call("POST", "/metrics"))[0] == 405
        assert (await api.call("GET", "/heads/h1/drain"))[0] == 405

        reg = {"head_id": "h1", "model_id": "m"}
        for body_in, field in [({"model_id": "m"}, "head_id"), (reg | {"capacity": "8"}, "capacity"),
                               (reg | {"capacity": 0}, "capacity"), (reg | {"colour": "red"}, "colour"),
                               (reg | {"head_id": "a/b"}, "head_id"), ("h1", "body")]:  # fmt: skip
            status, body = await api.call("POST", "/heads", OPS, body_in)
            assert (status, body["field"]) == (400, field), (body_in, body)
        for raw in (b"", b"   ", b"{", b"\xff\xfe"):
            status, body = await api.call("POST", "/heads", OPS, raw=raw)
            assert (status, body["field"]) == (400, "body"), (raw, body)
        assert (await api.call("PUT", "/heads/h1/status", OPS, {}))[1]["field"] == "status"
        assert (await api.call("GET", "/policy/history?limit=51"))[1]["field"] == "limit"
        assert not await redis.exists(Keys(settings.redis_prefix).heads), "nothing malformed was registered"


def _write_calls(stats: dict[str, Any], write_commands: set[str]) -> dict[str, int]:
    out = {}
    for name, value in stats.items():
        cmd = name.removeprefix("cmdstat_").lower()
        if cmd in write_commands:
            out[cmd] = int(value["calls"])
    return out


async def _write_commands(redis: Redis) -> set[str]:
    """Every command the server flags ``write``, and the ones that can write or signal without that flag."""
    info = cast(dict[str, Any], await redis.command())
    flagged = {name.lower() for name, doc in info.items() if "write" in (doc.get("flags") or [])}
    return flagged | {"eval", "evalsha", "fcall", "publish", "spublish"}


async def _state(redis: Redis, prefix: str) -> dict[str, bytes | None]:
    keys = sorted([k async for k in redis.scan_iter(match=f"{{{prefix}}}*", count=1000)])
    return {k: await redis.execute_command("DUMP", k, NEVER_DECODE=True) for k in keys}


async def test_reads_never_write_to_redis(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.redis_prefix)
    registry = HeadRegistry(redis, keys, settings.head_ttl_ms)
    await registry.register(HeadRecord("h1", "m", partition=1))
    await registry.register(HeadRecord("gone", "m", partition=2))
    await redis.delete(keys.head("gone"))  # an expired hash: a router's snapshot would prune its index entry
    async with admin_api(settings, redis, tokens(), stream=True) as api:
        await api.call("PUT", "/policy", OPS, {"default_strategy": "hybrid"})
        await api.call("PUT", "/policy", OPS, {"default_strategy": "random"})
        await api.call("POST", "/heads/h1/drain", OPS)
        write_commands = await _write_commands(redis)
        before_state = await _state(redis, settings.redis_prefix)
        before = _write_calls(cast(dict[str, Any], await redis.info("commandstats")), write_commands)

        doc = (await api.call("GET", "/openapi.json"))[1]
        gets = [path for path, ops in doc["paths"].items() if "get" in ops]
        assert {"/heads", "/heads/{head_id}", "/policy", "/policy/history", "/audit"} <= set(gets)
        for _ in range(3):
            for path in gets:
                for concrete in {path.replace("{head_id}", h) for h in ("h1", "gone", "nobody")}:
                    status, _ = await api.call("GET", concrete, CI)
                    assert status in (200, 404, 503), (concrete, status)
            for body in ({"model_type": "m", "session_id": "s1"}, {"model_type": "x"}):
                assert (await api.call("POST", "/explain", None, body))[0] == 200
            assert (await api.call("POST", "/policy/validate", None, {"default_strategy": "hybrid"}))[
                0
            ] == 200

        after = _write_calls(cast(dict[str, Any], await redis.info("commandstats")), write_commands)
        changed = {
            c: after.get(c, 0) - before.get(c, 0) for c in after if after.get(c, 0) != before.get(c, 0)
        }
        assert changed == {}, f"write commands during the read sweep: {changed}"
        assert await _state(redis, settings.redis_prefix) == before_state
        assert "gone" in await redis.smembers(keys.heads), "the read left the index as it was"


async def test_the_cli_verbs_take_the_same_paths_as_the_api(settings: Settings, redis: Redis) -> None:
    from router_worker.audit import os_actor

    async def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(cli, settings, *args, check=check)

    async with admin_api(settings, redis, tokens()) as api:
        await run("heads", "register", "h1", "--model", "m", "--partition", "1", "--region", "eu")
        assert (await api.call("GET", "/heads/h1"))[1]["region"] == "eu"
        proc = await run("heads", "register", "h/1", "--model", "m", check=False)
        assert proc.returncode == 2
        assert "head_id" in proc.stderr
        await run("heads", "status", "h1", "--set", "degraded")
        assert (await api.call("GET", "/heads/h1"))[1]["status"] == "degraded"
        await run("heads", "undrain", "h1")
        shown = json.loads((await run("heads", "status", "h1")).stdout)
        served = (await api.call("GET", "/heads/h1"))[1] | {"valid": True, "invalid_reason": None}
        # "alive" is judged by the clock at each read (a head registered by hand lapses when its TTL passes)
        assert {k: v for k, v in shown.items() if k != "alive"} == {
            k: v for k, v in served.items() if k != "alive"
        }
        assert (await run("heads", "status", "h1", "--set", "sleepy", check=False)).returncode == 2
        assert (await run("heads", "undrain", "nobody", check=False)).returncode == 1

        assert (await api.call("PUT", "/policy", OPS, {"default_strategy": "hybrid"}))[0] == 200
        policy_file = Path(settings.audit_file).with_name("policy.yaml")
        policy_file.write_text("default_strategy: random\nmax_load_threshold: 0.8\n")
        proc = await run("policy", "set", str(policy_file), "--expect-version", "0", check=False)
        assert proc.returncode == 1
        assert "expected version 0, found 1" in proc.stderr
        await run("policy", "set", str(policy_file), "--expect-version", "1")
        history = [json.loads(line) for line in (await run("policy", "history")).stdout.splitlines()]
        assert history == (await api.call("GET", "/policy/history"))[1]
        assert [p["default_strategy"] for p in history] == ["hybrid"]
        policy_file.write_text("max_load_threshold: yes\n")  # YAML's true: no number
        proc = await run("policy", "validate", str(policy_file), check=False)
        assert proc.returncode == 1
        assert "max_load_threshold" in proc.stderr

        ask = {"model_type": "m", "region": "eu"}
        by_cli = json.loads((await run("explain", "--model", "m", "--region", "eu", "--json")).stdout)
        by_api = (await api.call("POST", "/explain", None, ask))[1]
        assert by_cli == by_api

        await run("heads", "remove", "h1")
        assert (await api.call("GET", "/heads/h1"))[0] == 404

    by_cli = [r for r in audit_lines(settings) if r["router_id"] == "cli"]
    assert [r["event"] for r in by_cli] == ["head_registered", "head_status", "head_status", "policy_changed",
                                           "head_removed"]  # fmt: skip
    assert {r["actor"] for r in by_cli} == {os_actor()}, "the CLI's actor is the OS user"


async def test_recent_audit_records_come_from_the_stream_when_there_is_one(
    settings: Settings, redis: Redis
) -> None:
    async with admin_api(settings, redis, tokens(), stream=True) as api:
        sink = AuditSink.from_settings(redis, settings, with_file=False)
        assert sink.stream is not None
        # Another router's records (not in this server's file): 150 stream entries of 3 records each.
        for i in range(150):
            await sink.emit_many([{"ts": i, "event": "route", "router_id": "other", "job_id": f"j{i}-{k}"}
                                  for k in range(3)])  # fmt: skip
        assert (await api.call("POST", "/heads/nobody/drain", OPS))[0] == 404
        assert (await api.call("PUT", "/policy", CI, {"default_strategy": "hybrid"}))[0] == 200
        status, recent = await api.call("GET", "/audit?limit=320")
        assert status == 200
        assert [r["event"] for r in recent[:1]] == ["policy_changed"]
        assert recent[0]["actor"] == "ci"
        jobs = [r["job_id"] for r in recent[1:]]
        assert jobs == [f"j{i}-{k}" for i in reversed(range(150)) for k in (2, 1, 0)][:319]
        assert len((await api.call("GET", "/audit?limit=1000"))[1]) == 451
        status, only = await api.call("GET", "/audit?job_id=j3-1")
        assert [r["job_id"] for r in only] == ["j3-1"]
        assert (await api.call("GET", "/audit?actor=ci&event=policy_changed"))[1][0]["version"] == 1
        assert (await api.call("GET", "/audit?event=nothing"))[1] == []
