"""The producer SDK (async and blocking) and `router-worker submit` put valid jobs on the request topic."""

from __future__ import annotations

import asyncio

import pytest

from producers.producer import JobProducer, SyncJobProducer
from router_worker.settings import Settings
from router_worker.topics import Topics
from schemas.envelope import JSON, MSGPACK, EnvelopeError, content_type_of, decode_job
from tests.helpers import cli, read_topic

pytestmark = pytest.mark.integration


async def test_sync_producer_and_submit_cli(settings: Settings) -> None:
    topic = Topics.from_settings(settings).requests

    def blocking() -> list[str]:
        with SyncJobProducer(settings) as p:
            ids = [p.submit("resnet50", b"\x00\x01", region="eu", session_id="s1") for _ in range(3)]
            with pytest.raises(EnvelopeError, match="model_type"):
                p.submit("", "x")
            return ids

    ids = await asyncio.to_thread(blocking)
    async with JobProducer(settings) as jp:
        many = await jp.submit_many(
            [{"model_type": "bert_base", "payload": {"i": i}, "priority": i} for i in range(3)]
        )
    ids += many
    proc = await asyncio.to_thread(cli, settings, "submit", "--model", "llama", "--count", "2", "--json")
    cli_ids = proc.stdout.split()
    assert len(cli_ids) == 2
    records = await read_topic(settings, topic, expect=8)
    jobs = {}
    for rec in records:
        ctype = content_type_of(rec.headers)
        jobs[decode_job(rec.value, ctype).job_id] = (ctype, decode_job(rec.value, ctype))
    assert set(jobs) == set(ids) | set(cli_ids)
    for i, job_id in enumerate(many):
        assert jobs[job_id][1].payload == {"i": i}
        assert jobs[job_id][1].priority == i
    for job_id in ids[:3]:
        ctype, job = jobs[job_id]
        assert ctype == MSGPACK
        assert (job.model_type, job.payload, job.region, job.session_id) == (
            "resnet50",
            b"\x00\x01",
            "eu",
            "s1",
        )
        assert job.created_at is not None
    for job_id in cli_ids:
        assert jobs[job_id][0] == JSON
        assert jobs[job_id][1].model_type == "llama"
