"""A third-party client (librdkafka, through confluent-kafka) writes a mixed stream of valid jobs and every class
of bad input; two routers and two heads run in their own processes. Every valid job reaches a head exactly once,
every bad record lands in the DLQ exactly once with its reason and original coordinates, the routers live on,
and the group's offsets cover every record."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from aiokafka import TopicPartition
from confluent_kafka import KafkaError, Message, Producer

from router_worker.clock import now_ms
from router_worker.settings import Settings
from router_worker.topics import Topics
from tests.procs import DeadLetter, Ledger, Procs, sha256_hex, time_limit, wait_committed

pytestmark = pytest.mark.integration

MODEL = "tp"
MP = b"application/msgpack"
JS = b"application/json"
Headers = list[tuple[str, bytes | None]]


@dataclass
class Rec:
    """One record to produce, what it should become, and (after delivery) where it landed."""

    label: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    reasons: frozenset[str] = frozenset()
    """Empty: a valid job that must reach a head. Otherwise the acceptable x-dlq-reason values."""
    job_id: str | None = None
    retry_tier: bool = False
    coords: tuple[str, int, int] | None = None
    error: str | None = None
    dead: list[DeadLetter] = field(default_factory=list)


def _job(job_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "job_id": job_id,
        "model_type": MODEL,
        "payload": {"i": job_id},
        "created_at": now_ms(),
    } | extra


def valid_records() -> list[Rec]:
    out = []
    for i in range(200):
        jid = f"ok-{i:03d}"
        kind = i % 5
        if kind in (0, 1):  # msgpack, labelled
            out.append(
                Rec("msgpack", msgpack.packb(_job(jid)), jid.encode(), [("content-type", MP)], job_id=jid)
            )
        elif kind == 2:  # JSON
            out.append(Rec("json", orjson.dumps(_job(jid)), jid.encode(), [("content-type", JS)], job_id=jid))
        elif kind == 3:  # no content-type header at all: MessagePack by default
            out.append(Rec("msgpack-no-header", msgpack.packb(_job(jid)), jid.encode(), [], job_id=jid))
        elif i % 2:  # legal Kafka headers with null values on otherwise valid jobs
            out.append(Rec("json-null-headers", orjson.dumps(_job(jid)), jid.encode(),
                           [("content-type", JS), ("x-note", None), ("traceparent", None)], job_id=jid))  # fmt: skip
        else:
            out.append(
                Rec("msgpack-null-header", msgpack.packb(_job(jid)), None, [("x-note", None)], job_id=jid)
            )
    return out


def bad_records(max_bytes: int) -> list[Rec]:
    dec, sch = frozenset({"decode_error"}), frozenset({"schema_error"})
    big = msgpack.packb(_job("big-1", payload=b"\x00" * (max_bytes + max_bytes // 5)))  # 1.2 MiB
    assert len(big) > max_bytes
    return [
        Rec("not-msgpack", b"\xc1\xff not msgpack", b"bad-1", [], dec),
        Rec("invalid-json", b'{"job_id": "x", not json', b"bad-2", [("content-type", JS)], dec),
        Rec(
            "unsupported-content-type",
            orjson.dumps(_job("csv-1")),
            b"bad-3",
            [("content-type", b"text/csv")],
            dec,
        ),
        # a null content-type: neither an absent header (MessagePack) nor JSON makes these bytes a job
        Rec("null-content-type", orjson.dumps(_job("nullct-1")), b"bad-4", [("content-type", None)], dec),
        # a map whose key is an array: msgpack can not build it in Python (decode) or it is no envelope (schema)
        Rec("array-key-map", bytes.fromhex("81910101"), b"bad-5", [], dec | sch),
        Rec("msgpack-array", msgpack.packb([1, 2, 3]), b"bad-6", [], sch),
        Rec("missing-job-id", msgpack.packb({"model_type": MODEL, "payload": "x"}), b"bad-7", [], sch),
        Rec("job-id-wrong-type", msgpack.packb({"job_id": 7, "model_type": MODEL}), b"bad-8", [], sch),
        Rec("tombstone", None, None, [], dec),
        Rec("too-large", big, b"bad-10", [("content-type", MP)], frozenset({"too_large"})),
        Rec("expired", msgpack.packb(_job("old-1", deadline_ms=1)), b"bad-11", [], frozenset({"expired"})),
        Rec("unknown-strategy", msgpack.packb(_job("strat-1", strategy="fastest")), b"bad-12", [], sch),
        # nacks without a valid attempt: refused, never taken for a duplicate of the first routing and dropped
        Rec(
            "retry-no-attempt",
            msgpack.packb(_job("retry-1")),
            b"bad-13",
            [("content-type", MP)],
            sch,
            retry_tier=True,
        ),
        Rec(
            "retry-attempt-abc",
            msgpack.packb(_job("retry-2")),
            b"bad-14",
            [("content-type", MP), ("x-route-attempt", b"abc")],
            sch,
            retry_tier=True,
        ),
    ]


def interleave(valid: list[Rec], bad: list[Rec], seed: int = 6) -> list[Rec]:
    """The valid jobs in order with the bad records spread among them (not at the ends)."""
    rng = random.Random(seed)
    out = list(valid)
    for b in bad:
        out.insert(rng.randrange(5, len(out) - 5), b)
    return out


def produce(bootstrap: str, topics: Topics, records: list[Rec]) -> None:
    """Produce with librdkafka, recording each record's (topic, partition, offset) from its delivery report."""
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8 << 20, "linger.ms": 5,
                         "acks": "all", "enable.idempotence": False, "broker.address.family": "v4"})  # fmt: skip

    def delivered(rec: Rec) -> Any:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                rec.error = str(err)
            else:
                rec.coords = (msg.topic(), msg.partition(), msg.offset())

        return cb

    for rec in records:
        topic = topics.retry(1) if rec.retry_tier else topics.requests
        producer.produce(topic, value=rec.value, key=rec.key, headers=rec.headers, on_delivery=delivered(rec))
        producer.poll(0)
    left = producer.flush(30)
    assert left == 0, f"{left} records not delivered by librdkafka in 30 s"
    failed = [(r.label, r.error) for r in records if r.error or r.coords is None]
    assert not failed, f"librdkafka could not produce: {failed}"


