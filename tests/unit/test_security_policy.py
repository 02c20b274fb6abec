"""Bounded input: policy documents have limits (refused naming the field), policy files are parsed without
YAML aliases, nothing decodes input with pickle/eval/dynamic import, and compose ships no admin token."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router_worker.core.policy import (
    MAX_AB_TESTS,
    MAX_DOCUMENT_CHARS,
    MAX_LIST_ITEMS,
    MAX_MAP_ENTRIES,
    MAX_NAME_CHARS,
    MAX_PATTERN_CHARS,
    MAX_PATTERN_WILDCARDS,
    MAX_RULES,
    Policy,
    parse_policy_text,
)
from router_worker.state.policy_store import PolicyError, load_policy_file, parse_policy

ROOT = Path(__file__).resolve().parents[2]


def _ab(i: int, **kw: Any) -> dict[str, Any]:
    return {"name": f"t{i}", "model": "m", "a_model": "a", "b_model": "b"} | kw


@pytest.mark.parametrize(
    ("doc", "field", "ok"),
    [
        ({"rules": [{"pattern": f"m{i}*"} for i in range(MAX_RULES + 1)]}, "rules",
         {"rules": [{"pattern": f"m{i}*"} for i in range(MAX_RULES)]}),
        ({"rules": [{"pattern": "x" * (MAX_PATTERN_CHARS + 1)}]}, "rules.0.pattern",
         {"rules": [{"pattern": "x" * MAX_PATTERN_CHARS}]}),
        ({"rules": [{"pattern": "*a" * (MAX_PATTERN_WILDCARDS + 1)}]}, "rules.0.pattern",
         {"rules": [{"pattern": "*a" * MAX_PATTERN_WILDCARDS}]}),
        ({"rules": [{"pattern": ""}]}, "rules.0.pattern", {"rules": [{"pattern": "?"}]}),
        ({"rules": [{"pattern": "m", "preferred_regions": ["r"] * (MAX_LIST_ITEMS + 1)}]},
         "rules.0.preferred_regions", {"rules": [{"pattern": "m", "preferred_regions": ["r"] * MAX_LIST_ITEMS}]}),
        ({"ab_tests": [_ab(i) for i in range(MAX_AB_TESTS + 1)]}, "ab_tests",
         {"ab_tests": [_ab(i) for i in range(MAX_AB_TESTS)]}),
        ({"ab_tests": [_ab(0, model="?" * (MAX_PATTERN_WILDCARDS + 1))]}, "ab_tests.0.model",
         {"ab_tests": [_ab(0, model="*")]}),
        ({"fallback_models": {"m": ["n"] * (MAX_LIST_ITEMS + 1)}}, "fallback_models.m",
         {"fallback_models": {"m": ["n"] * MAX_LIST_ITEMS}}),
        ({"fallback_models": {"m" * (MAX_NAME_CHARS + 1): ["n"]}}, "fallback_models",
         {"fallback_models": {"m" * MAX_NAME_CHARS: ["n"]}}),
        ({"region_fallbacks": {f"r{i}": [] for i in range(MAX_MAP_ENTRIES + 1)}}, "region_fallbacks",
         {"region_fallbacks": {f"r{i}": [] for i in range(MAX_MAP_ENTRIES)}}),
        ({"head_weights": {f"h{i}": 1.0 for i in range(MAX_MAP_ENTRIES + 1)}}, "head_weights",
         {"head_weights": {f"h{i}": 1.0 for i in range(MAX_MAP_ENTRIES)}}),
        ({"admission": {"tenants": {f"t{i}": None for i in range(MAX_MAP_ENTRIES + 1)}}}, "admission.tenants",
         {"admission": {"tenants": {f"t{i}": None for i in range(MAX_MAP_ENTRIES)}}}),
        ({"admission": {"models": {f"m{i}": {"rate": 1} for i in range(MAX_MAP_ENTRIES + 1)}}},
         "admission.models", {"admission": {"models": {f"m{i}": {"rate": 1} for i in range(MAX_MAP_ENTRIES)}}}),
        ({"allowed_overrides": ["random"] * (MAX_LIST_ITEMS + 1)}, "allowed_overrides",
         {"allowed_overrides": ["random"] * MAX_LIST_ITEMS}),
    ],
)  # fmt: skip
def test_policy_limits_refuse_naming_the_field_and_accept_the_limit(
    doc: dict[str, Any], field: str, ok: dict[str, Any]
) -> None:
    with pytest.raises(PolicyError, match=rf"invalid policy: {re.escape(field)}\b"):
        parse_policy(doc)
    assert isinstance(parse_policy(ok), Policy)


def test_a_pattern_at_the_limits_matches_quickly() -> None:
    """The worst pattern the limits allow (16 wildcards, 256 characters) against a long id that almost
    matches: bounded work, so a policy can not stall a router's rule lookup."""
    import time

    pattern = "*a" * MAX_PATTERN_WILDCARDS + "b" * (MAX_PATTERN_CHARS - 2 * MAX_PATTERN_WILDCARDS)
    policy = parse_policy({"rules": [{"pattern": pattern, "strategy": "random"}]})
    t0 = time.process_time()
    assert policy.strategy_for("a" * 4096) == policy.default_strategy
    assert time.process_time() - t0 < 5.0  # a generous bound: an exponential match would take hours


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nfallback_models: {m: *i}\n")  # 10^9 strings if expanded
    with pytest.raises(PolicyError, match="aliases"):
        load_policy_file(bomb)
    with pytest.raises(yaml.YAMLError, match="aliases"):
        parse_policy_text("x: &x 1\ny: *x\n", yaml_doc=True)
    assert parse_policy_text("default_strategy: random\n", yaml_doc=True) == {"default_strategy": "random"}


