"""Review of issue 10 (the soak's check): a job planted missing, duplicated or dead-lettered in a copy of the
check's inputs (the ledger's completion records and dead letters) is counted as such."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
from aiokafka import TopicPartition

from router_worker.bench_soak import SoakConfig, _keep, _report, _Run
from router_worker.harness.ledger import Ledger
from router_worker.settings import load_settings
from router_worker.topics import Topics

T0 = 1_700_000_000_000


def _ledger() -> tuple[Ledger, Topics]:
    s = load_settings(kafka_bootstrap_servers="k:9092", redis_url="redis://r:6379/0")
    return Ledger(s, keep=_keep), Topics.from_settings(s)


def _completion(ledger: Ledger, topics: Topics, job_id: str, offset: int, attempt: int = 1) -> None:
    doc = {"job_id": job_id, "attempt": attempt, "routed_at": T0 + offset, "head_id": "a1",
           "created_at": T0 + offset - 3, "finished_at": T0 + offset + 5}  # fmt: skip
    rec = SimpleNamespace(value=msgpack.packb(doc), key=None, headers=[], offset=offset)
    ledger._take(TopicPartition(topics.results, 0), rec)


def _dead_letter(
    ledger: Ledger, topics: Topics, job_id: str, offset: int, reason: str = "no_capacity"
) -> None:
    value = msgpack.packb({"job_id": job_id, "model_type": "soak-a"})
    rec = SimpleNamespace(value=value, key=None, headers=[("x-dlq-reason", reason.encode())], offset=offset)
    ledger._take(TopicPartition(topics.dlq, 0), rec)


def _run(tmp_path: Path) -> Any:
    return _Run(SoakConfig(minutes=1), None, None, None, tmp_path, None)  # type: ignore[arg-type]


def test_a_job_dropped_from_the_results_is_lost(tmp_path: Path) -> None:
    ledger, topics = _ledger()
    produced = [f"soak-{i:07d}" for i in range(200)]
    for off, job_id in enumerate(produced):
        if job_id != "soak-0000042":  # planted: never delivered
            _completion(ledger, topics, job_id, off)
    report = _report(_run(tmp_path), ledger, produced, 0, T0)
    assert report.lost == 1
    assert report.lost_samples == ["soak-0000042"]
    assert report.completed == 199
    assert report.duplicates.extra == 0


def test_a_duplicate_dead_letter_and_a_served_and_dead_lettered_job_are_counted_once_each(
    tmp_path: Path,
) -> None:
    ledger, topics = _ledger()
    produced = [f"soak-{i:07d}" for i in range(10)]
    off = 0
    for job_id in produced[:8]:
        _completion(ledger, topics, job_id, off)
        off += 1
    _completion(ledger, topics, produced[3], off, attempt=2)  # delivered twice
    _completion(ledger, topics, produced[3], off + 1, attempt=3)  # three times: 2 extra
    _dead_letter(ledger, topics, produced[5], 0)  # delivered and dead-lettered: completed
    _dead_letter(ledger, topics, produced[8], 1)  # dead-lettered only
    _dead_letter(ledger, topics, "not-ours", 2)  # another run's
    report = _report(_run(tmp_path), ledger, produced, 0, T0)
    assert report.duplicates.extra == 2
    assert report.duplicates.jobs == 1
    assert report.completed == 8
    assert report.dead_lettered == 1
    assert report.lost == 1
    assert report.lost_samples == [produced[9]]
    assert report.completed + report.dead_lettered + report.lost == report.produced
