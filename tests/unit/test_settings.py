from __future__ import annotations

from pathlib import Path

import pytest

from router_worker.settings import SettingsError, load_settings, settings_help


def test_defaults_are_sane() -> None:
    s = load_settings()
    assert s.group_id == "router-worker"
    assert s.requests_topic == "router.requests"
    assert s.audit_channel == "audit:routing:logs"
    assert not s.kafka_enable_idempotence, "off by default: the embedded broker has no InitProducerId"
    assert not s.external


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "router.toml"
    cfg.write_text('group_id = "from-file"\nbatch_max_records = 64\nROUTER_TOPIC_PREFIX = "file."\n')
    monkeypatch.setenv("ROUTER_GROUP_ID", "from-env")
    s = load_settings(cfg)
    assert s.group_id == "from-env"
    assert s.batch_max_records == 64
    assert s.topic_prefix == "file."


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_yaml_and_json_files(tmp_path: Path, suffix: str) -> None:
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text('{"redis_prefix": "abc", "retry_backoff_ms": [1, 2]}')
    s = load_settings(cfg)
    assert s.redis_prefix == "abc"
    assert s.retry_backoff_ms == [1, 2]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"group_id": "g2"}')
    monkeypatch.setenv("ROUTER_CONFIG_FILE", str(cfg))
    assert load_settings().group_id == "g2"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ROUTER_BATCH_MAX_RECORDS": "0"},
            "ROUTER_BATCH_MAX_RECORDS: Input should be greater than or equal to 1",
        ),
        ({"ROUTER_KAFKA_ACKS": "2"}, "ROUTER_KAFKA_ACKS"),
        (
            {"ROUTER_KAFKA_ENABLE_IDEMPOTENCE": "true", "ROUTER_KAFKA_ACKS": "1"},
            "ROUTER_KAFKA_ENABLE_IDEMPOTENCE requires ROUTER_KAFKA_ACKS='all'",
        ),
        ({"ROUTER_REDIS_PREFIX": "a:b"}, "ROUTER_REDIS_PREFIX must be"),
        ({"ROUTER_UNKNOWN_THING": "1"}, None),
    ],
)
def test_bad_values_are_refused_with_the_field_named(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                     message: str | None) -> None:  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if message is None:  # unknown environment variables are not ours to refuse
        load_settings()
        return
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_unknown_keys_in_a_file_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"gruop_id": "typo"}')
    with pytest.raises(SettingsError, match="GRUOP_ID"):
        load_settings(cfg)


def test_help_lists_every_setting() -> None:
    text = settings_help()
    for name in ("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "ROUTER_REDIS_URL", "ROUTER_TOPIC_PREFIX", "ROUTER_GROUP_ID",
                 "ROUTER_ADMIN_PORT", "ROUTER_ADMIN_TOKEN", "ROUTER_AUDIT_FILE"):  # fmt: skip
        assert name in text


def test_an_unknown_default_strategy_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match=r"ROUTER_DEFAULT_STRATEGY.*unknown strategy 'fastest'"):
        load_settings(default_strategy="fastest")
