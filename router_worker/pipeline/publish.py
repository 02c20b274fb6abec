"""Publishing a batch to Kafka with every result classified, per record.

A record's send ends one of three ways:

- **acknowledged** by the broker;
- **fatal**: an error that sending again can not cure (too large for the producer or broker, a partition the
  topic does not have, no authorisation). The caller turns it into a dead letter (reason ``publish_error``);
  it never rewinds a batch;
- **unsent**: a retriable error (broker unreachable, leader moving, timeout) still failing after the bounded
  retries, or the producer closing. The caller leaves it uncommitted, so it is read and sent again.

Retriable errors are retried with ``tenacity`` (exponential back-off with jitter, bounded in attempts and
time). Only what was not acknowledged is sent again. All sends of a round are enqueued first and their
futures gathered after: never one awaited round trip per record. Records bound for one partition travel as
one producer batch (see :func:`_round`). The router and the worker SDK both publish through :func:`publish`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    ProducerClosed,
    RequestTimedOutError,
)
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from router_worker.pipeline.messages import (
    H_DLQ_HEADERS_DROPPED,
    H_DLQ_KEY_TRUNCATED,
    H_DLQ_SHA256,
    H_DLQ_TRUNCATED,
    H_JOB_ID,
    Headers,
    dead_letter_headers,
    headers_size,
    origin_only,
)
from schemas.envelope import MSGPACK, content_type_of, decode_raw

log = logging.getLogger(__name__)

_ALWAYS_RETRIABLE = (KafkaTimeoutError, KafkaConnectionError, RequestTimedOutError, NodeNotReadyError)


@dataclass(slots=True)
class Send:
    """One record to publish, and after :func:`publish`, what became of it."""

    topic: str
    value: bytes | None
    key: bytes | None
    partition: int | None
    headers: Headers
    error: BaseException | None = None
    """The last error (None when acknowledged)."""
    size: int = -1
    """A bound its value, key and headers (in bytes) stay within, when the plan knows one (-1: measured when
    sent). Whoever changes the headers of a send changes this too."""


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How long retriable errors are retried before the records are left unsent."""

    attempts: int = 5
    max_s: float = 30.0
    initial_s: float = 0.05
    max_wait_s: float = 2.0


@dataclass(slots=True)
class PublishReport:
    acked: list[Send] = field(default_factory=list)
    fatal: list[Send] = field(default_factory=list)
    unsent: list[Send] = field(default_factory=list)
    tries: int = 0

    @property
    def complete(self) -> bool:
        return not self.unsent


class _Retriable(Exception):
    pass


def is_retriable(exc: BaseException) -> bool:
    """Whether sending the same record again may succeed."""
    if isinstance(exc, ProducerClosed):
        return True  # shutting down: not the record's fault, it is read again by the next owner
    if isinstance(exc, _ALWAYS_RETRIABLE):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    return False  # AssertionError (unknown partition), ValueError, TypeError: the record itself is wrong


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_RECORD_OVERHEAD = 512
"""More than a record's framing adds to its key, value and headers (varints, attributes, header counts)."""


async def _outcomes(futures: Sequence[Any]) -> list[BaseException | None]:
    """Wait for the futures (errors raised before enqueue stand in for theirs) and give each one's error."""
    pending = [f for f in futures if not isinstance(f, BaseException)]
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    out: list[BaseException | None] = []
    for f in futures:
        if isinstance(f, BaseException):
            out.append(f)
        elif f.cancelled():
            out.append(ProducerClosed())
        else:
            out.append(f.exception())
    return out


async def _submit(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int) -> Any:
    try:
        return await producer.send_batch(batch, topic, partition=partition)
    except Exception as exc:  # a partition the topic lacks, metadata timeout, closed: its records' error
        return exc


async def _one(producer: AIOKafkaProducer, s: Send) -> Any:
    try:
        return await producer.send(s.topic, s.value, key=s.key, partition=s.partition, headers=s.headers)
    except Exception as exc:  # refused before enqueue: size, partition, metadata timeout, closed
        return exc


def _size(s: Send) -> int:
    return len(s.value or b"") + len(s.key or b"") + headers_size(s.headers)


