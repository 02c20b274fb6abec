"""Partition counts of model topics, from broker metadata.

A head is addressed by its partition of ``model.<model_id>``; the producer refuses a partition the topic does
not have. :class:`ModelTopology` keeps each model topic's partition count for a router, read from the very
cluster metadata its producer checks a send against, so "valid" here means "the send will be accepted".
:func:`topic_partitions` is the one-shot lookup for commands (``heads register``, ``worker --partition``).

Growing a topic (CreatePartitions, on brokers that have it) is seen within ``refresh_s``; a topic never
shrinks, so a count known once stays safe to use while the broker can not be reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

from router_worker.core.validity import partition_problem
from router_worker.pipeline.kafka import ensure_topics, make_admin
from router_worker.settings import Settings
from router_worker.topics import Topics

log = logging.getLogger(__name__)


class ModelTopology:
    """Partition counts of model topics as a router's producer sees them.

    Give it the settings and the router's started ``AIOKafkaProducer``. Call :meth:`ensure` with the model
    topics of the heads in the current snapshot before deciding a batch (it returns at once, without I/O,
    when every topic is known and the last refresh is younger than ``refresh_s``); then :meth:`partitions`
    answers synchronously, e.g. as ``partitions_of`` of :func:`router_worker.core.validity.split_valid`.

    A model topic missing on the broker is created with ``settings.model_partitions`` before its count is
    read (never left to the broker's auto-creation with its own default). Broker errors are logged as
    warnings and never raised: known counts are kept; a topic whose count could not be read stays unknown
    and is tried again after ``retry_s``, doubling with each failure up to ``refresh_s`` (a lookup that fails
    can take up to ``kafka_request_timeout_ms``; this bounds how often a caller waits on one).
    """

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        *,
        refresh_s: float = 30.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self._clock = clock
        self._timeout_s = settings.kafka_request_timeout_ms / 1000
        self._counts: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._refreshed_at = clock()
        self._lock = asyncio.Lock()

    def partitions(self, topic: str) -> int | None:
        """The topic's partition count as last fetched; None while it is not known."""
        return self._counts.get(topic)

    def known(self) -> dict[str, int]:
        """Every known count (a copy), for logs and tests."""
        return dict(self._counts)

    async def ensure(self, topics: Iterable[str]) -> None:
        """Learn the counts of ``topics`` not known yet, and refresh the known ones every ``refresh_s``."""
        now = self._clock()
        unknown = {t for t in topics if t not in self._counts and self._retry_at.get(t, 0.0) <= now}
        if not unknown and now - self._refreshed_at < self.refresh_s:
            return
        async with self._lock:
            unknown = {t for t in unknown if t not in self._counts}
            if unknown:
                await self._learn(sorted(unknown))
            if self._clock() - self._refreshed_at >= self.refresh_s:
                await self._refresh()

    async def _learn(self, topics: list[str]) -> None:
        try:
            await asyncio.wait_for(
                ensure_topics(self.settings, [(t, self.settings.model_partitions) for t in topics]),
                self._timeout_s,
            )
        except Exception as exc:
            log.warning("model topics %s: could not make sure they exist: %r", ", ".join(topics), exc)
        client: Any = self.producer.client
        for topic in topics:
            try:
                # Tracked by the producer's metadata from now on, so refreshes include it (and the producer
                # checks a send against the same metadata these counts come from).
                await asyncio.wait_for(client.add_topic(topic), self._timeout_s)
                parts = await asyncio.wait_for(self.producer.partitions_for(topic), self._timeout_s)
            except Exception as exc:
                n = self._failures[topic] = self._failures.get(topic, 0) + 1
                delay = min(max(self.retry_s, self.refresh_s), self.retry_s * 2 ** (n - 1))
                self._retry_at[topic] = self._clock() + delay
                log.warning(
                    "model topic %s: partition count not known (%r); its heads get no jobs", topic, exc
                )
                continue
            self._set(topic, len(parts))

    async def _refresh(self) -> None:
        self._refreshed_at = self._clock()
        if not self._counts:
            return
        client: Any = self.producer.client
        try:
            updated = await asyncio.wait_for(client.force_metadata_update(), self._timeout_s)
        except Exception as exc:
            log.warning("model topics: metadata refresh failed (%r); keeping the counts known", exc)
            return
        if not updated:
            log.warning("model topics: metadata refresh failed; keeping the counts known")
            return
        for topic in list(self._counts):
            parts = client.cluster.partitions_for_topic(topic)
            if parts:  # absent from this answer (a transient error): keep what we knew
                self._set(topic, len(parts))

    def _set(self, topic: str, count: int) -> None:
        old = self._counts.get(topic)
        if old != count:
            log.info("model topic %s: %d partitions%s", topic, count, "" if old is None else f" (was {old})")
        self._counts[topic] = count
        self._retry_at.pop(topic, None)
        self._failures.pop(topic, None)


async def topics_partitions(settings: Settings, topics: Iterable[str]) -> dict[str, int | None]:
    """Partition counts of ``topics`` from one metadata request over a short-lived admin client; None for a
    topic that does not exist. Never creates a topic. Raises the client's error when the broker can not be
    asked (``asyncio.TimeoutError`` after ``kafka_request_timeout_ms``)."""
    wanted = list(dict.fromkeys(topics))
    timeout_s = settings.kafka_request_timeout_ms / 1000
    admin = make_admin(settings)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        # All topics (a request naming topics may auto-create them on some brokers).
        described = await asyncio.wait_for(admin.describe_topics(), timeout_s)
    finally:
        await admin.close()
    found: dict[str, int] = {
        t["topic"]: len(t["partitions"]) for t in described if not t.get("error_code") and t.get("partitions")
    }
    return {t: found.get(t) for t in wanted}


async def topic_partitions(settings: Settings, topic: str) -> int | None:
    """One topic's partition count (see :func:`topics_partitions`); None when it does not exist."""
    return (await topics_partitions(settings, [topic]))[topic]


async def check_head_partition(settings: Settings, model_id: str, partition: int) -> str | None:
    """Why a head of ``model_id`` can not own ``partition`` (a one-line message), or None when it can.

    The bound is the model topic's real partition count, or ``settings.model_partitions`` when the topic
    does not exist yet (it will be created with that many). When the broker can not be asked, the bound is
    ``settings.model_partitions`` too and a warning is logged. For commands; routers use ModelTopology.
    """
    topic = Topics.from_settings(settings).model(model_id)
    if partition < 0:
        return partition_problem(partition, topic, None)
    n = settings.model_partitions
    try:
        count = await topic_partitions(settings, topic)
    except Exception as exc:
        log.warning(
            "could not read the partitions of %s (%r); checking against ROUTER_MODEL_PARTITIONS", topic, exc
        )
        if partition < n:
            return None
        return f"partition {partition} out of range: ROUTER_MODEL_PARTITIONS is {n} (valid: 0..{n - 1})"
    if count is None:
        if partition < n:
            return None
        return (
            f"partition {partition} out of range: {topic} does not exist yet and will be created with "
            f"{n} partition{'' if n == 1 else 's'} (ROUTER_MODEL_PARTITIONS; valid: 0..{n - 1})"
        )
    problem = partition_problem(partition, topic, count)
    return None if problem is None else f"{problem} (valid: 0..{count - 1})"
