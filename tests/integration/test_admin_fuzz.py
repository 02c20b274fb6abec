"""A property-based fuzzer (schemathesis) against the OpenAPI document of a live router process (real broker
and Redis): no 5xx, no status or body the document does not describe, invalid input refused; and every
mutation refused without a token, before it can write anything."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router_worker.localstack import free_port
from router_worker.settings import Settings
from tests.procs import Procs, poll, time_limit

pytestmark = pytest.mark.integration

OPS = "ops-fuzz-0123456789"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection,missing_required_header,unsupported_method,ignored_auth")  # fmt: skip
EXAMPLES = 6
"""Generated cases per operation and phase: enough to reach every status, well under a minute on 2 cores."""


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def _admin_state(procs: Procs) -> tuple[Any, ...]:
    """What the mutations could change (the head heartbeats, so not its whole hash)."""
    r, keys = procs.redis, procs.keys
    return (await r.get(keys.policy), await r.smembers(keys.heads), await r.hget(keys.head("m-1"), "status"),
            await r.llen(keys.policy_history))  # fmt: skip


def _schemathesis(base: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{base}/openapi.json", "--checks", CHECKS,
           "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES), "--seed", "20240611",
           "--workers", "1", "--request-timeout", "20", "--no-shrink", "--suppress-health-check", "all",
           "-H", f"Authorization: Bearer {OPS}", "--report", "junit",
           "--report-dir", str(workdir / "schemathesis")]  # fmt: skip
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_HOOKS="")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=workdir)


@time_limit(300)
async def test_fuzzed_api_answers_only_what_it_documents(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"ROUTER_ADMIN_PORT": str(port), "ROUTER_ADMIN_TOKENS": f"ops={OPS}"}
    async with Procs(settings, tmp_path, **env) as procs, aiohttp.ClientSession() as http:
        router = procs.router()
        await procs.start_head("m", head_id="m-1")

        async def ready() -> bool:
            try:
                return (await _get(http, f"{base}/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        assert await poll(ready, 60), router.tail()
        status, doc = await _get(http, f"{base}/openapi.json")
        assert status == 200

        # Unauthenticated (and wrongly authenticated) mutations: refused with 401, nothing written.
        before = await _admin_state(procs)
        mutations = [(m.upper(), p.replace("{head_id}", "m-1").replace("{redrive_id}", "rd-x"))
                     for p, item in doc["paths"].items() for m, op in item.items() if op["security"]]  # fmt: skip
        assert len(mutations) == 10, (
            mutations
        )  # heads 5, policy 1, dlq 4 (its reads too: dead letters carry jobs)
        for method, path in mutations:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": OPS}, {"X-Actor": "ops"}):
                async with http.request(
                    method, base + path, json={"status": "draining"}, headers=headers
                ) as resp:
                    assert resp.status == 401, (method, path, headers, await resp.text())
        assert await _admin_state(procs) == before
        assert before[2] == "healthy"

        proc = await asyncio.to_thread(_schemathesis, base, tmp_path)
        router.assert_alive()
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-12000:]
        assert "No issues found" in out or " passed" in out, out[-3000:]