async def _round(producer: AIOKafkaProducer, sends: Sequence[Send]) -> list[BaseException | None]:
    """Enqueue every send, then gather: one wait for the whole round.

    Records with a partition go in one batch per partition (``create_batch``/``send_batch``: a third of the
    CPU of a ``send`` per record, and one future per batch). A batch's error is each of its records' error,
    except a fatal one: then each of its records is sent again in a batch of its own (:func:`_alone`), so a
    record the broker refuses never takes its neighbours to the dead letters. A record the batch can not take
    (it can not be encoded) has that error as its own. Records without a partition (the producer's
    partitioner picks by key) are sent one by one."""
    out: list[BaseException | None] = [None] * len(sends)
    groups: dict[tuple[str, int], list[int]] = {}
    singles: list[int] = []
    # A batch is not checked against the producer's max_request_size as a send is: a record that may be over it
    # goes alone, so the producer refuses it (MessageSizeTooLargeError) instead of the broker taking it.
    roomy = getattr(producer, "_max_request_size", 1 << 20) - _RECORD_OVERHEAD
    for i, s in enumerate(sends):
        if s.partition is None or (s.size if 0 <= s.size <= roomy else _size(s)) > roomy:
            singles.append(i)
        else:
            groups.setdefault((s.topic, s.partition), []).append(i)
    members: list[list[int]] = []
    futures: list[Any] = []
    for (topic, partition), idxs in groups.items():
        batch = producer.create_batch()
        held: list[int] = []
        for i in idxs:
            s = sends[i]
            try:
                if batch.append(key=s.key, value=s.value, timestamp=None, headers=s.headers) is None:  # full
                    if held:
                        members.append(held)
                        futures.append(await _submit(producer, batch, topic, partition))
                    batch, held = producer.create_batch(), []
                    batch.append(key=s.key, value=s.value, timestamp=None, headers=s.headers)  # a first fits
            except Exception as exc:
                members.append([i])
                futures.append(exc)
                continue
            held.append(i)
        if held:
            members.append(held)
            futures.append(await _submit(producer, batch, topic, partition))
    if singles:
        members += [[i] for i in singles]
        futures += [await _one(producer, sends[i]) for i in singles]
    again: list[int] = []
    for idxs, err in zip(members, await _outcomes(futures), strict=True):
        if err is not None and len(idxs) > 1 and not is_retriable(err):
            again += idxs  # which record is at fault: each one, sent in a batch of its own, says
            continue
        for i in idxs:
            out[i] = err
    if again:
        for i, err in zip(again, await _alone(producer, [sends[i] for i in again]), strict=True):
            out[i] = err
    return out


async def _alone(producer: AIOKafkaProducer, sends: Sequence[Send]) -> list[BaseException | None]:
    """Each record in a closed batch of its own: one produce request each, so each gets its own answer (sent
    one by one with ``send``, they would share a batch again: nothing yields between them)."""
    futures: list[Any] = []
    for s in sends:
        if s.partition is None:
            futures.append(await _one(producer, s))
            continue
        try:
            batch = producer.create_batch()
            batch.append(key=s.key, value=s.value, timestamp=None, headers=s.headers)
            batch.close()  # nothing else joins it
        except Exception as exc:
            futures.append(exc)
            continue
        futures.append(await _submit(producer, batch, s.topic, s.partition))
    return await _outcomes(futures)


