"""``router-worker bench broker``: what one hop through the broker costs, before any router.

A producer sends stamped records at a fixed rate into a fresh topic; a consumer (no group, every partition
assigned) takes each record's arrival time. One row per (partitions, consumer fetch wait, rate), so the
router's latency can be read against the floor its broker sets: a router's job makes two such hops (request
topic, then model topic), and the bare pipe of ``bench e2e`` makes the same two.

What it shows on the embedded broker (Tansu) and not on Apache Kafka: a fetch that waits for records at the
broker is often answered well after records arrive (a sparse stream's latency grows with the fetch wait: about
a quarter of it at the median, half at p99), and a produce request costs more the more partitions it holds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass

from aiokafka import TopicPartition

from router_worker.pipeline.kafka import ensure_topics, make_admin, make_consumer, make_producer
from router_worker.settings import Settings

DEFAULT_CASES: tuple[tuple[int, int, float, int], ...] = (
    # (partitions, fetch wait ms, records/s, records)
    (8, 5, 2000.0, 2000),
    (8, 50, 2000.0, 2000),
    (100, 5, 2000.0, 2000),
    (100, 50, 2000.0, 2000),
    (1, 5, 20.0, 60),
    (1, 100, 20.0, 60),
    (1, 500, 20.0, 60),
)


@dataclass(frozen=True, slots=True)
class HopRow:
    partitions: int
    fetch_wait_ms: int
    rate: float
    records: int
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def to_json(self) -> dict[str, object]:
        return {"benchmark": "broker_hop", **asdict(self)}


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


async def one_hop(s: Settings, partitions: int, fetch_wait_ms: int, rate: float, n: int,
                  timeout_s: float = 30.0) -> HopRow:  # fmt: skip
    """Produce ``n`` stamped records at ``rate`` over ``partitions`` (in turn) and time each one's arrival."""
    topic = f"{s.topic_prefix}bench-hop-{uuid.uuid4().hex[:8]}"
    await ensure_topics(s, [(topic, partitions)])
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = make_consumer(s, group_id=None, fetch_max_wait_ms=fetch_wait_ms)
    consumer.assign(tps)
    producer = make_producer(s, linger_ms=0)
    await consumer.start()
    await producer.start()
    latencies: list[float] = []
    try:
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # positions resolved now, before the first stamped record

        async def receive() -> None:
            while len(latencies) < n:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time_ns()
                for recs in batch.values():
                    latencies.extend((now - int(r.value)) / 1e6 for r in recs if r.value)

        receiving = asyncio.create_task(receive())
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - t0) * rate) + 1)
            while sent < due:
                await producer.send(topic, str(time.time_ns()).encode(), partition=sent % partitions)
                sent += 1
            await asyncio.sleep(0.001)
        done, _ = await asyncio.wait([receiving], timeout=timeout_s)
        if not done:
            receiving.cancel()
    finally:
        await producer.stop()
        await consumer.stop()
        await _delete(s, topic)
    ms = sorted(latencies)
    return HopRow(partitions, fetch_wait_ms, rate, n, len(ms), _pct(ms, 0.5), _pct(ms, 0.99),
                  ms[-1] if ms else float("nan"))  # fmt: skip


async def _delete(s: Settings, topic: str) -> None:
    admin = make_admin(s)
    try:
        await admin.start()
        await admin.delete_topics([topic])
    except Exception:  # the topic is the benchmark's own; a broker that keeps it loses nothing
        pass
    finally:
        await admin.close()


async def run_broker_bench(settings: Settings,
                           cases: tuple[tuple[int, int, float, int], ...] = DEFAULT_CASES) -> list[HopRow]:  # fmt: skip
    """Every case against the configured broker, or an embedded one started for it."""
    from router_worker.runtime import runtime

    rows = []
    async with runtime(settings) as rt:
        for partitions, wait_ms, rate, n in cases:
            rows.append(await one_hop(rt.settings, partitions, wait_ms, rate, n))
    return rows