@time_limit(100)
async def test_a_librdkafka_producer_mixed_stream_every_record_ends_in_exactly_one_place(
    settings: Settings, tmp_path: Path
) -> None:
    topics = Topics.from_settings(settings)
    valid = valid_records()
    bad = bad_records(settings.kafka_max_message_bytes)
    records = interleave(valid, bad)
    async with Procs(settings, tmp_path) as procs:
        routers = await procs.start_routers(2)
        for h in [procs.head(MODEL, capacity=16, service_ms=2.0, jitter_ms=1.0) for _ in range(2)]:
            await procs.wait_head(h)
        async with Ledger(settings) as ledger:
            assert settings.kafka_bootstrap_servers
            await asyncio.to_thread(produce, settings.kafka_bootstrap_servers, topics, records)
            ids = [r.job_id for r in valid if r.job_id]

            def finished() -> bool:
                return (ledger.delivered(ids) == len(ids) and len(ledger.dead) >= len(bad)) or not any(
                    r.alive for r in routers
                )

            await ledger.wait_for(finished, 40)
            await ledger.settle(quiet_s=2.0)
            rep = ledger.report(ids)

            # offsets: the group's committed offset of each request partition is the count produced to it
            produced = Counter(r.coords[1] for r in records if r.coords and r.coords[0] == topics.requests)
            last = {p: max(r.coords[2] for r in records if r.coords and r.coords[:2] == (topics.requests, p))
                    for p in produced}  # fmt: skip
            assert all(last[p] + 1 == n for p, n in produced.items()), "a fresh topic: offsets 0..n-1"
            want = {TopicPartition(topics.requests, p): n for p, n in produced.items()}
            committed = await wait_committed(
                settings, want, timeout=15 if any(r.alive for r in routers) else 1
            )
            alive = {r.name: r.alive for r in routers}
            dead_routers = [r.describe() + "\n" + r.tail() for r in routers if not r.alive]

    # where every bad record went, by its original coordinates
    by_coords = {r.coords: r for r in bad}
    stray: list[DeadLetter] = []
    for d in ledger.dead:
        rec = by_coords.get(d.original)
        if rec is None:
            stray.append(d)
        else:
            rec.dead.append(d)
    problems = []
    for r in bad:
        if len(r.dead) != 1:
            where = (
                "routed to a head"
                if r.value and any(j in ledger.deliveries for j in _ids_in(r.value))
                else ""
            )
            problems.append(f"{r.label} @ {r.coords}: {len(r.dead)} dead letters {where}".rstrip())
            continue
        d = r.dead[0]
        if d.reason not in r.reasons:
            problems.append(
                f"{r.label}: reason {d.reason} ({d.h('x-dlq-error')}), expected {sorted(r.reasons)}"
            )
        if not d.h("x-dlq-error"):
            problems.append(f"{r.label}: no x-dlq-error")
        if r.label == "too-large":
            assert r.value is not None
            if d.value is None or len(d.value) >= len(r.value):
                problems.append(
                    f"too-large: dead letter not truncated ({len(d.value or b'')} of {len(r.value)} bytes)"
                )
            if d.h("x-dlq-truncated") != str(len(r.value)):
                problems.append(
                    f"too-large: x-dlq-truncated {d.h('x-dlq-truncated')!r}, expected {len(r.value)}"
                )
            if d.h("x-dlq-sha256") != sha256_hex(r.value):
                problems.append(f"too-large: x-dlq-sha256 {d.h('x-dlq-sha256')!r} is not the original's")
        elif d.value != r.value:
            problems.append(f"{r.label}: dead letter value is not the original bytes")
    stray_desc = [f"{d.reason} from {d.original}: {d.h('x-dlq-error')}" for d in stray[:5]]

    print(f"\n[thirdparty] {len(valid)} valid, {len(bad)} bad; {rep.summary()}; routers alive {alive}")
    print(
        f"[thirdparty] dead letters by reason {dict(Counter(d.reason for d in ledger.dead))}, stray {len(stray)}"
    )
    print(f"[thirdparty] committed {_fmt(committed)} vs produced {_fmt(want)}")
    assert not dead_routers, "routers died:\n" + "\n".join(dead_routers)
    assert rep.lost == 0, f"valid jobs lost: {rep.summary()}"
    assert not rep.more, f"valid jobs delivered more than once: {rep.summary()}"
    assert not problems, (
        f"{len(problems)} bad records not dead-lettered exactly once as expected:\n" + "\n".join(problems)
    )
    assert not stray, f"{len(stray)} dead letters that are not one of the bad records: {stray_desc}"
    assert committed == want, f"committed offsets {_fmt(committed)} != records produced {_fmt(want)}"


def _ids_in(value: bytes) -> list[str]:
    d = DeadLetter(value, None, {}, 0, 0)
    j = d.job_id()
    return [j] if j else []


def _fmt(offsets: dict[TopicPartition, Any]) -> str:
    return "{" + ", ".join(f"{tp.partition}: {off}" for tp, off in sorted(offsets.items())) + "}"
