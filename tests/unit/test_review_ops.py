"""Adversarial review of issue 9 (what ops see), the pure parts: ``audit tail``'s readable lines against what a
producer can put in a job, and the alert rules evaluated by promtool."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from router_worker.audit_tail import id_before, id_key
from router_worker.cli_audit import format_record
from tests.unit.test_monitoring_files import PROM, promtool


def _rendered(rec: dict[str, object]) -> str:
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=300).print(
        format_record(rec), soft_wrap=True, highlight=False
    )
    return buf.getvalue()


def test_tail_line_shows_control_characters_instead_of_sending_them_to_the_terminal() -> None:
    """A job id is the producer's choice (1-128 characters of anything). ``audit tail`` prints it to an
    operator's terminal: an escape sequence must not reach it (clear the screen, set the title, ...) and a
    newline must not forge a second audit line."""
    evil = "a\x1b]0;owned\x07\x1b[2J\nFAKE 12:00 policy_changed actor=admin\u202e"
    out = _rendered({"ts": 1, "event": "route", "router_id": "r", "job_id": evil, "tenant": "t\r\x9b"})
    body = out.replace("\x1b[0m", "").replace("\x1b[2m", "").replace("\x1b[32m", "")  # rich's own styles
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in body
    assert out.count("\n") == 1, out
    assert "\\x1b" in out  # still visible, as escapes
    assert "\\n" in out


def test_stream_id_order() -> None:
    assert id_key("5-2") < id_key("5-10") < id_key("6-0")
    assert id_key(id_before(6)) < id_key("6-0")
    assert id_key("5-3") < id_key(id_before(6))


def test_high_routing_errors_fires_on_queue_errors_before_any_dead_letter(tmp_path: Path) -> None:
    """HighRoutingErrors adds dead letters and queue errors; a router that never dead-lettered one of the
    listed reasons has no such series, and an empty operand made the whole sum empty: the alert could not
    fire however many publishes failed."""
    tool = promtool()
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text())
    rule = next(r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
                if r["alert"] == "HighRoutingErrors")  # fmt: skip
    fired = [
        {
            "exp_labels": dict(rule["labels"]),
            "exp_annotations": {
                **rule["annotations"],
                "description": "Jobs that could not be routed or published: 1.667/s.",
            },
        }
    ]

    def case(series: dict[str, str], expect: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "alert_rule_test": [{"eval_time": "20m", "alertname": "HighRoutingErrors", "exp_alerts": expect}],
        }

    errors, none = "0+100x30", "0+0x30"
    queue = 'message_queue_messages_total{queue="model",status="error"}'
    test = tmp_path / "test.yml"
    test.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["alerts.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    case(
                        {queue: errors, 'dead_letters_total{reason="decode_error"}': none}, fired
                    ),  # no listed reason yet
                    case(
                        {'dead_letters_total{reason="no_capacity"}': errors}, fired
                    ),  # no queue error series
                    case({'dead_letters_total{reason="no_capacity"}': none, queue: none}, []),
                ],
            }
        )
    )
    proc = subprocess.run([tool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
