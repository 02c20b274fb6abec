"""The Prometheus and Grafana files: every alert the issue lists, each with a runbook line; the dashboards'
panels of seed 002; every expression names only metrics the router exports (or the contract's breaker and
admission metrics); the provisioning matches docker-compose.yml; promtool accepts the config and the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router_worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "prometheus"
DASHBOARDS = ROOT / "grafana" / "dashboards"

ALERTS = {
    "HighRoutingErrors", "LowActiveHeads", "HighHTTPErrors", "HighHTTPLatency", "HighRoutingDecisionLatency",
    "HighMemoryUsage", "HighCPUUsage", "ConsumerLagGrowing", "PartitionsWithoutConsumer", "CircuitBreakerOpen",
    "HighDeadLetterRate",
}  # fmt: skip
BASIC_PANELS = ["Routing Decisions by Strategy", "Active Heads", "HTTP Requests", "Head Operations",
                "Cache Performance"]  # fmt: skip
ENHANCED_PANELS = [
    "HTTP Request Latency", "HTTP Error Rates", "Routing Errors", "System CPU and Memory Usage",
    "Real-time Connections", "Message Queue Activity", "Routing Decisions by Model Type and Region",
    "External Service Errors and Success", "Consumer Lag", "Dead Letters and Retries", "Routing Fallbacks",
    "Circuit Breakers",
]  # fmt: skip
OTHER_ISSUE = {"circuit_breaker_state", "circuit_breaker_transitions_total", "admission_throttled_total"}
"""Contract metrics declared by the fault-handling work; the rules and panels may name them already."""
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "delta", "deriv", "increase", "histogram_quantile",
    "clamp_min", "clamp_max", "absent", "vector", "and", "or", "unless", "by", "without", "on", "ignoring",
    "group_left", "group_right", "bool", "offset", "e",
}  # fmt: skip


def exported_names() -> set[str]:
    m = Metrics()
    names = set(m.registry._names_to_collectors)  # every declared sample name, _total/_bucket/... included
    names |= {s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    return names | OTHER_ISSUE | {"up"}  # the collectors (process_*) only show in what is rendered


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: label matchers, grouping clauses, ranges and strings removed."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "", e)))
    return words - PROMQL_WORDS


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool() -> str:
    venv = Path(sys.executable).parent / "promtool"  # where `make test` puts it
    path = str(venv) if venv.is_file() else shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not found: install Debian's 'prometheus' package (make test tries apt-get as root)"
        )
    return path


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) > 1e-9') == {"x_bucket"}
    assert metric_names("max(a) - sum(b) > 0 or absent(c)") == {"a", "b", "c"}


def test_alert_rules_cover_the_list_each_with_a_runbook_and_known_metrics() -> None:
    doc = load_yaml(PROM / "alerts.yml")
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    known = exported_names()
    for r in rules:
        runbook = r["annotations"].get("runbook", "")
        assert runbook.strip(), f"{r['alert']}: no runbook"
        assert "\n" not in runbook.strip(), f"{r['alert']}: the runbook is one line"
        assert r["labels"]["severity"] in {"warning", "critical"}
        unknown = metric_names(r["expr"]) - known
        assert not unknown, f"{r['alert']} reads metrics nobody exports: {unknown}"


def test_prometheus_scrapes_the_routers_admin_port() -> None:
    cfg = load_yaml(PROM / "prometheus.yml")
    compose = load_yaml(ROOT / "docker-compose.yml")
    port = int(compose["services"]["router"]["environment"]["ROUTER_ADMIN_PORT"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    sd = jobs["router"]["dns_sd_configs"][0]
    assert sd["names"] == ["router"]
    assert sd["port"] == port
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file()


def _dashboard(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return doc


@pytest.mark.parametrize(
    ("name", "panels"),
    [
        ("routing-service.json", BASIC_PANELS),
        ("routing-service-enhanced.json", BASIC_PANELS + ENHANCED_PANELS),
    ],
)
def test_dashboards_have_the_seed_panels_on_known_metrics(name: str, panels: list[str]) -> None:
    doc = _dashboard(name)
    titles = [p["title"] for p in doc["panels"]]
    assert set(panels) <= set(titles), set(panels) - set(titles)
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    datasource = load_yaml(ROOT / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    known = exported_names()
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == datasource["uid"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            unknown = metric_names(t["expr"]) - known
            assert not unknown, f"{name}: {p['title']} reads {unknown}"


def test_compose_runs_prometheus_and_grafana_on_these_files() -> None:
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = load_yaml(ROOT / "grafana/provisioning/dashboards/router-worker.yml")["providers"][0]
    assert graf_mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert graf_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = load_yaml(ROOT / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_promtool_accepts_the_config_and_the_rules() -> None:
    tool = promtool()
    for args in (
        ["check", "config", str(PROM / "prometheus.yml")],
        ["check", "rules", str(PROM / "alerts.yml")],
    ):
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_observing_a_batch_at_once_gives_the_histogram_observing_each_value_gives() -> None:
    """The router observes a batch's decision times in one call (``observe_many``): the exposition must be the
    one ``observe`` per value gives, bucket bounds included (a value equal to a bound falls in that bucket)."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from router_worker.metrics import observe_many

    rng = random.Random(7)
    bounds = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)
    values = [rng.choice((1e-6, 1e-4, 1e-2, 1.0)) * rng.random() for _ in range(2000)] + [*bounds, 0.0, 1e9]
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("d", "decisions", buckets=bounds, registry=one)
    h_many = Histogram("d", "decisions", buckets=bounds, registry=many)
    for v in values:
        h_one.observe(v)
    observe_many(h_many, values)

    def lines(r: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(r).decode().splitlines() if "_created" not in line]

    assert lines(many) == lines(one)
