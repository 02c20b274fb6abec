"""docker-compose.yml parses, and every service's command and environment match what the code reads."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml
from typer.core import TyperGroup

from router_worker.cli import app
from router_worker.cli_admin import register
from router_worker.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def _cli() -> TyperGroup:
    register(app)
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return group


def test_compose_services_use_real_commands_options_and_settings() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"kafka", "redis", "router"} <= set(services)
    assert services["router"]["deploy"]["replicas"] == 2
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"], "Kafka in KRaft mode"
    assert services["redis"]["image"].startswith("redis:7")
    cli = _cli()
    ours = [name for name, svc in services.items() if svc.get("build")]
    assert len(ours) >= 4
    fields = {f"ROUTER_{name.upper()}" for name in Settings.model_fields}
    heads = 0
    for name in ours:
        svc = services[name]
        cmd = svc["command"]
        sub = cli.commands.get(cmd[0])
        assert sub is not None, f"{name}: unknown command {cmd[0]!r}"
        opts = {o for p in sub.params for o in getattr(p, "opts", ())}
        for word in cmd[1:]:
            if word.startswith("--"):
                assert word in opts, f"{name}: {cmd[0]} has no option {word}"
        env = svc["environment"]
        for key in env:
            assert key in fields, f"{name}: {key} is not a setting"
        assert env["ROUTER_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["ROUTER_REDIS_URL"].startswith("redis://redis:6379")
        Settings.model_validate({k.removeprefix("ROUTER_").lower(): v for k, v in env.items()})
        heads += cmd[0] == "worker"
    assert heads >= 2, "a demo head per model"
