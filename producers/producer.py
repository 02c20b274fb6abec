"""The producer SDK: build, validate, encode and publish jobs to the request topic.

``JobProducer`` is async and batches naturally: :meth:`submit` returns once the job is queued and hands
back its id; :meth:`submit_many` publishes many and waits for every acknowledgement. ``SyncJobProducer``
wraps it for code without an event loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from router_worker.clock import now_ms
from router_worker.pipeline.kafka import make_producer
from router_worker.pipeline.messages import headers_size
from router_worker.settings import Settings
from router_worker.topics import Topics
from schemas.envelope import MSGPACK, DeadLetterReason, EnvelopeError, encode_job, validate

T = TypeVar("T")


def build_job(model_type: str, payload: Any = None, *, job_id: str | None = None,
              **fields: Any) -> dict[str, Any]:  # fmt: skip
    """A validated job envelope as a dict (raises EnvelopeError naming the bad field)."""
    doc: dict[str, Any] = {"v": 1, "job_id": uuid.uuid4().hex if job_id is None else job_id,
                           "model_type": model_type, "created_at": now_ms()}  # fmt: skip
    if payload is not None:
        doc["payload"] = payload
    doc.update((k, v) for k, v in fields.items() if v is not None)
    validate(doc)
    return doc


class JobProducer:
    def __init__(self, settings: Settings, content_type: str = MSGPACK,
                 producer: AIOKafkaProducer | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.topic = Topics.from_settings(settings).requests
        self.content_type = content_type
        self._producer = producer
        self._owned = producer is None
        self._max_pending = 10_000
        self._pending: list[asyncio.Future[Any]] = []

    async def start(self) -> None:
        if self._producer is None:
            self._producer = make_producer(self.settings)
        if self._owned:
            await self._producer.start()

    async def stop(self) -> None:
        await self.flush()
        if self._producer is not None and self._owned:
            await self._producer.stop()

    async def __aenter__(self) -> JobProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, model_type: str, payload: Any = None, *, job_id: str | None = None,
                     headers: Mapping[str, str] | None = None, **fields: Any) -> str:  # fmt: skip
        """Queue one job; returns its job id. Call :meth:`flush` (or use the context manager) to wait."""
        assert self._producer is not None, "call start() first"
        doc = build_job(model_type, payload, job_id=job_id, **fields)
        hdrs = [("content-type", self.content_type.encode())]
        if headers:
            hdrs += [(k, v.encode()) for k, v in headers.items()]
        key = (doc.get("session_id") or doc["job_id"]).encode()
        value = encode_job(doc, self.content_type)
        size, limit = len(value) + len(key) + headers_size(hdrs), self.settings.kafka_max_message_bytes
        if size > limit:  # counted as the routers count it, who would dead-letter it as too_large
            raise EnvelopeError(DeadLetterReason.TOO_LARGE, f"the job is {size} bytes (value, key and headers), "
                                f"over ROUTER_KAFKA_MAX_MESSAGE_BYTES={limit}")  # fmt: skip
        fut = await self._producer.send(self.topic, value, key=key, headers=hdrs)
        self._pending.append(fut)
        if len(self._pending) >= self._max_pending:  # bound what we hold in memory
            await self.flush()
        return str(doc["job_id"])

    async def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Publish many jobs (each a mapping with ``model_type`` and optional fields) and wait for all acks."""
        ids = []
        for j in jobs:
            fields = dict(j)
            model_type = fields.pop("model_type")
            payload = fields.pop("payload", None)
            ids.append(await self.submit(model_type, payload, **fields))
        await self.flush()
        return ids

    async def flush(self) -> None:
        """Wait until the broker acknowledged every job submitted so far (raises the first failure)."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


class SyncJobProducer:
    """A blocking wrapper: runs a JobProducer on a private event loop thread."""

    def __init__(self, settings: Settings, content_type: str = MSGPACK) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="job-producer", daemon=True)
        self._thread.start()
        self._inner = JobProducer(settings, content_type)
        self._call(self._inner.start())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def submit(self, model_type: str, payload: Any = None, **fields: Any) -> str:
        return self._call(self._inner.submit(model_type, payload, **fields))

    def flush(self) -> None:
        self._call(self._inner.flush())

    def close(self) -> None:
        try:
            self._call(self._inner.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> SyncJobProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
