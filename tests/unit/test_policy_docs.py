"""`router-worker policy fields`: every policy field documented from the policy's own schema."""

from __future__ import annotations

import json
import subprocess
import sys

from router_worker.core.policy import Policy
from router_worker.policy_docs import policy_fields


def test_every_top_level_and_fault_handling_field_is_listed_with_its_bounds() -> None:
    rows = {r.path: r for r in policy_fields()}
    assert set(Policy.model_fields) <= set(rows), "every top-level field"
    assert rows["breaker.window_s"].bounds == ">= 0.5, <= 3600"
    assert rows["breaker.cooldown_s"].description == "Open this long, at least."
    assert rows["admission.tenant.rate"].type == "number"
    assert rows["rules[].pattern"].bounds == "length <= 256"
    assert rows["rules"].bounds == "items <= 1000"
    assert "balanced" in rows["goal"].type


def test_the_cli_prints_them_as_json_lines() -> None:
    out = subprocess.run([sys.executable, "-m", "router_worker.cli", "policy", "fields", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert "priority_headroom" in paths
    assert "breaker.half_open_probes" in paths
