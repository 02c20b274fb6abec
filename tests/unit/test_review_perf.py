"""Review of the performance changes (route cache, plain records, producer batches): what they must not change.

The publish tests drive :func:`publish` against aiokafka's own ``MessageAccumulator`` and ``BatchBuilder`` (the
objects ``create_batch``/``send_batch``/``send`` use) with a scripted sender in place of the network: the
sender drains batches as aiokafka's does and answers each with the broker's verdict for its records, so how
records share a batch is aiokafka's, not a model of it."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder, MessageAccumulator
from aiokafka.record.default_records import DefaultRecordBatch

from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import Head, HeadStatus, RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import decode_one, intake
from router_worker.pipeline.outcomes import Routed
from router_worker.pipeline.plan import PlanConfig, Stats, plan
from router_worker.pipeline.publish import RetryBudget, Send, publish
from router_worker.topics import Topics
from schemas.envelope import Job

# --- route cache: criteria keys --------------------------------------------------------------------------


def _criteria_heads() -> list[Head]:
    far = 10**12
    return [
        # the one that meets the criteria, busier
        Head(head_id="big", model_id="m", expires_at_ms=far, capacity=8, reported_inflight=4, dynamic_shapes=True,
             param_count=70_000_000_000, max_context=8192),
        # idle, but small, static shapes, short context
        Head(head_id="small", model_id="m", expires_at_ms=far, capacity=8, reported_inflight=0,
             dynamic_shapes=False, param_count=8_000_000_000, max_context=2048),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("loose", "strict"),
    [
        ({"dynamic_shapes": 1}, {"dynamic_shapes": True}),  # 1 == True in Python, not as a criterion
        ({"min_params": 7e10}, {"min_params": 70_000_000_000}),  # a float is no min_params criterion
        ({"min_context": 4096.0}, {"min_context": 4096}),
    ],
)
def test_criteria_equal_in_python_but_not_as_criteria_get_their_own_route(
    loose: dict[str, Any], strict: dict[str, Any]
) -> None:
    """A job whose criteria compare equal (``==``/hash) to an earlier job's, but filter differently, must not be
    served the earlier job's cached route or candidate set: ``dynamic_shapes: true`` goes to a head with dynamic
    shapes even after ``dynamic_shapes: 1`` (not a criterion) was routed to one without."""
    index = HeadIndex.build(_criteria_heads())
    policy, memory, rng = Policy(default_strategy="least_loaded"), RouterMemory(), random.Random(0)
    first = decide(Job(job_id="a", model_type="m", metadata=loose), index, policy, memory, 1, rng)
    assert first.head is not None
    assert first.head.head_id == "small"  # not a criterion: the idle head
    second = decide(Job(job_id="b", model_type="m", metadata=strict), index, policy, memory, 1, rng)
    assert second.head is not None
    assert second.head.head_id == "big", second.reason
    # and the other way round, on a fresh index: the strict job first must not narrow the loose one's set
    index = HeadIndex.build(_criteria_heads())
    decide(Job(job_id="c", model_type="m", metadata=strict), index, policy, memory, 1, rng)
    again = decide(Job(job_id="d", model_type="m", metadata=loose), index, policy, memory, 1, rng)
    assert again.head is not None
    assert again.head.head_id == "small", again.reason


def test_a_head_that_turns_unhealthy_is_not_served_from_the_route_cache() -> None:
    """A new snapshot (a head drained) is a new index: the cached route of the old one is not consulted."""
    heads = _criteria_heads()
    index = HeadIndex.build(heads)
    policy, memory, rng = Policy(default_strategy="least_loaded"), RouterMemory(), random.Random(0)
    d = decide(Job(job_id="a", model_type="m"), index, policy, memory, 1, rng)
    assert d.head is not None
    assert d.head.head_id == "small"
    drained = [h if h.head_id != "small" else replace(h, status=HeadStatus.DRAINING) for h in heads]
    index = HeadIndex.build(drained)
    d = decide(Job(job_id="b", model_type="m"), index, policy, memory, 1, rng)
    assert d.head is not None
    assert d.head.head_id == "big"


def test_made_up_criteria_do_not_grow_the_caches_of_one_snapshot_without_bound() -> None:
    """Every job with criteria of its own (a tag per job, or its own x-route-exclude list) adds a candidate
    set to the snapshot's cache; the route cache starts afresh at 4,096 keys, the candidate-set cache never
    does. A snapshot lives until the next refresh, and for as long as Redis is unreachable."""
    index = HeadIndex.build(_criteria_heads())
    policy, memory, rng = Policy(default_strategy="least_loaded"), RouterMemory(), random.Random(0)
    for i in range(6000):
        decide(
            Job(job_id=f"j{i}", model_type="m", metadata={"tags": [f"t{i}"]}), index, policy, memory, 1, rng
        )
        decide(Job(job_id=f"k{i}", model_type="m"), index, policy, memory, 1, rng, avoid=frozenset({f"x{i}"}))
    assert len(index.routes) <= 4096
    assert len(index.cache) <= 4096, f"{len(index.cache)} candidate-set entries on one snapshot"


# --- plain records: the plan's header searches -----------------------------------------------------------


def job(job_id: str) -> bytes:
    out: bytes = msgpack.packb({"job_id": job_id, "model_type": "m"})
    return out


class _R:
    def __init__(self, headers: Any, value: bytes | None = None) -> None:
        self.headers = headers
        self.value = value if value is not None else job("j")
        self.key = None
        self.offset = 0


@pytest.mark.parametrize(
    ("headers", "marked"),
    [
        (None, False),
        ((), False),
        ([("content-type", b"application/msgpack")], False),
        ([("content-type", None)], False),  # refused by the decoder anyway
        ([("x-route-exclude", b'["h0"]')], True),  # one header, not a content-type
        ([("Content-Type", b"application/msgpack")], True),  # another spelling: searched, never skipped
        ([("content-type", b"application/msgpack"), ("content-type", b"application/json")], True),
        ([(b"content-type", b"application/msgpack")], True),  # a key as bytes (another client's library)
        ([("content-type", b"application/msgpack"), ("x-redrive", b"r1")], True),
    ],
)
def test_only_a_lone_content_type_header_makes_a_record_plain(headers: Any, marked: bool) -> None:
    inc = decode_one(_R(headers), TopicPartition("req", 0), 1, 1 << 20)
    assert inc.marked is marked


def test_a_lone_exclude_header_is_honoured_by_the_plan() -> None:
    """A producer's record whose only header is ``x-route-exclude`` (no content-type) is searched: the head it
    names is passed over while another can take the job."""
    tp = TopicPartition("req", 0)
    recs = []
    for i in range(6):
        r = _R([("x-route-exclude", b'["h0"]')], job(f"j{i}"))
        r.offset = i
        recs.append(r)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: recs}, gaps, frozenset(), 1_000_000, 1 << 20)
    topics = Topics(prefix="", requests="req", model_prefix="model.", retry_prefix="retry.", dlq="dlq",
                    results="res")  # fmt: skip
    cfg = PlanConfig(router_id="r", topics=topics, max_attempts=3, retry_backoff_ms=(100, 200),
                     max_message_bytes=1 << 20, dlq_keep_bytes=16)  # fmt: skip
    far = 10**12
    index = HeadIndex.build(
        [Head(head_id=f"h{i}", model_id="m", partition=i, expires_at_ms=far) for i in (0, 1)]
    )
    p = plan(parts, {}, index, Policy(), RouterMemory(), 1_000_000, 1_000_000, random.Random(1), cfg, Stats())
    routed = [o for o in p.outcomes if isinstance(o, Routed)]
    assert len(routed) == 6
    assert {o.head_id for o in routed} == {"h1"}


# --- producer batches ------------------------------------------------------------------------------------


class _Cluster:
    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 0


class _Producer:
    """``create_batch``/``send_batch``/``send`` as ``AIOKafkaProducer`` has them (metadata known, partitions
    checked), over aiokafka's real accumulator; a sender task drains it as aiokafka's sender does (one batch
    per partition at a time) and gives each drained batch the verdict of ``refuse`` over its values."""

    def __init__(self, refuse: Any, linger_ms: int = 2) -> None:
        self._max_request_size = 1 << 20
        self._acc = MessageAccumulator(_Cluster(), 256 * 1024, 0, 40.0, linger_ms=linger_ms)
        self._refuse = refuse
        self.offsets: dict[TopicPartition, int] = defaultdict(int)
        self.log: dict[TopicPartition, list[bytes]] = defaultdict(list)
        self.batches: list[list[bytes]] = []
        self._task = asyncio.create_task(self._sender())

    def create_batch(self) -> BatchBuilder:
        return self._acc.create_builder()

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        assert 0 <= partition < 8, "Unrecognized partition"
        return await self._acc.add_batch(batch, TopicPartition(topic, partition), 40.0)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: Any = None) -> Any:  # fmt: skip
        assert not (value is None and key is None), "Need at least one: key or value"
        p = 0 if partition is None else partition
        assert 0 <= p < 8, "Unrecognized partition"
        return await self._acc.add_message(TopicPartition(topic, p), key, value, 40.0, timestamp_ms=timestamp_ms,
                                           headers=headers or [])  # fmt: skip

    async def _sender(self) -> None:
        while True:
            await self._acc.waiter()
            nodes, _ = self._acc.drain_by_nodes(ignore_nodes=set())
            drained = [b for per_node in nodes.values() for b in per_node.values()]
            if not drained:
                await asyncio.sleep(0.001)  # lingering: look again
                continue
            await asyncio.sleep(0.002)  # the round trip
            for b in drained:
                values = [r.value for r in DefaultRecordBatch(b.get_data_buffer())]
                self.batches.append(values)
                err = self._refuse(values)
                if err is not None:
                    b.failure(exception=err)
                else:
                    b.done(base_offset=self.offsets[b.tp])
                    self.offsets[b.tp] += len(values)
                    self.log[b.tp] += values

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


def _too_large_if_poisoned(values: list[bytes]) -> BaseException | None:
    """The broker refuses a whole record batch for one record in it (too large for the topic, an invalid
    record): every record of the batch gets the error."""
    return (
        MessageSizeTooLargeError("batch holds a record over the topic's limit")
        if b"poison" in values
        else None
    )


async def test_batches_keep_order_and_ack_each_record_once() -> None:
    """The happy path over aiokafka's accumulator: several producer batches per partition, each record
    acknowledged once and in order in its partition."""
    producer = _Producer(lambda values: None)
    try:
        sends = [Send("model.m", b"%05d" % i + b"." * 2000, None, i % 3, []) for i in range(600)]
        report = await publish(producer, sends, RetryBudget(attempts=2, max_s=5))
    finally:
        await producer.stop()
    assert len(report.acked) == 600
    assert not report.fatal
    assert not report.unsent
    for p in range(3):
        got = [int(v[:5]) for v in producer.log[TopicPartition("model.m", p)]]
        assert got == list(range(p, 600, 3))
    assert max(len(b) for b in producer.batches) > 1


async def test_a_fatal_batch_error_dead_letters_only_the_record_at_fault() -> None:
    """Ten records for one head's partition, one of which the broker refuses (it fails the whole record batch).
    ``_round`` promises to pin the error on its record by sending that batch's records alone; only the
    culprit may end up fatal (a dead letter), the nine others must be acknowledged."""
    producer = _Producer(_too_large_if_poisoned)
    try:
        sends = [Send("model.m", b"job-%d" % i, None, 0, []) for i in range(10)]
        sends[4].value = b"poison"
        report = await publish(producer, sends, RetryBudget(attempts=2, max_s=5))
    finally:
        await producer.stop()
    assert [s.value for s in report.fatal] == [b"poison"], (
        f"{len(report.fatal)} fatal; batches the broker saw: {producer.batches}"
    )
    assert len(report.acked) == 9


async def test_a_record_the_batch_refuses_is_that_records_error_not_the_rounds() -> None:
    """``producer.send`` raising for one record (a value or header of a type the record format can not hold)
    was that record's fatal error; in a batch, ``BatchBuilder.append`` raises the same error, and it must
    stay that record's: the other records are published and the round returns."""
    producer = _Producer(lambda values: None)
    try:
        sends = [Send("model.m", b"job-%d" % i, None, 0, [("x-route-head", b"h1")]) for i in range(4)]
        sends[2].headers = [("x-route-head", "h1")]  # type: ignore[list-item]  # str, not bytes
        report = await publish(producer, sends, RetryBudget(attempts=2, max_s=5))
    finally:
        await producer.stop()
    assert [s.value for s in report.fatal] == [b"job-2"]
    assert isinstance(report.fatal[0].error, TypeError)
    assert len(report.acked) == 3