def test_a_policy_file_too_large_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('{"rules": []}' + " " * MAX_DOCUMENT_CHARS)
    with pytest.raises(PolicyError, match="at most"):
        load_policy_file(big)


def test_policy_validate_refuses_an_alias_bomb_with_one_message(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x]\nb: &b [*a, *a]\nfallback_models: {m: *b}\n")
    proc = subprocess.run([sys.executable, "-m", "router_worker.cli", "policy", "validate", str(bomb)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "aliases (*name) are not allowed" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_nothing_decodes_input_with_pickle_eval_or_dynamic_import() -> None:
    """Input (Kafka records, headers, Redis values, policy documents, HTTP bodies) is decoded by msgpack,
    orjson/json, yaml's safe loaders and pydantic only."""
    banned = re.compile(
        r"\bpickle\b|\bcPickle\b|\bmarshal\b|\bshelve\b|\bdill\b|(?<![.\w])eval\(|(?<![.\w])exec\(|"
        r"__import__\(|import_module\(|yaml\.load\((?![^)]*Loader=_PolicyYamlLoader)|yaml\.unsafe_load|"
        r"yaml\.full_load|FullLoader|UnsafeLoader|literal_eval"
    )
    found = []
    for folder in ("router_worker", "producers", "consumers", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if banned.search(line.split("#")[0]):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_compose_ships_no_usable_admin_token() -> None:
    """The router's token comes from the operator's environment (or .env); unset, it is empty, and an empty
    token is no token: the admin API refuses its mutating routes, saying how to set one."""
    from router_worker.admin.auth import HOW_TO_SET, AdminAuth
    from router_worker.settings import Settings

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items() if isinstance(env, dict) else ():
            if "TOKEN" in key or "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+:?-\}", str(value)), f"{name}: {key} ships {value!r}"
    token = doc["services"]["router"]["environment"]["ROUTER_ADMIN_TOKEN"]
    assert token == "${ROUTER_ADMIN_TOKEN:-}"
    compose_default = ""  # what compose substitutes when the operator set nothing
    s = Settings(admin_token=compose_default, redis_url="redis://r/0", kafka_bootstrap_servers="k:9092")
    assert s.admin_token is None
    assert not AdminAuth.from_settings(s).enabled
    assert "ROUTER_ADMIN_TOKEN" in HOW_TO_SET