async def publish(producer: AIOKafkaProducer, sends: Sequence[Send], budget: RetryBudget) -> PublishReport:
    """Send every record; retry the retriable failures within ``budget``; classify each."""
    report = PublishReport()
    pending: list[Send] = list(sends)
    if not pending:
        return report

    async def one_round() -> None:
        nonlocal pending
        report.tries += 1
        results = await _round(producer, pending)
        retry: list[Send] = []
        for s, err in zip(pending, results, strict=True):
            s.error = err
            if err is None:
                report.acked.append(s)
            elif is_retriable(err) and not isinstance(err, ProducerClosed):
                retry.append(s)
            elif isinstance(err, ProducerClosed):
                report.unsent.append(s)
            else:
                report.fatal.append(s)
        pending = retry
        if retry:
            log.warning("%d of %d publishes failed with retriable errors (try %d): %s", len(retry),
                        len(results), report.tries, describe(retry[0].error or Exception()))  # fmt: skip
            raise _Retriable

    retrying = AsyncRetrying(
        stop=stop_after_attempt(budget.attempts) | stop_after_delay(budget.max_s),
        wait=wait_exponential(multiplier=budget.initial_s, max=budget.max_wait_s)
        + wait_random(0, budget.initial_s),
        retry=retry_if_exception_type(_Retriable),
        reraise=False,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await one_round()
    except RetryError:
        report.unsent.extend(pending)
    return report


def truncate_for_dlq(value: bytes | None, limit: int, keep: int) -> tuple[bytes | None, Headers]:
    """The dead letter's value, and the headers that say it was cut.

    The original bytes are kept untouched when they fit within ``limit``; otherwise the first ``keep``
    bytes are kept and ``x-dlq-truncated`` (original size) and ``x-dlq-sha256`` (of the original) are
    added, so ops can fetch and check the original from the request topic while it is retained.
    """
    if value is None or len(value) <= limit:
        return value, []
    digest = hashlib.sha256(value).hexdigest()
    return value[: max(0, min(keep, limit))], [
        (H_DLQ_TRUNCATED, str(len(value)).encode()),
        (H_DLQ_SHA256, digest.encode()),
    ]


KEY_KEEP_BYTES = 256
"""A squeezed dead letter keeps at most this much of the original key."""


def dead_letter_record(value: bytes | None, key: bytes | None, headers: Headers | None, reason: str, error: str,
                       topic: str, partition: int, offset: int, attempt: int, *, limit: int, keep: int,
                       squeeze: bool = False) -> tuple[bytes | None, bytes | None, Headers]:  # fmt: skip
    """The value, key and headers of the dead letter of a record, sized to be publishable.

    The original record (value, key, the producer's headers) is kept untouched when it fits within ``limit``.
    Otherwise, or when ``squeeze`` is asked for (the broker refused the record for its size), the dead
    letter keeps the first ``keep`` bytes of the value, at most :data:`KEY_KEEP_BYTES` of the key and none of
    the producer's headers, and says so (``x-dlq-truncated`` with ``x-dlq-sha256``, ``x-dlq-key-truncated``,
    ``x-dlq-headers-dropped``): ops fetch the original from its coordinates while it is retained.
    """
    size = len(value or b"") + len(key or b"") + headers_size(headers)
    squeeze = squeeze or size > limit
    if not squeeze:
        out_value, cut = truncate_for_dlq(value, limit, keep)
        out = dead_letter_headers(headers, reason, error, topic, partition, offset, attempt) + cut
        out_key = key
    else:
        out_value, cut = truncate_for_dlq(value, min(limit, keep), keep)
        out = (
            dead_letter_headers(origin_only(headers), reason, error, topic, partition, offset, attempt) + cut
        )
        dropped = sum(1 for k, _ in (headers or ()) if k not in dict(out))
        if dropped:
            out.append((H_DLQ_HEADERS_DROPPED, str(dropped).encode()))
        out_key = key
        if key is not None and len(key) > KEY_KEEP_BYTES:
            out_key = key[:KEY_KEEP_BYTES]
            out.append((H_DLQ_KEY_TRUNCATED, str(len(key)).encode()))
    if cut:
        out += _job_id_header(value, headers)
    if out_key is None and out_value is None:
        out_key = b""  # Kafka needs a key or a value
    return out_value, out_key, out


def _job_id_header(value: bytes | None, headers: Headers | None) -> Headers:
    """``x-job-id`` of a dead letter whose value was cut (empty when the original holds no job id): a redrive
    must know the job of every dead letter, and the cut value no longer says."""
    job_id = _job_id_of(value or b"", content_type_of(headers))
    return [(H_JOB_ID, job_id.encode())] if isinstance(job_id, str) and 0 < len(job_id) <= 128 else []


_KEYS_READ = 64
"""Top-level keys read for a job id: an envelope has a few dozen at most."""
_JSON_PEEK_MAX = 256 << 10
"""Largest JSON value decoded for its job id (there is no streaming decoder; msgpack is read key by key)."""


def _job_id_of(value: bytes, content_type: str) -> object:
    """The top-level ``job_id`` of a value too large to route, found without decoding the whole of it: a
    hostile value of a few megabytes of empty maps would take seconds of the event loop and far more memory.
    msgpack is read key by key, other values skipped unbuilt."""
    try:
        if content_type == MSGPACK:
            reader = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(1, len(value)),
                                      max_str_len=1024, max_bin_len=1024, max_array_len=16, max_map_len=16)  # fmt: skip
            reader.feed(value)
            for _ in range(min(reader.read_map_header(), _KEYS_READ)):
                if reader.unpack() == "job_id":
                    return reader.unpack()
                reader.skip()
        elif len(value) <= _JSON_PEEK_MAX:
            env = decode_raw(value, content_type)
            return env.get("job_id") if isinstance(env, dict) else None
    except Exception:  # not a map, cut short, a key too large to be one of ours: nothing to name
        return None
    return None


async def publish_dead_letter(producer: AIOKafkaProducer, dlq_topic: str, rec: Any, reason: str, error: str,
                              attempt: int, *, limit: int, keep: int, budget: RetryBudget) -> bool:  # fmt: skip
    """Dead-letter a consumed record (one with ``value``, ``key``, ``headers``, ``topic``, ``partition``,
    ``offset``): as it is when it fits, squeezed when the broker refused it for good. True once acknowledged;
    False when it was not (the caller must not commit past the record)."""
    for squeeze in (False, True):
        value, key, headers = dead_letter_record(rec.value, rec.key, list(rec.headers or ()), reason, error,
                                                 rec.topic, rec.partition, rec.offset, attempt, limit=limit,
                                                 keep=keep, squeeze=squeeze)  # fmt: skip
        report = await publish(producer, [Send(dlq_topic, value, key, None, headers)], budget)
        if report.acked:
            return True
        if report.unsent:
            return False
    return False
